//! Evaluation: one confusion matrix over the whole set (not per-image averages), label 255
//! ignored, IoU per class, and the mean over the classes present in the labels or predictions.

use crate::confusion::confusion_counts;
use crate::data::labels::{LabelMap, DROPPED_FOR_13};
use crate::data::normalise::Normaliser;
use crate::data::source::SampleSource;
use crate::model::deeplab::upsample;
use crate::model::SegNet;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
pub struct Confusion {
    pub classes: usize,
    /// Row = label, column = prediction.
    pub counts: Vec<u64>,
    /// Labelled pixels of each class predicted as no evaluated class (a Cityscapes label id
    /// outside the training ids, e.g. 0 "unlabeled"): misses of that class, as the Cityscapes
    /// evaluation scripts count them.
    pub unassigned: Vec<u64>,
}

impl Confusion {
    pub fn new(classes: usize) -> Confusion {
        Confusion { classes, counts: vec![0; classes * classes], unassigned: vec![0; classes] }
    }

    /// Adds predictions and labels (same shape, training ids; label 255 is skipped).
    pub fn add(&mut self, predictions: &Tensor, labels: &Tensor) {
        let k = self.classes as i64;
        let counts = confusion_counts(labels, predictions, k).to_device(Device::Cpu).to_kind(Kind::Int64);
        let mut host = vec![0i64; (k * k) as usize];
        counts.copy_data(&mut host, (k * k) as usize);
        for (c, h) in self.counts.iter_mut().zip(host) {
            *c += h as u64;
        }
    }

    pub fn add_counts(&mut self, label: u8, prediction: u8, n: u64) {
        self.counts[label as usize * self.classes + prediction as usize] += n;
    }

    pub fn add_unassigned(&mut self, label: u8, n: u64) {
        self.unassigned[label as usize] += n;
    }

