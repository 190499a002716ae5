//! Pipeline configuration: one TOML file per benchmark (`pipelines/*.toml`).
//!
//! Loading is two-phase so that a user sees every mistake at once:
//! 1. serde builds the typed config; keys serde does not know are collected (not fatal yet);
//! 2. `validate` checks every value and reports each problem as
//!    `key = value: expected ...`.
//!
//! `${VAR}` and `${VAR:-default}` are expanded in path values.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// Every problem found in a config file, one per line.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} error(s)", self.file.display(), self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Gta5,
    Synthia,
    Synscapes,
    Cityscapes,
    /// CycleGAN-translated images of a source set, paired with that set's labels by file name.
    Translated,
    /// A packed shard written by `adamcu pack`.
    Shard,
}

impl DatasetKind {
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Gta5 => "gta5",
            DatasetKind::Synthia => "synthia",
            DatasetKind::Synscapes => "synscapes",
            DatasetKind::Cityscapes => "cityscapes",
            DatasetKind::Translated => "translated",
            DatasetKind::Shard => "shard",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBadSample {
    /// Count and log the sample with its path, then go on.
    Skip,
    /// Stop the run with the error.
    Stop,
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
    /// `cityscapes` only: "train" or "val".
    #[serde(default)]
    pub split: Option<String>,
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
    /// Where the benchmark is written; `source/`, `source_translated/`, `target/` below it.
    pub root: PathBuf,
    pub width: u32,
    pub height: u32,
    pub source_images: usize,
    pub target_train_images: usize,
    pub target_val_images: usize,
    /// How far (0..1) the "translated" source moves its appearance toward the target's.
    pub translation_strength: f32,
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
            translation_strength: 0.3,
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
            mean: crate::model::weights::IMAGENET_MEAN,
            std: crate::model::weights::IMAGENET_STD,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// "deeplabv2" or "deeplabv3plus".
    pub arch: String,
    /// "resnet101", "resnet50", "resnet18" or "tiny" (CPU runs).
    pub backbone: String,
    /// Width of the tiny backbone's first stage.
    pub tiny_width: i64,
    /// Optional ImageNet weights (.safetensors, torchvision names).
    pub pretrained: Option<PathBuf>,
    /// BatchNorm statistics: "frozen" (eval-mode statistics) or "batch" (batch statistics).
    /// The affine parameters are frozen in both cases, as in DeepLab v2.
    pub bn_stats: String,
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
            arch: "deeplabv2".into(),
            backbone: "resnet101".into(),
            tiny_width: 16,
            pretrained: None,
            bn_stats: "frozen".into(),
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
    /// "fp32", or "bf16": the network's forward under autocast in bf16, on CUDA or the CPU
    /// (softmax statistics, uncertainty and losses stay fp32).
    pub precision: String,
    /// Channels-last (NHWC) weights and activations, faster for convolutions on tensor cores.
    pub channels_last: bool,
    /// The daemon writes a checkpoint every this many ADA-MCU steps and keeps the last N.
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// Evaluate on the target val set every this many steps (0 = only at the end): the
    /// daemon, and the val curve a single `train --stage` logs.
    pub eval_every: usize,
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
            precision: "fp32".into(),
            channels_last: false,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            eval_every: 0,
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

/// How labels are drawn from the groups (docs/algorithm.md, "Two readings").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Algorithm 1: G_h until Ma = Me/2, then G_m until Ma = Me.
    Sequential,
    /// Section III-B: each batch draws the same number from G_h and G_m.
    Simultaneous,
}

/// The pixels the DCCM's error rates R (Eq. 7) are counted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DccmFrom {
    /// The target pixels whose labels were bought (the confusions the paper motivates the
    /// DCCM with, sidewalk taken for road, are the target's).
    Target,
    /// Those and every labelled source pixel (the source's far more numerous pixels then
    /// make R mostly the source's).
    Both,
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
        }
    }
}

