//! InfoNCE with several positives (Eqs. 9-11), for many contrastive units at once: for an
//! anchor a of class u, L_a = -1/|P| sum_{k in P} log( e^{s_ak} / (e^{s_ak} + sum_{n in N} e^{s_an}) ),
//! s_ak = w(u, v_k) a.k / lambda, P the keys of class u, N the others. The same form serves p2p
//! (pixel anchors and keys) and c2c (class centers as anchors and keys).
//!
//! Everything is padded to fixed sizes with validity masks, so a batch of units is a few
//! batched device ops with no host synchronisation.
//!
//! The gradient is written out by hand (`by_hand`) rather than left to autograd: the [U, Na, Nk]
//! logits are the largest tensors of the step, and autograd would keep half a dozen of them
//! for the backward pass and run as many passes over them again there. Writing
//! x_ak = s_ak - log sum_{n in N} e^{s_an} and q_ak = sigmoid(-x_ak) (the share of k's
//! denominator that is not e^{s_ak}), L_a = -1/|P| sum_{k in P} log sigmoid(x_ak) and
//!   dL_a/ds_ak = -q_ak / |P|                                 for k in P,
//!   dL_a/ds_an = e^{x_an} * 1/|P| sum_{k in P} q_ak          for n in N,
//! and 0 for pairs that are neither. `tests/ada.rs` checks both against autograd.

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

/// InfoNCE of U units at once. `weights`: optional [U, Na, Nk] logit weights (DCCM; they carry
/// no gradient: W is a statistic of the predictions, Eq. 8). A pair of an anchor with itself
/// (the same id: an intra-image unit draws anchors and keys from the same pixels) is neither
/// positive nor negative: its logit is 1/λ whatever the network does, so it would only dilute
/// the anchor's positives with a term that has no gradient.
pub fn info_nce_units(anchors: &Points, keys: &Points, temperature: f64, weights: Option<&Tensor>) -> UnitLosses {
    if let Some(w) = weights {
        assert!(!w.requires_grad(), "InfoNCE's logit weights must not need a gradient: by_hand gives none");
    }
    let (a, k) = (anchors.embeddings, keys.embeddings);
    let wanted = a.requires_grad() || k.requires_grad();
    let (mut units, gradients) = tch::no_grad(|| by_hand(anchors, keys, temperature, weights, wanted));
    if let Some((grad_a, grad_k)) = &gradients {
        units.loss = crate::torch_ext::with_gradient(&units.loss, &[(a, grad_a), (k, grad_k)]);
    }
    units
}

