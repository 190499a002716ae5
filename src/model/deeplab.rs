//! DeepLab v2 (the paper's main setting) and DeepLab v3+ (its Table IV), both with an
//! auxiliary classifier on layer3 (its output is p̂ in the uncertainty score, Eq. 1) and a
//! projection head whose L2-normalised embeddings feed the contrastive units.

use super::layers::{BatchNormMode, ConvBnRelu, FrozenBatchNorm, SumOverRanks};
use super::resnet::{Depth, ResNet};
use crate::config::{Arch, BnStats, ModelConfig};
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// DeepLab v2's classifier: the sum of four dilated 3x3 convolutions, weights N(0, 0.01).
#[derive(Debug)]
struct AsppV2 {
    branches: Vec<nn::Conv2D>,
}

impl AsppV2 {
    fn new(p: &nn::Path, c_in: i64, classes: i64, dilations: &[i64]) -> AsppV2 {
        let branches = dilations
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let config = nn::ConvConfig {
                    padding: d,
                    dilation: d,
                    bias: true,
                    ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.01 },
                    bs_init: nn::Init::Const(0.0),
                    ..Default::default()
                };
                nn::conv2d(p / "conv2d_list" / i, c_in, classes, 3, config)
            })
            .collect();
        AsppV2 { branches }
    }
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut out = xs.apply(&self.branches[0]);
        for branch in &self.branches[1..] {
            out = out + xs.apply(branch);
        }
        out
    }
}

/// 1x1 conv C->C, BN, ReLU, 1x1 conv C->D, L2 normalisation over channels (ContrastiveSeg's
/// `convmlp`).
#[derive(Debug)]
struct ProjectionHead {
    hidden: ConvBnRelu,
    out: nn::Conv2D,
}

impl ProjectionHead {
    fn new(p: &nn::Path, c_in: i64, dim: i64, bn: &BatchNormMode) -> ProjectionHead {
        ProjectionHead {
            hidden: ConvBnRelu::new(&(p / "hidden"), c_in, c_in, 1, 1, bn),
            out: nn::conv2d(p / "out", c_in, dim, 1, Default::default()),
        }
    }
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        crate::torch_ext::l2_normalised(&self.hidden.forward_t(xs, train).apply(&self.out), 1)
    }
}

/// Depthwise 3x3 (dilated) + BN + ReLU, then pointwise 1x1 + BN + ReLU.
#[derive(Debug)]
struct SeparableConv {
    depthwise: nn::Conv2D,
    depthwise_bn: FrozenBatchNorm,
    pointwise: ConvBnRelu,
}

impl SeparableConv {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, dilation: i64, bn: &BatchNormMode) -> SeparableConv {
        let config = nn::ConvConfig { padding: dilation, dilation, groups: c_in, bias: false, ..Default::default() };
        SeparableConv {
            depthwise: nn::conv2d(p / "depthwise", c_in, c_in, 3, config),
            depthwise_bn: FrozenBatchNorm::new(p / "depthwise_bn", c_in, bn),
            pointwise: ConvBnRelu::new(&(p / "pointwise"), c_in, c_out, 1, 1, bn),
        }
    }
}

impl ModuleT for SeparableConv {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = self.depthwise_bn.forward_t(&xs.apply(&self.depthwise), train).relu();
        self.pointwise.forward_t(&ys, train)
    }
}

/// DeepLab v3+'s head: depthwise-separable ASPP (1x1, dilations 6/12/18, image pooling),
/// then a decoder with a 48-channel low-level shortcut from layer1.
#[derive(Debug)]
struct V3PlusHead {
    aspp_1x1: ConvBnRelu,
    aspp_separable: Vec<SeparableConv>,
    pooling: nn::Conv2D,
    project: ConvBnRelu,
    low_level: ConvBnRelu,
    decoder: Vec<SeparableConv>,
    classifier: nn::Conv2D,
}

impl V3PlusHead {
    fn new(
        p: &nn::Path,
        c_in: i64,
        c_low: i64,
        width: i64,
        classes: i64,
        dilations: &[i64],
        bn: &BatchNormMode,
    ) -> V3PlusHead {
        V3PlusHead {
            aspp_1x1: ConvBnRelu::new(&(p / "aspp_1x1"), c_in, width, 1, 1, bn),
            aspp_separable: dilations
                .iter()
                .enumerate()
                .map(|(i, &d)| SeparableConv::new(&(p / "aspp" / i), c_in, width, d, bn))
                .collect(),
            pooling: nn::conv2d(p / "pooling", c_in, width, 1, Default::default()),
            project: ConvBnRelu::new(&(p / "project"), width * (dilations.len() as i64 + 2), width, 1, 1, bn),
            low_level: ConvBnRelu::new(&(p / "low_level"), c_low, 48, 1, 1, bn),
            decoder: vec![
                SeparableConv::new(&(p / "decoder" / 0), width + 48, width, 1, bn),
                SeparableConv::new(&(p / "decoder" / 1), width, width, 1, bn),
            ],
            classifier: nn::conv2d(p / "classifier", width, classes, 1, Default::default()),
        }
    }

