//! Small building blocks shared by the backbones and heads.

use std::sync::{Arc, Mutex, OnceLock};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// A differentiable sum over a data-parallel job's ranks: the forward pass sums the tensor,
/// the backward pass sums its gradient (`torch_ext::ProcessGroup::sum_differentiable`).
/// Implemented by `distributed::DataParallel`; the model needs only this of it.
pub trait SumOverRanks: Send + Sync {
    fn sum_over_ranks(&self, t: &Tensor) -> anyhow::Result<Tensor>;
}

/// How a network's BatchNorm layers normalise in training: on the stored running statistics
/// or on the batch's own, and (`train.sync_bn`) the batch's over every rank of a job.
/// One value is shared by every layer of a network, so that joining a job after the network
/// is built (`SegNet::sync_batch_norm`) reaches all of them.
#[derive(Clone)]
pub struct BatchNormMode {
    batch_stats: bool,
    sync: Arc<OnceLock<Arc<dyn SumOverRanks>>>,
    /// The first failed sum over the ranks (a peer lost): a layer's forward cannot return an
    /// error, so it is kept here for the trainer (`take_sync_failure`), and every layer after it
    /// normalises on its own batch alone rather than wait on the lost peer once per layer.
    sync_failure: Arc<Mutex<Option<anyhow::Error>>>,
}

impl BatchNormMode {
    pub fn new(batch_stats: bool) -> BatchNormMode {
        BatchNormMode { batch_stats, sync: Arc::new(OnceLock::new()), sync_failure: Arc::new(Mutex::new(None)) }
    }

    /// The failure of a synchronised layer since the last call, if any: the step's forward
    /// pass then ran on per-rank statistics and must not be applied.
    pub fn take_sync_failure(&self) -> Option<anyhow::Error> {
        self.sync_failure.lock().expect("the BatchNorm failure lock").take()
    }

    fn sync_failed(&self) -> bool {
        self.sync_failure.lock().expect("the BatchNorm failure lock").is_some()
    }

    fn record_sync_failure(&self, error: anyhow::Error) {
        *self.sync_failure.lock().expect("the BatchNorm failure lock") = Some(error);
    }

    /// From now on, batch statistics are the job's (no effect on stored statistics).
    pub fn synchronise_over(&self, ranks: Arc<dyn SumOverRanks>) {
        // Set once: a process is one rank of one job.
        let _ = self.sync.set(ranks);
    }
}

impl std::fmt::Debug for BatchNormMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BatchNormMode {{ batch_stats: {}, synchronised: {} }}", self.batch_stats, self.sync.get().is_some())
    }
}

/// BatchNorm with frozen affine parameters (as in DeepLab v2). Its statistics are either the
/// stored running ones ("frozen", eval-mode BN, for pretrained backbones and tiny batches) or
/// the batch's own in training ("batch", for small nets trained from scratch), optionally over
/// every rank's batch (SyncBatchNorm).
/// Names match torchvision: weight, bias, running_mean, running_var.
#[derive(Debug)]
pub struct FrozenBatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    mode: BatchNormMode,
}

const MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;

impl FrozenBatchNorm {
    pub fn new(p: nn::Path, channels: i64, mode: &BatchNormMode) -> FrozenBatchNorm {
        FrozenBatchNorm {
            weight: p.ones_no_train("weight", &[channels]),
            bias: p.zeros_no_train("bias", &[channels]),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
            mode: mode.clone(),
        }
    }

    /// Training-mode BatchNorm over every rank's batch, as torch's SyncBatchNorm: the
    /// per-channel count, sum and sum of squares are summed over the ranks (on the autograd
    /// graph, so the gradient flows through every rank's statistics), the batch is normalised by
    /// the job's mean and biased variance, and the running statistics take the unbiased one.
    /// `None` when the sum over the ranks fails (kept in the mode for the trainer) or failed
    /// earlier in this pass.
    fn synchronised(&self, xs: &Tensor, ranks: &dyn SumOverRanks) -> Option<Tensor> {
        if self.mode.sync_failed() {
            return None;
        }
        let dims: &[i64] = &[0, 2, 3];
        let x = xs.to_kind(Kind::Float);
        let channels = x.size()[1];
        let count = x.new_full([1], (x.numel() as i64 / channels) as f64, (Kind::Float, x.device()));
        let local = Tensor::cat(
            &[x.sum_dim_intlist(dims, false, Kind::Float), x.square().sum_dim_intlist(dims, false, Kind::Float), count],
            0,
        );
        let total = ranks.sum_over_ranks(&local).map_err(|e| self.mode.record_sync_failure(e)).ok()?;
        let n = total.get(2 * channels);
        let mean = total.narrow(0, 0, channels) / &n;
        let var = (total.narrow(0, channels, channels) / &n - mean.square()).clamp_min(0.0);
        tch::no_grad(|| {
            // On the device: a host read of n here would wait for the device in every layer.
            let unbiased = &var * (&n / (&n - 1.0).clamp_min(1.0));
            let mut running_mean = self.running_mean.shallow_clone();
            let mut running_var = self.running_var.shallow_clone();
            running_mean.copy_(&(&running_mean * (1.0 - MOMENTUM) + mean.detach() * MOMENTUM));
            running_var.copy_(&(&running_var * (1.0 - MOMENTUM) + unbiased.detach() * MOMENTUM));
        });
        let shape = [1, channels, 1, 1];
        let scale = (var + EPS).rsqrt() * &self.weight;
        Some(((x - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)).to_kind(xs.kind()))
    }
}

impl ModuleT for FrozenBatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let batch = train && self.mode.batch_stats;
        if let (true, Some(ranks)) = (batch, self.mode.sync.get()) {
            if let Some(ys) = self.synchronised(xs, ranks.as_ref()) {
                return ys;
            }
        }
        Tensor::batch_norm(
            xs,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            batch,
            MOMENTUM,
            EPS,
            true,
        )
    }
}

/// A bias-free convolution as used in ResNets (Kaiming-initialised).
pub fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, dilation: i64) -> nn::Conv2D {
    let config =
        nn::ConvConfig { stride, padding: dilation * (k - 1) / 2, dilation, bias: false, ..Default::default() };
    nn::conv2d(p, c_in, c_out, k, config)
}

/// conv -> frozen BN -> ReLU.
#[derive(Debug)]
pub struct ConvBnRelu {
    conv: nn::Conv2D,
    bn: FrozenBatchNorm,
}

impl ConvBnRelu {
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, k: i64, dilation: i64, bn: &BatchNormMode) -> ConvBnRelu {
        ConvBnRelu {
            conv: conv(p / "conv", c_in, c_out, k, 1, dilation),
            bn: FrozenBatchNorm::new(p / "bn", c_out, bn),
        }
    }
}

impl ModuleT for ConvBnRelu {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&xs.apply(&self.conv), train).relu()
    }
}
