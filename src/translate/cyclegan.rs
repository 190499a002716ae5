//! CycleGAN training (Zhu et al. 2017, with the reference code's defaults): G_A maps source to
//! target look and G_B back; D_A tells real target images from G_A's, D_B real source images
//! from G_B's. Least-squares GAN losses, cycle consistency (weight lambda) both ways, identity
//! (weight `identity_weight` x lambda), a history pool of generated images for the
//! discriminators, Adam, a constant learning rate for `epochs` then a linear decay over
//! `epochs_decay`. One source and one unpaired target image per iteration (batch 1, as published).
//!
//! Every iteration draws its randomness from (seed, iteration) alone, and a checkpoint holds the
//! networks, both optimizers and both pools: `--continue` after a kill goes on exactly where the
//! checkpoint was taken.

use super::networks::{Discriminator, Generator};
use crate::config::{AugmentConfig, TranslateConfig};
use crate::data::augment::Augmenter;
use crate::data::datasets::{decode_image, Rgb};
use crate::train::checkpoint;
use crate::train::optimizer::Adam;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Reduction, Tensor};

/// An image as [1, 3, H, W] floats of its 0-255 values (what FDA swaps).
pub fn to_float_bytes(rgb: &Rgb, device: Device) -> Tensor {
    Tensor::from_slice(&rgb.pixels)
        .view([1, rgb.height as i64, rgb.width as i64, 3])
        .permute([0, 3, 1, 2])
        .to(device)
        .to_kind(Kind::Float)
}

/// An image as the networks take it: [1, 3, H, W] in [-1, 1].
pub fn to_network(rgb: &Rgb, device: Device) -> Tensor {
    to_float_bytes(rgb, device) / 127.5 - 1.0
}

/// The networks' output back to RGB bytes (HWC).
pub fn to_rgb(image: &Tensor) -> Rgb {
    let (height, width) = (image.size()[2] as u32, image.size()[3] as u32);
    let bytes = ((image.squeeze_dim(0).permute([1, 2, 0]) + 1.0) * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .to(Device::Cpu)
        .contiguous();
    let mut pixels = vec![0u8; bytes.numel()];
    bytes.copy_data(&mut pixels, bytes.numel());
    Rgb { width, height, pixels }
}

/// The reference's ImagePool: until it holds `size` images each new one is kept and shown;
/// then with probability 1/2 a random stored image is shown and replaced by the new one,
/// otherwise the new one is shown.
pub struct ImagePool {
    size: usize,
    images: Vec<Tensor>,
}

impl ImagePool {
    pub fn new(size: usize) -> ImagePool {
        ImagePool { size, images: Vec::new() }
    }

    pub fn query(&mut self, image: &Tensor, rng: &mut impl Rng) -> Tensor {
        let image = image.detach();
        if self.size == 0 {
            return image;
        }
        if self.images.len() < self.size {
            self.images.push(image.copy());
            return image;
        }
        if rng.gen_bool(0.5) {
            let i = rng.gen_range(0..self.size);
            std::mem::replace(&mut self.images[i], image.copy())
        } else {
            image
        }
    }
}

/// The linear policy of the reference: factor 1 for epochs 1..=`epochs`, then down by
/// 1 / (`epochs_decay` + 1) per epoch (`epoch` counts from 1).
pub fn lr_factor(epoch: usize, epochs: usize, epochs_decay: usize) -> f64 {
    1.0 - epoch.saturating_sub(epochs) as f64 / (epochs_decay + 1) as f64
}

/// The loss terms of one iteration, as logged and exported.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Losses {
    pub g_gan: f64,
    pub cycle: f64,
    pub identity: f64,
    pub d: f64,
}

