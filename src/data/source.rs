//! Where a loader's samples come from: PNG files in a data set layout, or a packed shard.

use super::augment::{Augmented, Augmenter, Geometry};
use super::datasets::{self, Label, Listing, Rgb};
use super::error::DataError;
use super::labels::LabelMap;
use super::shard::Shard;
use crate::config::{DatasetConfig, DatasetKind};
use rand::Rng;
use std::sync::Arc;

/// A change of a sample's look made as it is loaded (online FDA: `translate::OnlineFda`),
/// from the image and a draw of the sample's random stream alone, so it is deterministic for
/// a seed. Labels are untouched.
pub trait Restyle: Send + Sync {
    fn restyle(&self, image: &Rgb, draw: u64) -> Result<Rgb, DataError>;
}

pub enum SampleSource {
    Files {
        listing: Listing,
        map: LabelMap,
    },
    Shard(Shard),
    /// Another source's samples, restyled on every load.
    Restyled {
        raw: Arc<SampleSource>,
        restyle: Arc<dyn Restyle>,
    },
}

impl SampleSource {
    /// Opens a configured data set with the label map for `classes`.
    pub fn open(set: &DatasetConfig, classes: usize) -> Result<SampleSource, DataError> {
        if set.kind == DatasetKind::Shard {
            let shard = Shard::open(&set.root)?;
            if shard.classes != classes {
                return Err(DataError::new(
                    super::error::DataErrorKind::Layout,
                    &set.root,
                    format!("shard was packed for {} classes, the config trains {classes}", shard.classes),
                ));
            }
            return Ok(SampleSource::Shard(shard));
        }
        let listing = datasets::list(set)?;
        let map = LabelMap::new(listing.encoding, classes)
            .map_err(|reason| DataError::new(super::error::DataErrorKind::Layout, &set.root, reason))?;
        Ok(SampleSource::Files { listing, map })
    }

    pub fn len(&self) -> usize {
        match self {
            SampleSource::Files { listing, .. } => listing.samples.len(),
            SampleSource::Shard(shard) => shard.len(),
            SampleSource::Restyled { raw, .. } => raw.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn id(&self, i: usize) -> &str {
        match self {
            SampleSource::Files { listing, .. } => &listing.samples[i].id,
            SampleSource::Shard(shard) => &shard.entries[i].id,
            SampleSource::Restyled { raw, .. } => raw.id(i),
        }
    }

    /// Width and height of sample `i` without decoding its pixels.
    pub fn dimensions(&self, i: usize) -> Result<(u32, u32), DataError> {
        match self {
            SampleSource::Files { listing, .. } => {
                let path = &listing.samples[i].image;
                image::image_dimensions(path).map_err(|e| {
                    DataError::new(
                        super::error::DataErrorKind::Corrupt,
                        path,
                        format!("cannot read the PNG header: {e}"),
                    )
                })
            }
            SampleSource::Shard(shard) => Ok((shard.entries[i].width, shard.entries[i].height)),
            SampleSource::Restyled { raw, .. } => raw.dimensions(i),
        }
    }

    /// Frames skipped while listing (a counterpart missing).
    pub fn skipped(&self) -> &[DataError] {
        match self {
            SampleSource::Files { listing, .. } => &listing.skipped,
            SampleSource::Shard(_) => &[],
            SampleSource::Restyled { raw, .. } => raw.skipped(),
        }
    }

    /// The full sample, decoded, in training ids (restyled with a draw fixed by `i`).
    pub fn load_full(&self, i: usize) -> Result<(Rgb, Label), DataError> {
        match self {
            SampleSource::Files { listing, map } => datasets::decode_sample(&listing.samples[i], map),
            SampleSource::Shard(shard) => {
                let (columns, label) = shard.sample(i)?;
                let e = &shard.entries[i];
                let mut pixels = vec![0; columns.len()];
                super::augment::transpose_rgb(columns, &mut pixels, e.height, e.width);
                Ok((
                    Rgb { width: e.width, height: e.height, pixels },
                    Label { width: e.width, height: e.height, ids: label.to_vec() },
                ))
            }
            SampleSource::Restyled { raw, restyle } => {
                let (rgb, label) = raw.load_full(i)?;
                Ok((restyle.restyle(&rgb, i as u64)?, label))
            }
        }
    }

    /// The image of sample `i` alone, decoded (its label is not read: the selection rounds
    /// score images without seeing a label).
    pub fn load_image(&self, i: usize) -> Result<Rgb, DataError> {
        match self {
            SampleSource::Files { listing, .. } => datasets::decode_image(&listing.samples[i].image),
            SampleSource::Shard(_) | SampleSource::Restyled { .. } => self.load_full(i).map(|(rgb, _)| rgb),
        }
    }

    /// Sample `i` with a random geometry drawn from `rng`.
    pub fn load_augmented(
        &self,
        i: usize,
        augmenter: &mut Augmenter,
        rng: &mut impl Rng,
    ) -> Result<Augmented, DataError> {
        match self {
            SampleSource::Files { .. } => {
                let (rgb, label) = self.load_full(i)?;
                let geometry: Geometry = augmenter.draw_geometry(rgb.width, rgb.height, rng);
                Ok(augmenter.apply(&rgb.pixels, &label.ids, geometry))
            }
            SampleSource::Shard(shard) => {
                let (columns, label) = shard.sample(i)?;
                let e = &shard.entries[i];
                let geometry: Geometry = augmenter.draw_geometry(e.width, e.height, rng);
                Ok(augmenter.apply_column_major(columns, label, geometry))
            }
            SampleSource::Restyled { raw, restyle } => {
                // The draw first, then the geometry: the same rng stream, so a seed fixes both.
                let draw: u64 = rng.gen();
                let (rgb, label) = raw.load_full(i)?;
                let rgb = restyle.restyle(&rgb, draw)?;
                let geometry: Geometry = augmenter.draw_geometry(rgb.width, rgb.height, rng);
                Ok(augmenter.apply(&rgb.pixels, &label.ids, geometry))
            }
        }
    }
}
