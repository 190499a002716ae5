//! Small building blocks shared by the backbones and heads.

use tch::nn::{self, ModuleT};
use tch::Tensor;

/// BatchNorm with frozen affine parameters (as in DeepLab v2). Its statistics are either the
/// stored running ones ("frozen", eval-mode BN, for pretrained backbones and tiny batches) or
/// the batch's own in training ("batch", for small nets trained from scratch).
/// Names match torchvision: weight, bias, running_mean, running_var.
#[derive(Debug)]
pub struct FrozenBatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    batch_stats: bool,
}

impl FrozenBatchNorm {
    pub fn new(p: nn::Path, channels: i64, batch_stats: bool) -> FrozenBatchNorm {
        FrozenBatchNorm {
            weight: p.ones_no_train("weight", &[channels]),
            bias: p.zeros_no_train("bias", &[channels]),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
            batch_stats,
        }
    }
}

impl ModuleT for FrozenBatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        Tensor::batch_norm(
            xs,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train && self.batch_stats,
            0.1,
            1e-5,
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
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, k: i64, dilation: i64, batch_stats: bool) -> ConvBnRelu {
        ConvBnRelu {
            conv: conv(p / "conv", c_in, c_out, k, 1, dilation),
            bn: FrozenBatchNorm::new(p / "bn", c_out, batch_stats),
        }
    }
}

impl ModuleT for ConvBnRelu {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&xs.apply(&self.conv), train).relu()
    }
}