/// Multi-level contrastive units (Section III-C/D, Eqs. 7-11).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ContrastConfig {
    pub enabled: bool,
    /// Levels: any of "intra-image", "cross-image", "cross-domain".
    pub levels: Vec<String>,
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
    /// Anchors per unit and keys per image, sampled uniformly when there are more.
    pub max_anchors: usize,
    pub max_keys: usize,
}

impl Default for ContrastConfig {
    fn default() -> Self {
        ContrastConfig {
            enabled: true,
            levels: vec!["intra-image".into(), "cross-image".into(), "cross-domain".into()],
            p2p: true,
            c2c: true,
            dccm: true,
            dccm_from: DccmFrom::Target,
            dccm_momentum: 0.99,
            temperature: 0.1,
            weight: 1.0,
            max_anchors: 256,
            max_keys: 1024,
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

/// Which rows `adamcu demo` trains (each an ablation preset, see `ablation::apply`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DemoConfig {
    pub variants: Vec<String>,
    /// Runs of the whole table, with seeds `run.seed`, `run.seed + 1`, ...; with more than one
    /// the table gives means and the mIoU's standard deviation over them.
    pub repeats: usize,
    /// Steps between target val evaluations of each row's stage, for its curve (0 = none).
    pub eval_every: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig { variants: vec!["al-w-as".into(), "mcu-i".into(), "full".into()], repeats: 1, eval_every: 0 }
    }
}

impl Config {
    /// Reads, expands and validates a config file; returns every problem at once.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let fail = |errors: Vec<String>| ConfigErrors { file: path.to_path_buf(), errors };
        let text = std::fs::read_to_string(path).map_err(|e| fail(vec![format!("cannot read the file: {e}")]))?;
        Config::from_toml_str(&text).map_err(fail)
    }

