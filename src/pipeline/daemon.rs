//! `adamcu train --config F`: the long-lived run. Source pretraining (once, if the run has no
//! source checkpoint), then ADA-MCU with periodic atomic checkpoints (`checkpoints/`, the last
//! `train.keep_checkpoints` kept; `writer::CheckpointWriter` writes them while training goes
//! on), a status line and file, periodic evaluation, and metrics.
//! SIGTERM/SIGINT: the step in progress finishes, a checkpoint is written, exit 0.
//! `--resume` restores model, optimizer state and LR position, DCCM, thresholds, the ledger,
//! the random streams (seeded per step) and the data order from the newest checkpoint that
//! loads: a damaged one is set aside in `checkpoints/damaged/` (`resume_from_newest_sound`).

use super::control::Control;
use super::lock::RunLock;
use super::status::{bottleneck, LastEval, Status};
use super::writer::CheckpointWriter;
use crate::config::{listed, Config, ConfigChange};
use crate::train::ada::{resume, AdaCheckpoint, AdaRun, AdaState, ConfigChanges, ResumePoint};
use crate::train::checkpoint::{Checkpoint, DamagedCheckpoint, Rotation};
use crate::train::driver::{drive, Listener, StepEvent};
use crate::train::{open_set, SupervisedStage, Trainer};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How the daemon starts on its run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run (refused where one holds checkpoints or bought labels).
    Fresh,
    /// From the run's newest checkpoint (`--resume`).
    Resume,
    /// From the newest checkpoint if there is one, else a new run (`--continue`): one command
    /// a supervisor (systemd's `Restart=`) can repeat after any crash.
    ResumeIfAny,
}

pub struct DaemonOptions {
    pub start: Start,
    /// Weights to start ADA-MCU from instead of the run's own source checkpoint.
    pub init: Option<PathBuf>,
    /// On a resume: what to do when the config changed the experiment since the checkpoint.
    pub config_changes: ConfigChanges,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Stopped,
}

