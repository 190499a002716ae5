//! Dilated ResNet backbones (output stride 8: layer3 dilation 2, layer4 dilation 4, as in
//! DeepLab v2). Parameter names follow torchvision so its ImageNet weights load directly.

use super::layers::{conv, BatchNormMode, FrozenBatchNorm};
use tch::nn::{self, ModuleT};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    R101,
    R50,
    R18,
    /// A small BasicBlock net (one block per stage, widths w, 2w, 4w, 8w) for CPU runs.
    Tiny(i64),
}

impl Depth {
    pub fn of(backbone: crate::config::Backbone, tiny_width: i64) -> Depth {
        use crate::config::Backbone;
        match backbone {
            Backbone::Resnet101 => Depth::R101,
            Backbone::Resnet50 => Depth::R50,
            Backbone::Resnet18 => Depth::R18,
            Backbone::Tiny => Depth::Tiny(tiny_width),
        }
    }
    pub fn blocks(self) -> [usize; 4] {
        match self {
            Depth::R101 => [3, 4, 23, 3],
            Depth::R50 => [3, 4, 6, 3],
            Depth::R18 => [2, 2, 2, 2],
            Depth::Tiny(_) => [1, 1, 1, 1],
        }
    }
    fn bottleneck(self) -> bool {
        matches!(self, Depth::R101 | Depth::R50)
    }
    fn stem_width(self) -> i64 {
        match self {
            Depth::Tiny(w) => w,
            _ => 64,
        }
    }
}

#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, FrozenBatchNorm)>,
    downsample: Option<(nn::Conv2D, FrozenBatchNorm)>,
}

impl ModuleT for Block {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut ys = xs.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, (c, bn)) in self.convs.iter().enumerate() {
            ys = bn.forward_t(&ys.apply(c), train);
            if i < last {
                ys = ys.relu();
            }
        }
        let shortcut = match &self.downsample {
            Some((c, bn)) => bn.forward_t(&xs.apply(c), train),
            None => xs.shallow_clone(),
        };
        (ys + shortcut).relu()
    }
}

/// Features the heads use.
pub struct Features {
    /// layer1 output (stride 4), for the DeepLab v3+ decoder.
    pub low: Tensor,
    /// layer3 output (stride 8), for the auxiliary head.
    pub layer3: Tensor,
    /// layer4 output (stride 8), for the main head and the projection head.
    pub layer4: Tensor,
}

#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: FrozenBatchNorm,
    layers: Vec<Vec<Block>>,
    ceil_mode: bool,
    pub low_channels: i64,
    pub layer3_channels: i64,
    pub layer4_channels: i64,
}

impl ResNet {
    /// `caffe_style`: stride on a bottleneck's first 1x1 conv and a ceil-mode max-pool (ADVENT's
    /// DeepLab v2); otherwise torchvision's layout (stride on the 3x3 conv), which matches
    /// torchvision's ImageNet weights.
    pub fn new(p: &nn::Path, depth: Depth, bn: &BatchNormMode, caffe_style: bool) -> ResNet {
        let stem = depth.stem_width();
        let conv1 = conv(p / "conv1", 3, stem, 7, 2, 1);
        let bn1 = FrozenBatchNorm::new(p / "bn1", stem, bn);
        let expansion = if depth.bottleneck() { 4 } else { 1 };
        let widths = [stem, stem * 2, stem * 4, stem * 8];
        // (stride, dilation) per stage: output stride 8.
        let strides = [(1, 1), (2, 1), (1, 2), (1, 4)];
        let mut c_in = stem;
        let mut layers = Vec::new();
        for (stage, (&n, &width)) in depth.blocks().iter().zip(&widths).enumerate() {
            let lp = p / format!("layer{}", stage + 1);
            let (stride, dilation) = strides[stage];
            let c_out = width * expansion;
            let mut blocks = Vec::new();
            for b in 0..n {
                let bp = &lp / b;
                let s = if b == 0 { stride } else { 1 };
                let downsample = (b == 0 && (s != 1 || c_in != c_out)).then(|| {
                    (
                        conv(&bp / "downsample" / 0, c_in, c_out, 1, s, 1),
                        FrozenBatchNorm::new(&bp / "downsample" / 1, c_out, bn),
                    )
                });
                let convs = if depth.bottleneck() {
                    let (s1, s2) = if caffe_style { (s, 1) } else { (1, s) };
                    vec![
                        (conv(&bp / "conv1", c_in, width, 1, s1, 1), FrozenBatchNorm::new(&bp / "bn1", width, bn)),
                        (
                            conv(&bp / "conv2", width, width, 3, s2, dilation),
                            FrozenBatchNorm::new(&bp / "bn2", width, bn),
                        ),
                        (conv(&bp / "conv3", width, c_out, 1, 1, 1), FrozenBatchNorm::new(&bp / "bn3", c_out, bn)),
                    ]
                } else {
                    vec![
                        (
                            conv(&bp / "conv1", c_in, width, 3, s, dilation),
                            FrozenBatchNorm::new(&bp / "bn1", width, bn),
                        ),
                        (
                            conv(&bp / "conv2", width, width, 3, 1, dilation),
                            FrozenBatchNorm::new(&bp / "bn2", width, bn),
                        ),
                    ]
                };
                blocks.push(Block { convs, downsample });
                c_in = c_out;
            }
            layers.push(blocks);
        }
        ResNet {
            conv1,
            bn1,
            layers,
            ceil_mode: caffe_style,
            low_channels: widths[0] * expansion,
            layer3_channels: widths[2] * expansion,
            layer4_channels: widths[3] * expansion,
        }
    }

    pub fn features(&self, xs: &Tensor, train: bool) -> Features {
        let x = self.bn1.forward_t(&xs.apply(&self.conv1), train).relu();
        let mut x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], self.ceil_mode);
        let mut outputs = Vec::new();
        for blocks in &self.layers {
            for block in blocks {
                x = block.forward_t(&x, train);
            }
            outputs.push(x.shallow_clone());
        }
        Features { low: outputs[0].shallow_clone(), layer3: outputs[2].shallow_clone(), layer4: x }
    }
}