    pub fn from_toml_str(text: &str) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let deserializer = toml::Deserializer::new(text);
        let mut unknown = Vec::new();
        let mut config: Config = serde_ignored::deserialize(deserializer, |path| {
            unknown.push(path.to_string());
        })
        .map_err(|e| vec![format!("{}", e.to_string().trim_end())])?;
        for key in unknown {
            errors.push(format!("{key}: unknown key"));
        }
        config.expand_paths(&mut errors);
        config.validate(&mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    fn expand_paths(&mut self, errors: &mut Vec<String>) {
        expand(&mut self.run.runs_dir, "run.runs_dir", errors);
        expand(&mut self.synth.root, "synth.root", errors);
        if let Some(p) = self.model.pretrained.as_mut() {
            expand(p, "model.pretrained", errors);
        }
        for (name, set) in [
            ("data.source", self.data.source.as_mut()),
            ("data.target", self.data.target.as_mut()),
            ("data.target_val", self.data.target_val.as_mut()),
        ] {
            if let Some(set) = set {
                expand(&mut set.root, &format!("{name}.root"), errors);
                if let Some(p) = set.labels_root.as_mut() {
                    expand(p, &format!("{name}.labels_root"), errors);
                }
            }
        }
    }

    fn validate(&self, errors: &mut Vec<String>) {
        let mut check = |ok: bool, key: &str, value: String, expected: &str| {
            if !ok {
                errors.push(format!("{key} = {value}: expected {expected}"));
            }
        };
        let r = &self.run;
        check(
            !r.name.is_empty() && !r.name.contains('/'),
            "run.name",
            format!("{:?}", r.name),
            "a non-empty name without '/'",
        );
        check(
            parse_device(&r.device).is_some(),
            "run.device",
            format!("{:?}", r.device),
            "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"",
        );

        let d = &self.data;
        check(d.classes == 19 || d.classes == 16, "data.classes", d.classes.to_string(), "19 or 16");
        check(d.workers >= 1, "data.workers", d.workers.to_string(), "at least 1");
        check(d.channel_capacity >= 1, "data.channel_capacity", d.channel_capacity.to_string(), "at least 1");
        for (name, set) in [("data.source", &d.source), ("data.target", &d.target), ("data.target_val", &d.target_val)]
        {
            let Some(set) = set else { continue };
            if set.kind == DatasetKind::Translated {
                check(
                    set.labels_kind.is_some_and(|k| {
                        k != DatasetKind::Translated && k != DatasetKind::Shard && k != DatasetKind::Cityscapes
                    }),
                    &format!("{name}.labels_kind"),
                    format!("{:?}", set.labels_kind.map(|k| k.name())),
                    "the original source set: \"gta5\", \"synthia\" or \"synscapes\"",
                );
                check(
                    set.labels_root.is_some(),
                    &format!("{name}.labels_root"),
                    "(missing)".into(),
                    "the original set's root, whose labels pair with the translated images",
                );
            }
            if set.kind == DatasetKind::Synthia {
                check(
                    d.classes == 16,
                    "data.classes",
                    d.classes.to_string(),
                    "16 with a SYNTHIA set (its 16-class protocol)",
                );
            }
            if let Some(split) = &set.split {
                check(
                    split == "train" || split == "val",
                    &format!("{name}.split"),
                    format!("{split:?}"),
                    "\"train\" or \"val\"",
                );
            }
        }

        let s = &self.synth;
        check(
            s.width >= 64 && s.width.is_multiple_of(8),
            "synth.width",
            s.width.to_string(),
            "a multiple of 8, at least 64",
        );
        check(
            s.height >= 32 && s.height.is_multiple_of(8),
            "synth.height",
            s.height.to_string(),
            "a multiple of 8, at least 32",
        );
        check(s.source_images >= 1, "synth.source_images", s.source_images.to_string(), "at least 1");
        check(s.target_train_images >= 1, "synth.target_train_images", s.target_train_images.to_string(), "at least 1");
        check(s.target_val_images >= 1, "synth.target_val_images", s.target_val_images.to_string(), "at least 1");
        check(
            (0.0..=1.0).contains(&s.translation_strength),
            "synth.translation_strength",
            s.translation_strength.to_string(),
            "a fraction in [0, 1]",
        );

        let a = &self.augment;
        check(
            a.crop[0] >= 8 && a.crop[1] >= 8,
            "augment.crop",
            format!("{:?}", a.crop),
            "[height, width], each at least 8",
        );
        check(
            a.scale[0] > 0.0 && a.scale[0] <= a.scale[1],
            "augment.scale",
            format!("{:?}", a.scale),
            "[min, max] with 0 < min <= max",
        );
        check(
            (a.resize[0] == 0) == (a.resize[1] == 0),
            "augment.resize",
            format!("{:?}", a.resize),
            "[height, width], both 0 or both positive",
        );
        check(a.std.iter().all(|&v| v > 0.0), "augment.std", format!("{:?}", a.std), "three positive numbers");

        let m = &self.model;
        check(
            matches!(m.arch.as_str(), "deeplabv2" | "deeplabv3plus"),
            "model.arch",
            format!("{:?}", m.arch),
            "\"deeplabv2\" or \"deeplabv3plus\"",
        );
        check(
            matches!(m.backbone.as_str(), "resnet101" | "resnet50" | "resnet18" | "tiny"),
            "model.backbone",
            format!("{:?}", m.backbone),
            "\"resnet101\", \"resnet50\", \"resnet18\" or \"tiny\"",
        );
        check(m.tiny_width >= 4, "model.tiny_width", m.tiny_width.to_string(), "at least 4");
        check(
            matches!(m.bn_stats.as_str(), "frozen" | "batch"),
            "model.bn_stats",
            format!("{:?}", m.bn_stats),
            "\"frozen\" or \"batch\"",
        );
        check(m.projection_dim >= 2, "model.projection_dim", m.projection_dim.to_string(), "at least 2");
        check(
            !m.aspp_dilations.is_empty()
                && m.aspp_dilations.iter().all(|&d| d >= 1)
                && (m.arch != "deeplabv3plus" || m.aspp_dilations.len() >= 2),
            "model.aspp_dilations",
            format!("{:?}", m.aspp_dilations),
            "a list of dilations >= 1 (at least two for deeplabv3plus)",
        );
        check(m.v3plus_width >= 8, "model.v3plus_width", m.v3plus_width.to_string(), "at least 8");

        let t = &self.train;
        check(t.batch_source >= 1, "train.batch_source", t.batch_source.to_string(), "at least 1");
        check(t.batch_target >= 1, "train.batch_target", t.batch_target.to_string(), "at least 1");
        check(t.lr > 0.0 && t.lr.is_finite(), "train.lr", t.lr.to_string(), "a positive number");
        check((0.0..1.0).contains(&t.momentum), "train.momentum", t.momentum.to_string(), "a number in [0, 1)");
        check(t.weight_decay >= 0.0, "train.weight_decay", t.weight_decay.to_string(), "a number >= 0");
        check(t.poly_power >= 0.0, "train.poly_power", t.poly_power.to_string(), "a number >= 0");
        check(t.head_lr_mult > 0.0, "train.head_lr_mult", t.head_lr_mult.to_string(), "a positive number");
        check(t.aux_weight >= 0.0, "train.aux_weight", t.aux_weight.to_string(), "a number >= 0");
        check(t.log_every >= 1, "train.log_every", t.log_every.to_string(), "at least 1");
        check(
            matches!(t.precision.as_str(), "fp32" | "bf16"),
            "train.precision",
            format!("{:?}", t.precision),
            "\"fp32\" or \"bf16\"",
        );
        check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every.to_string(), "at least 1");
        check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints.to_string(), "at least 1");
        check(
            self.metrics.listen.is_empty() || self.metrics.listen.parse::<std::net::SocketAddr>().is_ok(),
            "metrics.listen",
            format!("{:?}", self.metrics.listen),
            "\"host:port\" (e.g. \"127.0.0.1:9464\") or \"\"",
        );