    /// Returns (logits at stride 4, ASPP features at stride 8).
    fn forward_t(&self, high: &Tensor, low: &Tensor, train: bool) -> (Tensor, Tensor) {
        let (h, w) = (high.size()[2], high.size()[3]);
        let mut branches = vec![self.aspp_1x1.forward_t(high, train)];
        branches.extend(self.aspp_separable.iter().map(|b| b.forward_t(high, train)));
        let pooled = high.adaptive_avg_pool2d([1, 1]).apply(&self.pooling).relu();
        branches.push(pooled.upsample_bilinear2d([h, w], false, None, None));
        let aspp = self.project.forward_t(&Tensor::cat(&branches, 1), train);
        let (lh, lw) = (low.size()[2], low.size()[3]);
        let up = aspp.upsample_bilinear2d([lh, lw], false, None, None);
        let mut x = Tensor::cat(&[up, self.low_level.forward_t(low, train)], 1);
        for layer in &self.decoder {
            x = layer.forward_t(&x, train);
        }
        (x.apply(&self.classifier), aspp)
    }
}

// One per model: boxing the larger head would save nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum MainHead {
    V2(AsppV2),
    V3Plus(V3PlusHead),
}

/// What one forward pass gives the later stages.
pub struct SegOutput {
    /// Main-head logits (stride 8 for v2, 4 for v3+).
    pub main: Tensor,
    /// Auxiliary-head logits (stride 8).
    pub aux: Tensor,
    /// L2-normalised pixel embeddings (stride 8).
    pub embedding: Tensor,
    /// The backbone's output (layer4, stride 8), where the diagnostics compare the gradients
    /// of the losses; in the forward's own precision.
    pub features: Tensor,
}

#[derive(Debug)]
pub struct SegNet {
    backbone: ResNet,
    aux: AsppV2,
    main: MainHead,
    projection: ProjectionHead,
    pub classes: i64,
    /// Shared by every BatchNorm layer (`sync_batch_norm`).
    batch_norm: BatchNormMode,
}

/// Variable-name prefixes; the optimizer gives `HEAD_PREFIXES` the 10x learning rate.
pub const BACKBONE_PREFIX: &str = "backbone.";
pub const HEAD_PREFIXES: [&str; 3] = ["aux.", "main.", "projection."];

impl SegNet {
    pub fn new(root: &nn::Path, config: &ModelConfig, classes: usize) -> anyhow::Result<SegNet> {
        let depth = Depth::of(config.backbone, config.tiny_width);
        let batch_norm = BatchNormMode::new(config.bn_stats == BnStats::Batch);
        let bn = &batch_norm;
        let classes = classes as i64;
        let backbone = ResNet::new(&(root / "backbone"), depth, bn, config.caffe_style);
        let aux = AsppV2::new(&(root / "aux"), backbone.layer3_channels, classes, &config.aspp_dilations);
        let (main, projection_in) = match config.arch {
            Arch::Deeplabv2 => (
                MainHead::V2(AsppV2::new(&(root / "main"), backbone.layer4_channels, classes, &config.aspp_dilations)),
                backbone.layer4_channels,
            ),
            Arch::Deeplabv3plus => {
                let width = config.v3plus_width;
                let dilations: Vec<i64> = config.aspp_dilations.iter().skip(1).copied().collect();
                (
                    MainHead::V3Plus(V3PlusHead::new(
                        &(root / "main"),
                        backbone.layer4_channels,
                        backbone.low_channels,
                        width,
                        classes,
                        &dilations,
                        bn,
                    )),
                    width,
                )
            }
        };
        let projection = ProjectionHead::new(&(root / "projection"), projection_in, config.projection_dim, bn);
        Ok(SegNet { backbone, aux, main, projection, classes, batch_norm })
    }

    /// `train.sync_bn`: from now on every BatchNorm layer that normalises on batch statistics
    /// takes them over all of a job's ranks. Every rank must then run the same layers forward
    /// and backward in each step (a collective per layer each way).
    pub fn sync_batch_norm(&self, ranks: std::sync::Arc<dyn SumOverRanks>) {
        self.batch_norm.synchronise_over(ranks);
    }

    /// Whether a synchronised BatchNorm layer failed since the last call (a peer lost): the
    /// error, and the forward passes since then ran on per-rank statistics.
    pub fn take_sync_failure(&self) -> Option<anyhow::Error> {
        self.batch_norm.take_sync_failure()
    }

    pub fn forward_t(&self, images: &Tensor, train: bool) -> SegOutput {
        let f = self.backbone.features(images, train);
        let aux = self.aux.forward(&f.layer3);
        let (main, embedding_features) = match &self.main {
            MainHead::V2(head) => (head.forward(&f.layer4), f.layer4.shallow_clone()),
            MainHead::V3Plus(head) => head.forward_t(&f.layer4, &f.low, train),
        };
        let embedding = self.projection.forward_t(&embedding_features, train);
        SegOutput { main, aux, embedding, features: f.layer4 }
    }
}

/// Bilinear upsampling of logits to a label's size.
pub fn upsample(logits: &Tensor, height: i64, width: i64) -> Tensor {
    // At the same size bilinear (align_corners = false) is the identity: no copy.
    if logits.size()[2..] == [height, width] {
        return logits.shallow_clone();
    }
    logits.upsample_bilinear2d([height, width], false, None, None)
}
