//! The config's schema: one struct per TOML table, with the defaults a table takes when a
//! file leaves it out. Closed choices are the enums of `choices.rs`.

use super::choices::*;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// ImageNet's per-channel RGB statistics: the default normalisation (`augment.mean`, `augment.std`)
/// and that of every torchvision backbone.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub synth: SynthConfig,
    pub augment: AugmentConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    pub active: ActiveConfig,
    pub contrast: ContrastConfig,
    pub demo: DemoConfig,
    pub metrics: MetricsConfig,
    pub translate: TranslateConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    /// Run name: outputs go to `<runs_dir>/<name>/`.
    pub name: String,
    pub runs_dir: PathBuf,
    pub seed: u64,
    /// "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
    pub device: String,
    /// libtorch intra-op threads; 0 = libtorch's default.
    pub threads: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig { name: "run".into(), runs_dir: "runs".into(), seed: 0, device: "auto".into(), threads: 0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetConfig {
    pub kind: DatasetKind,
    /// Data set root (for `translated`: the folder of translated images).
    pub root: PathBuf,
    /// `translated` only: kind of the original set whose labels pair with the images.
    #[serde(default)]
    pub labels_kind: Option<DatasetKind>,
    /// `translated` only: root of the original set (its labels are used).
    #[serde(default)]
    pub labels_root: Option<PathBuf>,
    /// `cityscapes` only.
    #[serde(default)]
    pub split: Option<Split>,
    /// Overrides of `augment.resize` and `augment.crop` for this set (e.g. GTA5 frames to
    /// 720x1280, Cityscapes to 512x1024).
    #[serde(default)]
    pub resize: Option<[u32; 2]>,
    #[serde(default)]
    pub crop: Option<[u32; 2]>,
}

impl DatasetConfig {
    /// A set of `kind` at `root` with nothing else configured.
    pub fn at(kind: DatasetKind, root: impl Into<PathBuf>) -> DatasetConfig {
        DatasetConfig {
            kind,
            root: root.into(),
            labels_kind: None,
            labels_root: None,
            split: None,
            resize: None,
            crop: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DataConfig {
    /// 19 (GTA5, Synscapes) or 16 (SYNTHIA) training classes.
    pub classes: usize,
    pub on_bad_sample: OnBadSample,
    /// Decode/augment threads per domain.
    pub workers: usize,
    /// Capacity (in batches) of each bounded loader channel.
    pub channel_capacity: usize,
    pub source: Option<DatasetConfig>,
    pub target: Option<DatasetConfig>,
    pub target_val: Option<DatasetConfig>,
}

impl DataConfig {
    /// The original (untranslated) source set of a `translated` data.source, as its own data
    /// set: what the translation reads, and what online FDA restyles as it loads.
    pub fn original_source(&self) -> Option<DatasetConfig> {
        let source = self.source.as_ref()?;
        Some(DatasetConfig {
            resize: source.resize,
            crop: source.crop,
            ..DatasetConfig::at(source.labels_kind?, source.labels_root.clone()?)
        })
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            classes: 19,
            on_bad_sample: OnBadSample::Skip,
            workers: 1,
            channel_capacity: 4,
            source: None,
            target: None,
            target_val: None,
        }
    }
}

/// The embedded synthetic benchmark (`adamcu datasets synth`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    /// Where the benchmark is written: the raw source in `source/`, the target in `target/`
    /// (`adamcu translate` writes the translated source beside them).
    pub root: PathBuf,
    pub width: u32,
    pub height: u32,
    pub source_images: usize,
    pub target_train_images: usize,
    pub target_val_images: usize,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            root: "data/synth".into(),
            width: 256,
            height: 128,
            source_images: 400,
            target_train_images: 300,
            target_val_images: 100,
            seed: 7,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AugmentConfig {
    /// Images are first resized to this [height, width] (bicubic; labels nearest);
    /// [0, 0] keeps the stored size.
    pub resize: [u32; 2],
    /// Random crop [height, width] taken after random scaling.
    pub crop: [u32; 2],
    /// Random scale range [min, max] applied before cropping.
    pub scale: [f32; 2],
    pub flip: bool,
    /// Per-channel normalisation of RGB in 0..1.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            resize: [0, 0],
            crop: [128, 256],
            scale: [0.75, 1.25],
            flip: true,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    pub arch: Arch,
    pub backbone: Backbone,
    /// Width of the tiny backbone's first stage.
    pub tiny_width: i64,
    /// Optional ImageNet weights (.safetensors, torchvision names).
    pub pretrained: Option<PathBuf>,
    /// BatchNorm statistics. The affine parameters are frozen in both cases, as in DeepLab v2.
    pub bn_stats: BnStats,
    /// Output dimension of the projection head.
    pub projection_dim: i64,
    /// Dilations of the ASPP branches (v2: the four classifier branches; v3+: the first is
    /// replaced by the 1x1 branch and the rest are the separable branches).
    pub aspp_dilations: Vec<i64>,
    /// DeepLab v3+ ASPP/decoder width.
    pub v3plus_width: i64,
    /// Caffe-style bottlenecks (stride on the first 1x1 conv, ceil-mode max-pool) as in
    /// ADVENT's DeepLab v2; false = torchvision's layout, matching its ImageNet weights.
    pub caffe_style: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: Arch::Deeplabv2,
            backbone: Backbone::Resnet101,
            tiny_width: 16,
            pretrained: None,
            bn_stats: BnStats::Frozen,
            projection_dim: 256,
            aspp_dilations: vec![6, 12, 18, 24],
            v3plus_width: 512,
            caffe_style: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub batch_source: usize,
    pub batch_target: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub poly_power: f64,
    /// LR multiplier for the classifier and projection heads.
    pub head_lr_mult: f64,
    /// Weight of the auxiliary head's segmentation loss.
    pub aux_weight: f64,
    /// Iterations of source-only pretraining (Algorithm 1, step 2).
    pub source_iterations: usize,
    /// Iterations of the target-supervised upper bound (all target labels).
    pub target_supervised_iterations: usize,
    pub log_every: usize,
    pub precision: Precision,
    /// Channels-last (NHWC) weights and activations, faster for convolutions on tensor cores.
    pub channels_last: bool,
    /// The daemon writes a checkpoint every this many ADA-MCU steps and keeps the last N.
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// Evaluate on the target val set every this many steps (0 = only at the end): the
    /// daemon, and the val curve a single `train --stage` logs.
    pub eval_every: usize,
    /// Data-parallel with `model.bn_stats = "batch"`: BatchNorm's batch statistics over every
    /// rank's images (torch's SyncBatchNorm), not each rank's own share. One process: no effect.
    pub sync_bn: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_source: 2,
            batch_target: 2,
            lr: 2.5e-4,
            momentum: 0.9,
            weight_decay: 1e-4,
            poly_power: 0.9,
            head_lr_mult: 10.0,
            aux_weight: 0.1,
            source_iterations: 20_000,
            target_supervised_iterations: 20_000,
            log_every: 50,
            precision: Precision::Fp32,
            channels_last: false,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            eval_every: 0,
            sync_bn: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalConfig {
    /// Average the predictions of the image and its horizontal flip.
    pub flip: bool,
    /// Resize val images to [height, width] before the network ([0, 0] = as stored);
    /// logits are always upsampled to the full label resolution.
    pub input_size: [u32; 2],
}

/// ADA-MCU's active labelling (Section III-B, Algorithm 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ActiveConfig {
    /// Me as a fraction of all target training pixels (Mt).
    pub budget: f64,
    /// Weight of the KL term in the uncertainty score (Eq. 1; paper: 0.5).
    pub gamma: f64,
    /// Initial pi_high and the fixed pi_low (paper: not given; our choice).
    pub pi_high: f64,
    pub pi_low: f64,
    /// Decay rate r of pi_high (Algorithm 1: 0.9).
    pub decay: f64,
    pub schedule: Schedule,
    /// Adaptive sampling (AS); false is the paper's "AL w/o AS" row.
    pub adaptive_sampling: bool,
    /// Train on pseudo labels from G_l (Eq. 5).
    pub pseudo_labels: bool,
    /// Iterations of the ADA-MCU stage.
    pub iterations: usize,
    /// How labels are chosen (docs/algorithm.md, "Strategies"): ADA-MCU per step, or RIPU and
    /// the uncertainty baselines in selection rounds.
    pub strategy: Strategy,
    /// Round strategies: the iterations of the stage at which a round selects over the whole
    /// target set, each spending an equal share of Me (RIPU: 10k, 12k, 14k, 16k, 18k).
    pub rounds: Vec<usize>,
    /// Round strategies: regions or single pixels (RIPU's RA and PA).
    pub annotation: Annotation,
    /// Round strategies: k, the half-width of the (2k+1)^2 window of a region and of RIPU's
    /// scores; with pixel annotation, no two chosen pixels within k of each other
    /// (RIPU: 1 for RA, 32 for PA).
    pub radius: usize,
    /// A budget of so many pixels per target image instead of `budget` (RIPU's PA: 40 at
    /// 1280x640), at the training resolution; absent: `budget`.
    pub pixels_per_image: Option<u64>,
    /// The poly learning-rate schedule's length, when it is not `iterations` (RIPU decays over
    /// 62,500 iterations and stops at 40,000); absent: `iterations`.
    pub poly_horizon: Option<usize>,
    /// RIPU's training losses beside the supervised ones.
    pub ripu: RipuLosses,
}

/// RIPU's extra training terms (its `core/loss/*` and `train.py`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RipuLosses {
    /// Negative learning on every target pixel: -log(1 - p) over the classes with p below
    /// `negative_threshold` (RIPU: weight 1, threshold 0.05).
    pub negative_weight: f64,
    pub negative_threshold: f64,
    /// Local consistency on the source: the L1 distance of each pixel's softmax to its 3x3
    /// neighbourhood mean, at the source labels' boundaries (RIPU: 0.1).
    pub consistency_weight: f64,
}

impl Default for RipuLosses {
    fn default() -> Self {
        RipuLosses { negative_weight: 1.0, negative_threshold: 0.05, consistency_weight: 0.1 }
    }
}

impl Default for ActiveConfig {
    fn default() -> Self {
        ActiveConfig {
            budget: 0.05,
            gamma: 0.5,
            pi_high: 0.9,
            pi_low: 0.1,
            decay: 0.9,
            schedule: Schedule::Sequential,
            adaptive_sampling: true,
            pseudo_labels: true,
            iterations: 40_000,
            strategy: Strategy::AdaMcu,
            rounds: vec![10_000, 12_000, 14_000, 16_000, 18_000],
            annotation: Annotation::Region,
            radius: 1,
            pixels_per_image: None,
            poly_horizon: None,
            ripu: RipuLosses::default(),
        }
    }
}

/// Multi-level contrastive units (Section III-C/D, Eqs. 7-11).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ContrastConfig {
    pub enabled: bool,
    /// The levels whose units are built (Section III-C).
    pub levels: Vec<Level>,
    /// Whose anchors the cross-domain units hold: both domains' (our reading, the default), or
    /// only the target's against source keys (Section I's "target aligned to the source").
    pub cross_domain_anchors: CrossDomainAnchors,
    /// Pixel-to-pixel (Eqs. 9-10) and center-to-center (Eq. 11) InfoNCE.
    pub p2p: bool,
    pub c2c: bool,
    /// Weight the logits by the dynamic category correlation matrix (Eqs. 7-8).
    pub dccm: bool,
    /// Whose confusions R counts (Eq. 7; docs/algorithm.md): the target's revealed labels, or
    /// those and the source's ground truth.
    pub dccm_from: DccmFrom,
    /// EMA momentum beta of the DCCM (Eq. 8; not given in the paper: our choice).
    pub dccm_momentum: f64,
    /// InfoNCE temperature lambda (peers: 0.1).
    pub temperature: f64,
    /// Weight of L_con in the total loss (the paper: L_total = L_seg + L_con, 1).
    pub weight: f64,
    /// Each level's share of L_con (the paper sums the three levels unweighted: 1 each). Not a
    /// reading of the paper: a knob to ask whether one level's loss is its weight
    /// (datasets/synth.md).
    pub level_weights: LevelWeights,
    /// Anchors per unit and keys per image, drawn by `sampling` when there are more.
    pub max_anchors: usize,
    pub max_keys: usize,
    /// How anchors and keys are drawn: an equal share per class, as ContrastiveSeg [25] draws
    /// them (the default), or uniformly over the image's candidates.
    pub sampling: ContrastSampling,
}

impl Default for ContrastConfig {
    fn default() -> Self {
        ContrastConfig {
            enabled: true,
            levels: Level::ALL.to_vec(),
            cross_domain_anchors: CrossDomainAnchors::Both,
            p2p: true,
            c2c: true,
            dccm: true,
            dccm_from: DccmFrom::Target,
            dccm_momentum: 0.99,
            temperature: 0.1,
            weight: 1.0,
            level_weights: LevelWeights::default(),
            max_anchors: 256,
            max_keys: 1024,
            sampling: ContrastSampling::ClassBalanced,
        }
    }
}

/// A weight per level of contrastive units: L_con = sum over levels of weight x (p2p + c2c).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct LevelWeights {
    pub intra_image: f64,
    pub cross_image: f64,
    pub cross_domain: f64,
}

