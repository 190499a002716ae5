//! `adamcu bench loader`: our loader's per-core throughput on the PNG path and the shard path,
//! side by side with the PIL/PyTorch reference (`bench/reference/loader_bench.py`) on the same
//! files in the same run.

use crate::config::{AugmentConfig, BnStats, DatasetConfig, DatasetKind, Precision, Preset};
use crate::data::augment::Augmenter;
use crate::data::normalise::Normaliser;
use crate::data::source::SampleSource;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

pub struct LoaderBenchOptions {
    pub dir: PathBuf,
    pub images: usize,
    pub python: PathBuf,
    pub reference: PathBuf,
}

/// Passes over every sample per figure, as the reference measures itself (median of 3).
const PASSES: usize = 3;

/// Images per second of one thread: the median of `PASSES` passes over every sample, the
/// reference's own method. With `normalise`, each sample is also turned into what the
/// network and its loss take, on the CPU, as the reference does: float input and i64 labels
/// (what a CPU run does; on CUDA it runs on the device).
fn images_per_second(
    source: &SampleSource,
    augmenter: &mut Augmenter,
    normaliser: &Normaliser,
    rng: &mut rand_chacha::ChaCha8Rng,
    normalise: bool,
) -> Result<f64> {
    let mut rates = Vec::with_capacity(PASSES);
    for _ in 0..PASSES {
        let started = Instant::now();
        for i in 0..source.len() {
            let sample = source.load_augmented(i, augmenter, rng)?;
            if normalise {
                let g = sample.geometry;
                let _ = std::hint::black_box(normaliser.bytes_to_input(
                    &sample.image,
                    1,
                    g.crop_height as i64,
                    g.crop_width as i64,
                ));
                let _ = std::hint::black_box(crate::torch_ext::labels_on(
                    &tch::Tensor::from_slice(&sample.label),
                    tch::Device::Cpu,
                ));
            }
            std::hint::black_box(sample);
        }
        rates.push(source.len() as f64 / started.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn run_reference(options: &LoaderBenchOptions, make: bool) -> Result<f64> {
    let mut cmd = Command::new(&options.python);
    cmd.arg(&options.reference).arg("--dir").arg(&options.dir);
    if make {
        cmd.args(["--make", &options.images.to_string(), "--size", "1280x720"]);
    }
    let out = cmd.output().with_context(|| format!("running {}", options.python.display()))?;
    if !out.status.success() {
        bail!("reference loader failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("reference printed {line:?}, expected one JSON line"))?;
    json["images_per_s"].as_f64().context("reference JSON lacks images_per_s")
}

/// Interleaved rounds of the loader benchmark.
const ROUNDS: usize = 5;

pub fn loader(options: &LoaderBenchOptions) -> Result<()> {
    // One core each: the reference pins torch to one thread and runs one process.
    tch::set_num_threads(1);
    let have_frames =
        options.dir.join("images").is_dir() && std::fs::read_dir(options.dir.join("images"))?.count() >= options.images;
    if !have_frames {
        run_reference(options, true)?; // writes the frames (its figure counts as a warm-up)
    }

    let set = DatasetConfig::at(DatasetKind::Gta5, options.dir.clone());
    let augment =
        AugmentConfig { resize: [0, 0], crop: [512, 1024], scale: [0.5, 1.5], flip: true, ..AugmentConfig::default() };
    let files = SampleSource::open(&set, 19).map_err(anyhow::Error::msg)?;
    let shard_path = options.dir.join("bench.shard");
    crate::data::pack::pack(&files, &shard_path, 19, None)?;
    let shard_set = DatasetConfig { kind: DatasetKind::Shard, root: shard_path, ..set };
    let shard_source = SampleSource::open(&shard_set, 19).map_err(anyhow::Error::msg)?;

    // Rounds that interleave the reference and our paths, so that a slow spell of the
    // machine hits them alike; each figure is the median over the rounds, each ratio the
    // median of the per-round ratios. One warm-up pass first (maps and checksums the shard).
    let mut augmenter = Augmenter::new(&augment);
    let normaliser = Normaliser::new(&augment, tch::Device::Cpu);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    images_per_second(&shard_source, &mut augmenter, &normaliser, &mut rng, true)?;
    let paths: [(&str, Option<(&SampleSource, bool)>); 4] = [
        ("reference (PIL + torch)", None),
        ("adamcu PNG", Some((&files, true))),
        ("adamcu shard", Some((&shard_source, true))),
        ("adamcu shard, loader only", Some((&shard_source, false))),
    ];
    let mut rates = vec![Vec::new(); paths.len()];
    for _ in 0..ROUNDS {
        for (k, (_, path)) in paths.iter().enumerate() {
            rates[k].push(match path {
                None => run_reference(options, false)?,
                Some((source, normalise)) => {
                    images_per_second(source, &mut augmenter, &normaliser, &mut rng, *normalise)?
                }
            });
        }
    }
    println!(
        "loader benchmark: {} GTA5-layout 1280x720 frames in {}, random scale 0.5-1.5, \
        512x1024 crop, flip, normalise; one core each",
        files.len(),
        options.dir.display()
    );
    println!("{:<28} {:>14} {:>10} {:>13}", "path", "images/s/core", "ms/image", "vs reference");
    for (k, (name, _)) in paths.iter().enumerate() {
        let rate = median(rates[k].clone());
        let ratio = median(rates[k].iter().zip(&rates[0]).map(|(ours, reference)| ours / reference).collect());
        println!("{name:<28} {rate:>14.1} {:>10.2} {ratio:>12.2}x", 1e3 / rate);
    }
    println!(
        "(medians over {ROUNDS} interleaved rounds; each figure per round is the median of {PASSES} passes, \
        the reference's own method)"
    );
    println!(
        "(every row but the last includes normalising images to float and widening labels to i64 on the CPU, \
        as the reference does; \"loader only\" is the loader thread's share when both run on the GPU)"
    );
    println!("targets: PNG >= 3x, shard >= 20x the reference");
    Ok(())
}

pub struct StepBenchOptions {
    /// Base config (model, optimizer, ADA-MCU settings); pretrained weights are not loaded.
    pub config: crate::config::Config,
    pub source_size: (i64, i64),
    pub target_size: (i64, i64),
    pub batch: i64,
    pub iterations: usize,
    pub warmup: usize,
    /// How many of the most called operators to list under each row.
    pub top_ops: usize,
    /// Reference script and its Python, run with the same shapes in the same call.
    pub reference: Option<(PathBuf, PathBuf)>,
    /// Data-parallel (a rank of `adamcu bench step --nproc N`): every step is the job's, with
    /// `batch` images of each domain per rank.
    pub parallel: Option<std::sync::Arc<crate::distributed::DataParallel>>,
}

struct StepFigures {
    ms_median: f64,
    images_per_second: f64,
    peak_gib: Option<f64>,
    /// Outcome of libtorch's sync check over one step (None: not run, e.g. on the CPU):
    /// Some(None) when the step never waited for the device, else the error it raised.
    sync_check: Option<Option<String>>,
    /// The operators one step dispatched (None without a warm-up iteration).
    ops: Option<crate::torch_ext::OpCount>,
}

/// The real ADA-MCU step on random data (random weights: time and memory only).
fn time_step(
    base: &crate::config::Config,
    variant: &str,
    bf16_channels_last: bool,
    o: &StepBenchOptions,
) -> Result<StepFigures> {
    use crate::active::ledger::{Ledger, LedgerImage};
    use crate::data::augment::Geometry;
    use tch::{Kind, Tensor};
    let mut config = crate::ablation::apply(base, if variant == "seg" { Preset::AlWAs } else { Preset::Full });
    config.model.pretrained = None;
    // As the reference (a torchvision ResNet in training mode, affine frozen): BatchNorm on the
    // batch's statistics. The stored ones of an untrained ResNet-101 make it diverge at once,
    // and the step of a diverged network (NaN scores, empty groups) is not a real step.
    config.model.bn_stats = BnStats::Batch;
    config.train.precision = if bf16_channels_last { Precision::Bf16 } else { Precision::Fp32 };
    config.train.channels_last = bf16_channels_last;
    let mut trainer = crate::train::Trainer::new(&config)?;
    trainer.join(o.parallel.clone());
    let device = trainer.device;
    let cuda_index = match device {
        tch::Device::Cuda(i) => i,
        _ => 0,
    };
    let dir = tempfile_dir()?;
    let (ht, wt) = o.target_size;
    let images: Vec<LedgerImage> =
        (0..100).map(|i| LedgerImage { id: i.to_string(), width: wt as u32, height: ht as u32 }).collect();
    let budget = (config.active.budget * 100.0 * (ht * wt) as f64) as u64;
    let mut state = trainer.new_ada_state(Ledger::open_or_create(&dir.join("ledger.bin"), &images, budget)?);
    let mut optimizer = trainer.optimizer();
    let (hs, ws) = o.source_size;
    let b = o.batch;
    let bytes = |h, w| Tensor::randint(256, [b, h, w, 3], (Kind::Uint8, device));
    let labels = |h, w| Tensor::randint(config.data.classes as i64, [b, h, w], (Kind::Int64, device));
    let (si, sl, ti) = (bytes(hs, ws), labels(hs, ws), bytes(ht, wt));
    let sealed = crate::active::oracle::SealedLabels::seal(labels(ht, wt));
    let geometry = vec![Geometry::identity(wt as u32, ht as u32); b as usize];
    let sync = || {
        if device.is_cuda() {
            tch::Cuda::synchronize(cuda_index as i64)
        }
    };
    let mut times = Vec::new();
    crate::torch_ext::cuda_reset_peak(cuda_index);
    let mut sync_check = None;
    let mut ops = None;
    for it in 0..o.warmup + o.iterations {
        sync();
        let started = Instant::now();
        let samples: Vec<usize> = (0..b as usize).map(|i| (it * b as usize + i) % 100).collect();
        // The last warm-up iteration runs under libtorch's sync check: from the batch to the
        // update, the step must only queue work (CUDA builds; the read at its end is allowed).
        let checked = it + 1 == o.warmup && device.is_cuda() && crate::torch_ext::set_cuda_sync_check(true);
        let mut queue = || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut out = trainer.ada_losses(&mut state, &si, &sl, &ti, &sealed, &samples, &geometry)?;
                trainer.ada_update(&mut out, &mut optimizer, config.train.lr, None)?;
                Ok::<_, anyhow::Error>(out)
            }))
        };
        // The last warm-up iteration also counts the operators one step dispatches (a retry's
        // count replaces that of the attempt the sync check stopped).
        let counted = it + 1 == o.warmup;
        let mut attempt = || {
            if counted {
                let (queued, count) = crate::torch_ext::count_ops(&mut queue);
                ops = Some(count);
                queued
            } else {
                queue()
            }
        };
        let mut queued = attempt();
        if checked {
            crate::torch_ext::set_cuda_sync_check(false);
            sync_check = Some(queued.as_ref().err().map(|e| panic_message(e.as_ref())));
            if queued.is_err() {
                queued = attempt(); // the check stopped the step at its first wait: run it whole
            }
        }
        let out = queued.map_err(|e| anyhow::anyhow!("training step failed: {}", panic_message(e.as_ref())))??;
        let (losses, _) = trainer.ada_settle(&mut state, &out)?;
        if !losses.total.is_finite() {
            bail!(
                "the {variant} step diverged at iteration {it} (loss {}): its timings would not be a real step's",
                losses.total
            );
        }
        sync();
        if it >= o.warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let ms_median = times[times.len() / 2];
    let _ = std::fs::remove_dir_all(&dir);
    Ok(StepFigures {
        ms_median,
        images_per_second: (2 * b) as f64 / (ms_median / 1e3),
        peak_gib: crate::torch_ext::cuda_peak_bytes(cuda_index).map(|b| b as f64 / (1u64 << 30) as f64),
        sync_check,
        ops,
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("adamcu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn reference_step(
    o: &StepBenchOptions,
    variant: &str,
    bf16_channels_last: bool,
    device: &str,
) -> Result<serde_json::Value> {
    let (python, script) = o.reference.as_ref().expect("checked by the caller");
    let mut cmd = Command::new(python);
    cmd.arg(script).args([
        "--variant",
        variant,
        "--iters",
        &o.iterations.to_string(),
        "--warmup",
        &o.warmup.to_string(),
        "--source-size",
        &format!("{}x{}", o.source_size.0, o.source_size.1),
        "--target-size",
        &format!("{}x{}", o.target_size.0, o.target_size.1),
        "--device",
        device,
        // The same contrastive units as ours: per image, at most this many anchors and keys.
        "--anchors",
        &o.config.contrast.max_anchors.to_string(),
        "--candidates",
        &o.config.contrast.max_keys.to_string(),
    ]);
    if bf16_channels_last {
        cmd.args(["--amp", "bf16", "--channels-last"]);
    }
    let out = cmd.output().with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!("reference step failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(stdout.lines().last().unwrap_or_default())?)
}

pub fn step(o: &StepBenchOptions) -> Result<()> {
    let device = o.config.device()?;
    println!(
        "step benchmark on {device:?} ({}): {} {} {}, source {b}x{}x{}, target {b}x{}x{}; median of {} \
        iterations after {} warm-up; random weights and data, BatchNorm on batch statistics as the reference",
        crate::doctor::LIBTORCH_VERSION,
        o.config.model.arch,
        o.config.model.backbone,
        if o.config.contrast.enabled { "ADA-MCU" } else { "" },
        o.source_size.0,
        o.source_size.1,
        o.target_size.0,
        o.target_size.1,
        o.iterations,
        o.warmup,
        b = o.batch
    );
    if o.reference.is_some() {
        let m = &o.config.model;
        let (ours, reference) = (
            format!("{} {}, {} classes, {}-d projection", m.arch, m.backbone, o.config.data.classes, m.projection_dim),
            "deeplabv2 resnet101, 19 classes, 256-d projection",
        );
        println!(
            "reference: {reference}; contrastive units of both: at most {} anchors and {} keys per image \
            (contrast.max_anchors, contrast.max_keys){}",
            o.config.contrast.max_anchors,
            o.config.contrast.max_keys,
            if ours == reference {
                String::new()
            } else {
                format!("\nNOT LIKE FOR LIKE: this config's network is {ours}; the reference always runs its own")
            }
        );
    }
    println!(
        "{:<6} {:<10} {:>10} {:>10} {:>10} {:>9} | {:>14} {:>10}",
        "step", "precision", "ms/iter", "images/s", "peak GiB", "ops/step", "reference ms", "ref GiB"
    );
    let dev = if device.is_cuda() { "cuda" } else { "cpu" };
    let gib = |g: Option<f64>| g.map_or("-".into(), |g| format!("{g:.2}"));
    // (row label, ours, the reference's ms and peak GiB): seg then full, per precision.
    let mut results = Vec::new();
    for bf16_cl in [false, true] {
        let precision = if bf16_cl { "bf16+cl" } else { "fp32" };
        for variant in ["seg", "full"] {
            let ours = time_step(&o.config, variant, bf16_cl, o)?;
            let reference = match &o.reference {
                Some(_) => {
                    let r = reference_step(o, variant, bf16_cl, dev)?;
                    Some((r["ms_per_iter_median"].as_f64().unwrap_or(f64::NAN), r["peak_gib"].as_f64()))
                }
                None => None,
            };
            let (ref_ms, ref_gib) = reference.map_or(("-".into(), "-".into()), |(ms, g)| (format!("{ms:.1}"), gib(g)));
            println!(
                "{variant:<6} {precision:<10} {:>10.1} {:>10.1} {:>10} {:>9} | {ref_ms:>14} {ref_gib:>10}",
                ours.ms_median,
                ours.images_per_second,
                gib(ours.peak_gib),
                ours.ops.as_ref().map_or("-".into(), |ops| ops.total.to_string())
            );
            for (calls, micros, name) in ours.ops.iter().flat_map(|ops| &ops.by_name).take(o.top_ops) {
                println!("    {calls:>6} calls {:>10.1} ms  {name}", *micros as f64 / 1e3);
            }
            results.push((format!("{variant} {precision}"), ours, reference));
        }
    }
    // Our full step against the reference's two (issue 7's targets, on a GPU: at most 1.1x its
    // seg step and 0.75x its full step; peak memory at most its own).
    for pair in results.chunks(2) {
        if let [(_, _, Some((ref_seg, _))), (label, full, Some((ref_full, ref_gib)))] = pair {
            let memory = match (full.peak_gib, ref_gib) {
                (None, None) => "peak memory not measured (no GPU)".to_string(),
                (ours, theirs) => format!("peak memory {} GiB against its {} GiB", gib(ours), gib(*theirs)),
            };
            println!(
                "our {label} step: {:.2}x the reference's seg step (GPU target <= 1.10), {:.2}x its full step \
                (GPU target <= 0.75); {memory}",
                full.ms_median / ref_seg,
                full.ms_median / ref_full
            );
        }
    }
    if let Ok(path) = std::env::var(STEP_FIGURES_ENV) {
        // For `step_scaling`: each row's images/s over the whole job (rank 0 writes).
        if crate::distributed::writes_files(o.parallel.as_deref()) {
            let world = o.parallel.as_ref().map_or(1, |p| p.world()) as f64;
            let rows: serde_json::Map<String, serde_json::Value> = results
                .iter()
                .map(|(label, ours, _)| (label.clone(), (ours.images_per_second * world).into()))
                .collect();
            std::fs::write(&path, serde_json::to_vec(&rows)?)?;
        }
    }
    for (label, ours, _) in &results {
        println!(
            "host waits for the device inside a {label} step (libtorch sync check): {}",
            match &ours.sync_check {
                None => "not checked (needs CUDA and a warm-up iteration)".to_string(),
                Some(None) => "none".to_string(),
                Some(Some(error)) => format!("WAITED: {}", error.lines().next().unwrap_or_default()),
            }
        );
    }
    // Checked on every device from the operators the counted step called, at any depth.
    for (label, ours, _) in &results {
        println!(
            "operators that wait for a GPU inside a {label} step: {}",
            match ours.ops.as_ref().map(|o| o.waits_on_cuda()) {
                None => "not counted (no warm-up iteration)".to_string(),
                Some(waits) if waits.is_empty() => "none".to_string(),
                Some(waits) => format!("WAITS: {}", waits.join(", ")),
            }
        );
    }
    #[cfg(target_arch = "x86_64")]
    if !device.is_cuda() {
        let has = if std::is_x86_feature_detected!("avx512bf16") { "has" } else { "lacks" };
        println!(
            "(bf16 rows on the CPU: CPU autocast in bf16; this CPU {has} AVX512-BF16, without which bf16 is emulated)"
        );
    }
    Ok(())
}

/// Where a step benchmark writes its rows' images/s (JSON) for `step_scaling`.
const STEP_FIGURES_ENV: &str = "ADAMCU_BENCH_STEP_FIGURES";

/// `adamcu bench step --nproc N`: the step benchmark as one process, then as N data-parallel
/// ranks on this machine (each with the same per-rank batch), and the scaling efficiency of
/// every row side by side: the job's images/s over N times one process's. `args` are the
/// command's own, less `--nproc`.
pub fn step_scaling(nproc: usize, args: Vec<std::ffi::OsString>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = |ranks: usize| -> Result<serde_json::Map<String, serde_json::Value>> {
        let figures = dir.path().join(format!("ranks-{ranks}.json"));
        let exe = std::env::current_exe()?;
        let ok = if ranks == 1 {
            Command::new(&exe).args(&args).env(STEP_FIGURES_ENV, &figures).status()?.success()
        } else {
            let env = [(STEP_FIGURES_ENV, figures.as_os_str())];
            crate::distributed::launch_local(ranks, args.clone(), &env)? == std::process::ExitCode::SUCCESS
        };
        anyhow::ensure!(ok, "the step benchmark with {ranks} rank(s) failed");
        let text = std::fs::read_to_string(&figures).with_context(|| format!("{}", figures.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let (one, many) = (run(1)?, run(nproc)?);
    println!("\ndata-parallel scaling (c10d; each rank its own batch; efficiency = {nproc} ranks' images/s over {nproc} x one process's):");
    println!("{:<16} {:>16} {:>16} {:>11}", "step", "1 process img/s", format!("{nproc} ranks img/s"), "efficiency");
    for (label, single) in &one {
        let (single, job) =
            (single.as_f64().unwrap_or(f64::NAN), many.get(label).and_then(|v| v.as_f64()).unwrap_or(f64::NAN));
        println!("{label:<16} {single:>16.1} {job:>16.1} {:>10.0}%", 100.0 * job / (nproc as f64 * single));
    }
    Ok(())
}

/// `adamcu bench translate`: images/s of the translation stage on the config's device, with
/// the config's [translate] sizes: the CycleGAN generator translating `height` x `width`
/// images (what the write-out does), one CycleGAN training iteration at `translate.crop` (two
/// images: one source, one target), and FDA at `height` x `width`. Random weights and images.
pub fn translate(
    config: &crate::config::Config,
    height: u32,
    width: u32,
    iterations: usize,
    reference: Option<(PathBuf, PathBuf)>,
) -> Result<()> {
    use crate::translate::{cyclegan::CycleGan, fda};
    use tch::{Kind, Tensor};
    let device = config.device()?;
    if config.run.threads > 0 {
        tch::set_num_threads(config.run.threads as i32);
    }
    let t = &config.translate;
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // The reference first (its figures print beside ours), on the same device and threads.
    let theirs = match &reference {
        Some((python, script)) => {
            let [ch, cw] = t.crop;
            let out = Command::new(python)
                .arg(script)
                .args(["--size", &format!("{height}x{width}"), "--crop", &format!("{ch}x{cw}")])
                .args(["--ngf", &t.generator_width.to_string(), "--blocks", &t.generator_blocks.to_string()])
                .args(["--ndf", &t.discriminator_width.to_string(), "--layers", &t.discriminator_layers.to_string()])
                .args(["--beta", &t.fda_beta.to_string(), "--iterations", &iterations.to_string()])
                .args(["--device", if device.is_cuda() { "cuda" } else { "cpu" }])
                .env("OMP_NUM_THREADS", tch::get_num_threads().to_string())
                .output()
                .with_context(|| format!("running {}", python.display()))?;
            if !out.status.success() {
                bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout.lines().last().unwrap_or_default().to_string();
            Some(
                serde_json::from_str::<serde_json::Value>(&line)
                    .with_context(|| format!("reference printed {line:?}"))?,
            )
        }
        None => None,
    };
    let beside = |key: &str, ours: f64| match &theirs {
        Some(v) => {
            v[key].as_f64().map_or(String::new(), |r| format!("   reference {r:>9.2} images/s ({:.2}x)", ours / r))
        }
        None => String::new(),
    };
    let timed = |what: &str, images_per_call: f64, key: &str, call: &mut dyn FnMut()| {
        call(); // warm-up
        sync();
        let start = std::time::Instant::now();
        for _ in 0..iterations.max(1) {
            call();
        }
        sync();
        let seconds = start.elapsed().as_secs_f64();
        let rate = images_per_call * iterations.max(1) as f64 / seconds;
        println!(
            "{what:<66} {rate:>9.2} images/s ({:.1} ms per call){}",
            1000.0 * seconds / iterations.max(1) as f64,
            beside(key, rate)
        );
    };
    let mut gan = CycleGan::new(t, device);
    println!(
        "translation stage on {device:?}: CycleGAN ngf {} with {} blocks, ndf {} with {} layers",
        t.generator_width, t.generator_blocks, t.discriminator_width, t.discriminator_layers
    );
    let image = Tensor::rand([1, 3, height as i64, width as i64], (Kind::Float, device)) * 2.0 - 1.0;
    timed(&format!("generator, translating {height}x{width}"), 1.0, "translate_images_per_s", &mut || {
        let _ = gan.translate(&image);
    });
    let [ch, cw] = t.crop.map(|c| c as i64);
    let (a, b) = (
        Tensor::rand([1, 3, ch, cw], (Kind::Float, device)) * 2.0 - 1.0,
        Tensor::rand([1, 3, ch, cw], (Kind::Float, device)) * 2.0 - 1.0,
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    timed(&format!("training iteration at {ch}x{cw} (source + target image)"), 2.0, "train_images_per_s", &mut || {
        let _ = gan.step(&a, &b, t.lr, &mut rng);
    });
    // FDA, on 0-255 values as both engines take them: libtorch's FFT on the device (the
    // offline write-out), and rustfft on one loader thread (online FDA), from the same bytes.
    let bytes = |seed: u64| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let pixels = (0..height * width * 3).map(|_| rand::Rng::gen::<u8>(&mut rng)).collect();
        crate::data::datasets::Rgb { width, height, pixels }
    };
    let (source_rgb, target_rgb) = (bytes(1), bytes(2));
    let as_tensor = |rgb| crate::translate::cyclegan::to_float_bytes(rgb, device);
    let (source, target) = (as_tensor(&source_rgb), as_tensor(&target_rgb));
    let label = format!("FDA (beta {}), {height}x{width}", t.fda_beta);
    timed(&format!("{label}, libtorch ({} threads)", tch::get_num_threads()), 1.0, "fda_images_per_s", &mut || {
        let _ = tch::no_grad(|| fda::transfer(&source, &target, t.fda_beta, t.fda_window));
    });
    if !device.is_cuda() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        timed(&format!("{label}, libtorch (1 thread)"), 1.0, "", &mut || {
            let _ = tch::no_grad(|| fda::transfer(&source, &target, t.fda_beta, t.fda_window));
        });
        tch::set_num_threads(threads);
    }
    let swap = crate::data::fda::Swap::new(height, width, t.fda_beta, t.fda_window);
    let amplitudes = swap.target_amplitudes(&target_rgb);
    timed(&format!("{label}, rustfft (1 loader thread, target cached)"), 1.0, "", &mut || {
        let _ = swap.apply(&source_rgb, &amplitudes);
    });
    timed(&format!("{label}, rustfft (1 loader thread, target too)"), 1.0, "", &mut || {
        let _ = swap.apply(&source_rgb, &swap.target_amplitudes(&target_rgb));
    });
    Ok(())
}
