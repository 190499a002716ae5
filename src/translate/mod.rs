//! Algorithm 1, line 1: "Use CycleGAN to translate images in Ds to having a similar appearance
//! as target images". `adamcu translate` (and the daemon and the demo, when the translated set
//! is missing or stale) reads the original source set (`data.source.labels_kind` at
//! `data.source.labels_root`) and the target train images (never their labels), and writes the
//! translated source, same file names, into `data.source.root`, which the `translated` layout
//! reads and pairs with the original labels.
//!
//! - `networks.rs`: CycleGAN's ResNet generator and PatchGAN discriminator;
//! - `cyclegan.rs`: its training (losses, history pool, Adam, schedule, checkpoints);
//! - `fda.rs`: Fourier domain adaptation, the training-free alternative;
//! - here: what to translate, the settings stamp, the checkpoints' rotation, the write-out and
//!   the appearance figures of the report.
//!
//! Outputs are written atomically; a frame that cannot be read is named and skipped (the
//! translated set then lacks it, and the `translated` reader reports the missing frame).

pub mod cyclegan;
pub mod fda;
pub mod networks;

use crate::config::{Config, DatasetConfig, FdaMode, TranslateConfig, TranslateMethod};
use crate::data::datasets::{decode_image, list, Rgb};
use crate::data::error::DataError;
use crate::files::write_json;
use crate::progress::Progress;
use crate::train::checkpoint::Rotation;
use crate::train::Trainer;
use anyhow::{bail, Context, Result};
use cyclegan::{crop_augmenter, lr_factor, to_float_bytes, to_network, to_rgb, training_crop, CycleGan, Schedule};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

/// The stamp beside the translated images: the settings and inputs they were made from.
pub const STAMP: &str = "translate.json";
/// CycleGAN checkpoints kept in the run's `translate/` folder.
const KEEP_CHECKPOINTS: usize = 2;

/// What the configured translation reads and writes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub method: TranslateMethod,
    /// The raw source set (images and labels).
    pub original: DatasetConfig,
    /// The target train set (its images only).
    pub target: DatasetConfig,
    /// Where the translated images go (`data.source.root`).
    pub output: PathBuf,
    /// CycleGAN checkpoints: `<run dir>/translate/`.
    pub state_dir: PathBuf,
}

impl Plan {
    /// The plan of `config`, or none when there is nothing to write: `translate.method =
    /// "none"`, or FDA online (the source loader restyles as it reads, `train::open_source`).
    pub fn for_config(config: &Config) -> Result<Option<Plan>> {
        let t = &config.translate;
        if t.method == TranslateMethod::None || (t.method == TranslateMethod::Fda && t.fda_mode == FdaMode::Online) {
            return Ok(None);
        }
        let original = config
            .data
            .original_source()
            .context("translate.method needs data.source.kind = \"translated\" with labels_kind and labels_root")?;
        let source = config.data.source.as_ref().expect("DataConfig::original_source checked it");
        let target = config.data.target.clone().context("translate.method needs data.target (the target train set)")?;
        let output = source.root.clone();
        let images = list(&original)?.samples.first().and_then(|s| s.image.parent().map(Path::to_path_buf));
        if output == original.root || images.as_deref() == Some(output.as_path()) {
            bail!(
                "data.source.root = {}: the translation writes there, and it is the original set's own folder; \
                 give the translated set a folder of its own",
                output.display()
            );
        }
        Ok(Some(Plan {
            method: config.translate.method,
            original,
            target,
            output,
            state_dir: config.run_dir().join("translate"),
        }))
    }
}

/// `config` reading the raw source instead of the translated one, with no translation: the
/// "source-only, untranslated" row of the demo (the paper's Table III compares the two).
pub fn untranslated(config: &Config) -> Option<Config> {
    let original = config.data.original_source()?;
    let mut c = config.clone();
    c.data.source = Some(original);
    c.translate.method = TranslateMethod::None;
    Some(c)
}