impl Default for LevelWeights {
    fn default() -> Self {
        LevelWeights { intra_image: 1.0, cross_image: 1.0, cross_domain: 1.0 }
    }
}

impl LevelWeights {
    pub fn of(&self, level: Level) -> f64 {
        match level {
            Level::IntraImage => self.intra_image,
            Level::CrossImage => self.cross_image,
            Level::CrossDomain => self.cross_domain,
        }
    }
}

/// The Prometheus endpoint of the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// Address of `/metrics` ("" = off).
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:9464".into() }
    }
}

impl MetricsConfig {
    pub fn listen_address(&self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.listen.parse().map_err(|e| anyhow::anyhow!("metrics.listen = {:?}: {e}", self.listen))?))
    }
}

/// Algorithm 1, line 1: the translation of the source images toward the target's look
/// (`adamcu translate`). It reads the original source set (`data.source.labels_kind` at
/// `data.source.labels_root`) and the target train images (no labels), and writes the
/// translated set, same file names, to `data.source.root` (`kind = "translated"`).
/// The CycleGAN defaults are the published ones (Zhu et al. 2017 and its reference code).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TranslateConfig {
    pub method: TranslateMethod,
    /// Seed of the networks' initialisation, the data order, crops and the history pool.
    pub seed: u64,
    /// CycleGAN: the ResNet generator's width (ngf) and residual blocks.
    pub generator_width: i64,
    pub generator_blocks: i64,
    /// CycleGAN: the PatchGAN discriminator's width (ndf) and strided layers (3: 70x70 patches).
    pub discriminator_width: i64,
    pub discriminator_layers: i64,
    /// CycleGAN: training images are resized to `load_size` [height, width] ([0, 0]: as stored),
    /// then a random `crop` [height, width] is taken and flipped with probability 1/2.
    pub load_size: [u32; 2],
    pub crop: [u32; 2],
    /// CycleGAN: epochs at the full learning rate, then epochs of linear decay to zero. An
    /// epoch is max(|source|, |target|) iterations of one image each.
    pub epochs: usize,
    pub epochs_decay: usize,
    /// CycleGAN: Adam's learning rate and beta1 (beta2 = 0.999).
    pub lr: f64,
    pub beta1: f64,
    /// CycleGAN: the cycle-consistency weight (lambda) and the identity weight as a fraction
    /// of it.
    pub cycle_weight: f64,
    pub identity_weight: f64,
    /// CycleGAN: the history of generated images the discriminators also see.
    pub pool_size: usize,
    /// CycleGAN: iterations between checkpoints (`translate --continue` goes on from the newest).
    pub checkpoint_every: usize,
    /// FDA: the low-frequency window's half-side as a fraction of min(height, width).
    pub fda_beta: f64,
    pub fda_window: FdaWindow,
    /// FDA: written once before pretraining, or in the source loader per sample drawn.
    pub fda_mode: FdaMode,
}