        let a = &self.active;
        check(a.budget > 0.0 && a.budget <= 1.0, "active.budget", a.budget.to_string(), "a fraction in (0, 1]");
        check(a.gamma >= 0.0, "active.gamma", a.gamma.to_string(), "a number >= 0");
        check(
            a.pi_low >= 0.0 && a.pi_low < a.pi_high,
            "active.pi_low",
            a.pi_low.to_string(),
            "a number >= 0 and below active.pi_high",
        );
        check(a.decay > 0.0 && a.decay < 1.0, "active.decay", a.decay.to_string(), "a rate in (0, 1)");

        let c = &self.contrast;
        for level in &c.levels {
            check(
                matches!(level.as_str(), "intra-image" | "cross-image" | "cross-domain"),
                "contrast.levels",
                format!("{level:?}"),
                "\"intra-image\", \"cross-image\" or \"cross-domain\"",
            );
        }
        check(
            (0.0..1.0).contains(&c.dccm_momentum),
            "contrast.dccm_momentum",
            c.dccm_momentum.to_string(),
            "a number in [0, 1)",
        );
        check(c.temperature > 0.0, "contrast.temperature", c.temperature.to_string(), "a positive number");
        check(c.weight >= 0.0, "contrast.weight", c.weight.to_string(), "a number >= 0");
        check(c.max_anchors >= 1, "contrast.max_anchors", c.max_anchors.to_string(), "at least 1");
        check(c.max_keys >= 2, "contrast.max_keys", c.max_keys.to_string(), "at least 2");
        for v in &self.demo.variants {
            check(
                crate::ablation::PRESETS.contains(&v.as_str()),
                "demo.variants",
                format!("{v:?}"),
                &format!("one of {:?}", crate::ablation::PRESETS),
            );
        }
        check(self.demo.repeats >= 1, "demo.repeats", self.demo.repeats.to_string(), "at least 1");

