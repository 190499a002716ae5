//! Readers for the data set layouts users have (see `datasets/README.md`): they list image and
//! label files, pair them by file name, and decode them.
//!
//! | kind        | images                                      | labels                                              |
//! |-------------|---------------------------------------------|-----------------------------------------------------|
//! | gta5        | `images/*.png`                              | `labels/<same name>` (Cityscapes ids)               |
//! | synthia     | `RGB/*.png`                                 | `GT/LABELS/<same name>` (16-bit, SYNTHIA ids)       |
//! | synscapes   | `img/rgb/*.png`                             | `img/class/<same name>` (Cityscapes ids)            |
//! | cityscapes  | `leftImg8bit/<split>/<city>/*_leftImg8bit.png` | `gtFine/<split>/<city>/*_gtFine_labelIds.png`    |
//! | translated  | `<root>/*.png` (or `<root>/images/*.png`)   | the original set's labels, paired by file name      |

use super::error::{DataError, DataErrorKind};
use super::labels::{LabelEncoding, LabelMap};
use crate::config::{DatasetConfig, DatasetKind, Named, Split};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One sample's files. `id` is stable across runs (the ledger keys on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleFiles {
    pub id: String,
    pub image: PathBuf,
    pub label: PathBuf,
}

/// The samples of a data set, plus the frames skipped because a counterpart was missing.
#[derive(Debug, Clone)]
pub struct Listing {
    pub samples: Vec<SampleFiles>,
    pub skipped: Vec<DataError>,
    pub encoding: LabelEncoding,
}

/// Lists a configured data set; a wrong layout or an empty set is an error.
pub fn list(set: &DatasetConfig) -> Result<Listing, DataError> {
    let root = &set.root;
    match set.kind {
        DatasetKind::Gta5 => flat_pairs(root, "images", "labels", LabelEncoding::CityscapesIds),
        DatasetKind::Synthia => flat_pairs(root, "RGB", "GT/LABELS", LabelEncoding::SynthiaIds),
        DatasetKind::Synscapes => flat_pairs(root, "img/rgb", "img/class", LabelEncoding::CityscapesIds),
        DatasetKind::Cityscapes => cityscapes(root, set.split.unwrap_or(Split::Train).name()),
        DatasetKind::Translated => translated(set),
        DatasetKind::Shard => Err(DataError::new(
            DataErrorKind::Layout,
            root,
            "a shard is read with data::shard::Shard, not listed as PNG files",
        )),
    }
}

fn require_dir(path: &Path, what: &str) -> Result<(), DataError> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(DataError::new(DataErrorKind::Layout, path, format!("missing folder: expected {what}")))
    }
}

/// PNG files directly in `dir`, by file name.
fn png_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>, DataError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| DataError::new(DataErrorKind::Unreadable, dir, format!("cannot list: {e}")))?;
    let mut files = BTreeMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        // Not `is_file()`: a dangling link must be listed so that reading it reports the problem.
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) && !path.is_dir() {
            files.insert(entry.file_name().to_string_lossy().into_owned(), path);
        }
    }
    Ok(files)
}

/// Pairs `images` and `labels` by file name; a frame missing on either side is skipped.
fn pair_by_name(
    images: BTreeMap<String, PathBuf>,
    mut labels: BTreeMap<String, PathBuf>,
    id_of: impl Fn(&str) -> String,
    label_name_of: impl Fn(&str) -> String,
    label_dir: &Path,
) -> (Vec<SampleFiles>, Vec<DataError>) {
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for (name, image) in images {
        match labels.remove(&label_name_of(&name)) {
            Some(label) => samples.push(SampleFiles { id: id_of(&name), image, label }),
            None => skipped.push(DataError::new(
                DataErrorKind::MissingCounterpart,
                &image,
                format!("no label {} in {}", label_name_of(&name), label_dir.display()),
            )),
        }
    }
    for (_, label) in labels {
        skipped.push(DataError::new(DataErrorKind::MissingCounterpart, &label, "label without an image"));
    }
    (samples, skipped)
}

fn non_empty(listing: Listing, root: &Path) -> Result<Listing, DataError> {
    if listing.samples.is_empty() {
        Err(DataError::new(
            DataErrorKind::Empty,
            root,
            format!("no image/label pairs found ({} unpaired file(s))", listing.skipped.len()),
        ))
    } else {
        Ok(listing)
    }
}

