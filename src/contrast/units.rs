//! Anchors, category centers and the contrastive units at three levels, computed for all
//! units of a batch at once (fixed-size samples with validity masks, no host synchronisation).
//!
//! Per image (at the embedding's resolution):
//! - keys: pixels with a label (source: ground truth; target: bought labels and the sampled
//!   pseudo labels from G_l), classed by that label;
//! - anchors: misclassified keys (source: all of them; target: those bought in G_h);
//! - anchor centers: per-class means of the image's keys ("class-wise anchors", Eq. 11);
//! - category centers: per-class means of the image's G_l pixels (Section III-B.1), classed by
//!   the ground truth (source) or the prediction (target).
//!
//! A unit pairs an anchor image A with a key image K: the same image (intra-image), another
//! image of the same domain (cross-image) or an image of the other domain (cross-domain).
//! p2p contrasts A's anchors with K's keys; c2c contrasts A's anchor centers with K's category
//! centers.

use super::dccm::Dccm;
use super::infonce::{info_nce_units, Points};
use crate::config::{ContrastConfig, ContrastSampling, CrossDomainAnchors, Level};
use crate::torch_ext::l2_normalised;
use tch::{Kind, Tensor};

/// One domain's batch. Keys and anchors are pixels of the crop at its own resolution, so that
/// every bought target label can be one (the stride-8 grid would keep one pixel in 64); their
/// embeddings are read from the stride-8 map bilinearly at those positions. G_l, whose pixels
/// only enter through their class means, is taken at the embedding's resolution.
pub struct DomainBatch {
    /// [B, D, h, w], L2-normalised.
    pub embedding: Tensor,
    /// [B, H, W], the crop's resolution: key labels (255 = none) and anchors.
    pub labels: Tensor,
    pub anchors: Tensor,
    /// [B, h, w], the embedding's resolution: G_l membership and the class each G_l pixel
    /// counts for.
    pub low: Tensor,
    pub center_classes: Tensor,
}

/// Fixed-size points of a batch of images (or units): embeddings [B, N, D], classes [B, N]
/// and which are real [B, N]. Pixel samples and class centers alike. Pixel samples also carry
/// an id per point ([B, N], unique in the batch: image and pixel), so that an anchor is never
/// paired with itself among the keys of its own image (ContrastiveSeg masks these pairs too).
pub struct Sample {
    pub embeddings: Tensor,
    pub classes: Tensor,
    pub valid: Tensor,
    pub ids: Option<Tensor>,
}

impl Sample {
    /// The points of `self`'s images followed by those of `other`'s. The one with fewer points
    /// per image (a domain whose crops hold fewer pixels than the sample size) is padded with
    /// points that are not real.
    fn cat(&self, other: &Sample) -> Sample {
        let n = self.valid.size()[1].max(other.valid.size()[1]);
        let (a, b) = (self.padded_to(n), other.padded_to(n));
        let cat = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0);
        let ids = match (&a.ids, &b.ids) {
            (Some(x), Some(y)) => Some(cat(x, y)),
            _ => None,
        };
        Sample {
            embeddings: cat(&a.embeddings, &b.embeddings),
            classes: cat(&a.classes, &b.classes),
            valid: cat(&a.valid, &b.valid),
            ids,
        }
    }

    /// `n` points per image: the extra ones are zero and not valid.
    fn padded_to(&self, n: i64) -> Sample {
        let extra = n - self.valid.size()[1];
        if extra == 0 {
            // The usual case (both domains' samples at their caps): a padding of zero would
            // still copy each tensor, forward and backward.
            return self.map(|t| t.shallow_clone(), |t| t.shallow_clone());
        }
        self.map(|t| t.constant_pad_nd([0, 0, 0, extra]), |t| t.constant_pad_nd([0, extra]))
    }

    /// The points of the images at `index` ([U]), one row per unit.
    fn select(&self, index: &Tensor) -> Sample {
        self.map(|t| t.index_select(0, index), |t| t.index_select(0, index))
    }

    /// `embeddings` through `f3`, every [B, N] tensor through `f2`.
    fn map(&self, f3: impl Fn(&Tensor) -> Tensor, f2: impl Fn(&Tensor) -> Tensor) -> Sample {
        Sample {
            embeddings: f3(&self.embeddings),
            classes: f2(&self.classes),
            valid: f2(&self.valid),
            ids: self.ids.as_ref().map(&f2),
        }
    }

    fn points(&self) -> Points<'_> {
        Points { embeddings: &self.embeddings, classes: &self.classes, valid: &self.valid, ids: self.ids.as_ref() }
    }
}

