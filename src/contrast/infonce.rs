//! InfoNCE with several positives (Eqs. 9-11): for an anchor a of class u,
//! L_a = -1/|P| sum_{k in P} log( e^{s_ak} / (e^{s_ak} + sum_{n in N} e^{s_an}) ),
//! s_ak = w(u, v_k) a.k / lambda, where P are the keys of class u and N the others. The same
//! form serves p2p (pixel anchors and keys) and c2c (class centers as anchors and keys).

use tch::{Kind, Tensor};

/// Mean loss over anchors that have at least one positive and one negative; None when no
/// anchor has both. `weights`: optional [Na, Nk] logit weights (DCCM).
pub fn info_nce(anchors: &Tensor, anchor_classes: &Tensor, keys: &Tensor, key_classes: &Tensor,
    temperature: f64, weights: Option<&Tensor>) -> Option<Tensor> {
    if anchors.size()[0] == 0 || keys.size()[0] == 0 {
        return None;
    }
    let mut logits = anchors.matmul(&keys.tr()) / temperature;
    if let Some(w) = weights {
        logits = logits * w;
    }
    let positive = anchor_classes.unsqueeze(1).eq_tensor(&key_classes.unsqueeze(0));
    let negative = positive.logical_not();
    let neg_inf = Tensor::full([1], f64::NEG_INFINITY, (Kind::Float, logits.device()));
    let negative_lse = logits.where_self(&negative, &neg_inf).logsumexp([1i64].as_slice(), true);
    // log(e^s / (e^s + sum_N e^n)) = s - logaddexp(s, logsumexp_N)
    let log_prob = &logits - logits.logaddexp(&negative_lse);
    let positive_f = positive.to_kind(Kind::Float);
    let positives_per_anchor = positive_f.sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let usable = positives_per_anchor.gt(0.0).logical_and(&negative.any_dim(1, false));
    let n_usable = usable.sum(Kind::Int64).int64_value(&[]);
    if n_usable == 0 {
        return None;
    }
    let per_anchor = -(log_prob.where_self(&positive, &Tensor::zeros_like(&log_prob)))
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float) / positives_per_anchor.clamp_min(1.0);
    Some(per_anchor.masked_select(&usable).mean(Kind::Float))
}