pub fn run(config: &Config, options: DaemonOptions) -> Result<Outcome> {
    // Data-parallel (`distributed`): one device and one metrics port per rank; rank 0 owns the
    // run's files (lock, checkpoints, status, the ledger), the others follow its decisions.
    let config = &crate::distributed::config_for_rank(config)?;
    let parallel = crate::distributed::DataParallel::from_env(config.device()?)?.map(std::sync::Arc::new);
    let owner = crate::distributed::writes_files(parallel.as_deref());
    let barrier = || parallel.as_ref().map_or(Ok(()), |p| p.barrier());
    let run_dir = config.run_dir();
    let _lock = if owner { Some(RunLock::acquire(&run_dir)?) } else { None };
    if let Some(p) = &parallel {
        crate::telemetry::set_rank(p.rank());
    }
    let control = Control::start(config.metrics.listen_address()?)?;
    let rotation = Rotation { dir: run_dir.join("checkpoints"), keep: config.train.keep_checkpoints };
    // The other ranks' ledgers are replicas that every step keeps equal to rank 0's.
    let replica = (!owner).then(tempfile::tempdir).transpose()?;
    let run_ledger = run_dir.join("ledger.bin");
    let ledger_path = replica.as_ref().map_or(run_ledger.clone(), |d| d.path().join("ledger.bin"));
    if owner {
        rotation.remove_unfinished()?;
        // Algorithm 1, line 1, when the translated source is missing or stale (its own
        // checkpoints in <run dir>/translate/ make it resumable; it finishes before a stop
        // request is seen).
        crate::translate::ensure(config, config.device()?)?;
    }
    barrier()?;
    open_every_set(config)?;
    let mut trainer = Trainer::new(config)?;
    trainer.join(parallel.clone());

    let resuming = match options.start {
        Start::Fresh => false,
        Start::Resume => true,
        Start::ResumeIfAny => rotation.latest().is_some(),
    };
    if resuming && options.init.is_some() {
        tracing::info!("resuming: --init applies only to a new run");
    }
    let (state, point) = if resuming {
        // Rank 0 first: it sets any damaged checkpoint aside. Then the others take the same
        // newest sound checkpoint with a copy of the run's ledger (no rank has bought yet).
        let mut resumed = None;
        if owner {
            resumed = Some(resume_from_newest_sound(&mut trainer, &rotation, &ledger_path, options.config_changes)?);
        }
        barrier()?;
        if !owner {
            std::fs::copy(&run_ledger, &ledger_path)
                .with_context(|| format!("{}: a rank's copy", run_ledger.display()))?;
            resumed = Some(resume_from_newest_sound(&mut trainer, &rotation, &ledger_path, options.config_changes)?);
        }
        let (state, point) = resumed.expect("every rank resumed");
        (state, Some(point))
    } else {
        if owner && rotation.latest().is_some() {
            return Err(StartRefused::HoldsRun { run_dir: run_dir.clone() }.into());
        }
        // A ledger without checkpoints is one a kill left before the first step: nothing was
        // bought, and the new run takes it over. One with purchases is never dropped.
        if owner && ledger_path.exists() {
            let charged = trainer.open_ledger(&ledger_path)?.charged();
            if charged > 0 {
                return Err(StartRefused::PurchasesWithoutCheckpoint { ledger: ledger_path.clone(), charged }.into());
            }
        }
        match &options.init {
            Some(init) => {
                trainer.load_network(init).context("--init")?;
            }
            None => {
                let source = run_dir.join("source.safetensors");
                // Every rank sees the same: rank 0 can only write it after training with them.
                if source.exists() {
                    let loaded = trainer.load(&source)?;
                    check_source_config(loaded.config_changes(config, &source), &source)?;
                } else {
                    trainer.share_first_ranks_weights()?;
                    trainer.train_supervised(SupervisedStage::Source, config.train.source_iterations)?;
                    if owner {
                        trainer.save(&source, None, serde_json::json!({"stage": "source"}))?;
                    }
                }
            }
        }
        (trainer.new_ada_state(trainer.open_ledger(&ledger_path)?), None)
    };
    trainer.share_first_ranks_weights()?;
    let fresh = point.is_none();
    let mut run = AdaRun::start(&trainer, state, point, config.active.iterations as u64)?;
    if fresh && owner {
        // A base checkpoint, on disk before the first step, so that a kill before the first
        // periodic one can still resume.
        run.capture_checkpoint(&trainer).write(&rotation)?;
    }
    // Rank 0 writes the checkpoints; the other ranks start no writer.
    let mut checkpoints = if owner {
        Some(Checkpoints {
            writer: CheckpointWriter::start(rotation.clone())?,
            every: config.train.checkpoint_every as u64,
        })
    } else {
        None
    };

    // A resumed run keeps showing the evaluation it had.
    let last_eval = if fresh { None } else { Status::read(&run_dir).ok().and_then(|s| s.last_eval) };
    let mut reporter = Reporter {
        run_dir: run_dir.clone(),
        since: Instant::now(),
        step: run.step,
        waited: run.waited,
        stepped: run.stepped,
        rate: 0.0,
        wait_share: 0.0,
        last_eval,
        log_every: config.train.log_every as u64,
        eval_every: config.train.eval_every as u64,
    };
    // After each step: a checkpoint, then the status line and file, then an evaluation, each
    // on its own cadence (rank 0's). A stop asked of any rank stops every rank at the same
    // step: the ranks agree on it before each one.
    let lost_peer = std::cell::RefCell::new(None);
    let stop = || match &parallel {
        None => control.stop_requested(),
        Some(p) => p.any(control.stop_requested()).unwrap_or_else(|e| {
            *lost_peer.borrow_mut() = Some(e);
            true
        }),
    };
    let finished = match &mut checkpoints {
        Some(checkpoints) => drive(&trainer, &mut run, &mut [checkpoints, &mut reporter], &stop)?,
        None => drive(&trainer, &mut run, &mut [], &stop)?,
    };
    if let Some(e) = lost_peer.into_inner() {
        // The periodic checkpoints stand; a final one would not know the lost rank's step.
        return Err(e.context("the data-parallel job lost a rank; go on with --continue"));
    }
    let outcome = if finished { Outcome::Finished } else { Outcome::Stopped };
    if let Some(Checkpoints { mut writer, .. }) = checkpoints {
        run.checkpoint(&trainer, |c| writer.submit(c))?;
        writer.finish()?;
        tracing::info!("checkpoint {}", rotation.path_for(run.step, "safetensors").display());
        if outcome == Outcome::Finished {
            reporter.last_eval = evaluate(&trainer, &run).or(reporter.last_eval);
        }
        reporter.report(&run, if outcome == Outcome::Finished { "finished" } else { "stopped" })?;
    }
    run.finish()?;
    Ok(outcome)
}

