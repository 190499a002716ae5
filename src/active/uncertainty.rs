//! S = E + gamma * KL(p || p̂) per pixel (Eq. 1): E is the entropy of the main head's softmax
//! normalised by log C (Eq. 2), KL is from the main head's distribution p to the auxiliary
//! head's p̂ (Eq. 3). Computed in fp32 on the device, without gradient.

use tch::{Kind, Tensor};

/// Scores from main and auxiliary logits of the same shape [B, C, H, W] -> [B, H, W].
pub fn uncertainty(main_logits: &Tensor, aux_logits: &Tensor, gamma: f64) -> Tensor {
    tch::no_grad(|| {
        let classes = main_logits.size()[1] as f64;
        let log_p = main_logits.to_kind(Kind::Float).log_softmax(1, Kind::Float);
        let log_q = aux_logits.to_kind(Kind::Float).log_softmax(1, Kind::Float);
        let p = log_p.exp();
        let entropy = -(&p * &log_p).sum_dim_intlist([1i64].as_slice(), false, Kind::Float) / classes.ln();
        let kl = (&p * (&log_p - &log_q)).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
        entropy + kl * gamma
    })
}