fn stem(name: &str) -> String {
    name.rsplit_once('.').map_or(name, |(s, _)| s).to_string()
}

fn flat_pairs(root: &Path, image_dir: &str, label_dir: &str, encoding: LabelEncoding) -> Result<Listing, DataError> {
    let (image_dir, label_dir) = (root.join(image_dir), root.join(label_dir));
    require_dir(&image_dir, "the images folder of this layout")?;
    require_dir(&label_dir, "the labels folder of this layout")?;
    let (samples, skipped) =
        pair_by_name(png_files(&image_dir)?, png_files(&label_dir)?, stem, |n| n.to_string(), &label_dir);
    non_empty(Listing { samples, skipped, encoding }, root)
}

fn cityscapes(root: &Path, split: &str) -> Result<Listing, DataError> {
    let image_root = root.join("leftImg8bit").join(split);
    let label_root = root.join("gtFine").join(split);
    require_dir(&image_root, "leftImg8bit/<split>/<city>/")?;
    require_dir(&label_root, "gtFine/<split>/<city>/")?;
    let mut cities: Vec<_> = std::fs::read_dir(&image_root)
        .map_err(|e| DataError::new(DataErrorKind::Unreadable, &image_root, e.to_string()))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    cities.sort();
    let (mut samples, mut skipped) = (Vec::new(), Vec::new());
    for city in cities {
        let images =
            png_files(&image_root.join(&city))?.into_iter().filter(|(n, _)| n.ends_with("_leftImg8bit.png")).collect();
        let label_dir = label_root.join(&city);
        let labels = if label_dir.is_dir() { png_files(&label_dir)? } else { BTreeMap::new() };
        let labels = labels.into_iter().filter(|(n, _)| n.ends_with("_gtFine_labelIds.png")).collect();
        let (s, k) = pair_by_name(
            images,
            labels,
            |n| n.trim_end_matches("_leftImg8bit.png").to_string(),
            |n| n.replace("_leftImg8bit.png", "_gtFine_labelIds.png"),
            &label_dir,
        );
        samples.extend(s);
        skipped.extend(k);
    }
    non_empty(Listing { samples, skipped, encoding: LabelEncoding::CityscapesIds }, root)
}

/// The folder a `translated` set's images are in: `<root>/images` if there is one, else `<root>`.
pub fn translated_image_dir(root: &Path) -> PathBuf {
    if root.join("images").is_dir() {
        root.join("images")
    } else {
        root.to_path_buf()
    }
}

fn translated(set: &DatasetConfig) -> Result<Listing, DataError> {
    let labels_kind = set.labels_kind.ok_or_else(|| {
        DataError::new(DataErrorKind::Layout, &set.root, "a translated set needs labels_kind (the original set)")
    })?;
    let labels_root = set.labels_root.clone().ok_or_else(|| {
        DataError::new(DataErrorKind::Layout, &set.root, "a translated set needs labels_root (the original set's root)")
    })?;
    let original = list(&DatasetConfig::at(labels_kind, labels_root))?;
    let image_dir = translated_image_dir(&set.root);
    require_dir(&image_dir, "a folder of translated images")?;
    let translated = png_files(&image_dir)?;
    // Pair by file name, never by index: published translated sets lack some frames.
    let labels: BTreeMap<String, PathBuf> = original
        .samples
        .iter()
        .map(|s| (s.image.file_name().unwrap().to_string_lossy().into_owned(), s.label.clone()))
        .collect();
    let label_dir = original.samples[0].label.parent().unwrap_or(Path::new("")).to_path_buf();
    let (samples, mut skipped) = pair_by_name(translated, labels, stem, |n| n.to_string(), &label_dir);
    // A frame the original set skips and that was translated is already reported above
    // (its translated image has no label): each frame once.
    let reported: std::collections::BTreeSet<_> =
        skipped.iter().map(|e| e.path.file_name().map(|n| n.to_owned())).collect();
    skipped
        .extend(original.skipped.into_iter().filter(|e| !reported.contains(&e.path.file_name().map(|n| n.to_owned()))));
    non_empty(Listing { samples, skipped, encoding: original.encoding }, &set.root)
}