/// Embeddings [B, N, D] of the map `embedding` [B, D, h, w] read bilinearly at `positions`
/// ([B, N] pixel indices y * width + x of a crop of `width` x `height` that the map covers),
/// L2-normalised again. With align_corners = false a crop pixel's centre sits at
/// (x + 0.5) / width of the map's extent whatever the map's size, as `upsample` places it.
pub fn embeddings_at(embedding: &Tensor, positions: &Tensor, width: i64, height: i64) -> Tensor {
    let to_grid = |v: Tensor, size: i64| (v.to_kind(Kind::Float) + 0.5) * (2.0 / size as f64) - 1.0;
    let (x, y) = (to_grid(positions.remainder(width), width), to_grid(positions.floor_divide_scalar(width), height));
    // [B, 1, N, 2]. Bilinear (0), border padding (1): a crop's edge pixels read the map's edge.
    let grid = Tensor::stack(&[x, y], 2).unsqueeze(1).to_kind(embedding.kind());
    l2_normalised(&embedding.grid_sampler_2d(&grid, 0, 1, false).squeeze_dim(2).transpose(1, 2), 2)
}

/// Up to `k` positions per image of `mask` [B, P] whose pixels are classed by `labels` [B, P]:
/// uniformly, or with an equal share per class present (`ContrastSampling`). Positions [B, k]
/// and which are real [B, k].
pub fn sample_positions(
    mask: &Tensor,
    labels: &Tensor,
    k: i64,
    sampling: ContrastSampling,
    n_classes: i64,
) -> (Tensor, Tensor) {
    match sampling {
        ContrastSampling::Uniform => crate::torch_ext::random_subset(mask, k, None),
        ContrastSampling::ClassBalanced => {
            // Weight 1 / (the class's candidates in the image): each class weighs 1 in all. Every
            // pixel counts itself in its row, so no count is 0.
            let rows = class_rows(labels, mask, n_classes);
            let per_pixel = class_counts(&rows, n_classes).gather(1, &rows, false);
            crate::torch_ext::weighted_random_subset(mask, &per_pixel.reciprocal(), k)
        }
    }
}

/// Up to `max` pixels per image drawn from `mask` [B, H*W] by `sampling`, with their
/// embeddings read from the map at their positions. Ids: `first_image` + b, times 2^32, plus
/// the pixel.
fn sample(
    embedding: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
    (max, sampling, n_classes): (usize, ContrastSampling, i64),
    (width, height): (i64, i64),
    first_image: i64,
) -> Sample {
    let (b, p) = (mask.size()[0], mask.size()[1]);
    let (positions, valid) = sample_positions(mask, labels, (max as i64).min(p), sampling, n_classes);
    let images = Tensor::arange_start(first_image, first_image + b, (Kind::Int64, mask.device())).unsqueeze(1);
    Sample {
        embeddings: embeddings_at(embedding, &positions, width, height),
        classes: labels.gather(1, &positions, false),
        valid,
        ids: Some(images * (1i64 << 32) + &positions),
    }
}

/// Each pixel's row in a per-class table [B, P]: its class (0..C), or C outside `mask`.
fn class_rows(classes: &Tensor, mask: &Tensor, n_classes: i64) -> Tensor {
    classes.clamp(0, n_classes - 1).where_scalarother(mask, n_classes)
}

/// Pixels of each row of `class_rows` per image [B, C + 1] (row C: those outside the mask).
fn class_counts(rows: &Tensor, n_classes: i64) -> Tensor {
    let b = rows.size()[0];
    Tensor::zeros([b, n_classes + 1], (Kind::Float, rows.device())).scatter_add(
        1,
        rows,
        &Tensor::ones(rows.size(), (Kind::Float, rows.device())),
    )
}

