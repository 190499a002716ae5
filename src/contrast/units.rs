//! Anchors, category centers and the contrastive units at three levels.
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
use super::infonce::info_nce;
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

struct ImageView {
    anchor_emb: Tensor,
    anchor_cls: Tensor,
    key_emb: Tensor,
    key_cls: Tensor,
    anchor_centers: (Tensor, Tensor),
    category_centers: (Tensor, Tensor),
}

/// Per-class mean of `emb` rows [N, D] by `cls` [N], L2-normalised; only present classes.
pub fn class_centers(emb: &Tensor, cls: &Tensor, classes: i64) -> (Tensor, Tensor) {
    let d = emb.size()[1];
    let sums = Tensor::zeros([classes, d], (emb.kind(), emb.device())).index_add(0, cls, emb);
    let counts = Tensor::zeros([classes], (Kind::Float, emb.device()))
        .index_add(0, cls, &Tensor::ones([cls.size()[0]], (Kind::Float, emb.device())));
    let present = counts.gt(0.0).nonzero().squeeze_dim(1);
    let centers = sums.index_select(0, &present);
    let norm = centers.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12);
    (centers / norm, present)
}

fn subsample(indices: Tensor, max: usize) -> Tensor {
    let n = indices.size()[0];
    if n as usize <= max {
        return indices;
    }
    let keep = Tensor::randperm(n, (Kind::Int64, indices.device())).narrow(0, 0, max as i64);
    indices.index_select(0, &keep)
}

fn views(batch: &DomainBatch, config: &ContrastConfig, classes: i64) -> Vec<ImageView> {
    let size = batch.embedding.size();
    let (b, d) = (size[0], size[1]);
    (0..b).map(|i| {
        let emb = batch.embedding.get(i).view([d, -1]).tr();
        let labels = batch.labels.get(i).flatten(0, -1);
        let select = |mask: &Tensor, max: usize| subsample(mask.flatten(0, -1).nonzero().squeeze_dim(1), max);
        let key_mask = labels.ne(255);
        let key_idx = select(&key_mask, config.max_keys);
        let anchor_idx = select(&batch.anchors.get(i).logical_and(&key_mask.view_as(&batch.anchors.get(i))), config.max_anchors);
        let all_keys = key_mask.nonzero().squeeze_dim(1);
        let low_idx = batch.low.get(i).flatten(0, -1).nonzero().squeeze_dim(1);
        let center_cls = batch.center_classes.get(i).flatten(0, -1);
        ImageView {
            anchor_emb: emb.index_select(0, &anchor_idx),
            anchor_cls: labels.index_select(0, &anchor_idx),
            key_emb: emb.index_select(0, &key_idx),
            key_cls: labels.index_select(0, &key_idx),
            anchor_centers: class_centers(&emb.index_select(0, &all_keys), &labels.index_select(0, &all_keys), classes),
            category_centers: class_centers(&emb.index_select(0, &low_idx), &center_cls.index_select(0, &low_idx), classes),
        }
    }).collect()
}

/// The sum over the configured levels of each level's mean p2p and c2c loss.
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

pub fn contrastive_losses(source: &DomainBatch, target: &DomainBatch, config: &ContrastConfig,
    dccm: Option<&Dccm>, classes: i64) -> ContrastLosses {
    let mut all = views(source, config, classes);
    let ns = all.len();
    all.extend(views(target, config, classes));
    let nt = all.len() - ns;
    let weights = |u: &Tensor, v: &Tensor| dccm.map(|d| d.weights(u, v));
    let mut p2p_levels = Vec::new();
    let mut c2c_levels = Vec::new();
    for level in &config.levels {
        let pairs = unit_pairs(level, ns, nt);
        let mean = |terms: Vec<Tensor>| (!terms.is_empty()).then(|| Tensor::stack(&terms, 0).mean(Kind::Float));
        if config.p2p {
            let terms: Vec<Tensor> = pairs.iter().filter_map(|&(a, k)| {
                let (a, k) = (&all[a], &all[k]);
                info_nce(&a.anchor_emb, &a.anchor_cls, &k.key_emb, &k.key_cls, config.temperature,
                    weights(&a.anchor_cls, &k.key_cls).as_ref())
            }).collect();
            p2p_levels.extend(mean(terms));
        }
        if config.c2c {
            let terms: Vec<Tensor> = pairs.iter().filter_map(|&(a, k)| {
                let ((ac, acls), (kc, kcls)) = (&all[a].anchor_centers, &all[k].category_centers);
                info_nce(ac, acls, kc, kcls, config.temperature, weights(acls, kcls).as_ref())
            }).collect();
            c2c_levels.extend(mean(terms));
        }
    }
    let sum = |levels: Vec<Tensor>| (!levels.is_empty()).then(|| Tensor::stack(&levels, 0).sum(Kind::Float));
    ContrastLosses { p2p: sum(p2p_levels), c2c: sum(c2c_levels) }
}
