//! InfoNCE with several positives (Eqs. 9-11), for many contrastive units at once: for an
//! anchor a of class u, L_a = -1/|P| sum_{k in P} log( e^{s_ak} / (e^{s_ak} + sum_{n in N} e^{s_an}) ),
//! s_ak = w(u, v_k) a.k / lambda, P the keys of class u, N the others. The same form serves p2p
//! (pixel anchors and keys) and c2c (class centers as anchors and keys).
//!
//! Everything is padded to fixed sizes with validity masks, so a batch of units is a few
//! batched device ops with no host synchronisation.

use tch::{Kind, Tensor};

/// Anchors or keys of U units: embeddings [U, N, D], classes [U, N], validity [U, N], and for
/// pixels an id [U, N] that is equal for the same pixel of the same image.
pub struct Points<'a> {
    pub embeddings: &'a Tensor,
    pub classes: &'a Tensor,
    pub valid: &'a Tensor,
    pub ids: Option<&'a Tensor>,
}

/// Stands in for -inf among the masked logits: finite, so no NaN reaches a gradient.
const MASKED: f64 = -1e4;

/// Per unit [U]: the mean loss over the anchors that have a positive and a negative, whether
/// the unit had such an anchor, how many it had and their positive pairs in all.
pub struct UnitLosses {
    pub loss: Tensor,
    pub usable: Tensor,
    pub anchors: Tensor,
    pub positives: Tensor,
}

/// InfoNCE of U units at once. `weights`: optional [U, Na, Nk] logit weights (DCCM). A pair of
/// an anchor with itself (the same id: an intra-image unit draws anchors and keys from the same
/// pixels) is neither positive nor negative: its logit is 1/λ whatever the network does, so it
/// would only dilute the anchor's positives with a term that has no gradient.
pub fn info_nce_units(anchors: &Points, keys: &Points, temperature: f64, weights: Option<&Tensor>) -> UnitLosses {
    // 1/λ on the [U, Na, D] anchors rather than on the [U, Na, Nk] logits: one pass fewer
    // over the largest tensor of the step, forward and backward.
    let mut logits = (anchors.embeddings / temperature).matmul(&keys.embeddings.transpose(1, 2));
    if let Some(w) = weights {
        logits = logits * w;
    }
    let mut pair_valid = anchors.valid.unsqueeze(2).logical_and(&keys.valid.unsqueeze(1));
    if let (Some(a), Some(k)) = (anchors.ids, keys.ids) {
        pair_valid = pair_valid.logical_and(&a.unsqueeze(2).ne_tensor(&k.unsqueeze(1)));
    }
    let same = anchors.classes.unsqueeze(2).eq_tensor(&keys.classes.unsqueeze(1));
    let positive = same.logical_and(&pair_valid);
    let negative = same.logical_not().logical_and(&pair_valid);
    let negative_lse = logits.where_scalarother(&negative, MASKED).logsumexp([2i64].as_slice(), true);
    // log(e^s / (e^s + sum_N e^n)) = s - logaddexp(s, logsumexp_N)
    let log_prob = &logits - logits.logaddexp(&negative_lse);
    let positives = positive.sum_dim_intlist([2i64].as_slice(), false, Kind::Float);
    let usable = positives.gt(0.0).logical_and(&negative.any_dim(2, false));
    let per_anchor = -log_prob.where_scalarother(&positive, 0.0).sum_dim_intlist([2i64].as_slice(), false, Kind::Float)
        / positives.clamp_min(1.0);
    let usable_f = usable.to_kind(Kind::Float);
    let sum = |t: &Tensor| t.sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let anchors_usable = sum(&usable_f);
    UnitLosses {
        loss: sum(&(per_anchor * &usable_f)) / anchors_usable.clamp_min(1.0),
        usable: usable.any_dim(1, false),
        positives: sum(&(positives * &usable_f)).detach(),
        anchors: anchors_usable.detach(),
    }
}