/// Per-class normalised means of `emb` [B, P, D] over `mask` [B, P] by `classes`:
/// centers [B, C, D], their classes [B, C] (0..C) and which classes are present [B, C].
pub fn class_centers(emb: &Tensor, classes: &Tensor, mask: &Tensor, n_classes: i64) -> Sample {
    let (b, d) = (emb.size()[0], emb.size()[2]);
    // Pixels outside the mask go to an extra row C that is dropped.
    let index = class_rows(classes, mask, n_classes);
    let sums = Tensor::zeros([b, n_classes + 1, d], (emb.kind(), emb.device()))
        .scatter_add(1, &index.unsqueeze(2).expand([-1, -1, d], false), emb)
        .narrow(1, 0, n_classes);
    let counts = class_counts(&index, n_classes).narrow(1, 0, n_classes);
    Sample {
        embeddings: l2_normalised(&sums, 2),
        classes: Tensor::arange(n_classes, (Kind::Int64, emb.device())).unsqueeze(0).expand([b, -1], false),
        valid: counts.gt(0.0),
        ids: None,
    }
}

struct DomainViews {
    anchors: Sample,
    keys: Sample,
    anchor_centers: Sample,
    category_centers: Sample,
}

fn views(batch: &DomainBatch, config: &ContrastConfig, classes: i64, first_image: i64) -> DomainViews {
    let size = batch.embedding.size();
    let (b, d) = (size[0], size[1]);
    let crop = batch.labels.size();
    // Sizes are host metadata: checking them costs no wait for the device. A mask at another
    // resolution would pair pixels with the wrong embeddings, silently where it is smaller.
    assert_eq!(batch.anchors.size(), crop, "contrastive units: anchors are not at the labels' resolution");
    assert_eq!(crop[0], b, "contrastive units: labels and embeddings hold different numbers of images");
    for (name, t) in [("low", &batch.low), ("center_classes", &batch.center_classes)] {
        assert_eq!(t.size(), [b, size[2], size[3]], "contrastive units: {name} is not at the embedding's resolution");
    }
    let (height, width) = (crop[1], crop[2]);
    let labels = batch.labels.view([b, -1]);
    let key_mask = labels.ne(255);
    let anchor_mask = batch.anchors.view([b, -1]).logical_and(&key_mask);
    let draw = |mask: &Tensor, max: usize| {
        sample(&batch.embedding, &labels, mask, (max, config.sampling, classes), (width, height), first_image)
    };
    let keys = draw(&key_mask, config.max_keys);
    let emb = batch.embedding.view([b, d, -1]).transpose(1, 2);
    DomainViews {
        anchors: draw(&anchor_mask, config.max_anchors),
        // Class-wise anchors (Eq. 11): the class means of the image's keys, from its key sample.
        anchor_centers: class_centers(&keys.embeddings, &keys.classes, &keys.valid, classes),
        category_centers: class_centers(&emb, &batch.center_classes.view([b, -1]), &batch.low.view([b, -1]), classes),
        keys,
    }
}

/// The sum over the configured levels of each level's mean p2p and c2c loss (0 when no unit
/// of a level has a usable anchor), and what the p2p units had to work with.
pub struct ContrastLosses {
    pub p2p: Option<Tensor>,
    pub c2c: Option<Tensor>,
    /// p2p + c2c of each configured level [levels] (unweighted; they sum to p2p + c2c): what the
    /// diagnostics take each level's gradient of.
    pub per_level: Option<Tensor>,
    /// p2p's usable anchors and their positive pairs per configured level and anchor domain:
    /// [levels, 2 (source, target), 2 (anchors, positives)] f32 on the device, summed over the
    /// batch's units (None without p2p units). A level whose anchors have no positive adds
    /// nothing to the gradient: this shows it.
    pub usage: Option<Tensor>,
}

/// Unit pairs (anchor image, key image) of one level over source images 0..ns and target
/// images ns..ns+nt. `cross_domain`: whose anchors the cross-domain units hold.
pub fn unit_pairs(level: Level, cross_domain: CrossDomainAnchors, ns: usize, nt: usize) -> Vec<(usize, usize)> {
    let domains = [(0..ns).collect::<Vec<_>>(), (ns..ns + nt).collect()];
    match level {
        Level::IntraImage => (0..ns + nt).map(|i| (i, i)).collect(),
        Level::CrossImage => domains
            .iter()
            .filter(|d| d.len() >= 2)
            .flat_map(|d| (0..d.len()).map(move |j| (d[j], d[(j + 1) % d.len()])))
            .collect(),
        Level::CrossDomain if ns > 0 && nt > 0 => {
            let source_anchors = (0..ns).map(|j| (j, ns + j % nt));
            let target_anchors = (0..nt).map(|j| (ns + j, j % ns));
            match cross_domain {
                CrossDomainAnchors::Both => source_anchors.chain(target_anchors).collect(),
                CrossDomainAnchors::Source => source_anchors.collect(),
                CrossDomainAnchors::Target => target_anchors.collect(),
            }
        }
        // A batch without both domains has no cross-domain units.
        Level::CrossDomain => Vec::new(),
    }
}