/// Fréchet distances of image-pooled layer4 features (`train::embeddings::FeatureFit`) to the
/// target train images' in a network. The demo takes its target-supervised network: trained on
/// the target alone, so neither source set is in its training data.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FeatureDistance {
    pub raw_to_target: f64,
    pub translated_to_target: f64,
    /// Images fitted per set (spread evenly).
    pub images: usize,
}

/// The distances in `trainer`'s network over `images` images a set (none when the config does
/// not translate).
pub fn feature_distance(config: &Config, trainer: &Trainer, images: usize) -> Result<Option<FeatureDistance>> {
    let original = config.data.original_source().filter(|_| config.translate.method != TranslateMethod::None);
    if original.is_none() {
        return Ok(None);
    }
    let classes = config.data.classes;
    // The translated source as training reads it (written offline, or restyled online).
    let translated = crate::train::open_source(config)?;
    let raw = crate::train::open_set(&original, "data.source (its original set)", classes)?;
    let target = crate::train::open_set(&config.data.target, "data.target", classes)?;
    let target_fit = crate::train::embeddings::FeatureFit::of(trainer, &target, images)?;
    let distance = FeatureDistance {
        raw_to_target: crate::train::embeddings::FeatureFit::of(trainer, &raw, images)?.distance(&target_fit),
        translated_to_target: crate::train::embeddings::FeatureFit::of(trainer, &translated, images)?
            .distance(&target_fit),
        images: target_fit.images,
    };
    tracing::info!(
        "feature distance to the target (Fréchet, image-pooled layer4 features): raw source {:.3}, translated {:.3}",
        distance.raw_to_target,
        distance.translated_to_target
    );
    Ok(Some(distance))
}

/// The settings that shape the translated images, by method (not the paths, nor how often
/// checkpoints are written).
fn settings(t: &TranslateConfig) -> serde_json::Value {
    match t.method {
        TranslateMethod::None => json!({ "method": t.method }),
        TranslateMethod::Fda => {
            json!({ "method": t.method, "seed": t.seed, "fda_beta": t.fda_beta, "fda_window": t.fda_window })
        }
        TranslateMethod::Cyclegan => {
            let mut v = serde_json::to_value(TranslateConfig { checkpoint_every: 0, fda_beta: 0.0, ..t.clone() })
                .expect("serialises");
            let map = v.as_object_mut().expect("a table");
            map.remove("checkpoint_every");
            map.remove("fda_beta");
            map.remove("fda_window");
            map.remove("fda_mode");
            v
        }
    }
}

/// A fingerprint of a set of files (names, sizes, modification times): a regenerated or
/// edited input makes the translation stale.
fn fingerprint(files: &[PathBuf]) -> String {
    let mut hasher = crc32fast::Hasher::new();
    for f in files {
        hasher.update(f.to_string_lossy().as_bytes());
        if let Ok(m) = std::fs::metadata(f) {
            hasher.update(&m.len().to_le_bytes());
            if let Ok(t) = m.modified().map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default()) {
                hasher.update(&t.as_nanos().to_le_bytes());
            }
        }
    }
    format!("{:08x} over {} files", hasher.finalize(), files.len())
}

/// The images a translation reads: the original source's and the target train set's.
struct Inputs {
    source: Vec<PathBuf>,
    target: Vec<PathBuf>,
}

impl Inputs {
    fn of(plan: &Plan) -> Result<Inputs> {
        let source = list(&plan.original)?;
        let target = list(&plan.target)?;
        Ok(Inputs {
            source: source.samples.into_iter().map(|s| s.image).collect(),
            target: target.samples.into_iter().map(|s| s.image).collect(),
        })
    }

    fn stamp(&self, config: &TranslateConfig) -> serde_json::Value {
        json!({ "settings": settings(config), "source": fingerprint(&self.source), "target": fingerprint(&self.target) })
    }
}

/// Whether the translated set in `plan.output` was made from these settings and inputs.
fn is_current(plan: &Plan, stamp: &serde_json::Value) -> bool {
    std::fs::read(plan.output.join(STAMP))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|report| report.get("stamp") == Some(stamp))
}

