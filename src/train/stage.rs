//! `adamcu train --stage`: which stages a command runs, and one stage run on its own.

use super::{SupervisedStage, Trainer};
use crate::config::Config;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// What `adamcu train` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// The daemon: source pretraining if the run has none, then ADA-MCU with periodic
    /// checkpoints; SIGTERM/SIGINT stop it cleanly.
    All,
    /// Source-only pretraining.
    Source,
    /// One uninterrupted ADA-MCU pass (start it with --init).
    Ada,
    /// The upper bound on every target training label.
    TargetSupervised,
}

/// A stage run on its own: trains it from `init` (or from scratch), logs its target val curve
/// every `train.eval_every` steps (is more training still helping?), and writes
/// `runs/<name>/<stage>.safetensors` with what it did in the metadata; returns that path.
///
/// Data-parallel (torchrun's environment, or `--nproc`; `distributed`), the supervised stages
/// train on every rank's share of each batch; rank 0 evaluates and writes the checkpoint.
pub fn train_one(config: &Config, stage: Stage, init: Option<&Path>) -> Result<PathBuf> {
    let config = &crate::distributed::config_for_rank(config)?;
    let mut trainer = Trainer::new(config)?;
    trainer.join(crate::distributed::DataParallel::from_env(trainer.device)?.map(std::sync::Arc::new));
    trainer.curve_every = if trainer.writes_files() { config.train.eval_every } else { 0 };
    if let Some(init) = init {
        trainer.load_network(init).context("--init")?;
    }
    trainer.share_first_ranks_weights()?;
    let run_dir = config.run_dir();
    let supervised = |stage: SupervisedStage, iterations: usize, trainer: &mut Trainer| -> Result<_> {
        trainer.train_supervised(stage, iterations)?;
        Ok((run_dir.join(format!("{}.safetensors", stage.name())), serde_json::json!({"stage": stage.name()})))
    };
    let (path, meta) = match stage {
        Stage::All => anyhow::bail!("the whole run (--stage all) is the daemon's (pipeline::daemon::run)"),
        Stage::Source => supervised(SupervisedStage::Source, config.train.source_iterations, &mut trainer)?,
        Stage::TargetSupervised => {
            supervised(SupervisedStage::TargetSupervised, config.train.target_supervised_iterations, &mut trainer)?
        }
        Stage::Ada => {
            // One ledger for the job: rank 0's is the run's; the other ranks keep replicas that
            // every step's gathered purchases keep equal to it (`Trainer::ada_settle`).
            let replica = (!trainer.writes_files()).then(tempfile::tempdir).transpose()?;
            let ledger = replica.as_ref().map_or(run_dir.join("ledger.bin"), |d| d.path().join("ledger.bin"));
            let (summary, _) = trainer.train_ada(&ledger, config.active.iterations)?;
            println!(
                "bought {} of {} {} ({:.3}% of the target set)",
                summary.spent,
                summary.budget,
                summary.pixels,
                100.0 * summary.labelled_fraction()
            );
            (run_dir.join("ada.safetensors"), serde_json::json!({"stage": "ada", "summary": summary}))
        }
    };
    if trainer.writes_files() {
        trainer.save(&path, None, meta)?;
    }
    Ok(path)
}