        let e = &self.eval;
        check(
            (e.input_size[0] == 0) == (e.input_size[1] == 0),
            "eval.input_size",
            format!("{:?}", e.input_size),
            "[height, width], both 0 or both positive",
        );
    }

    /// The augmentation of one set: `[augment]` with the set's own resize and crop.
    pub fn augment_for(&self, set: &DatasetConfig) -> AugmentConfig {
        AugmentConfig {
            resize: set.resize.unwrap_or(self.augment.resize),
            crop: set.crop.unwrap_or(self.augment.crop),
            ..self.augment.clone()
        }
    }

    /// Like `load`, with `key=value` overrides (TOML values, dotted keys) applied first.
    pub fn load_with_overrides(path: &Path, overrides: &[String]) -> Result<Config, ConfigErrors> {
        let fail = |errors: Vec<String>| ConfigErrors { file: path.to_path_buf(), errors };
        let text = std::fs::read_to_string(path).map_err(|e| fail(vec![format!("cannot read the file: {e}")]))?;
        let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| fail(vec![e.to_string()]))?;
        let mut errors = Vec::new();
        for o in overrides {
            let Some((key, value)) = o.split_once('=') else {
                errors.push(format!("--set {o:?}: expected KEY=VALUE, e.g. active.budget=0.017"));
                continue;
            };
            let value: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
                Ok(mut t) => t.remove("v").unwrap(),
                // A bare word is a string.
                Err(_) => toml::Value::String(value.to_string()),
            };
            let parts: Vec<&str> = key.trim().split('.').collect();
            if let Err(e) = set_dotted(&mut doc, &parts, value) {
                errors.push(format!("--set {key}: {e}"));
            }
        }
        if !errors.is_empty() {
            return Err(fail(errors));
        }
        Config::from_toml_str(&toml::to_string(&doc).expect("a table serialises")).map_err(fail)
    }

    /// The device `run.device` names, or an error naming the key where it is not there.
    pub fn device(&self) -> anyhow::Result<tch::Device> {
        use anyhow::Context;
        let choice = parse_device(&self.run.device).expect("validated");
        choice.resolve().with_context(|| format!("run.device = {:?}", self.run.device))
    }

    /// The folder of this run's outputs.
    pub fn run_dir(&self) -> PathBuf {
        self.run.runs_dir.join(&self.run.name)
    }

    /// This config as a checkpoint records it (JSON; read back bit-exact, serde_json's
    /// `float_roundtrip` being on).
    pub fn recorded(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a config serialises")
    }

    /// Every key whose value differs between a recorded config (`Config::recorded`) and this
    /// one, in key order.
    pub fn changes_since(&self, recorded: &serde_json::Value) -> Vec<ConfigChange> {
        let (mut was, mut now) = (Default::default(), Default::default());
        flatten("", recorded, &mut was);
        flatten("", &self.recorded(), &mut now);
        let keys: std::collections::BTreeSet<&String> = was.keys().chain(now.keys()).collect();
        let null = serde_json::Value::Null;
        keys.into_iter()
            .filter_map(|key| {
                let (a, b) = (was.get(key).unwrap_or(&null), now.get(key).unwrap_or(&null));
                (a != b).then(|| ConfigChange { key: key.clone(), was: a.clone(), now: b.clone() })
            })
            .collect()
    }
}

/// Keys a resumed run may change without changing its experiment: where the files are, the
/// device and its threads, the memory layout, how the loaders are staffed, how often the run
/// reports, checkpoints and evaluates, and the parts `adamcu train` does not read.
const KEYS_RESUME_MAY_CHANGE: &[&str] = &[
    "run.name",
    "run.runs_dir",
    "run.device",
    "run.threads",
    "data.on_bad_sample",
    "data.workers",
    "data.channel_capacity",
    "data.source.root",
    "data.source.labels_root",
    "data.target.root",
    "data.target.labels_root",
    "data.target_val.root",
    "data.target_val.labels_root",
    "model.pretrained",
    "train.channels_last",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.target_supervised_iterations",
    "metrics",
    "demo",
    "synth",
];

