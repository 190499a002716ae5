//! The `adamcu` command line: one subcommand per job; the work lives in the library.

use adamcu::config::{parse_device, Config, DatasetConfig, Preset};
use adamcu::train::ada::ConfigChanges;
use adamcu::train::eval::{markdown_table, EvalOptions, EvalRow};
use adamcu::train::stage::Stage;
use adamcu::train::Trainer;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "adamcu",
    version,
    about = "Active domain adaptation for semantic segmentation \
    with multi-level contrastive units (ADA-MCU)"
)]
struct Cli {
    /// Override a config value: KEY=VALUE with a dotted key and a TOML value
    /// (e.g. --set active.budget=0.017); repeatable.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print versions and the device, then run a smoke check (a few SGD steps) on that device.
    Doctor {
        /// "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Pipeline config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// What a weights file (.pth, .safetensors) holds and the config lines that use it.
    Weights { file: PathBuf },
    /// Data sets: generate the synthetic benchmark, check configured sets.
    #[command(subcommand)]
    Datasets(DatasetsCommand),
    /// Pack a configured data set into one memory-mapped shard of decoded pixels.
    Pack {
        #[arg(long, default_value = "pipelines/synth.toml")]
        config: PathBuf,
        /// Which configured data set ([data.source], [data.target] or [data.target_val]).
        #[arg(long = "data-set", value_enum)]
        data_set: DataSet,
        /// Output shard file.
        #[arg(long)]
        out: PathBuf,
        /// Resize every sample to WIDTHxHEIGHT (bicubic images, nearest labels) before packing.
        #[arg(long)]
        size: Option<String>,
    },
    /// Benchmarks, printed side by side with the PyTorch/PIL reference.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The main job on a config end to end (default: the embedded synthetic benchmark):
    /// generate data if missing, train, evaluate, print the table, write runs/<name>/report.json.
    Demo {
        #[arg(long, default_value = "pipelines/synth.toml")]
        config: PathBuf,
        /// Also train each variant at these budgets (fractions, e.g. 0.017,0.034): a table of
        /// mIoU against the labelled fraction and fig1c.png (sets demo.budgets).
        #[arg(long, value_delimiter = ',')]
        budgets: Vec<f64>,
        /// Train nothing: one table and its paired gains over the seeds of these demo (or
        /// compare) run folders, each with its report.json (seeds split over processes or
        /// machines); their configs must agree but for the seeds, the run's name and threads.
        #[arg(long, value_delimiter = ',', value_name = "DIR,DIR,...", requires = "out", conflicts_with_all = ["config", "budgets"])]
        merge: Vec<PathBuf>,
        /// With --merge: the folder of the merged report.json.
        #[arg(long, requires = "merge")]
        out: Option<PathBuf>,
    },
    /// Active-learning strategies side by side: each from the same source checkpoint at the same
    /// budget (the demo's rows with demo.variants = the strategies), one table with paired
    /// differences against the first strategy over seeds, and labels-<strategy>.png.
    Compare {
        #[arg(long, default_value = "pipelines/synth.toml")]
        config: PathBuf,
        /// The strategies, in the order of the table (the first is the reference of the paired
        /// differences).
        #[arg(long, value_delimiter = ',', required = true)]
        strategies: Vec<adamcu::config::Strategy>,
        /// Seeds run.seed .. run.seed + N - 1 (sets demo.repeats).
        #[arg(long)]
        repeats: Option<usize>,
        /// Also each strategy at these budgets: mIoU against the labelled fraction, fig1c.png.
        #[arg(long, value_delimiter = ',')]
        budgets: Vec<f64>,
    },
    /// Algorithm 1, line 1: translate the source images toward the target's look
    /// ([translate] of the config: CycleGAN or FDA) into data.source.root; checkpoints in
    /// runs/<name>/translate/.
    Translate {
        #[arg(long, default_value = "pipelines/synth.toml")]
        config: PathBuf,
        /// Go on from the newest CycleGAN checkpoint made with these settings and inputs.
        #[arg(long = "continue")]
        continue_run: bool,
        /// Translate nothing: measure how far the raw and the translated source are from the
        /// target train images in this checkpoint's network (Fréchet distance of image-pooled
        /// layer4 features; a target-supervised one has seen neither source).
        #[arg(long, value_name = "CHECKPOINT", conflicts_with = "continue_run")]
        distance_in: Option<PathBuf>,
        /// Images a set for --distance-in (spread evenly).
        #[arg(long, default_value_t = 100, requires = "distance_in")]
        images: usize,
    },
    /// Train the configured stages; checkpoints go to runs/<name>/<stage>.safetensors.
    Train {
        #[arg(long, default_value = "pipelines/synth.toml")]
        config: PathBuf,
        /// The stages to run.
        #[arg(long, value_enum, default_value_t = Stage::All)]
        stage: Stage,
        /// Go on from the run's newest checkpoint (--stage all). Refused when the config changed
        /// a key that alters the experiment since that checkpoint (the error lists them).
        #[arg(long)]
        resume: bool,
        /// Go on from the run's newest checkpoint if it has one, else start it (--stage all):
        /// the one command for a supervisor that restarts the daemon after a crash.
        #[arg(long = "continue", conflicts_with = "resume")]
        continue_run: bool,
        /// With --resume or --continue: go on even though such keys changed (each is logged as
        /// a warning).
        #[arg(long)]
        accept_config_changes: bool,
        /// For --stage ada: an ablation preset (a row of Table VI); default: the config as written.
        #[arg(long, value_enum)]
        ablation: Option<Preset>,
        /// Start from these weights: an adamcu checkpoint, or a peer's whole DeepLab v2 in
        /// ADVENT's naming (.pth or .safetensors, e.g. a source-only warm-up model).
        #[arg(long)]
        init: Option<PathBuf>,
        /// Data-parallel on this machine: start N ranks of this command (c10d: Gloo on the CPU,
        /// NCCL on CUDA), each on its share of every batch. Under torchrun, Slurm or
        /// Kubernetes, set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT instead.
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// mIoU on the target val set: of a checkpoint, or of a folder of prediction PNGs.
    Eval {
        #[arg(long, default_value = "pipelines/synth.toml")]
        config: PathBuf,
        /// An adamcu checkpoint, or a peer's DeepLab v2 in ADVENT's naming (.pth, .safetensors).
        #[arg(long, conflicts_with = "predictions", required_unless_present = "predictions")]
        checkpoint: Option<PathBuf>,
        /// Folder of prediction masks, one per val image: `<id>.png` with training ids (as
        /// `adamcu predict` writes) or `<id>_labelIds.png` with Cityscapes label ids.
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// What the prediction masks hold (with --predictions).
        #[arg(long, value_enum, default_value_t = adamcu::predict::PredictionIds::Auto, requires = "predictions")]
        ids: adamcu::predict::PredictionIds,
        /// Average with the horizontally flipped prediction.
        #[arg(long)]
        flip: bool,
        /// Also write the row as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The daemon's status: step, it/s, ETA, budget spent, the bottleneck stage.
    Status {
        /// The run directory (runs/<name>).
        run_dir: PathBuf,
    },
    /// Write colourised masks and overlays for a folder of images.
    Predict {
        #[arg(long, default_value = "pipelines/synth.toml")]
        config: PathBuf,
        /// An adamcu checkpoint, or a peer's DeepLab v2 in ADVENT's naming (.pth, .safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config: print it resolved, or every error (exit code 2).
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum DatasetsCommand {
    /// Write the synthetic benchmark ([synth] of the config) unless it is already there.
    Synth {
        #[arg(long, default_value = "pipelines/synth.toml")]
        config: PathBuf,
    },
    /// Decode every sample of the configured sets: counts, class histogram, sizes, problems.
    /// Exit code 0 only when every checked set is usable.
    Check {
        #[arg(long, default_value = "pipelines/synth.toml")]
        config: PathBuf,
        /// Only this configured data set; default every configured one.
        #[arg(long = "data-set", value_enum)]
        data_set: Option<DataSet>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Loader throughput per core (PNG and shard paths) against bench/reference/loader_bench.py.
    Loader {
        /// Folder of GTA5-layout frames; the reference writes 1280x720 test frames there if missing.
        #[arg(long, default_value = "data/bench-loader")]
        dir: PathBuf,
        #[arg(long, default_value_t = 32)]
        images: usize,
        /// Python with torch, numpy and Pillow for the reference.
        #[arg(long, default_value = "python3")]
        python: PathBuf,
        #[arg(long, default_value = "bench/reference/loader_bench.py")]
        reference: PathBuf,
    },
    /// ms/iter, images/s, peak GPU memory and operators per step of the real training step (seg-only and full
    /// ADA-MCU; fp32 and bf16 + channels-last), optionally beside bench/reference/ada_mcu_step.py.
    Step(StepArgs),
    /// CycleGAN generator images/s (inference at the size of the translated images, and one
    /// training iteration's images/s at the [translate] crop) and FDA images/s, on the
    /// config's device.
    Translate {
        #[arg(long, default_value = "pipelines/gta5-cityscapes.toml")]
        config: PathBuf,
        /// HEIGHTxWIDTH of the translated images [default: 1052x1914, GTA5's frames]
        #[arg(long, default_value = "1052x1914")]
        size: String,
        #[arg(long, default_value_t = 5)]
        iterations: usize,
        /// Python with torch to time the PyTorch reference in the same call.
        #[arg(long)]
        python: Option<PathBuf>,
        #[arg(long, default_value = "bench/reference/translate_bench.py")]
        reference: PathBuf,
    },
}

#[derive(clap::Args)]
struct StepArgs {
    /// Model and ADA-MCU settings (pretrained weights are not loaded).
    #[arg(long, default_value = "pipelines/gta5-cityscapes.toml")]
    config: PathBuf,
    /// HEIGHTxWIDTH of the source crops [default: the config's, 720x1280 in the paper's]
    #[arg(long)]
    source_size: Option<String>,
    /// HEIGHTxWIDTH of the target crops [default: the config's, 512x1024 in the paper's]
    #[arg(long)]
    target_size: Option<String>,
    #[arg(long, default_value_t = 2)]
    batch: i64,
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Warm-up iterations; the last one also counts the operators a step dispatches (ops/step)
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// List the N most called operators of each row (calls and their wall time)
    #[arg(long, value_name = "N", default_value_t = 0)]
    top_ops: usize,
    /// Python with torch to run the reference with the same shapes in the same call.
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long, default_value = "bench/reference/ada_mcu_step.py")]
    reference: PathBuf,
    /// Also run the step as N data-parallel ranks on this machine (c10d; each rank the same
    /// per-rank batch) and print the scaling efficiency beside one process's figures.
    #[arg(long, value_name = "N", conflicts_with = "python")]
    nproc: Option<usize>,
}

fn load_config(path: &Path, overrides: &[String]) -> Result<Config> {
    Ok(Config::load_with_overrides(path, overrides)?)
}

/// A configured data set, as `datasets check` and `pack` choose one (not `--set`, which
/// overrides config values for every subcommand).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DataSet {
    Source,
    Target,
    #[value(name = "target_val")]
    TargetVal,
}

impl DataSet {
    fn name(self) -> &'static str {
        match self {
            DataSet::Source => "source",
            DataSet::Target => "target",
            DataSet::TargetVal => "target_val",
        }
    }

    fn of(self, config: &Config) -> Option<&DatasetConfig> {
        match self {
            DataSet::Source => config.data.source.as_ref(),
            DataSet::Target => config.data.target.as_ref(),
            DataSet::TargetVal => config.data.target_val.as_ref(),
        }
    }
}

fn configured_sets(config: &Config) -> Vec<(&'static str, &DatasetConfig)> {
    [DataSet::Source, DataSet::Target, DataSet::TargetVal]
        .into_iter()
        .filter_map(|d| d.of(config).map(|s| (d.name(), s)))
        .collect()
}

fn pick_set(config: &Config, choice: DataSet) -> Result<&DatasetConfig> {
    choice.of(config).ok_or_else(|| {
        anyhow!(
            "--data-set {}: the config has no [data.{}]; configured: {}",
            choice.name(),
            choice.name(),
            configured_sets(config).iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        )
    })
}

/// `--budgets` of the demo and compare: more budgets beside `active.budget` (demo.budgets).
fn set_budgets(config: &mut Config, budgets: Vec<f64>) -> Result<()> {
    if let Some(bad) = budgets.iter().find(|b| !(**b > 0.0 && **b <= 1.0)) {
        bail!("--budgets {bad}: expected fractions in (0, 1] of the target's pixels, e.g. 0.017,0.034,0.05");
    }
    if !budgets.is_empty() {
        let main = config.active.budget;
        config.demo.budgets = budgets.into_iter().filter(|b| (b - main).abs() > 1e-12).collect();
    }
    Ok(())
}

fn run(command: Command, overrides: &[String]) -> Result<ExitCode> {
    match command {
        Command::Weights { file } => weights(&file),
        Command::Doctor { device } => doctor(&device),
        Command::Config(ConfigCommand::Check { file }) => config_check(&file, overrides),
        Command::Datasets(DatasetsCommand::Synth { config }) => datasets_synth(&load_config(&config, overrides)?),
        Command::Datasets(DatasetsCommand::Check { config, data_set }) => {
            datasets_check(&load_config(&config, overrides)?, data_set)
        }
        Command::Pack { config, data_set, out, size } => pack(&load_config(&config, overrides)?, data_set, &out, size),
        Command::Demo { merge, out: Some(out), .. } => {
            if !overrides.is_empty() {
                bail!("--merge takes the merged runs' own configs: --set {} does not apply", overrides.join(" --set "));
            }
            adamcu::demo::merge(&merge, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { config, budgets, .. } => {
            let mut config = load_config(&config, overrides)?;
            set_budgets(&mut config, budgets)?;
            adamcu::demo::run(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare { config, strategies, repeats, budgets } => {
            let mut config = load_config(&config, overrides)?;
            set_budgets(&mut config, budgets)?;
            config.demo.variants = strategies.iter().map(|s| s.preset()).collect();
            config.demo.paired_against = adamcu::config::PairedAgainst::First;
            if let Some(n) = repeats {
                anyhow::ensure!(n >= 1, "--repeats {n}: expected at least 1");
                config.demo.repeats = n;
            }
            adamcu::demo::run(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Translate { config, distance_in: Some(checkpoint), images, .. } => {
            let config = load_config(&config, overrides)?;
            let mut trainer = adamcu::train::Trainer::new(&config)?;
            trainer.load_network(&checkpoint)?;
            let d = adamcu::translate::feature_distance(&config, &trainer, images)?
                .context("translate.method = \"none\": no translated source to measure")?;
            println!(
                "feature distance to the target in {}: raw source {:.4}, translated {:.4} (Fréchet, image-pooled \
                 layer4 features, {} images a set)",
                checkpoint.display(),
                d.raw_to_target,
                d.translated_to_target,
                d.images
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Translate { config, continue_run, .. } => {
            let config = load_config(&config, overrides)?;
            if let Some(address) = config.metrics.listen_address()? {
                adamcu::telemetry::install_exporter(address)?;
                tracing::info!("metrics on http://{address}/metrics");
            }
            let report = adamcu::translate::run(&config, continue_run, config.device()?)?;
            println!(
                "translated {} images into {} ({} skipped); colour distance to the target: raw {:.1}, translated {:.1}",
                report.written,
                config.data.source.as_ref().map(|s| s.root.display().to_string()).unwrap_or_default(),
                report.skipped.len(),
                report.raw_to_target,
                report.translated_to_target
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Train { nproc: Some(n), .. } if n > 1 => {
            if adamcu::distributed::Launch::from_env()?.is_some() {
                bail!("--nproc {n} inside a data-parallel job (WORLD_SIZE is set): start the ranks one way, not both");
            }
            let args: Vec<std::ffi::OsString> = rank_args(std::env::args_os().skip(1));
            adamcu::distributed::launch_local(n, args, &[])
        }
        Command::Train { nproc: Some(0), .. } => bail!("--nproc 0: expected 1 or more ranks"),
        Command::Train { config, stage, init, ablation, resume, continue_run, accept_config_changes, nproc: _ } => {
            let mut config = load_config(&config, overrides)?;
            if let Some(preset) = ablation {
                config = adamcu::ablation::apply(&config, preset);
            }
            let restart = Restart { resume, continue_run, accept_config_changes };
            train(&config, stage, init, restart)
        }
        Command::Eval { config, checkpoint, predictions, ids, flip, json } => {
            eval(load_config(&config, overrides)?, checkpoint, predictions.map(|dir| (dir, ids)), flip, json)
        }
        Command::Status { run_dir } => status(&run_dir),
        Command::Predict { config, checkpoint, images, out } => {
            predict(&load_config(&config, overrides)?, &checkpoint, &images, &out)
        }
        Command::Bench(BenchCommand::Step(args)) => bench_step(args, overrides),
        Command::Bench(BenchCommand::Translate { config, size, iterations, python, reference }) => {
            let config = load_config(&config, overrides)?;
            let (height, width) = parse_size(&size)?;
            adamcu::bench::translate(&config, height, width, iterations, python.map(|p| (p, reference)))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Loader { dir, images, python, reference }) => {
            adamcu::bench::loader(&adamcu::bench::LoaderBenchOptions { dir, images, python, reference })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// This command's arguments for each rank `--nproc` starts: the same, less `--nproc`.
fn rank_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        match arg.to_str() {
            Some("--nproc") => skip_value = true,
            Some(a) if a.starts_with("--nproc=") => {}
            _ => out.push(arg),
        }
    }
    out
}

fn weights(file: &Path) -> Result<ExitCode> {
    println!("{}: {}", file.display(), adamcu::model::weights::summarise(file)?);
    Ok(ExitCode::SUCCESS)
}

fn doctor(device: &str) -> Result<ExitCode> {
    let choice = parse_device(device)
        .ok_or_else(|| anyhow!("--device {device:?}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""))?;
    adamcu::doctor::run(choice).with_context(|| format!("--device {device:?}"))?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the resolved config, or every error with exit code 2.
fn config_check(file: &Path, overrides: &[String]) -> Result<ExitCode> {
    match Config::load_with_overrides(file, overrides) {
        Ok(config) => {
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprint!("{errors}");
            Ok(ExitCode::from(2))
        }
    }
}

fn datasets_synth(config: &Config) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    adamcu::data::synth::generate(&config.synth)?;
    println!("synthetic benchmark ready in {} ({:.1} s)", config.synth.root.display(), started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// Decodes every sample of the configured sets (or `only`); fails unless each is usable.
fn datasets_check(config: &Config, only: Option<DataSet>) -> Result<ExitCode> {
    let sets = match only {
        Some(choice) => vec![(choice.name(), pick_set(config, choice)?)],
        None => configured_sets(config),
    };
    if sets.is_empty() {
        bail!("no data sets configured ([data.source], [data.target], [data.target_val])");
    }
    // The translated source is the translation stage's output: say so before its error.
    if let Some(plan) = adamcu::translate::Plan::for_config(config)? {
        if !plan.output.join(adamcu::translate::STAMP).exists() && sets.iter().any(|(n, _)| *n == "source") {
            println!(
                "note: data.source ({}) is what the translation stage writes, and it has not run yet: \
                 `adamcu translate --config FILE` writes it (make demo and the daemon run it themselves)",
                plan.output.display()
            );
        }
    }
    let mut usable = true;
    for (name, set) in sets {
        let report = adamcu::data::check::check(name, set, config.data.classes);
        report.print(config.data.classes);
        usable &= report.usable();
    }
    Ok(if usable { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn pack(config: &Config, set: DataSet, out: &Path, size: Option<String>) -> Result<ExitCode> {
    let set = pick_set(config, set)?;
    let size = size.map(|s| parse_size(&s)).transpose()?;
    let source = adamcu::data::source::SampleSource::open(set, config.data.classes)?;
    let n = adamcu::data::pack::pack(&source, out, config.data.classes, size)?;
    println!("packed {n} sample(s) into {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// How `train --stage all` starts: `--resume`, `--continue`, `--accept-config-changes`.
struct Restart {
    resume: bool,
    continue_run: bool,
    accept_config_changes: bool,
}

fn train(config: &Config, stage: Stage, init: Option<PathBuf>, restart: Restart) -> Result<ExitCode> {
    use adamcu::pipeline::daemon::{DaemonOptions, Outcome, Start};
    let Restart { resume, continue_run, accept_config_changes } = restart;
    if stage != Stage::All {
        if resume || continue_run || accept_config_changes {
            bail!("--resume, --continue and --accept-config-changes go with --stage all (the daemon)");
        }
        let path = adamcu::train::stage::train_one(config, stage, init.as_deref())?;
        println!("checkpoint: {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    if accept_config_changes && !resume && !continue_run {
        bail!("--accept-config-changes goes with --resume or --continue");
    }
    let config_changes = if accept_config_changes { ConfigChanges::Accept } else { ConfigChanges::Refuse };
    let start = match (resume, continue_run) {
        (true, _) => Start::Resume,
        (false, true) => Start::ResumeIfAny,
        (false, false) => Start::Fresh,
    };
    let outcome = adamcu::pipeline::daemon::run(config, DaemonOptions { start, init, config_changes })?;
    println!(
        "{}",
        match outcome {
            Outcome::Finished => "finished",
            Outcome::Stopped => "stopped; go on with --resume (or --continue)",
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn eval(
    mut config: Config,
    checkpoint: Option<PathBuf>,
    predictions: Option<(PathBuf, adamcu::predict::PredictionIds)>,
    flip: bool,
    json: Option<PathBuf>,
) -> Result<ExitCode> {
    config.eval.flip |= flip;
    let row = match (checkpoint, predictions) {
        (Some(checkpoint), _) => {
            let trainer = Trainer::with_network(&config, &checkpoint).context("--checkpoint")?;
            trainer.evaluate(&checkpoint.file_stem().unwrap().to_string_lossy(), f64::NAN)?
        }
        (None, Some((dir, ids))) => {
            let labels = adamcu::train::open_set(&config.data.target_val, "data.target_val", config.data.classes)?;
            let confusion = adamcu::predict::score_folder(&dir, &labels, config.data.classes, ids)?;
            EvalRow::from_confusion(&dir.display().to_string(), &confusion, f64::NAN)
        }
        (None, None) => unreachable!("clap requires one"),
    };
    print!("{}", markdown_table(std::slice::from_ref(&row)));
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&row)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn status(run_dir: &Path) -> Result<ExitCode> {
    let status = adamcu::pipeline::status::Status::read(run_dir)?;
    let alive = adamcu::pipeline::lock::RunLock::is_held(run_dir);
    println!(
        "{} ({}; pid {}, daemon {})",
        status.line(),
        status.state,
        status.pid,
        if alive { "running" } else { "not running" }
    );
    Ok(ExitCode::SUCCESS)
}

fn predict(config: &Config, checkpoint: &Path, images: &Path, out: &Path) -> Result<ExitCode> {
    let trainer = Trainer::with_network(config, checkpoint).context("--checkpoint")?;
    let options = EvalOptions { flip: config.eval.flip, input_size: config.eval.input_size };
    let n = adamcu::predict::predict_folder(&trainer, images, out, &options)?;
    println!("wrote masks and overlays for {n} image(s) to {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// The step benchmark on the config's model and ADA-MCU settings, with crop sizes given as
/// HEIGHTxWIDTH (as the reference script takes them) or the config's.
fn bench_step(args: StepArgs, overrides: &[String]) -> Result<ExitCode> {
    if let Some(n) = args.nproc.filter(|&n| n > 1) {
        adamcu::bench::step_scaling(n, rank_args(std::env::args_os().skip(1)))?;
        return Ok(ExitCode::SUCCESS);
    }
    let config = load_config(&args.config, overrides)?;
    let config = adamcu::distributed::config_for_rank(&config)?;
    let parallel = adamcu::distributed::DataParallel::from_env(config.device()?)?.map(std::sync::Arc::new);
    let size = |given: Option<String>, set: &Option<DatasetConfig>| -> Result<(i64, i64)> {
        let [height, width] = match given {
            Some(text) => parse_size(&text)?.into(),
            None => set.as_ref().map_or(config.augment.crop, |set| config.augment_for(set).crop),
        };
        Ok((height as i64, width as i64))
    };
    let source_size = size(args.source_size, &config.data.source)?;
    let target_size = size(args.target_size, &config.data.target)?;
    let reference = args.python.map(|python| (python, args.reference));
    let (batch, iterations, warmup, top_ops) = (args.batch, args.iterations, args.warmup, args.top_ops);
    let options = adamcu::bench::StepBenchOptions {
        config,
        source_size,
        target_size,
        batch,
        iterations,
        warmup,
        top_ops,
        reference,
        parallel,
    };
    adamcu::bench::step(&options)?;
    Ok(ExitCode::SUCCESS)
}

/// "AxB" -> (A, B), both positive.
fn parse_size(text: &str) -> Result<(u32, u32)> {
    let parse = |v: &str| v.parse::<u32>().ok().filter(|&v| v > 0);
    match text.split_once('x').map(|(a, b)| (parse(a), parse(b))) {
        Some((Some(a), Some(b))) => Ok((a, b)),
        _ => bail!("size {text:?}: expected two positive numbers as AxB, e.g. 1024x512"),
    }
}

fn main() -> ExitCode {
    adamcu::torch_ext::keep_freed_memory();
    // Colour only on a terminal, and never with NO_COLOR set (no-color.org): a log written to
    // a file, a pipe or a journal stays plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.command, &cli.overrides) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
