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

/// Fixed-size samples of one domain's images: embeddings [B, N, D], classes and validity [B, N].
struct Sample {
    embeddings: Tensor,
    classes: Tensor,
    valid: Tensor,
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
/// centers [B, C, D], their classes [B, C] (0..C) and presence [B, C].
pub fn class_centers(emb: &Tensor, classes: &Tensor, mask: &Tensor, n_classes: i64) -> Sample3 {
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
    Sample3 {
        centers: sums / norm,
        classes: Tensor::arange(n_classes, (Kind::Int64, emb.device())).unsqueeze(0).expand([b, -1], false),
        present: counts.gt(0.0),
    }
}

/// Category centers of a batch of images.
pub struct Sample3 {
    pub centers: Tensor,
    pub classes: Tensor,
    pub present: Tensor,
}

struct DomainViews {
    anchors: Sample,
    keys: Sample,
    anchor_centers: Sample3,
    category_centers: Sample3,
}

fn views(batch: &DomainBatch, config: &ContrastConfig, classes: i64) -> DomainViews {
    let size = batch.embedding.size();
    let (b, d) = (size[0], size[1]);
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
    let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0);
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
    let weights = |ac: &Tensor, kc: &Tensor| dccm.map(|d| d.weights_batched(ac, kc));
    let unit_loss = |anchors: (Tensor, Tensor, Tensor), keys: (Tensor, Tensor, Tensor)| {
        let (ae, ac, av) = (anchors.0.index_select(0, &a_idx), anchors.1.index_select(0, &a_idx), anchors.2.index_select(0, &a_idx));
        let (ke, kc, kv) = (keys.0.index_select(0, &k_idx), keys.1.index_select(0, &k_idx), keys.2.index_select(0, &k_idx));
        let w = weights(&ac, &kc);
        let (per_unit, usable) = info_nce_units(&Points { embeddings: &ae, classes: &ac, valid: &av },
            &Points { embeddings: &ke, classes: &kc, valid: &kv }, config.temperature, w.as_ref());
        sum_of_level_means(&per_unit, &usable, &level, levels)
    };
    let p2p = config.p2p.then(|| unit_loss(
        (cat(&s.anchors.embeddings, &t.anchors.embeddings), cat(&s.anchors.classes, &t.anchors.classes),
         cat(&s.anchors.valid, &t.anchors.valid)),
        (cat(&s.keys.embeddings, &t.keys.embeddings), cat(&s.keys.classes, &t.keys.classes),
         cat(&s.keys.valid, &t.keys.valid))));
    let c2c = config.c2c.then(|| unit_loss(
        (cat(&s.anchor_centers.centers, &t.anchor_centers.centers), cat(&s.anchor_centers.classes, &t.anchor_centers.classes),
         cat(&s.anchor_centers.present, &t.anchor_centers.present)),
        (cat(&s.category_centers.centers, &t.category_centers.centers),
         cat(&s.category_centers.classes, &t.category_centers.classes),
         cat(&s.category_centers.present, &t.category_centers.present))));
    ContrastLosses { p2p, c2c }
}