/// One key whose value differs between the config a run was started with and the current one.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigChange {
    /// Dotted key, as in `--set`.
    pub key: String,
    /// JSON `null` where the key was or is absent (an unconfigured data set).
    pub was: serde_json::Value,
    pub now: serde_json::Value,
}

/// Keys (besides `KEYS_RESUME_MAY_CHANGE`) that source-only pretraining does not read: the
/// target side, the active-learning and contrastive settings, evaluation.
const KEYS_AFTER_SOURCE_STAGE: &[&str] =
    &["data.target", "data.target_val", "train.batch_target", "active", "contrast", "eval"];

impl ConfigChange {
    /// Whether the change alters what the run computes (anything not in
    /// `KEYS_RESUME_MAY_CHANGE`).
    pub fn changes_experiment(&self) -> bool {
        !self.is_under(KEYS_RESUME_MAY_CHANGE)
    }

    /// Whether the change alters what source-only pretraining computes.
    pub fn changes_source_stage(&self) -> bool {
        self.changes_experiment() && !self.is_under(KEYS_AFTER_SOURCE_STAGE)
    }

    fn is_under(&self, keys: &[&str]) -> bool {
        keys.iter().any(|k| self.key == *k || self.key.starts_with(&format!("{k}.")))
    }
}

/// Changes one per line, each indented, for an error message or a log line.
pub fn listed(changes: &[ConfigChange]) -> String {
    changes.iter().map(|c| format!("\n  {c}")).collect()
}

impl fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: was {}, now {}", self.key, self.was, self.now)
    }
}

/// `value`'s leaves by dotted key (arrays are leaves: `augment.crop` is one value).
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut std::collections::BTreeMap<String, serde_json::Value>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf.clone());
        }
    }
}

/// Sets `parts` (a dotted key) in a TOML table, creating tables on the way.
fn set_dotted(table: &mut toml::Table, parts: &[&str], value: toml::Value) -> Result<(), String> {
    match parts {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.to_string(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            match table.entry(first.to_string()).or_insert_with(|| toml::Value::Table(Default::default())) {
                toml::Value::Table(inner) => set_dotted(inner, rest, value),
                _ => Err(format!("{first} is not a table")),
            }
        }
    }
}

fn expand(path: &mut PathBuf, key: &str, errors: &mut Vec<String>) {
    let raw = path.to_string_lossy().into_owned();
    match shellexpand::env(&raw) {
        Ok(expanded) => *path = PathBuf::from(expanded.as_ref()),
        Err(e) => errors.push(format!(
            "{key} = {raw:?}: environment variable ${{{}}} is not set ({}); expected it set, \
             or a default as ${{{}:-default}}",
            e.var_name, e.cause, e.var_name
        )),
    }
}

/// Parses `run.device`; `None` when malformed.
pub fn parse_device(spec: &str) -> Option<DeviceChoice> {
    match spec {
        "auto" => Some(DeviceChoice::Auto),
        "cpu" => Some(DeviceChoice::Cpu),
        "cuda" => Some(DeviceChoice::Cuda(0)),
        _ => spec.strip_prefix("cuda:")?.parse().ok().map(DeviceChoice::Cuda),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// The device, or an error naming what libtorch sees when a CUDA device is asked for that
    /// is not there (libtorch itself would fail deep inside the first allocation).
    pub fn resolve(self) -> anyhow::Result<tch::Device> {
        match self {
            DeviceChoice::Auto => Ok(tch::Device::cuda_if_available()),
            DeviceChoice::Cpu => Ok(tch::Device::Cpu),
            DeviceChoice::Cuda(i) => {
                let count = tch::Cuda::device_count();
                anyhow::ensure!(
                    (i as i64) < count,
                    "CUDA device {i} asked for, but libtorch sees {count} CUDA device(s) \
                    (no NVIDIA driver, or a CPU-only libtorch?): expected \"auto\" or \"cpu\" here, or a GPU machine"
                );
                Ok(tch::Device::Cuda(i))
            }
        }
    }
}