    /// IoU per class; None for a class absent from both labels and predictions.
    pub fn iou(&self) -> Vec<Option<f64>> {
        let k = self.classes;
        (0..k)
            .map(|c| {
                let tp = self.counts[c * k + c];
                let label_total: u64 = self.counts[c * k..(c + 1) * k].iter().sum::<u64>() + self.unassigned[c];
                let pred_total: u64 = (0..k).map(|r| self.counts[r * k + c]).sum();
                let union = label_total + pred_total - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU over the classes in `subset` (all when None) that are present.
    pub fn miou(&self, subset: Option<&[usize]>) -> f64 {
        let iou = self.iou();
        let present: Vec<f64> = iou
            .iter()
            .enumerate()
            .filter(|(c, _)| subset.is_none_or(|s| s.contains(c)))
            .filter_map(|(_, v)| *v)
            .collect();
        if present.is_empty() {
            0.0
        } else {
            present.iter().sum::<f64>() / present.len() as f64
        }
    }
}

/// One row of a results table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRow {
    pub name: String,
    /// mIoU in percent.
    pub miou: f64,
    /// 13-class mIoU (16-class setting only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miou13: Option<f64>,
    /// IoU in percent per class name (null when absent from labels and predictions).
    pub per_class: Vec<(String, Option<f64>)>,
    /// Fraction of the target training pixels whose labels were used.
    pub target_labeled_fraction: f64,
    /// Sample standard deviation of `miou` over seeds (a row averaged by `EvalRow::mean`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miou_std: Option<f64>,
}

impl EvalRow {
    pub fn from_confusion(name: &str, confusion: &Confusion, target_labeled_fraction: f64) -> EvalRow {
        let names = LabelMap::class_names(confusion.classes);
        let per_class = names.iter().zip(confusion.iou()).map(|(n, v)| (n.to_string(), v.map(|v| 100.0 * v))).collect();
        let miou13 = (confusion.classes == 16).then(|| {
            let keep: Vec<usize> = (0..16).filter(|c| !DROPPED_FOR_13.contains(c)).collect();
            100.0 * confusion.miou(Some(&keep))
        });
        EvalRow {
            name: name.to_string(),
            miou: 100.0 * confusion.miou(None),
            miou13,
            per_class,
            target_labeled_fraction,
            miou_std: None,
        }
    }

    /// The same method's rows from runs with different seeds, averaged: each value is the mean
    /// over the runs that have it, and `miou_std` the spread of the mIoU (with two runs or more).
    pub fn mean(runs: &[EvalRow]) -> EvalRow {
        let first = &runs[0];
        let miou: Vec<f64> = runs.iter().map(|r| r.miou).collect();
        let per_class = first
            .per_class
            .iter()
            .enumerate()
            .map(|(c, (name, _))| (name.clone(), mean_of(runs.iter().filter_map(|r| r.per_class[c].1))))
            .collect();
        EvalRow {
            name: first.name.clone(),
            miou: mean_of(miou.iter().copied()).expect("at least one run"),
            miou13: mean_of(runs.iter().filter_map(|r| r.miou13)),
            per_class,
            target_labeled_fraction: mean_of(runs.iter().map(|r| r.target_labeled_fraction)).expect("at least one run"),
            miou_std: (runs.len() > 1).then(|| sample_std(&miou)),
        }
    }
}

fn mean_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Standard deviation with Bessel's correction (n - 1), the usual "± std over seeds".
pub fn sample_std(values: &[f64]) -> f64 {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64).sqrt()
}

/// A Markdown table in the paper's layout: one row per method, one column per class, mIoU last.
pub fn markdown_table(rows: &[EvalRow]) -> String {
    let Some(first) = rows.first() else { return String::new() };
    let mut out = String::from("| method | labeled |");
    for (name, _) in &first.per_class {
        out.push_str(&format!(" {} |", &name[..name.len().min(5)]));
    }
    out.push_str(" mIoU |");
    if first.miou13.is_some() {
        out.push_str(" mIoU13 |");
    }
    out.push_str("\n|---|---:|");
    out.push_str(&"---:|".repeat(first.per_class.len() + 1 + usize::from(first.miou13.is_some())));
    for row in rows {
        // "-" where the figure does not apply (a folder of predictions: no budget is known).
        match row.target_labeled_fraction {
            f if f.is_finite() => out.push_str(&format!("\n| {} | {:.1}% |", row.name, 100.0 * f)),
            _ => out.push_str(&format!("\n| {} | - |", row.name)),
        }
        for (_, v) in &row.per_class {
            match v {
                Some(v) => out.push_str(&format!(" {v:.1} |")),
                None => out.push_str(" - |"),
            }
        }
        match row.miou_std {
            Some(std) => out.push_str(&format!(" **{:.1}** ± {std:.1} |", row.miou)),
            None => out.push_str(&format!(" **{:.1}** |", row.miou)),
        }
        if let Some(m) = row.miou13 {
            out.push_str(&format!(" **{m:.1}** |"));
        }
    }
    out.push('\n');
    out
}

pub struct EvalOptions {
    pub flip: bool,
    /// Network input size [height, width]; [0, 0] = as stored.
    pub input_size: [u32; 2],
}

/// The network's input [1, 3, h, w] for a stored image (val, or a round strategy's target image
/// at its training size), resized to `input_size` ([0, 0]: as stored). The loader resizes
/// training images with an antialiased bilinear filter (fast_image_resize's convolution, PIL's
/// filter); torch's antialiased bilinear is the same filter, so val images reach the network
/// as the training images did. A plain bilinear
/// resample would read 2 source pixels per output pixel at a 2x reduction where the loader
/// weighs 4: sharper, aliased inputs than the network was trained on.
pub fn network_input(normaliser: &Normaliser, rgb: &crate::data::datasets::Rgb, input_size: [u32; 2]) -> Tensor {
    let (h, w) = (rgb.height as i64, rgb.width as i64);
    let input = normaliser.to_input(&Tensor::from_slice(&rgb.pixels).view([1, h, w, 3]));
    if input_size[0] == 0 || [input_size[0] as i64, input_size[1] as i64] == [h, w] {
        return input;
    }
    input.internal_upsample_bilinear2d_aa([input_size[0] as i64, input_size[1] as i64], false, None, None)
}

/// Predicted training ids at the label's full resolution for one image.
pub fn predict_full(
    model: &SegNet,
    normaliser: &Normaliser,
    rgb: &crate::data::datasets::Rgb,
    options: &EvalOptions,
) -> Tensor {
    let (h, w) = (rgb.height as i64, rgb.width as i64);
    let input = network_input(normaliser, rgb, options.input_size);
    let logits = |x: &Tensor| upsample(&model.forward_t(x, false).main, h, w).softmax(1, Kind::Float);
    let mut probs = logits(&input);
    if options.flip {
        probs = probs + logits(&input.flip([3])).flip([3]);
    }
    probs.argmax(1, false).squeeze_dim(0)
}

/// Confusion matrix of `model` over every sample of `source`.
pub fn evaluate(
    model: &SegNet,
    normaliser: &Normaliser,
    source: &SampleSource,
    classes: usize,
    options: &EvalOptions,
) -> Result<Confusion> {
    let mut confusion = Confusion::new(classes);
    let mut progress = crate::progress::Progress::bar_only("eval", source.len() as u64);
    tch::no_grad(|| -> Result<()> {
        for i in 0..source.len() {
            let (rgb, label) = source.load_full(i).map_err(anyhow::Error::msg)?;
            let prediction = predict_full(model, normaliser, &rgb, options);
            let labels = Tensor::from_slice(&label.ids).view([label.height as i64, label.width as i64]);
            confusion.add(&prediction, &labels);
            progress.tick();
        }
        Ok(())
    })?;
    progress.finish();
    Ok(confusion)
}

#[cfg(test)]
mod tests {
    use super::network_input;
    use crate::config::AugmentConfig;
    use crate::data::datasets::Rgb;
    use crate::data::normalise::Normaliser;
    use fast_image_resize::{FilterType, ResizeAlg, Resizer};
    use tch::Device;

