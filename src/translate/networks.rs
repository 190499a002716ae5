//! CycleGAN's networks as published (Zhu et al. 2017, and the reference code's `networks.py`
//! for `--netG resnet_9blocks --netD basic --norm instance`): a ResNet generator with reflection
//! padding and instance norm, and the 70x70 PatchGAN discriminator. Variables are named as the
//! reference's `state_dict` keys (`model.<index>.weight`), so its weights load as they are and
//! the parity test (`tests/translate.rs`) compares like with like.

use tch::nn::{self, Module};
use tch::Tensor;

/// The reference's `init_weights(init_type="normal", gain=0.02)`: every convolution's weight
/// from N(0, 0.02), its bias 0 (instance norm has no affine parameters).
fn conv_config(stride: i64, padding: i64) -> nn::ConvConfig {
    nn::ConvConfig {
        stride,
        padding,
        ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    }
}

/// InstanceNorm2d(affine=False, track_running_stats=False): each image's own statistics.
fn instance_norm(xs: &Tensor) -> Tensor {
    xs.instance_norm(None::<Tensor>, None::<Tensor>, None::<Tensor>, None::<Tensor>, true, 0.1, 1e-5, false)
}

/// One residual block: pad 1, conv 3x3, IN, ReLU, pad 1, conv 3x3, IN; plus the input.
#[derive(Debug)]
struct ResidualBlock {
    first: nn::Conv2D,
    second: nn::Conv2D,
}

impl ResidualBlock {
    fn new(p: nn::Path, channels: i64) -> ResidualBlock {
        let p = p / "conv_block";
        ResidualBlock {
            first: nn::conv2d(&p / "1", channels, channels, 3, conv_config(1, 0)),
            second: nn::conv2d(&p / "5", channels, channels, 3, conv_config(1, 0)),
        }
    }
}

impl Module for ResidualBlock {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let y = instance_norm(&xs.reflection_pad2d([1, 1, 1, 1]).apply(&self.first)).relu();
        xs + instance_norm(&y.reflection_pad2d([1, 1, 1, 1]).apply(&self.second))
    }
}

/// The ResNet generator: c7s1-ngf, two stride-2 downsamplings, `blocks` residual blocks at
/// 4 ngf, two stride-2 transposed convolutions, c7s1-3, tanh. Images in and out in [-1, 1].
/// Heights and widths that are not multiples of 4 are reflection-padded up and cropped back.
#[derive(Debug)]
pub struct Generator {
    stem: nn::Conv2D,
    down: Vec<nn::Conv2D>,
    blocks: Vec<ResidualBlock>,
    up: Vec<nn::ConvTranspose2D>,
    head: nn::Conv2D,
}

impl Generator {
    pub fn new(p: &nn::Path, width: i64, block_count: i64) -> Generator {
        let p = p / "model";
        let stem = nn::conv2d(&p / "1", 3, width, 7, conv_config(1, 0));
        let down = (0..2)
            .map(|i| {
                let c = width << i;
                nn::conv2d(&p / (4 + 3 * i).to_string(), c, 2 * c, 3, conv_config(2, 1))
            })
            .collect();
        let blocks = (0..block_count).map(|i| ResidualBlock::new(&p / (10 + i).to_string(), 4 * width)).collect();
        let up = (0..2)
            .map(|i| {
                let c = (4 * width) >> i;
                let config = nn::ConvTransposeConfig {
                    stride: 2,
                    padding: 1,
                    output_padding: 1,
                    ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
                    bs_init: nn::Init::Const(0.0),
                    ..Default::default()
                };
                nn::conv_transpose2d(&p / (10 + block_count + 3 * i).to_string(), c, c / 2, 3, config)
            })
            .collect();
        let head = nn::conv2d(&p / (10 + block_count + 7).to_string(), width, 3, 7, conv_config(1, 0));
        Generator { stem, down, blocks, up, head }
    }
}

impl Module for Generator {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (h, w) = (xs.size()[2], xs.size()[3]);
        let (pad_h, pad_w) = ((4 - h % 4) % 4, (4 - w % 4) % 4);
        let padded = if pad_h + pad_w > 0 { xs.reflection_pad2d([0, pad_w, 0, pad_h]) } else { xs.shallow_clone() };
        let mut y = instance_norm(&padded.reflection_pad2d([3, 3, 3, 3]).apply(&self.stem)).relu();
        for conv in &self.down {
            y = instance_norm(&y.apply(conv)).relu();
        }
        for block in &self.blocks {
            y = block.forward(&y);
        }
        for conv in &self.up {
            y = instance_norm(&y.apply(conv)).relu();
        }
        let out = y.reflection_pad2d([3, 3, 3, 3]).apply(&self.head).tanh();
        if pad_h + pad_w > 0 {
            out.narrow(2, 0, h).narrow(3, 0, w)
        } else {
            out
        }
    }
}

/// The PatchGAN discriminator (`n_layers` = 3: each output sees a 70x70 patch): conv 4x4
/// stride 2 and leaky ReLU 0.2; `layers - 1` more at doubling widths (at most 8 ndf) with IN;
/// one at stride 1 with IN; a 1-channel conv at stride 1. One real/fake score per patch.
#[derive(Debug)]
pub struct Discriminator {
    convs: Vec<(nn::Conv2D, bool)>,
    head: nn::Conv2D,
}

impl Discriminator {
    pub fn new(p: &nn::Path, width: i64, layers: i64) -> Discriminator {
        let p = p / "model";
        let mut convs = vec![(nn::conv2d(&p / "0", 3, width, 4, conv_config(2, 1)), false)];
        let (mut index, mut channels) = (2, width);
        for n in 1..=layers {
            let out = width * (1 << n).min(8);
            let stride = if n < layers { 2 } else { 1 };
            convs.push((nn::conv2d(&p / index.to_string(), channels, out, 4, conv_config(stride, 1)), true));
            (index, channels) = (index + 3, out);
        }
        let head = nn::conv2d(&p / index.to_string(), channels, 1, 4, conv_config(1, 1));
        Discriminator { convs, head }
    }
}

fn leaky_relu(xs: &Tensor) -> Tensor {
    xs.maximum(&(xs * 0.2))
}

impl Module for Discriminator {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut y = xs.shallow_clone();
        for (conv, normed) in &self.convs {
            y = y.apply(conv);
            y = leaky_relu(&if *normed { instance_norm(&y) } else { y });
        }
        y.apply(&self.head)
    }
}