/// Opens every data set the run reads (the val set where one is configured) before anything
/// starts, and reports each that cannot be read at once rather than the first, hours apart.
fn open_every_set(config: &Config) -> Result<()> {
    let classes = config.data.classes;
    let errors: Vec<String> = config
        .data_sets()
        .into_iter()
        .filter(|(key, set)| set.is_some() || *key != "data.target_val")
        .filter_map(|(key, set)| open_set(&set.cloned(), key, classes).err().map(|e| format!("{e:#}")))
        .collect();
    anyhow::ensure!(errors.is_empty(), "the run cannot start:\n  {}", errors.join("\n  "));
    Ok(())
}

/// Why the daemon refuses to start a run: each protects work already done (checkpoints,
/// bought labels, a pretrained source model) from being overwritten or mixed up.
/// Resumes from the newest checkpoint that loads. One that does not (`DamagedCheckpoint`:
/// truncated, unreadable, failing its checksum) is named, moved with its ledger snapshot into
/// `checkpoints/damaged/` and the one before it is tried: the ledger keeps every purchase, and
/// the replay of the steps after the older checkpoint buys again without charging twice, as
/// after a kill. Any other refusal (a changed experiment) stops the start as it is.
fn resume_from_newest_sound(
    trainer: &mut Trainer,
    rotation: &Rotation,
    ledger_path: &Path,
    config_changes: ConfigChanges,
) -> Result<(AdaState, ResumePoint)> {
    let steps = rotation.steps();
    if steps.is_empty() {
        anyhow::bail!("--resume: no checkpoint in {}", rotation.dir.display());
    }
    let mut set_aside = Vec::new();
    for &step in steps.iter().rev() {
        let path = rotation.path_for(step, "safetensors");
        tracing::info!("resuming from {}", path.display());
        match resume(trainer, &path, ledger_path, config_changes) {
            Ok(resumed) => {
                if !set_aside.is_empty() {
                    tracing::warn!("resumed from step {step}; set aside as damaged: {}", set_aside.join(", "));
                }
                return Ok(resumed);
            }
            Err(e) if e.downcast_ref::<DamagedCheckpoint>().is_some() => {
                let damaged = rotation.dir.join("damaged");
                std::fs::create_dir_all(&damaged)?;
                for file in rotation.files_of(step)? {
                    std::fs::rename(&file, damaged.join(file.file_name().expect("a listed file")))?;
                }
                tracing::warn!("{e:#}; moved to {} and trying the checkpoint before it", damaged.display());
                set_aside.push(path.display().to_string());
            }
            Err(e) => return Err(e),
        }
    }
    anyhow::bail!("no checkpoint in {} loads; set aside as damaged: {}", rotation.dir.display(), set_aside.join(", "))
}

#[derive(Debug, thiserror::Error)]
pub enum StartRefused {
    #[error("{} already holds a run (checkpoints): add --resume to go on, or choose another run.name", run_dir.display())]
    HoldsRun { run_dir: PathBuf },
    #[error(
        "{} holds {charged} bought pixel labels but no checkpoint to go on from: move it away to \
         start a new run, or choose another run.name",
        ledger.display()
    )]
    PurchasesWithoutCheckpoint { ledger: PathBuf, charged: u64 },
    #[error(
        "{}: this run's source checkpoint was pretrained with other settings:{}\nset them back, remove the \
         file to pretrain again, or start from it regardless with --init {}",
        checkpoint.display(),
        listed(changes),
        checkpoint.display()
    )]
    SourceSettingsChanged { checkpoint: PathBuf, changes: Vec<ConfigChange> },
}

