//! The paper's Fig. 5 and its compactness claim: target val pixel embeddings of a network,
//! projected to 2-D by PCA (libtorch's SVD) and drawn coloured by class, and the mean cosine
//! similarity of pixel pairs of the same class against pairs of different classes.

use super::Trainer;
use crate::data::labels::palette_colour;
use anyhow::Result;
use image::RgbImage;
use std::path::Path;
use tch::{Kind, Tensor};

/// Labelled target val pixels' embeddings [N, D] (L2-normalised, stride 8, labels taken
/// nearest) and their classes [N]: up to `per_image` pixels drawn uniformly (seeded) from each
/// of the first `images` val images.
pub fn val_embeddings(trainer: &Trainer, images: usize, per_image: i64, seed: i64) -> Result<(Tensor, Tensor)> {
    let val = super::open_set(&trainer.config.data.target_val, "data.target_val", trainer.config.data.classes)?;
    let (mut embeddings, mut classes) = (Vec::new(), Vec::new());
    tch::no_grad(|| -> Result<()> {
        tch::manual_seed(seed);
        for i in 0..images.min(val.len()) {
            let (rgb, label) = val.load_full(i)?;
            let bytes = Tensor::from_slice(&rgb.pixels).view([1, rgb.height as i64, rgb.width as i64, 3]);
            let embedding = trainer.model.forward_t(&trainer.normaliser.to_input(&bytes), false).embedding;
            let (d, h, w) = (embedding.size()[1], embedding.size()[2], embedding.size()[3]);
            let labels = Tensor::from_slice(&label.ids)
                .view([1, 1, label.height as i64, label.width as i64])
                .to_kind(Kind::Float)
                .upsample_nearest2d([h, w], None, None)
                .view([-1])
                .to_kind(Kind::Int64)
                .to_device(embedding.device());
            let (positions, valid) = crate::torch_ext::random_subset(&labels.ne(255).unsqueeze(0), per_image, None);
            // Host-side selection of the valid draws: a figure, not the training step.
            let positions = positions.squeeze_dim(0).masked_select(&valid.squeeze_dim(0));
            embeddings
                .push(embedding.view([d, -1]).transpose(0, 1).index_select(0, &positions).to_device(tch::Device::Cpu));
            classes.push(labels.index_select(0, &positions).to_device(tch::Device::Cpu));
        }
        Ok(())
    })?;
    anyhow::ensure!(!embeddings.is_empty(), "no target val images to embed");
    Ok((Tensor::cat(&embeddings, 0), Tensor::cat(&classes, 0)))
}

/// Mean cosine similarity of pixel pairs of the same class (`intra`, self-pairs excluded) and of
/// different classes (`inter`): Fig. 5's "more compact" is a larger gap.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Compactness {
    pub intra: f64,
    pub inter: f64,
}

pub fn compactness(embeddings: &Tensor, classes: &Tensor) -> Compactness {
    let n = embeddings.size()[0];
    let similarity = embeddings.matmul(&embeddings.transpose(0, 1));
    let same = classes.unsqueeze(1).eq_tensor(&classes.unsqueeze(0));
    let not_self = Tensor::eye(n, (Kind::Bool, embeddings.device())).logical_not();
    let mean = |mask: &Tensor| {
        let m = mask.to_kind(Kind::Float);
        (&similarity * &m).sum(Kind::Float).double_value(&[]) / m.sum(Kind::Float).double_value(&[]).max(1.0)
    };
    Compactness { intra: mean(&same.logical_and(&not_self)), inter: mean(&same.logical_not()) }
}

/// The first two principal components of `embeddings` [N, D]: [N, 2].
pub fn pca_2d(embeddings: &Tensor) -> Tensor {
    let centred = embeddings - embeddings.mean_dim([0i64].as_slice(), true, Kind::Float);
    // Reduced SVD: the columns of v are the right singular vectors, by decreasing value.
    let (_, _, v) = centred.svd(true, true);
    centred.matmul(&v.narrow(1, 0, 2))
}