/// Per-channel mean and standard deviation of RGB values (0-255) over a set of images, and
/// the distance between two such fits: the 2-Wasserstein (Frechet) distance between
/// per-channel Gaussians, sqrt(sum_c (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2). It sees global
/// colour and contrast, which is what an appearance translation must move.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ColourStats {
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl ColourStats {
    /// Over at most `limit` images spread evenly through `files` (unreadable ones left out).
    pub fn of(files: &[PathBuf], limit: usize) -> ColourStats {
        let step = files.len().div_ceil(limit.max(1)).max(1);
        let (mut sum, mut squares, mut n) = ([0f64; 3], [0f64; 3], 0f64);
        for file in files.iter().step_by(step) {
            let Ok(rgb) = decode_image(file) else { continue };
            for px in rgb.pixels.chunks_exact(3) {
                for c in 0..3 {
                    let v = px[c] as f64;
                    sum[c] += v;
                    squares[c] += v * v;
                }
            }
            n += (rgb.pixels.len() / 3) as f64;
        }
        let mean = sum.map(|s| s / n.max(1.0));
        let std = [0, 1, 2].map(|c| (squares[c] / n.max(1.0) - mean[c] * mean[c]).max(0.0).sqrt());
        ColourStats { mean, std }
    }

    pub fn distance(&self, other: &ColourStats) -> f64 {
        (0..3)
            .map(|c| (self.mean[c] - other.mean[c]).powi(2) + (self.std[c] - other.std[c]).powi(2))
            .sum::<f64>()
            .sqrt()
    }
}

/// What a translation did, written as the stamp file beside the images.
#[derive(Debug, Clone, Serialize)]
pub struct TranslateReport {
    pub stamp: serde_json::Value,
    pub method: TranslateMethod,
    pub written: usize,
    /// Frames that could not be read: named, skipped, and missing from the translated set.
    pub skipped: Vec<String>,
    pub training_iterations: u64,
    pub training_seconds: f64,
    pub writing_seconds: f64,
    /// Colour statistics of the raw source, the translated source and the target train images,
    /// and each source's distance to the target's.
    pub raw: ColourStats,
    pub translated: ColourStats,
    pub target: ColourStats,
    pub raw_to_target: f64,
    pub translated_to_target: f64,
}

/// Translates if the translated set is missing or stale (the daemon and the demo call this
/// before pretraining): goes on from the newest CycleGAN checkpoint of these settings.
pub fn ensure(config: &Config, device: Device) -> Result<Option<TranslateReport>> {
    let Some(plan) = Plan::for_config(config)? else { return Ok(None) };
    let inputs = Inputs::of(&plan)?;
    if is_current(&plan, &inputs.stamp(&config.translate)) {
        tracing::info!("translated source in {} is current ({STAMP})", plan.output.display());
        return Ok(None);
    }
    run_plan(config, &plan, inputs, true, device).map(Some)
}

/// `adamcu translate`: translates now; with `continue_run`, from the newest checkpoint of
/// these settings.
pub fn run(config: &Config, continue_run: bool, device: Device) -> Result<TranslateReport> {
    let plan = Plan::for_config(config)?.context(
        "nothing to write: translate.method = \"none\", or FDA with translate.fda_mode = \"online\" (the loader applies it)",
    )?;
    let inputs = Inputs::of(&plan)?;
    run_plan(config, &plan, inputs, continue_run, device)
}