impl Losses {
    pub fn terms(&self) -> [(&'static str, f64); 4] {
        [("g_gan", self.g_gan), ("cycle", self.cycle), ("identity", self.identity), ("d", self.d)]
    }
}

pub struct CycleGan {
    pub vs: nn::VarStore,
    pub g_a: Generator,
    pub g_b: Generator,
    d_a: Discriminator,
    d_b: Discriminator,
    d_params: Vec<Tensor>,
    opt_g: Adam,
    opt_d: Adam,
    pool_a: ImagePool,
    pool_b: ImagePool,
    config: TranslateConfig,
    /// Iterations done.
    pub iteration: u64,
}

fn params_under(vs: &nn::VarStore, prefixes: &[&str]) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().filter(|(n, _)| prefixes.iter().any(|p| n.starts_with(p))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

impl CycleGan {
    pub fn new(config: &TranslateConfig, device: Device) -> CycleGan {
        tch::manual_seed(config.seed as i64);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (gw, gb) = (config.generator_width, config.generator_blocks);
        let (dw, dl) = (config.discriminator_width, config.discriminator_layers);
        let g_a = Generator::new(&(&root / "netG_A"), gw, gb);
        let g_b = Generator::new(&(&root / "netG_B"), gw, gb);
        let d_a = Discriminator::new(&(&root / "netD_A"), dw, dl);
        let d_b = Discriminator::new(&(&root / "netD_B"), dw, dl);
        let betas = (config.beta1, 0.999);
        let opt_g = Adam::new(params_under(&vs, &["netG_A.", "netG_B."]), betas);
        let d = params_under(&vs, &["netD_A.", "netD_B."]);
        let d_params = d.iter().map(|(_, t)| t.shallow_clone()).collect();
        let opt_d = Adam::new(d, betas);
        CycleGan {
            vs,
            g_a,
            g_b,
            d_a,
            d_b,
            d_params,
            opt_g,
            opt_d,
            pool_a: ImagePool::new(config.pool_size),
            pool_b: ImagePool::new(config.pool_size),
            config: config.clone(),
            iteration: 0,
        }
    }

    fn set_d_trainable(&mut self, on: bool) {
        for p in &mut self.d_params {
            let _ = p.set_requires_grad(on);
        }
    }

    /// One iteration on a source image `real_a` and a target image `real_b` ([1, 3, H, W] in
    /// [-1, 1]) at learning rate `lr`; `rng` draws the pools' choices.
    pub fn step(&mut self, real_a: &Tensor, real_b: &Tensor, lr: f64, rng: &mut impl Rng) -> Losses {
        let c = &self.config;
        let (lambda, identity) = (c.cycle_weight, c.identity_weight * c.cycle_weight);
        let l1 = |a: &Tensor, b: &Tensor| (a - b).abs().mean(Kind::Float);
        let lsgan = |prediction: &Tensor, real: bool| {
            let target = if real { prediction.ones_like() } else { prediction.zeros_like() };
            prediction.mse_loss(&target, Reduction::Mean)
        };

        // Generators, with the discriminators fixed.
        self.set_d_trainable(false);
        let fake_b = self.g_a.forward(real_a);
        let rec_a = self.g_b.forward(&fake_b);
        let fake_a = self.g_b.forward(real_b);
        let rec_b = self.g_a.forward(&fake_a);
        let (idt_loss, idt_value) = if identity > 0.0 {
            let loss = (l1(&self.g_a.forward(real_b), real_b) + l1(&self.g_b.forward(real_a), real_a)) * identity;
            let value = loss.double_value(&[]);
            (loss, value)
        } else {
            (Tensor::zeros([], (Kind::Float, real_a.device())), 0.0)
        };
        let gan = lsgan(&self.d_a.forward(&fake_b), true) + lsgan(&self.d_b.forward(&fake_a), true);
        let cycle = (l1(&rec_a, real_a) + l1(&rec_b, real_b)) * lambda;
        let total = &gan + &cycle + idt_loss;
        self.opt_g.zero_grad();
        total.backward();
        self.opt_g.update(lr);
        self.set_d_trainable(true);

        // Discriminators on real images and on the pools' generated ones.
        let shown_b = self.pool_b.query(&fake_b, rng);
        let shown_a = self.pool_a.query(&fake_a, rng);
        let d_a = (lsgan(&self.d_a.forward(real_b), true) + lsgan(&self.d_a.forward(&shown_b), false)) * 0.5;
        let d_b = (lsgan(&self.d_b.forward(real_a), true) + lsgan(&self.d_b.forward(&shown_a), false)) * 0.5;
        let d = d_a + d_b;
        self.opt_d.zero_grad();
        d.backward();
        self.opt_d.update(lr);
        self.iteration += 1;
        Losses {
            g_gan: gan.double_value(&[]),
            cycle: cycle.double_value(&[]),
            identity: idt_value,
            d: d.double_value(&[]),
        }
    }

    /// Translates at the scale the generator was trained at: resized to `load_size`
    /// [height, width] (as stored when [0, 0]), translated, resized back to its own size, so
    /// that the translated image stays aligned with the original's labels.
    pub fn translate_at(&self, image: &Tensor, load_size: [u32; 2]) -> Tensor {
        let (h, w) = (image.size()[2], image.size()[3]);
        let [lh, lw] = load_size.map(i64::from);
        if load_size == [0, 0] || (lh, lw) == (h, w) {
            return self.translate(image);
        }
        let resized = image.upsample_bilinear2d([lh, lw], false, None, None);
        self.translate(&resized).upsample_bilinear2d([h, w], false, None, None).clamp(-1.0, 1.0)
    }

    /// D_A, which tells real target images from G_A's.
    pub fn discriminator_a(&self) -> &Discriminator {
        &self.d_a
    }

    /// Translates one source image (any size) to the target's look.
    pub fn translate(&self, image: &Tensor) -> Tensor {
        tch::no_grad(|| self.g_a.forward(image))
    }

    /// Writes networks, optimizers, pools and `meta` atomically to `path`, as every adamcu
    /// checkpoint is written (`train::checkpoint`: the variables as `model.*`, the rest as
    /// `state.*`, a checksum of the contents in the metadata).
    pub fn save(&self, path: &Path, meta: &serde_json::Value) -> Result<()> {
        let mut state: Vec<(String, Tensor)> = Vec::new();
        for (prefix, opt) in [("adam_g", &self.opt_g), ("adam_d", &self.opt_d)] {
            state.extend(opt.state().into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)));
        }
        for (prefix, pool) in [("pool_a", &self.pool_a), ("pool_b", &self.pool_b)] {
            state.extend(pool.images.iter().enumerate().map(|(i, t)| (format!("{prefix}.{i:04}"), t.shallow_clone())));
        }
        checkpoint::capture(&self.vs, None, &state, meta).write(path)
    }