/// A run's own source checkpoint is reused only if pretraining would compute the same thing
/// now: a changed seed, source set, augmentation, network or pretraining schedule is refused.
fn check_source_config(changes: Vec<ConfigChange>, source: &Path) -> Result<()> {
    let changed: Vec<ConfigChange> = changes.into_iter().filter(ConfigChange::changes_source_stage).collect();
    if !changed.is_empty() {
        return Err(StartRefused::SourceSettingsChanged { checkpoint: source.to_path_buf(), changes: changed }.into());
    }
    Ok(())
}

/// Writes the run's checkpoints every `every` steps (on the writer thread).
struct Checkpoints {
    writer: CheckpointWriter<AdaCheckpoint>,
    every: u64,
}

impl Listener<AdaRun> for Checkpoints {
    fn on_step(&mut self, trainer: &Trainer, run: &mut AdaRun, _: &StepEvent) -> Result<()> {
        if run.step.is_multiple_of(self.every) {
            run.checkpoint(trainer, |c| self.writer.submit(c))?;
        }
        Ok(())
    }
}

/// The log line and status file every `log_every` steps, with rates over the last interval,
/// and the evaluation every `eval_every` (0: at the end only).
struct Reporter {
    run_dir: PathBuf,
    since: Instant,
    step: u64,
    waited: f64,
    stepped: f64,
    rate: f64,
    wait_share: f64,
    last_eval: Option<LastEval>,
    log_every: u64,
    eval_every: u64,
}

impl Listener<AdaRun> for Reporter {
    fn on_step(&mut self, trainer: &Trainer, run: &mut AdaRun, _: &StepEvent) -> Result<()> {
        if run.step.is_multiple_of(self.log_every) {
            self.report(run, "running")?;
        }
        if self.eval_every > 0 && run.step.is_multiple_of(self.eval_every) {
            self.last_eval = evaluate(trainer, run).or(self.last_eval);
        }
        Ok(())
    }
}

impl Reporter {
    fn report(&mut self, run: &AdaRun, state: &str) -> Result<()> {
        if run.step > self.step {
            self.rate = (run.step - self.step) as f64 / self.since.elapsed().as_secs_f64().max(1e-9);
            self.wait_share = (run.waited - self.waited) / (run.stepped - self.stepped).max(1e-9);
        }
        let ledger = &run.state.ledger;
        let disk_free_bytes = crate::train::checkpoint::free_bytes(&self.run_dir)?;
        crate::telemetry::run_dir_free(disk_free_bytes);
        let status = Status {
            pid: std::process::id(),
            state: state.into(),
            step: run.step,
            iterations: run.iterations,
            iterations_per_second: self.rate,
            eta_seconds: (run.iterations - run.step) as f64 / self.rate.max(1e-9),
            budget_spent_pixels: ledger.charged(),
            budget_limit_pixels: ledger.budget(),
            budget_pixels: ledger.pixel_unit(),
            contrast: run.last.contrast.clone(),
            labeled_fraction: ledger.labelled_fraction(),
            trainer_wait_share: self.wait_share,
            bottleneck: bottleneck(self.wait_share).into(),
            loss: run.last.total,
            disk_free_bytes,
            last_eval: self.last_eval,
            updated_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        tracing::info!("{}", status.line());
        status.write(&self.run_dir)?;
        (self.since, self.step, self.waited, self.stepped) = (Instant::now(), run.step, run.waited, run.stepped);
        Ok(())
    }
}

/// The target val mIoU at this step (None if it failed). A failed evaluation (an unreadable val
/// image, the device out of memory at full resolution) is logged and counted, and training goes
/// on: a run of days is not given up for a figure, and a supervisor's restart would only meet
/// the same failure.
fn evaluate(trainer: &Trainer, run: &AdaRun) -> Option<LastEval> {
    let labeled = run.state.ledger.labelled_fraction();
    match trainer.evaluate(&format!("step {}", run.step), labeled) {
        Ok(row) => {
            crate::telemetry::evaluation(row.miou, &row.per_class);
            tracing::info!("step {}: mIoU {:.1} on the target val set", run.step, row.miou);
            Some(LastEval { step: run.step, miou: row.miou })
        }
        Err(error) => {
            crate::telemetry::evaluation_failed();
            tracing::error!("step {}: the evaluation failed, training goes on: {error:#}", run.step);
            None
        }
    }
}