/// A decoded RGB image (row-major, 3 bytes per pixel).
#[derive(Debug, Clone)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl Rgb {
    /// This image resampled to `width` x `height` by `alg` (fast_image_resize).
    pub fn resized(
        &self,
        resizer: &mut fast_image_resize::Resizer,
        width: u32,
        height: u32,
        alg: fast_image_resize::ResizeAlg,
    ) -> Rgb {
        use fast_image_resize::{images::Image, images::ImageRef, PixelType, ResizeOptions};
        let src =
            ImageRef::new(self.width, self.height, &self.pixels, PixelType::U8x3).expect("buffer matches its size");
        let mut dst = Image::new(width, height, PixelType::U8x3);
        resizer.resize(&src, &mut dst, &ResizeOptions::new().resize_alg(alg)).expect("same pixel types");
        Rgb { width, height, pixels: dst.into_vec() }
    }
}

/// A decoded label map in training ids (255 = ignore).
#[derive(Debug, Clone)]
pub struct Label {
    pub width: u32,
    pub height: u32,
    pub ids: Vec<u8>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::new(DataErrorKind::Unreadable, path, format!("cannot read: {e}")))
}

pub fn decode_image(path: &Path) -> Result<Rgb, DataError> {
    let bytes = read_file(path)?;
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .map_err(|e| DataError::new(DataErrorKind::Corrupt, path, format!("not a readable PNG image: {e}")))?
        .into_rgb8();
    let (width, height) = image.dimensions();
    Ok(Rgb { width, height, pixels: image.into_raw() })
}

/// Decodes a label PNG without colour conversion (palette indices and 16-bit values stay
/// raw) and maps it to training ids.
pub fn decode_label(path: &Path, map: &LabelMap) -> Result<Label, DataError> {
    let bytes = read_file(path)?;
    let corrupt = |e: png::DecodingError| {
        DataError::new(DataErrorKind::Corrupt, path, format!("not a readable PNG label map: {e}"))
    };
    let mut decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(corrupt)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| DataError::new(DataErrorKind::Corrupt, path, "label map too large"))?;
    let mut buffer = vec![0u8; size];
    let info = reader.next_frame(&mut buffer).map_err(corrupt)?;
    let channels = info.color_type.samples();
    let sixteen_bit = info.bit_depth == png::BitDepth::Sixteen;
    if !sixteen_bit && info.bit_depth != png::BitDepth::Eight {
        return Err(DataError::new(
            DataErrorKind::Corrupt,
            path,
            format!("label bit depth {:?}: expected 8 or 16 bits", info.bit_depth),
        ));
    }
    let bytes_per_pixel = channels * if sixteen_bit { 2 } else { 1 };
    let (width, height) = (info.width, info.height);
    let mut ids = Vec::with_capacity((width * height) as usize);
    let out_of_map = |bad| {
        DataError::new(
            DataErrorKind::LabelOutOfMap,
            path,
            format!("label id {bad} is outside the {:?} map", map.encoding),
        )
    };
    for row in buffer.chunks_exact(info.line_size).take(height as usize) {
        if bytes_per_pixel == 1 {
            map.extend_train_ids(&row[..width as usize], &mut ids).map_err(out_of_map)?;
            continue;
        }
        // The class id is in the first channel (SYNTHIA: the 16-bit R channel).
        for pixel in row.chunks_exact(bytes_per_pixel).take(width as usize) {
            let stored = if sixteen_bit { u16::from_be_bytes([pixel[0], pixel[1]]) } else { pixel[0] as u16 };
            let id = map.train_id(stored).map_err(out_of_map)?;
            ids.push(id);
        }
    }
    Ok(Label { width, height, ids })
}

/// Decodes one sample and checks that image and label agree in size.
pub fn decode_sample(files: &SampleFiles, map: &LabelMap) -> Result<(Rgb, Label), DataError> {
    let image = decode_image(&files.image)?;
    let label = decode_label(&files.label, map)?;
    if (image.width, image.height) != (label.width, label.height) {
        return Err(DataError::new(
            DataErrorKind::SizeMismatch,
            &files.label,
            format!(
                "label is {}x{} but its image {} is {}x{}",
                label.width,
                label.height,
                files.image.display(),
                image.width,
                image.height
            ),
        ));
    }
    Ok((image, label))
}