    /// Loads a checkpoint written by `save` (a damaged one is a `DamagedCheckpoint`); returns
    /// its metadata.
    pub fn load(&mut self, path: &Path) -> Result<serde_json::Value> {
        let loaded = checkpoint::load(path, &mut self.vs)?;
        let device = self.vs.device();
        let (mut adam_g, mut adam_d) = (Vec::new(), Vec::new());
        let (mut pool_a, mut pool_b) = (Vec::new(), Vec::new());
        for (key, t) in loaded.extra {
            match key.split_once('.') {
                Some(("adam_g", rest)) => adam_g.push((rest.to_string(), t)),
                Some(("adam_d", rest)) => adam_d.push((rest.to_string(), t)),
                Some(("pool_a", _)) => pool_a.push((key, t.to(device))),
                Some(("pool_b", _)) => pool_b.push((key, t.to(device))),
                _ => bail!("{}: unknown entry state.{key}", path.display()),
            }
        }
        self.opt_g.load_state(&adam_g).with_context(|| format!("{}: generator optimizer", path.display()))?;
        self.opt_d.load_state(&adam_d).with_context(|| format!("{}: discriminator optimizer", path.display()))?;
        for (pool, mut images) in [(&mut self.pool_a, pool_a), (&mut self.pool_b, pool_b)] {
            images.sort_by(|a, b| a.0.cmp(&b.0));
            pool.images = images.into_iter().map(|(_, t)| t).collect();
        }
        let meta = loaded.meta;
        self.iteration = meta["iteration"].as_u64().with_context(|| format!("{}: no iteration", path.display()))?;
        Ok(meta)
    }
}

/// The images one iteration trains on: which source and target image, and the crops' randomness.
pub struct Schedule {
    source: usize,
    target: usize,
    seed: u64,
    pub epoch_length: usize,
    pub total: u64,
}

impl Schedule {
    pub fn new(config: &TranslateConfig, source: usize, target: usize) -> Schedule {
        let epoch_length = source.max(target);
        let total = (epoch_length * (config.epochs + config.epochs_decay)) as u64;
        Schedule { source, target, seed: config.seed, epoch_length, total }
    }

    /// The epoch (from 1) of iteration `i` (from 0).
    pub fn epoch(&self, i: u64) -> usize {
        1 + i as usize / self.epoch_length
    }

    /// Iteration `i`'s random state (crops, pools), from the seed and `i` alone.
    pub fn rng(&self, i: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed ^ (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Iteration `i`'s source image (each epoch a fresh shuffle, as the reference's loader) and
    /// target image (uniformly at random: the two sets are unpaired).
    pub fn images(&self, i: u64, rng: &mut ChaCha8Rng) -> (usize, usize) {
        let epoch = i / self.epoch_length as u64;
        let mut order: Vec<usize> = (0..self.source).collect();
        order
            .shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(epoch).wrapping_mul(0xD1B5_4A32_D192_ED03)));
        let a = order[(i % self.epoch_length as u64) as usize % self.source];
        (a, rng.gen_range(0..self.target))
    }
}

/// The training crops: resized to `load_size` (as stored when [0, 0]), a random crop, a
/// random horizontal flip; the project's augmenter does exactly that with scale 1.
pub fn crop_augmenter(config: &TranslateConfig) -> Augmenter {
    Augmenter::new(&AugmentConfig {
        resize: config.load_size,
        crop: config.crop,
        scale: [1.0, 1.0],
        flip: true,
        ..AugmentConfig::default()
    })
}

/// A random training crop of the image at `path` as the networks take it.
pub fn training_crop(path: &Path, augmenter: &mut Augmenter, rng: &mut impl Rng, device: Device) -> Result<Tensor> {
    let rgb = decode_image(path)?;
    let geometry = augmenter.draw_geometry(rgb.width, rgb.height, rng);
    let no_label = vec![0u8; (rgb.width * rgb.height) as usize];
    let crop = augmenter.apply(&rgb.pixels, &no_label, geometry);
    let crop = Rgb { width: geometry.crop_width, height: geometry.crop_height, pixels: crop.image };
    Ok(to_network(&crop, device))
}