fn run_plan(
    config: &Config,
    plan: &Plan,
    inputs: Inputs,
    continue_run: bool,
    device: Device,
) -> Result<TranslateReport> {
    let t = &config.translate;
    let stamp = inputs.stamp(t);
    tracing::info!(
        "translating {} source images ({}) toward {} target images by {} into {}",
        inputs.source.len(),
        plan.original.root.display(),
        inputs.target.len(),
        t.method,
        plan.output.display()
    );
    // Never overwrite images this stage did not write (a translated set made elsewhere).
    let image_dir = crate::data::datasets::translated_image_dir(&plan.output);
    if !plan.output.join(STAMP).exists() && has_pngs(&image_dir) {
        bail!(
            "data.source.root = {}: holds images that adamcu did not translate (no {STAMP}); to train on them as \
             they are, set translate.method = \"none\"; to translate, point data.source.root to an empty folder",
            plan.output.display()
        );
    }
    let mut skipped = Vec::new();
    let started = Instant::now();
    let (model, iterations) = match t.method {
        TranslateMethod::None => unreachable!("Plan::for_config returns none"),
        TranslateMethod::Fda => (None, 0),
        TranslateMethod::Cyclegan => {
            let model = train_cyclegan(config, plan, &inputs, &stamp, continue_run, device, &mut skipped)?;
            let done = model.iteration;
            (Some(model), done)
        }
    };
    let training_seconds = started.elapsed().as_secs_f64();

    // The write-out: the old images go first, so no stale frame pairs with a label.
    let _ = std::fs::remove_file(plan.output.join(STAMP));
    remove_pngs(&image_dir)?;
    let started = Instant::now();
    let mut progress = Progress::new("translate: write", inputs.source.len() as u64, config.train.log_every as u64);
    let mut written = Vec::new();
    let since = Instant::now();
    for (i, file) in inputs.source.iter().enumerate() {
        let result = match &model {
            Some(gan) => {
                decode_image(file).map(|rgb| to_rgb(&gan.translate_at(&to_network(&rgb, device), t.load_size)))
            }
            None => fda_one(t, i, file, &inputs.target, device),
        };
        match result {
            Ok(rgb) => {
                let out = image_dir.join(file.file_name().expect("a listed file has a name"));
                let image = image::RgbImage::from_raw(rgb.width, rgb.height, rgb.pixels).expect("sized buffer");
                crate::files::write_png(&out, &image)?;
                written.push(out);
            }
            Err(e) => {
                tracing::warn!("{e}: skipped, not translated");
                skipped.push(e.to_string());
            }
        }
        progress.tick();
        crate::telemetry::translate_written(1, (i + 1) as f64 / since.elapsed().as_secs_f64().max(1e-9));
    }
    progress.finish();
    let writing_seconds = started.elapsed().as_secs_f64();
    if written.is_empty() {
        bail!("no source image could be translated (every frame failed: {})", skipped.join("; "));
    }
    let limit = 200;
    let (raw, translated, target) = (
        ColourStats::of(&inputs.source, limit),
        ColourStats::of(&written, limit),
        ColourStats::of(&inputs.target, limit),
    );
    let report = TranslateReport {
        stamp,
        method: t.method,
        written: written.len(),
        skipped,
        training_iterations: iterations,
        training_seconds,
        writing_seconds,
        raw,
        translated,
        target,
        raw_to_target: raw.distance(&target),
        translated_to_target: translated.distance(&target),
    };
    write_json(&plan.output.join(STAMP), &report)?;
    tracing::info!(
        "translated {} images ({} skipped) in {:.0} s training + {:.0} s writing; colour distance to the target: \
         raw {:.1}, translated {:.1} (RGB 0-255, per-channel Gaussian W2)",
        report.written,
        report.skipped.len(),
        training_seconds,
        writing_seconds,
        report.raw_to_target,
        report.translated_to_target
    );
    Ok(report)
}

fn has_pngs(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.path().extension().is_some_and(|x| x.eq_ignore_ascii_case("png"))))
        .unwrap_or(false)
}

fn remove_pngs(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
            std::fs::remove_file(&path).with_context(|| format!("removing the stale {}", path.display()))?;
        }
    }
    Ok(())
}

