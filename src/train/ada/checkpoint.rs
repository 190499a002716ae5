//! ADA-MCU checkpoints: captured off the live run (model, optimizer, DCCM, thresholds, the
//! ledger's bits), written on the daemon's writer thread, and resumed from.

use super::{AdaRun, AdaState};
use crate::active::ledger::{Ledger, LedgerSnapshot};
use crate::active::sampling::Thresholds;
use crate::config::{listed, ConfigChange};
use crate::telemetry;
use crate::train::checkpoint;
use crate::train::Trainer;
use anyhow::{bail, Context, Result};
use indicatif::HumanBytes;
use std::path::Path;
use std::time::Instant;
use tch::Tensor;

/// What a resumed run does when its config differs from the checkpoint's in a key that changes
/// the experiment (`ConfigChange::changes_experiment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigChanges {
    /// Refuse to go on, naming each such key: a run silently changed halfway reports numbers
    /// that belong to no config.
    Refuse,
    /// Go on with the new values, each logged as a warning (the next checkpoints record them).
    Accept,
}

/// Of the config's changes since `checkpoint`: logs those that leave the experiment as it was
/// and refuses (or, accepted, warns of) the others.
fn check_config(changes: Vec<ConfigChange>, checkpoint: &Path, policy: ConfigChanges) -> Result<()> {
    let (experiment, operational): (Vec<ConfigChange>, Vec<ConfigChange>) =
        changes.into_iter().partition(ConfigChange::changes_experiment);
    for change in &operational {
        tracing::info!("resume: {change}");
    }
    if experiment.is_empty() {
        return Ok(());
    }
    let changes = listed(&experiment);
    if policy == ConfigChanges::Accept {
        tracing::warn!("resume: going on with a changed experiment (--accept-config-changes):{changes}");
        return Ok(());
    }
    bail!(
        "{}: the config differs from the one this run was started with, in keys that change the experiment:\
           {changes}\nset them back (config file or --set), or add --accept-config-changes to go on with the \
           new values (active.budget and the target set stay fixed by the run's ledger)",
        checkpoint.display()
    )
}

/// Where a resumed run picks up (from a checkpoint).
pub struct ResumePoint {
    pub step: u64,
    pub optimizer: Vec<(String, Tensor)>,
}

/// One ADA-MCU checkpoint captured at a step (`AdaRun::capture_checkpoint`), to be written
/// as `step-N.ledger` and `step-N.safetensors`.
pub struct AdaCheckpoint {
    pub step: u64,
    ledger: LedgerCopy,
    model: checkpoint::Captured,
}

/// The ledger's part of a checkpoint.
enum LedgerCopy {
    Taken(LedgerSnapshot),
    /// No label was bought since the snapshot of this step (the ledger only gains bits, and
    /// the count charged did not move): its file serves again. Once the budget is spent, most
    /// of a run's checkpoints are like this, and a copy of Cityscapes' ledger is 780 MB.
    SameAs(u64),
}

impl checkpoint::Checkpoint for AdaCheckpoint {
    fn step(&self) -> u64 {
        self.step
    }

