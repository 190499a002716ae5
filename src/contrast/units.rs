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
use crate::config::ContrastConfig;
use tch::{Kind, Tensor};

/// One domain's batch at the embedding's resolution [B, h, w].
pub struct DomainBatch {
    /// [B, D, h, w], L2-normalised.
    pub embedding: Tensor,
    /// Key labels (255 = none).
    pub labels: Tensor,
    pub anchors: Tensor,
    /// G_l membership and the class each G_l pixel counts for.
    pub low: Tensor,
    pub center_classes: Tensor,
}

/// Fixed-size points of a batch of images (or units): embeddings [B, N, D], classes [B, N]
/// and which are real [B, N]. Pixel samples and class centers alike.
pub struct Sample {
    pub embeddings: Tensor,
    pub classes: Tensor,
    pub valid: Tensor,
}

impl Sample {
    /// The points of `self`'s images followed by those of `other`'s. The one with fewer points
    /// per image (a domain whose crops hold fewer pixels than the sample size) is padded with
    /// points that are not real.
    fn cat(&self, other: &Sample) -> Sample {
        let n = self.valid.size()[1].max(other.valid.size()[1]);
        let (a, b) = (self.padded_to(n), other.padded_to(n));
        let cat = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0);
        Sample { embeddings: cat(&a.embeddings, &b.embeddings), classes: cat(&a.classes, &b.classes),
            valid: cat(&a.valid, &b.valid) }
    }

    /// `n` points per image: the extra ones are zero and not valid.
    fn padded_to(&self, n: i64) -> Sample {
        let extra = n - self.valid.size()[1];
        if extra == 0 {
            // The usual case (both domains' samples at their caps): a padding of zero would
            // still copy each tensor, forward and backward.
            return Sample { embeddings: self.embeddings.shallow_clone(), classes: self.classes.shallow_clone(),
                valid: self.valid.shallow_clone() };
        }
        Sample { embeddings: self.embeddings.constant_pad_nd([0, 0, 0, extra]),
            classes: self.classes.constant_pad_nd([0, extra]), valid: self.valid.constant_pad_nd([0, extra]) }
    }

    /// The points of the images at `index` ([U]), one row per unit.
    fn select(&self, index: &Tensor) -> Sample {
        Sample { embeddings: self.embeddings.index_select(0, index), classes: self.classes.index_select(0, index),
            valid: self.valid.index_select(0, index) }
    }

    fn points(&self) -> Points<'_> {
        Points { embeddings: &self.embeddings, classes: &self.classes, valid: &self.valid }
    }
}

/// Up to `max` pixels per image drawn uniformly from `mask` [B, P] (random keys + top-k).
fn sample(emb: &Tensor, classes: &Tensor, mask: &Tensor, max: usize) -> Sample {
    let p = mask.size()[1];
    let (index, valid) = crate::torch_ext::random_subset(mask, (max as i64).min(p), None);
    let d = emb.size()[2];
    Sample {
        embeddings: emb.gather(1, &index.unsqueeze(2).expand([-1, -1, d], false), false),
        classes: classes.gather(1, &index, false),
        valid,
    }
}

/// Per-class normalised means of `emb` [B, P, D] over `mask` [B, P] by `classes`:
/// centers [B, C, D], their classes [B, C] (0..C) and which classes are present [B, C].
pub fn class_centers(emb: &Tensor, classes: &Tensor, mask: &Tensor, n_classes: i64) -> Sample {
    let (b, d) = (emb.size()[0], emb.size()[2]);
    // Pixels outside the mask go to an extra row C that is dropped.
    let index = classes.clamp(0, n_classes - 1).where_scalarother(mask, n_classes);
    let sums = Tensor::zeros([b, n_classes + 1, d], (emb.kind(), emb.device()))
        .scatter_add(1, &index.unsqueeze(2).expand([-1, -1, d], false), emb)
        .narrow(1, 0, n_classes);
    let counts = Tensor::zeros([b, n_classes + 1], (Kind::Float, emb.device()))
        .scatter_add(1, &index, &Tensor::ones(index.size(), (Kind::Float, emb.device())))
        .narrow(1, 0, n_classes);
    let norm = sums.norm_scalaropt_dim(2.0, [2i64].as_slice(), true).clamp_min(1e-12);
    Sample {
        embeddings: sums / norm,
        classes: Tensor::arange(n_classes, (Kind::Int64, emb.device())).unsqueeze(0).expand([b, -1], false),
        valid: counts.gt(0.0),
    }
}

struct DomainViews {
    anchors: Sample,
    keys: Sample,
    anchor_centers: Sample,
    category_centers: Sample,
}

