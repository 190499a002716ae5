//! `adamcu predict` writes, for each image, its training-id mask (`<id>.png`), the mask in the
//! Cityscapes palette (`<id>_color.png`) and an overlay on the image (`<id>_overlay.png`);
//! `score_folder` scores such masks against a labelled set, so any method's outputs compare.

use crate::data::datasets::{self, Rgb};
use crate::data::labels::{palette_colour, IGNORE};
use crate::data::source::SampleSource;
use crate::train::eval::{predict_full, Confusion, EvalOptions};
use crate::train::Trainer;
use anyhow::{bail, Context, Result};
use image::{GrayImage, RgbImage};
use std::path::Path;

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

/// Scores `<dir>/<id>.png` (training ids, 255 = ignore) against every sample of `labels`.
pub fn score_folder(dir: &Path, labels: &SampleSource, classes: usize) -> Result<Confusion> {
    let mut confusion = Confusion::new(classes);
    for i in 0..labels.len() {
        let path = dir.join(format!("{}.png", labels.id(i)));
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
            if p as usize >= classes {
                bail!("{}: predicted id {p} is not a training id (expected 0..{})", path.display(), classes - 1);
            }
            confusion.add_counts(l, p, 1);
        }
    }
    Ok(confusion)
}