    /// Writes the ledger snapshot, then the checkpoint (so a checkpoint file never exists
    /// without its snapshot), then prunes the old ones. Seconds at the paper's scale: the
    /// daemon runs it on its writer thread.
    fn write(&self, rotation: &checkpoint::Rotation) -> Result<std::path::PathBuf> {
        let started = Instant::now();
        let ledger_path = rotation.path_for(self.step, "ledger");
        match &self.ledger {
            LedgerCopy::Taken(snapshot) => snapshot.write(&ledger_path)?,
            // A second name for the earlier file (it is still there: pruning comes after).
            LedgerCopy::SameAs(step) => crate::files::write_atomically(&ledger_path, |temp| {
                let _ = std::fs::remove_file(temp); // left by an earlier attempt
                Ok(std::fs::hard_link(rotation.path_for(*step, "ledger"), temp)?)
            })?,
        }
        let path = rotation.path_for(self.step, "safetensors");
        self.model.write(&path)?;
        rotation.prune()?;
        let bytes = std::fs::metadata(&path)?.len() + std::fs::metadata(&ledger_path)?.len();
        telemetry::checkpoint(started.elapsed().as_secs_f64(), bytes);
        // The next checkpoint is written before the oldest is pruned: it needs this room again.
        let free = checkpoint::free_bytes(&rotation.dir)?;
        telemetry::run_dir_free(free);
        if free < 2 * bytes {
            tracing::warn!(
                "{} free on the file system of {}: room for fewer than two more checkpoints of {} \
                            (a write that does not fit stops the daemon; the checkpoints before it stay whole)",
                HumanBytes(free),
                rotation.dir.display(),
                HumanBytes(bytes)
            );
        }
        Ok(path)
    }
}

impl AdaRun {
    /// Captures this step's checkpoint: model, optimizer, DCCM, thresholds, step and the
    /// ledger's bits, all copied, so that it can be written while training goes on.
    pub fn capture_checkpoint(&mut self, trainer: &Trainer) -> AdaCheckpoint {
        let ledger = &self.state.ledger;
        let meta = serde_json::json!({ "stage": "ada", "step": self.step, "iterations": self.iterations,
            "thresholds": self.state.sampler.thresholds, "spent": ledger.spent(),
            "charged": ledger.charged(), "budget": ledger.budget() });
        let model = trainer.capture(Some(&self.optimizer), &[("dccm".into(), self.state.dccm.w.shallow_clone())], meta);
        let ledger_copy = match self.last_snapshot {
            Some((charged, step)) if charged == ledger.charged() => LedgerCopy::SameAs(step),
            _ => LedgerCopy::Taken(ledger.snapshot()),
        };
        self.last_snapshot = Some((ledger.charged(), self.step));
        AdaCheckpoint { step: self.step, ledger: ledger_copy, model }
    }

    /// Captures this step's checkpoint and hands it to `submit` (the daemon's writer thread).
    /// The pause it costs the trainer (the copies, and waiting while the writer is still busy
    /// with the previous checkpoint) is recorded as the train stage's output wait.
    pub fn checkpoint(&mut self, trainer: &Trainer, submit: impl FnOnce(AdaCheckpoint) -> Result<()>) -> Result<()> {
        let started = Instant::now();
        submit(self.capture_checkpoint(trainer))?;
        self.stage.waited_output(started.elapsed());
        Ok(())
    }
}

/// Restores the model, DCCM and thresholds from an ADA checkpoint and opens the ledger with
/// the checkpoint's snapshot; returns the state and where the run resumes.
pub fn resume(
    trainer: &mut Trainer,
    checkpoint_path: &Path,
    ledger_path: &Path,
    config_changes: ConfigChanges,
) -> Result<(AdaState, ResumePoint)> {
    let loaded = trainer.load(checkpoint_path)?;
    check_config(loaded.config_changes(&trainer.config, checkpoint_path), checkpoint_path, config_changes)?;
    let meta = &loaded.meta;
    let step = meta["step"].as_u64().context("checkpoint lacks its step")?;
    let thresholds: Thresholds =
        serde_json::from_value(meta["thresholds"].clone()).context("checkpoint lacks thresholds")?;
    let (images, budget) = trainer.ledger_layout()?;
    let ledger = Ledger::open_resumed(ledger_path, &images, budget, &checkpoint_path.with_extension("ledger"))?;
    let mut state = trainer.new_ada_state(ledger);
    state.sampler.thresholds = thresholds;
    let dccm = loaded.extra.iter().find(|(n, _)| n == "dccm").context("checkpoint lacks the DCCM")?;
    state.dccm.w = dccm.1.to_device(trainer.device);
    Ok((state, ResumePoint { step, optimizer: loaded.optimizer }))
}