/// The units' losses with no graph and, when `gradients`, d loss_u / d anchors [U, Na, D] and
/// d loss_u / d keys [U, Nk, D] (the formulas at the top of this file).
fn by_hand(
    anchors: &Points,
    keys: &Points,
    temperature: f64,
    weights: Option<&Tensor>,
    gradients: bool,
) -> (UnitLosses, Option<(Tensor, Tensor)>) {
    let (a, k) = (anchors.embeddings.detach(), keys.embeddings.detach());
    // 1/λ on the [U, Na, D] anchors rather than on the [U, Na, Nk] logits: one pass fewer over
    // the largest tensor of the step. f32 from here on (under bf16 autocast the matmul is bf16).
    // The passes over [U, Na, Nk] below are in place where they can be, and mask by multiplying
    // with 0/1 floats: on the CPU `where` with a bool mask, like `softplus` and `logaddexp`,
    // costs several times a vectorised multiply (docs/performance.md).
    let scaled = &a / temperature;
    // The logits s [U, Na, Nk], turned into x in place below.
    let mut x = scaled.matmul(&k.transpose(1, 2)).to_kind(Kind::Float);
    if let Some(w) = weights {
        let _ = x.g_mul_(w);
    }
    let mut pair_valid = anchors.valid.unsqueeze(2).logical_and(&keys.valid.unsqueeze(1));
    if let (Some(a), Some(k)) = (anchors.ids, keys.ids) {
        pair_valid = pair_valid.logical_and(&a.unsqueeze(2).ne_tensor(&k.unsqueeze(1)));
    }
    let same = anchors.classes.unsqueeze(2).eq_tensor(&keys.classes.unsqueeze(1));
    let positive = same.logical_and(&pair_valid).to_kind(Kind::Float);
    let negative = pair_valid.to_kind(Kind::Float) - &positive;
    let over_keys = |t: &Tensor| t.sum_dim_intlist([2i64].as_slice(), false, Kind::Float);
    let positives = over_keys(&positive);
    let usable = positives.gt(0.0).logical_and(&over_keys(&negative).gt(0.0));
    let usable_f = usable.to_kind(Kind::Float);
    // e^{s_an - m_a} on the negatives (m_a their largest logit) and 0 elsewhere: the other
    // pairs' logits are pushed down by MASKED, where exp is 0 (except for an anchor with no
    // negative, which is not usable and gets no gradient).
    let mut e = &negative - 1.0;
    let _ = e.g_mul_scalar_(-MASKED).g_add_(&x);
    let largest = e.amax([2i64].as_slice(), true);
    let _ = e.g_sub_(&largest).exp_();
    let negatives = e.sum_dim_intlist([2i64].as_slice(), true, Kind::Float);
    // x = s - log sum_N e^n, and e^s / (e^s + sum_N e^n) = sigmoid(x), floored at the smallest
    // normal f32 (x below about -87: a positive 87 logits under its negatives, which λ = 0.1
    // and unit embeddings cannot reach) so that only the reported value saturates there.
    let _ = x.g_sub_(&(negatives.log() + largest)).sigmoid_().clamp_min_(f32::MIN_POSITIVE as f64);
    let sigma = x;
    // -log sigmoid(x) over the positives, written into `negative`, which is not needed again.
    let _ = sigma.log_out(&negative).g_mul_(&positive);
    let per_anchor = -over_keys(&negative) / positives.clamp_min(1.0);
    let sum = |t: &Tensor| t.sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let anchors_usable = sum(&usable_f);
    let denominator = anchors_usable.clamp_min(1.0);
    let loss = sum(&(per_anchor * &usable_f)) / &denominator;
    let positives_usable = sum(&(&positives * &usable_f));
    let gradients = gradients.then(|| {
        // d loss_u / d s_ak is the anchor's derivative times usable_a / (usable anchors of u).
        let scale = (usable_f / positives.clamp_min(1.0) / denominator.unsqueeze(1)).unsqueeze(2);
        // q = 1 - sigmoid(x) on the positives (absolute error under 1e-7 where it is tiny).
        let mut q = sigma;
        let _ = q.g_mul_scalar_(-1.0).g_add_scalar_(1.0).g_mul_(&positive);
        let q_positive = over_keys(&q).unsqueeze(2);
        // On the negatives e^{x_an} = e^{s_an - m_a} / sum_N e^{s_n - m_a}.
        let _ = e.g_mul_(&(q_positive * &scale / negatives));
        let mut d_logits = q.g_mul_(&scale.neg()).g_add_(&e);
        if let Some(w) = weights {
            let _ = d_logits.g_mul_(w);
        }
        // s = w (a / λ).k: d/da = (d_logits w / λ) k, d/dk = (d_logits w)^T (a / λ).
        let d_logits = d_logits.to_kind(a.kind());
        // Each gradient in its input's kind (under bf16 autocast the matmuls are bf16).
        let grad_a = d_logits.matmul(&k) / temperature;
        let grad_k = d_logits.transpose(1, 2).matmul(&scaled);
        (grad_a.to_kind(a.kind()), grad_k.to_kind(k.kind()))
    });
    let units =
        UnitLosses { loss, usable: usable.any_dim(1, false), positives: positives_usable, anchors: anchors_usable };
    (units, gradients)
}
