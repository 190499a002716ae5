//! A running ADA-MCU stage: its loaders, optimizer and state, one step at a time, and the
//! uninterrupted pass of `train --stage ada` and the demo (the daemon drives its own, with
//! checkpoints: `pipeline::daemon`).

use super::checkpoint::ResumePoint;
use super::{AdaState, AdaSummary, StepLosses};
use crate::active::oracle::SealedLabels;
use crate::data::loader::Loader;
use crate::telemetry;
use crate::train::driver::{drive, ProgressLine, StageRun, StepEvent, Trace, ValCurve};
use crate::train::optimizer::{poly_lr, Sgd};
use crate::train::{open_set, open_source, Trainer};
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Instant;

/// A running ADA-MCU stage: its loaders, optimizer and state, one `step` at a time.
pub struct AdaRun {
    pub state: AdaState,
    pub optimizer: Sgd,
    source: Loader,
    target: Loader,
    pub step: u64,
    pub iterations: u64,
    pub last: StepLosses,
    /// The base learning rate of the last step.
    pub last_lr: f64,
    pub(super) stage: telemetry::Stage,
    /// Seconds this run's steps spent waiting for batches, and in all (for the bottleneck).
    pub waited: f64,
    pub stepped: f64,
    /// Pixels charged when this run last captured the ledger, and at which step.
    pub(super) last_snapshot: Option<(u64, u64)>,
}

impl AdaRun {
    pub fn start(trainer: &Trainer, state: AdaState, resume: Option<ResumePoint>, iterations: u64) -> Result<AdaRun> {
        let c = &trainer.config;
        let mut optimizer = trainer.optimizer();
        let step = match resume {
            Some(point) => {
                optimizer.load_state(&point.optimizer)?;
                point.step
            }
            None => 0,
        };
        // The data order resumes too: the loaders skip the samples already drawn.
        let options = |domain, batch_size: usize, seed| trainer.loader_options(domain, batch_size, seed, step);
        let (source_cfg, target_cfg) = (c.data.source.as_ref(), c.data.target.as_ref());
        let source_set = open_source(c)?;
        let target_set = open_set(&c.data.target, "data.target", c.data.classes)?;
        let source = Loader::spawn(
            source_set,
            &c.augment_for(source_cfg.unwrap()),
            options("source", c.train.batch_source, c.run.seed)?,
        );
        let target = Loader::spawn(
            target_set,
            &c.augment_for(target_cfg.unwrap()),
            options("target", c.train.batch_target, c.run.seed.wrapping_add(1))?,
        );
        Ok(AdaRun {
            state,
            optimizer,
            source,
            target,
            step,
            iterations,
            last: StepLosses::default(),
            last_lr: 0.0,
            stage: telemetry::Stage::new("train"),
            waited: 0.0,
            stepped: 0.0,
            last_snapshot: None,
        })
    }

    pub fn done(&self) -> bool {
        self.step >= self.iterations
    }

