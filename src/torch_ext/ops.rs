//! Tensor operations tch lacks or makes slow: the fused SGD update, gradient clearing, a
//! random subset of a mask, L2 normalisation, a value with a gradient written out by hand.

use super::shim::*;

/// One SGD step (PyTorch's semantics: `buf = momentum * buf + grad + weight_decay * p`,
/// `p -= lr * buf`) for parameters that all have a gradient, with their momentum buffers
/// (zero before the first step), as libtorch's multi-tensor kernels.
pub fn sgd_foreach(
    params: &[&tch::Tensor],
    buffers: &[&tch::Tensor],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Result<(), String> {
    assert_eq!(params.len(), buffers.len(), "one momentum buffer per parameter");
    let (p, b) = (handles(params), handles(buffers));
    with_error_buffer(|error, len| {
        // SAFETY: the handles point to live tensors for the duration of the call; the shim
        // copies them into at::Tensor values and writes its message on failure.
        let failed = unsafe {
            adamcu_sgd_foreach(p.as_ptr(), b.as_ptr(), p.len() as i32, lr, momentum, weight_decay, error, len)
        };
        (failed == 0).then_some(())
    })
}

/// Sets the gradients of `params` to none (as `zero_grad(set_to_none=True)`).
pub fn clear_grads(params: &[&tch::Tensor]) {
    let p = handles(params);
    // SAFETY: the handles point to live tensors for the duration of the call.
    unsafe { adamcu_clear_grads(p.as_ptr(), p.len() as i32) }
}

/// A uniform random subset of each row's `mask`ed entries ([B, N] bool), drawn on the device
/// with random keys and top-k: at most `k` positions per row, `count` ([B] i64) per row when
/// given, fewer where a row has fewer. Returns the positions [B, k] and which are real [B, k].
pub fn random_subset(mask: &tch::Tensor, k: i64, count: Option<&tch::Tensor>) -> (tch::Tensor, tch::Tensor) {
    use tch::{Kind, Tensor};
    let k = k.min(mask.size()[1]);
    let keys = Tensor::rand(mask.size(), (Kind::Float, mask.device())).where_scalarother(mask, -1.0);
    // Sorted: the first `count` of the k largest keys are themselves a uniform subset.
    let (values, positions) = keys.topk(k, 1, true, count.is_some());
    let mut valid = values.ge(0.0);
    if let Some(count) = count {
        let rank = Tensor::arange(k, (Kind::Int64, mask.device())).unsqueeze(0);
        valid = valid.logical_and(&rank.lt_tensor(&count.unsqueeze(1)));
    }
    (positions, valid)
}

/// Up to `k` positions per row of `mask` [B, P], drawn without replacement with probabilities
/// proportional to `weights` [B, P] (> 0 where `mask`): the k largest of Efraimidis and
/// Spirakis' keys log(u) / w, u uniform. Returns positions [B, k] and which are real [B, k] (a
/// row with fewer than k candidates). Not `multinomial`, which without replacement refuses a
/// row with fewer candidates than k. With equal weights it draws a uniform subset, as
/// `random_subset` does.
pub fn weighted_random_subset(mask: &tch::Tensor, weights: &tch::Tensor, k: i64) -> (tch::Tensor, tch::Tensor) {
    use tch::{Kind, Tensor};
    let k = k.min(mask.size()[1]);
    let keys = (Tensor::rand(mask.size(), (Kind::Float, mask.device())).log() / weights.to_kind(Kind::Float))
        .where_scalarother(mask, f64::NEG_INFINITY);
    let (_, positions) = keys.topk(k, 1, true, false);
    // From the mask, not the key: a real candidate whose u was 0 has key -inf too.
    let valid = mask.gather(1, &positions, false);
    (positions, valid)
}

/// `t` divided by its L2 norm along `dim` (an all-zero vector stays zero rather than NaN).
pub fn l2_normalised(t: &tch::Tensor, dim: i64) -> tch::Tensor {
    t / t.norm_scalaropt_dim(2.0, [dim].as_slice(), true).clamp_min(1e-12)
}

/// `value` ([U]) as a function of `inputs` ([U, ...] each) whose gradient is given: the
/// backward pass reaches input x with d value_u / d x_u = g_u, for a loss whose gradient is
/// written out by hand (no graph kept over its intermediate tensors). The forward value is
/// `value` exactly: the added term is t - t = 0.
pub fn with_gradient(value: &tch::Tensor, inputs: &[(&tch::Tensor, &tch::Tensor)]) -> tch::Tensor {
    use tch::Kind;
    let mut result = value.detach();
    for (x, g) in inputs {
        if !x.requires_grad() {
            continue;
        }
        let dims: Vec<i64> = (1..x.dim() as i64).collect();
        let linear = (*x * g.detach()).sum_dim_intlist(dims.as_slice(), false, Kind::Float);
        result = result + (&linear - linear.detach());
    }
    result
}