/// FDA of source image `index`: a target image drawn for it from (seed, index), resized to
/// the source's size if it differs; an unreadable target image is replaced by another draw.
fn fda_one(
    t: &TranslateConfig,
    index: usize,
    file: &Path,
    targets: &[PathBuf],
    device: Device,
) -> Result<Rgb, DataError> {
    let source = decode_image(file)?;
    let mut rng = ChaCha8Rng::seed_from_u64(t.seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    crate::data::fda::with_drawn_target(&mut rng, targets.len(), |k| {
        let target = decode_image(&targets[k])?;
        // On 0-255 values, as `fda` explains.
        let (s, mut g) = (to_float_bytes(&source, device), to_float_bytes(&target, device));
        if (target.width, target.height) != (source.width, source.height) {
            g = g.upsample_bilinear2d([source.height as i64, source.width as i64], false, None, None);
        }
        let out = tch::no_grad(|| fda::transfer(&s, &g, t.fda_beta, t.fda_window)) / 127.5 - 1.0;
        Ok(to_rgb(&out))
    })
}

/// Trains (or goes on training) the CycleGAN to the end of its schedule.
fn train_cyclegan(
    config: &Config,
    plan: &Plan,
    inputs: &Inputs,
    stamp: &serde_json::Value,
    continue_run: bool,
    device: Device,
    skipped: &mut Vec<String>,
) -> Result<CycleGan> {
    let t = &config.translate;
    std::fs::create_dir_all(&plan.state_dir)?;
    let mut gan = CycleGan::new(t, device);
    let schedule = Schedule::new(t, inputs.source.len(), inputs.target.len());
    let rotation = Rotation { dir: plan.state_dir.clone(), keep: KEEP_CHECKPOINTS };
    rotation.remove_unfinished()?;
    if continue_run {
        for step in rotation.steps().into_iter().rev() {
            let file = rotation.path_for(step, "safetensors");
            let mut candidate = CycleGan::new(t, device);
            match candidate.load(&file) {
                Ok(meta) if meta.get("stamp") == Some(stamp) => {
                    tracing::info!("going on from {} (iteration {})", file.display(), candidate.iteration);
                    gan = candidate;
                    break;
                }
                Ok(_) => tracing::warn!("{}: made with other settings or inputs; not used", file.display()),
                Err(e) => tracing::warn!("{e:#}; trying an older checkpoint"),
            }
        }
    }
    if gan.iteration == 0 {
        for step in rotation.steps() {
            std::fs::remove_file(rotation.path_for(step, "safetensors"))?;
        }
    }
    let mut augmenter = crop_augmenter(t);
    let mut progress = Progress::new("translate: cyclegan", schedule.total, config.train.log_every as u64);
    progress.resume_at(gan.iteration);
    let mut bad: std::collections::BTreeSet<PathBuf> = Default::default();
    let save = |gan: &CycleGan| -> Result<()> {
        let path = rotation.path_for(gan.iteration, "safetensors");
        gan.save(&path, &json!({ "iteration": gan.iteration, "stamp": stamp }))?;
        rotation.prune()
    };
    let since = Instant::now();
    let first = gan.iteration;
    while gan.iteration < schedule.total {
        let i = gan.iteration;
        let mut rng = schedule.rng(i);
        let (a, b) = schedule.images(i, &mut rng);
        let mut crop = |files: &[PathBuf], mut index: usize, rng: &mut ChaCha8Rng| -> Result<tch::Tensor> {
            // An unreadable frame is named once and replaced by another draw of this iteration.
            for _ in 0..files.len() {
                match training_crop(&files[index], &mut augmenter, rng, device) {
                    Ok(x) => return Ok(x),
                    Err(e) => {
                        if bad.insert(files[index].clone()) {
                            tracing::warn!("{e}: skipped in CycleGAN training");
                            skipped.push(e.to_string());
                        }
                        index = rng.gen_range(0..files.len());
                    }
                }
            }
            bail!("no readable image among {} files", files.len())
        };
        let real_a = crop(&inputs.source, a, &mut rng)?;
        let real_b = crop(&inputs.target, b, &mut rng)?;
        let lr = t.lr * lr_factor(schedule.epoch(i), t.epochs, t.epochs_decay);
        let losses = gan.step(&real_a, &real_b, lr, &mut rng);
        progress.step(losses.g_gan + losses.cycle + losses.identity, lr);
        let rate = 2.0 * (gan.iteration - first) as f64 / since.elapsed().as_secs_f64().max(1e-9);
        crate::telemetry::translate_iteration(&losses.terms(), rate);
        if gan.iteration.is_multiple_of(t.checkpoint_every as u64) || gan.iteration == schedule.total {
            save(&gan)?;
        }
    }
    progress.finish();
    skipped.sort();
    skipped.dedup();
    Ok(gan)
}