/// Per level [levels], the mean of `per_unit` over that level's usable units (0 with none).
fn level_means(per_unit: &Tensor, usable: &Tensor, level_of_unit: &Tensor, levels: i64) -> Tensor {
    let usable = usable.to_kind(Kind::Float);
    let device = per_unit.device();
    let sums = Tensor::zeros([levels], (Kind::Float, device)).index_add(0, level_of_unit, &(per_unit * &usable));
    let counts = Tensor::zeros([levels], (Kind::Float, device)).index_add(0, level_of_unit, &usable);
    sums / counts.clamp_min(1.0)
}

pub fn contrastive_losses(
    source: &DomainBatch,
    target: &DomainBatch,
    config: &ContrastConfig,
    dccm: Option<&Dccm>,
    classes: i64,
) -> ContrastLosses {
    let (ns, nt) = (source.embedding.size()[0] as usize, target.embedding.size()[0] as usize);
    let (s, t) = (views(source, config, classes, 0), views(target, config, classes, ns as i64));
    // Every unit of every level, as index tensors into the concatenated images.
    let pairs: Vec<(i64, i64, i64)> = config
        .levels
        .iter()
        .enumerate()
        .flat_map(|(l, level)| {
            unit_pairs(*level, config.cross_domain_anchors, ns, nt)
                .into_iter()
                .map(move |(a, k)| (a as i64, k as i64, l as i64))
        })
        .collect();
    if pairs.is_empty() {
        return ContrastLosses { p2p: None, c2c: None, per_level: None, usage: None };
    }
    let device = source.embedding.device();
    let column = |f: &dyn Fn(&(i64, i64, i64)) -> i64| {
        crate::torch_ext::upload(&Tensor::from_slice(&pairs.iter().map(f).collect::<Vec<_>>()), device)
    };
    let (a_idx, k_idx, level) = (column(&|p| p.0), column(&|p| p.1), column(&|p| p.2));
    // Row of the usage table: level * 2 + the anchor image's domain (0 source, 1 target).
    let usage_row = column(&|p| p.2 * 2 + (p.0 >= ns as i64) as i64);
    let levels = config.levels.len() as i64;
    let unit_loss = |anchors: Sample, keys: Sample| {
        let (anchors, keys) = (anchors.select(&a_idx), keys.select(&k_idx));
        let w = dccm.map(|d| d.weights_batched(&anchors.classes, &keys.classes));
        let units = info_nce_units(&anchors.points(), &keys.points(), config.temperature, w.as_ref());
        (level_means(&units.loss, &units.usable, &level, levels), units)
    };
    let (mut p2p_levels, mut usage) = (None, None);
    if config.p2p {
        let (loss, units) = unit_loss(s.anchors.cat(&t.anchors), s.keys.cat(&t.keys));
        let counts = Tensor::stack(&[units.anchors, units.positives], 1); // [U, 2]
        usage = Some(
            Tensor::zeros([levels * 2, 2], (Kind::Float, device))
                .index_add(0, &usage_row, &counts)
                .view([levels, 2, 2]),
        );
        p2p_levels = Some(loss);
    }
    let c2c_levels = config
        .c2c
        .then(|| unit_loss(s.anchor_centers.cat(&t.anchor_centers), s.category_centers.cat(&t.category_centers)).0);
    let per_level = match (&p2p_levels, &c2c_levels) {
        (Some(p), Some(c)) => Some(p + c),
        (Some(l), None) | (None, Some(l)) => Some(l.shallow_clone()),
        (None, None) => None,
    };
    let total = |l: Option<Tensor>| l.map(|l| l.sum(Kind::Float));
    ContrastLosses { p2p: total(p2p_levels), c2c: total(c2c_levels), per_level, usage }
}