    /// One iteration: take a batch of each domain, compute the losses, update the model.
    pub fn step(&mut self, trainer: &Trainer) -> Result<&StepLosses> {
        let c = &trainer.config;
        // A round strategy's selection round before the step at its iteration (after that many
        // steps, as RIPU's). A resumed run replays it: the same model and ledger buy the same
        // pixels, and a purchase the crash left pending is not charged again.
        if c.active.strategy.uses_rounds() {
            if let Some(round) = c.active.rounds.iter().position(|&r| r as u64 == self.step) {
                trainer.selection_round(&mut self.state.ledger, round)?;
            }
        }
        let started = Instant::now();
        let sb = self.source.batches.recv().context("source loader stopped")??;
        let tb = self.target.batches.recv().context("target loader stopped")??;
        let waited = started.elapsed();
        self.stage.waited_input(waited);
        let busy = Instant::now();
        // Every random draw of the step is seeded by (seed, step): a resumed run replays it.
        tch::manual_seed((c.run.seed ^ self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64);
        let sealed = SealedLabels::seal(tb.labels);
        let mut out = trainer.ada_losses(
            &mut self.state,
            &sb.images,
            &sb.labels,
            &tb.images,
            &sealed,
            &tb.sample_indices,
            &tb.geometries,
        )?;
        let horizon = c.active.poly_horizon.map_or(self.iterations, |h| h as u64);
        let lr = poly_lr(c.train.lr, self.step, horizon, c.train.poly_power);
        // The gradient figures cost 2 + levels backward passes through the heads: on log steps only.
        let diagnose = c.train.log_every > 0 && self.step.is_multiple_of(c.train.log_every as u64);
        trainer.ada_update(&mut out, &mut self.optimizer, lr, diagnose.then_some(self.step))?;
        let (mut losses, settled) = trainer.ada_settle(&mut self.state, &out)?;
        if let Some(d) = losses.contrast.as_mut() {
            d.keep_gradient_of(self.last.contrast.as_ref());
        }
        (self.last, self.last_lr) = (losses, lr);
        self.stage.busy(busy.elapsed());
        self.stage.item();
        self.step += 1;
        let seconds = started.elapsed().as_secs_f64();
        (self.waited, self.stepped) = (self.waited + waited.as_secs_f64(), self.stepped + seconds);
        let l = &self.last;
        let terms = l.terms.iter().map(|(term, &value)| (term.name(), value));
        telemetry::step(seconds, lr, &terms.chain([("total", l.total)]).collect::<Vec<_>>());
        telemetry::images("source", sb.ids.len());
        telemetry::images("target", tb.ids.len());
        telemetry::channel("source_batches", self.source.batches.len(), c.data.channel_capacity);
        telemetry::channel("target_batches", self.target.batches.len(), c.data.channel_capacity);
        // After the metrics, so that a NaN shows on the dashboard (and fires its alert).
        anyhow::ensure!(
            self.last.total.is_finite(),
            "ada-mcu: loss is {} at step {}{}",
            self.last.total,
            self.step - 1,
            trainer.divergence_hint()
        );
        if let Some(d) = &self.last.contrast {
            d.publish();
            if diagnose {
                tracing::info!("ada-mcu step {}: {}", self.step - 1, d.line());
            }
        }
        let t = self.state.sampler.thresholds;
        telemetry::groups(settled.groups[0], settled.groups[1], settled.groups[2], t.pi_high, t.pi_low);
        telemetry::budget(self.state.ledger.spent(), self.state.ledger.budget());
        telemetry::gpu_memory(trainer.device);
        Ok(&self.last)
    }

    pub fn finish(self) -> Result<(AdaSummary, AdaState)> {
        self.source.stop();
        self.target.stop();
        self.state.ledger.flush()?;
        let summary = AdaSummary {
            iterations: self.step as usize,
            pixels: self.state.ledger.pixel_unit(),
            spent: self.state.ledger.charged(),
            budget: self.state.ledger.budget(),
            total_pixels: self.state.ledger.total_pixels(),
            thresholds: self.state.sampler.thresholds,
            last_losses: self.last,
            curve: Vec::new(),
            trace: Vec::new(),
        };
        Ok((summary, self.state))
    }
}

impl StageRun for AdaRun {
    fn name(&self) -> &'static str {
        "ada-mcu"
    }

    fn done(&self) -> bool {
        AdaRun::done(self)
    }

    fn advance(&mut self, trainer: &Trainer) -> Result<StepEvent> {
        let loss = self.step(trainer)?.total;
        Ok(StepEvent { step: self.step, iterations: self.iterations, loss, lr: self.last_lr })
    }

    fn labelled_fraction(&self) -> f64 {
        self.state.ledger.labelled_fraction()
    }
}

impl Trainer {
    /// Runs the ADA-MCU stage from the current weights to the end; the ledger lives at
    /// `ledger_path` (a fresh run: see `pipeline::daemon` for checkpoints and resume).
    pub fn train_ada(&mut self, ledger_path: &Path, iterations: usize) -> Result<(AdaSummary, AdaState)> {
        let state = self.new_ada_state(self.open_ledger(ledger_path)?);
        let mut run = AdaRun::start(self, state, None, iterations as u64)?;
        let mut progress = ProgressLine::new("ada-mcu", iterations as u64, self);
        let mut curve = ValCurve::default();
        let mut trace = Trace::default();
        drive(self, &mut run, &mut [&mut progress, &mut curve, &mut trace], &|| false)?;
        let ledger = &run.state.ledger;
        tracing::info!(
            "{}: bought {} of {} {} ({:.2}% of the target set), pi_high {:.4}",
            self.config.active.strategy,
            ledger.charged(),
            ledger.budget(),
            ledger.pixel_unit(),
            100.0 * ledger.labelled_fraction(),
            run.state.sampler.thresholds.pi_high
        );
        let (mut summary, state) = run.finish()?;
        summary.curve = curve.0;
        summary.trace = trace.0;
        Ok((summary, state))
    }
}
