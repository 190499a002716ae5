//! `adamcu predict` writes, for each image, its training-id mask (`<id>.png`), the mask in the
//! Cityscapes palette (`<id>_color.png`) and an overlay on the image (`<id>_overlay.png`);
//! `score_folder` scores such masks against a labelled set, so any method's outputs compare.

use crate::data::datasets::{self, Rgb};
use crate::data::labels::{palette_colour, LabelEncoding, LabelMap, IGNORE};
use crate::data::source::SampleSource;
use crate::train::eval::{predict_full, Confusion, EvalOptions};
use crate::train::Trainer;
use anyhow::{bail, Context, Result};
use image::{GrayImage, RgbImage};
use std::path::{Path, PathBuf};

pub fn colourise(ids: &[u8], classes: usize) -> Vec<u8> {
    ids.iter().flat_map(|&id| palette_colour(id, classes)).collect()
}

pub fn predict_folder(trainer: &Trainer, images: &Path, out: &Path, options: &EvalOptions) -> Result<usize> {
    std::fs::create_dir_all(out)?;
    let mut files: Vec<_> = std::fs::read_dir(images)
        .with_context(|| format!("{}: cannot list", images.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no PNG images to predict", images.display());
    }
    let classes = trainer.config.data.classes;
    tch::no_grad(|| -> Result<()> {
        for path in &files {
            let rgb: Rgb = datasets::decode_image(path)?;
            let prediction = predict_full(&trainer.model, &trainer.normaliser, &rgb, options).to_kind(tch::Kind::Uint8);
            let n = prediction.numel();
            let mut ids = vec![0u8; n];
            prediction.to_device(tch::Device::Cpu).copy_data(&mut ids, n);
            let stem = path.file_stem().unwrap().to_string_lossy().replace("_leftImg8bit", "");
            let (w, h) = (rgb.width, rgb.height);
            let colour = colourise(&ids, classes);
            let overlay: Vec<u8> =
                rgb.pixels.iter().zip(&colour).map(|(&a, &b)| ((a as u16 + b as u16) / 2) as u8).collect();
            GrayImage::from_raw(w, h, ids).unwrap().save(out.join(format!("{stem}.png")))?;
            RgbImage::from_raw(w, h, colour).unwrap().save(out.join(format!("{stem}_color.png")))?;
            RgbImage::from_raw(w, h, overlay).unwrap().save(out.join(format!("{stem}_overlay.png")))?;
        }
        Ok(())
    })?;
    Ok(files.len())
}

/// How a folder of prediction masks encodes classes (`eval --ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PredictionIds {
    /// By file name: `<id>.png` holds training ids (as `adamcu predict` writes),
    /// `<id>_labelIds.png` or `<id>_leftImg8bit.png` Cityscapes label ids (as the Cityscapes
    /// evaluation scripts and most other tools take them).
    Auto,
    /// Training ids 0..classes-1 (255: no class).
    Train,
    /// Cityscapes label ids, mapped to training ids; an id outside them counts as no class.
    Label,
}

/// The prediction file of sample `id` in `dir` and what it holds.
fn prediction_file(dir: &Path, id: &str, ids: PredictionIds) -> Result<Option<(PathBuf, PredictionIds)>> {
    let train = [dir.join(format!("{id}.png"))];
    let label = [dir.join(format!("{id}_labelIds.png")), dir.join(format!("{id}_leftImg8bit.png"))];
    let found = |files: &[PathBuf], kind| files.iter().find(|f| f.is_file()).map(|f| (f.clone(), kind));
    Ok(match ids {
        PredictionIds::Train => found(&train, PredictionIds::Train),
        PredictionIds::Label => found(&label, PredictionIds::Label),
        PredictionIds::Auto => match (found(&train, PredictionIds::Train), found(&label, PredictionIds::Label)) {
            (Some(a), Some(b)) => bail!(
                "{} and {}: two predictions for {id}; say which to read with --ids train or --ids label",
                a.0.display(),
                b.0.display()
            ),
            (a, b) => a.or(b),
        },
    })
}

/// Scores a folder of prediction masks against every sample of `labels` (see
/// `PredictionIds`). Every sample must have its prediction: the error names each one missing;
/// files that match no sample are named in a warning.
pub fn score_folder(dir: &Path, labels: &SampleSource, classes: usize, ids: PredictionIds) -> Result<Confusion> {
    if !dir.is_dir() {
        bail!("--predictions {}: not a folder", dir.display());
    }
    let label_ids = LabelMap::new(LabelEncoding::CityscapesIds, classes).map_err(anyhow::Error::msg)?;
    let mut confusion = Confusion::new(classes);
    let (mut missing, mut used) = (Vec::new(), std::collections::BTreeSet::new());
    for i in 0..labels.len() {
        let Some((path, kind)) = prediction_file(dir, labels.id(i), ids)? else {
            missing.push(labels.id(i).to_string());
            continue;
        };
        used.insert(path.clone());
        let (_, label) = labels.load_full(i)?;
        let prediction =
            image::open(&path).with_context(|| format!("{}: cannot read prediction", path.display()))?.into_luma8();
        if prediction.dimensions() != (label.width, label.height) {
            bail!(
                "{}: prediction is {:?}, its label {}x{}",
                path.display(),
                prediction.dimensions(),
                label.width,
                label.height
            );
        }
        for (&p, &l) in prediction.as_raw().iter().zip(&label.ids) {
            if l == IGNORE {
                continue;
            }
            let class = match kind {
                PredictionIds::Label => label_ids.train_id(p as u16).ok().filter(|&t| t != IGNORE),
                _ if p == IGNORE => None,
                _ if p as usize >= classes => bail!(
                    "{}: value {p} is not a training id (0..{}, or 255); Cityscapes label ids? --ids label",
                    path.display(),
                    classes - 1
                ),
                _ => Some(p),
            };
            match class {
                Some(c) => confusion.add_counts(l, c, 1),
                None => confusion.add_unassigned(l, 1),
            }
        }
    }
    let strays: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) && !used.contains(p))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            !name.ends_with("_color.png") && !name.ends_with("_overlay.png")
        })
        .map(|p| p.display().to_string())
        .collect();
    if !strays.is_empty() {
        tracing::warn!(
            "{} file(s) in {} match no val image and were not scored: {}",
            strays.len(),
            dir.display(),
            strays.join(", ")
        );
    }
    if !missing.is_empty() {
        bail!(
            "{} of the {} val images have no prediction in {} ({}): {}",
            missing.len(),
            labels.len(),
            dir.display(),
            match ids {
                PredictionIds::Train => "expected <id>.png, training ids",
                PredictionIds::Label => "expected <id>_labelIds.png or <id>_leftImg8bit.png, label ids",
                PredictionIds::Auto => "expected <id>.png with training ids or <id>_labelIds.png with label ids",
            },
            missing.join(", ")
        );
    }
    Ok(confusion)
}