/// One panel per (embeddings, classes): each pixel a 3x3 dot in the Cityscapes colour of its
/// class on white, panels side by side with a grey rule between, written as a PNG.
pub fn draw_panels(panels: &[(Tensor, Tensor)], classes: usize, side: u32, path: &Path) -> Result<()> {
    let gap = 4;
    let mut canvas = RgbImage::from_pixel(
        side * panels.len() as u32 + gap * (panels.len() as u32 - 1),
        side,
        image::Rgb([255, 255, 255]),
    );
    for (p, (embeddings, labels)) in panels.iter().enumerate() {
        let xy = pca_2d(embeddings);
        let (lo, hi) = (xy.amin([0i64].as_slice(), false), xy.amax([0i64].as_slice(), false));
        let scaled = (&xy - &lo) / (&hi - &lo).clamp_min(1e-9) * (side as f64 - 8.0) + 4.0;
        let points = Vec::<f32>::try_from(scaled.flatten(0, -1))?;
        let labels = Vec::<i64>::try_from(labels)?;
        let left = p as u32 * (side + gap);
        for (point, &label) in points.chunks(2).zip(&labels) {
            let colour = image::Rgb(palette_colour(label as u8, classes));
            for dy in 0..3 {
                for dx in 0..3 {
                    let (x, y) = (left + point[0] as u32 + dx - 1, point[1] as u32 + dy - 1);
                    canvas.put_pixel(x.min(canvas.width() - 1), y.min(side - 1), colour);
                }
            }
        }
        if p > 0 {
            for y in 0..side {
                for x in left - gap..left {
                    canvas.put_pixel(x, y, image::Rgb([160, 160, 160]));
                }
            }
        }
    }
    crate::files::write_png(path, &canvas)
}

/// How far apart two image sets look to a network: the Fréchet distance between Gaussians
/// fitted to each set's image features, as FID does with Inception's pooled features (Heusel
/// et al. 2017), here with a segmentation network's backbone output (layer4, stride 8)
/// averaged over each image. ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).
#[derive(Debug)]
pub struct FeatureFit {
    pub mean: Tensor,
    pub covariance: Tensor,
    pub images: usize,
}

impl FeatureFit {
    /// Over the first `limit` images of `set`, spread evenly (unreadable ones left out), in
    /// eval mode, each at its stored size.
    pub fn of(trainer: &Trainer, set: &crate::data::source::SampleSource, limit: usize) -> Result<FeatureFit> {
        let step = set.len().div_ceil(limit.max(1)).max(1);
        let mut pooled = Vec::new();
        tch::no_grad(|| {
            for i in (0..set.len()).step_by(step) {
                let Ok(rgb) = set.load_image(i) else { continue };
                let bytes = Tensor::from_slice(&rgb.pixels).view([1, rgb.height as i64, rgb.width as i64, 3]);
                let features = trainer.model.forward_t(&trainer.normaliser.to_input(&bytes), false).features;
                pooled.push(
                    features
                        .to_kind(Kind::Double)
                        .mean_dim([2i64, 3].as_slice(), false, Kind::Double)
                        .to_device(tch::Device::Cpu),
                );
            }
        });
        anyhow::ensure!(pooled.len() >= 2, "fewer than 2 readable images to fit features to");
        let x = Tensor::cat(&pooled, 0);
        let mean = x.mean_dim([0i64].as_slice(), false, Kind::Double);
        let centred = &x - mean.unsqueeze(0);
        let covariance = centred.transpose(0, 1).matmul(&centred) / (x.size()[0] - 1) as f64;
        Ok(FeatureFit { mean, covariance, images: pooled.len() })
    }

    pub fn distance(&self, other: &FeatureFit) -> f64 {
        // Square roots of symmetric positive semi-definite matrices by their eigenvalues
        // (rounding can make the smallest slightly negative: clamped to 0).
        let sqrt_psd = |m: &Tensor| {
            let (values, vectors) = ((m + m.transpose(0, 1)) / 2.0).linalg_eigh("L");
            vectors.matmul(&values.clamp_min(0.0).sqrt().diag_embed(0, -2, -1)).matmul(&vectors.transpose(0, 1))
        };
        let root = sqrt_psd(&self.covariance);
        let product = root.matmul(&other.covariance).matmul(&root);
        let cross =
            ((&product + product.transpose(0, 1)) / 2.0).linalg_eigvalsh("L").clamp_min(0.0).sqrt().sum(Kind::Double);
        let difference = (&self.mean - &other.mean).square().sum(Kind::Double);
        let trace = self.covariance.trace() + other.covariance.trace() - cross * 2.0;
        (difference + trace).double_value(&[])
    }
}