fn views(batch: &DomainBatch, config: &ContrastConfig, classes: i64) -> DomainViews {
    let size = batch.embedding.size();
    let (b, d) = (size[0], size[1]);
    // Sizes are host metadata: checking them costs no wait for the device. A mask at another
    // resolution would pair pixels with the wrong embeddings, silently where it is smaller.
    for (name, t) in [("labels", &batch.labels), ("anchors", &batch.anchors), ("low", &batch.low),
        ("center_classes", &batch.center_classes)] {
        assert_eq!(t.size(), [b, size[2], size[3]], "contrastive units: {name} is not at the embedding's resolution");
    }
    let emb = batch.embedding.view([b, d, -1]).transpose(1, 2);
    let labels = batch.labels.view([b, -1]);
    let key_mask = labels.ne(255);
    let anchor_mask = batch.anchors.view([b, -1]).logical_and(&key_mask);
    DomainViews {
        anchors: sample(&emb, &labels, &anchor_mask, config.max_anchors),
        keys: sample(&emb, &labels, &key_mask, config.max_keys),
        anchor_centers: class_centers(&emb, &labels, &key_mask, classes),
        category_centers: class_centers(&emb, &batch.center_classes.view([b, -1]), &batch.low.view([b, -1]), classes),
    }
}

/// The sum over the configured levels of each level's mean p2p and c2c loss (0 when no unit
/// of a level has a usable anchor).
pub struct ContrastLosses {
    pub p2p: Option<Tensor>,
    pub c2c: Option<Tensor>,
}

/// Unit pairs (anchor image, key image) of one level over source images 0..ns and target
/// images ns..ns+nt.
pub fn unit_pairs(level: &str, ns: usize, nt: usize) -> Vec<(usize, usize)> {
    let domains = [(0..ns).collect::<Vec<_>>(), (ns..ns + nt).collect()];
    match level {
        "intra-image" => (0..ns + nt).map(|i| (i, i)).collect(),
        "cross-image" => domains.iter().filter(|d| d.len() >= 2)
            .flat_map(|d| (0..d.len()).map(move |j| (d[j], d[(j + 1) % d.len()]))).collect(),
        "cross-domain" if ns > 0 && nt > 0 => (0..ns).map(|j| (j, ns + j % nt))
            .chain((0..nt).map(|j| (ns + j, j % ns))).collect(),
        _ => Vec::new(),
    }
}

/// Sum over levels of the mean of `per_unit` over each level's usable units.
fn sum_of_level_means(per_unit: &Tensor, usable: &Tensor, level_of_unit: &Tensor, levels: i64) -> Tensor {
    let usable = usable.to_kind(Kind::Float);
    let device = per_unit.device();
    let sums = Tensor::zeros([levels], (Kind::Float, device)).index_add(0, level_of_unit, &(per_unit * &usable));
    let counts = Tensor::zeros([levels], (Kind::Float, device)).index_add(0, level_of_unit, &usable);
    (sums / counts.clamp_min(1.0)).sum(Kind::Float)
}

pub fn contrastive_losses(source: &DomainBatch, target: &DomainBatch, config: &ContrastConfig,
    dccm: Option<&Dccm>, classes: i64) -> ContrastLosses {
    let (s, t) = (views(source, config, classes), views(target, config, classes));
    let (ns, nt) = (source.embedding.size()[0] as usize, target.embedding.size()[0] as usize);
    // Every unit of every level, as index tensors into the concatenated images.
    let pairs: Vec<(i64, i64, i64)> = config.levels.iter().enumerate()
        .flat_map(|(l, level)| unit_pairs(level, ns, nt).into_iter().map(move |(a, k)| (a as i64, k as i64, l as i64)))
        .collect();
    if pairs.is_empty() {
        return ContrastLosses { p2p: None, c2c: None };
    }
    let device = source.embedding.device();
    let column = |f: fn(&(i64, i64, i64)) -> i64| crate::torch_ext::upload(&Tensor::from_slice(&pairs.iter().map(f).collect::<Vec<_>>()), device);
    let (a_idx, k_idx, level) = (column(|p| p.0), column(|p| p.1), column(|p| p.2));
    let levels = config.levels.len() as i64;
    let unit_loss = |anchors: Sample, keys: Sample| {
        let (anchors, keys) = (anchors.select(&a_idx), keys.select(&k_idx));
        let w = dccm.map(|d| d.weights_batched(&anchors.classes, &keys.classes));
        let (per_unit, usable) = info_nce_units(&anchors.points(), &keys.points(), config.temperature, w.as_ref());
        sum_of_level_means(&per_unit, &usable, &level, levels)
    };
    let p2p = config.p2p.then(|| unit_loss(s.anchors.cat(&t.anchors), s.keys.cat(&t.keys)));
    let c2c = config.c2c.then(|| unit_loss(s.anchor_centers.cat(&t.anchor_centers),
        s.category_centers.cat(&t.category_centers)));
    ContrastLosses { p2p, c2c }
}