    #[test]
    fn val_images_are_resized_with_the_loaders_filter() {
        // A high-frequency image (stripes plus a ramp), reduced 2x as the paper's Cityscapes
        // is (stored 2048x1024, trained at 1024x512): the network's val input must be the
        // loader's resize of it, up to the loader's fixed-point arithmetic (a byte).
        let (w, h) = (64u32, 32u32);
        let pixels = (0..w * h * 3).map(|i| ((i / 3 % w) * 97 + (i / 3 / w) * 13 + (i % 3) * 40) as u8).collect();
        let rgb = Rgb { width: w, height: h, pixels };
        let config = AugmentConfig::default();
        let normaliser = Normaliser::new(&config, Device::Cpu);
        // An image's input at its own size (no resize).
        let as_stored = |image: &Rgb| network_input(&normaliser, image, [image.height, image.width]);
        let loader = rgb.resized(&mut Resizer::new(), w / 2, h / 2, ResizeAlg::Convolution(FilterType::Bilinear));
        let expected = as_stored(&loader);
        let input = network_input(&normaliser, &rgb, [h / 2, w / 2]);
        assert_eq!(input.size(), [1, 3, h as i64 / 2, w as i64 / 2]);
        // One byte step of the most sensitive channel, in normalised units.
        let byte = 1.0 / (255.0 * config.std.iter().cloned().fold(f32::INFINITY, f32::min) as f64);
        let diff = (&input - &expected).abs().max().double_value(&[]);
        assert!(diff <= 1.01 * byte, "val input differs from the loader's resize by {diff} (a byte is {byte})");
        // What the check tells apart: a plain bilinear resample of the same image.
        let plain = as_stored(&rgb).upsample_bilinear2d([h as i64 / 2, w as i64 / 2], false, None, None);
        assert!((&plain - &expected).abs().max().double_value(&[]) > 5.0 * byte);
        // The stored size asked for is no resize: the same input as [0, 0].
        let same = as_stored(&rgb);
        assert_eq!(same.size(), [1, 3, h as i64, w as i64]);
        assert!(same.equal(&network_input(&normaliser, &rgb, [0, 0])));
    }
}