impl Default for TranslateConfig {
    fn default() -> Self {
        TranslateConfig {
            method: TranslateMethod::None,
            seed: 0,
            generator_width: 64,
            generator_blocks: 9,
            discriminator_width: 64,
            discriminator_layers: 3,
            load_size: [286, 286],
            crop: [256, 256],
            epochs: 100,
            epochs_decay: 100,
            lr: 2e-4,
            beta1: 0.5,
            cycle_weight: 10.0,
            identity_weight: 0.5,
            pool_size: 50,
            checkpoint_every: 1000,
            fda_beta: 0.01,
            fda_window: FdaWindow::PerSide,
            fda_mode: FdaMode::Offline,
        }
    }
}

/// Which rows `adamcu demo` trains (each an ablation preset, see `ablation::apply`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DemoConfig {
    pub variants: Vec<Preset>,
    /// Runs of the whole table, with seeds `run.seed`, `run.seed + 1`, ...; with more than one
    /// the table gives means and the mIoU's standard deviation over them.
    pub repeats: usize,
    /// Steps between target val evaluations of each row's stage, for its curve (0 = none).
    pub eval_every: usize,
    /// More budgets (fractions of the target's pixels) at which each variant is trained
    /// again from the same source checkpoint, beside `active.budget`: the table of mIoU
    /// against the labelled fraction and `fig1c.png`, the paper's Fig. 1(c). Empty: none.
    pub budgets: Vec<f64>,
    /// Which row each row's paired gain is over: the row before (Table VI's steps) or the
    /// first variant (`adamcu compare`: each strategy against the first).
    pub paired_against: PairedAgainst,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            variants: vec![Preset::AlWAs, Preset::McuI, Preset::Full],
            repeats: 1,
            eval_every: 0,
            budgets: Vec::new(),
            paired_against: PairedAgainst::Previous,
        }
    }
}

impl Config {
    /// The augmentation of one set: `[augment]` with the set's own resize and crop.
    pub fn augment_for(&self, set: &DatasetConfig) -> AugmentConfig {
        AugmentConfig {
            resize: set.resize.unwrap_or(self.augment.resize),
            crop: set.crop.unwrap_or(self.augment.crop),
            ..self.augment.clone()
        }
    }

    /// The folder of this run's outputs.
    pub fn run_dir(&self) -> PathBuf {
        self.run.runs_dir.join(&self.run.name)
    }

    /// The three data sets with their keys, in the order every message lists them.
    pub fn data_sets(&self) -> [(&'static str, Option<&DatasetConfig>); 3] {
        [
            ("data.source", self.data.source.as_ref()),
            ("data.target", self.data.target.as_ref()),
            ("data.target_val", self.data.target_val.as_ref()),
        ]
    }
}
