//! The one training loop. A stage (`StageRun`: the supervised stages' `SupervisedRun`,
//! ADA-MCU's `AdaRun`) takes one step at a time; after each, its listeners hear of it in the
//! order given: the progress line, the val curve, and in the daemon the checkpoints, the
//! status file and the evaluations. Metrics a step sets itself (`telemetry`).

use super::optimizer::Sgd;
use super::{open_set, open_source, CurvePoint, SupervisedStage, Trainer};
use crate::data::loader::{Loader, LoaderOptions, RankShare};
use crate::progress::Progress;
use anyhow::{Context, Result};

/// What a step did, as every listener hears it.
#[derive(Debug, Clone, Copy)]
pub struct StepEvent {
    /// Steps done (the one just taken included) and in all.
    pub step: u64,
    pub iterations: u64,
    pub loss: f64,
    /// The base learning rate the step used.
    pub lr: f64,
}

/// A stage that trains one step at a time.
pub trait StageRun {
    /// Its name in log lines.
    fn name(&self) -> &'static str;
    fn done(&self) -> bool;
    /// One step; a non-finite loss is an error that names the step.
    fn advance(&mut self, trainer: &Trainer) -> Result<StepEvent>;
    /// The fraction of target pixels whose labels the stage trains on (for evaluation rows).
    fn labelled_fraction(&self) -> f64;
}

/// Hears of each step of a running stage.
pub trait Listener<R: StageRun> {
    fn on_step(&mut self, trainer: &Trainer, run: &mut R, event: &StepEvent) -> Result<()>;
}

/// Steps `run` until it is done or `stop` says so; after each step every listener, in order.
/// Returns whether the stage ran to its end.
pub fn drive<R: StageRun>(
    trainer: &Trainer,
    run: &mut R,
    listeners: &mut [&mut dyn Listener<R>],
    stop: &dyn Fn() -> bool,
) -> Result<bool> {
    while !run.done() && !stop() {
        let event = run.advance(trainer)?;
        for listener in listeners.iter_mut() {
            listener.on_step(trainer, run, &event)?;
        }
    }
    Ok(run.done())
}

/// The progress bar on a terminal, a log line every `train.log_every` steps otherwise.
pub struct ProgressLine(pub Progress);

impl ProgressLine {
    pub fn new(name: &str, iterations: u64, trainer: &Trainer) -> ProgressLine {
        ProgressLine(Progress::new(name, iterations, trainer.config.train.log_every as u64))
    }
}

impl<R: StageRun> Listener<R> for ProgressLine {
    fn on_step(&mut self, _: &Trainer, _: &mut R, event: &StepEvent) -> Result<()> {
        self.0.step(event.loss, event.lr);
        if event.step == event.iterations {
            self.0.finish();
        }
        Ok(())
    }
}

/// One step's loss and the labelled fraction after it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TracePoint {
    pub step: u64,
    pub loss: f64,
    pub labelled_fraction: f64,
}

/// Every step's loss and labelled fraction (the demo's loss and budget plots).
#[derive(Default)]
pub struct Trace(pub Vec<TracePoint>);

impl<R: StageRun> Listener<R> for Trace {
    fn on_step(&mut self, _: &Trainer, run: &mut R, event: &StepEvent) -> Result<()> {
        self.0.push(TracePoint { step: event.step, loss: event.loss, labelled_fraction: run.labelled_fraction() });
        Ok(())
    }
}

/// The stage's val curve (`Trainer::curve_every`): the target val mIoU every so many steps.
#[derive(Default)]
pub struct ValCurve(pub Vec<CurvePoint>);

impl<R: StageRun> Listener<R> for ValCurve {
    fn on_step(&mut self, trainer: &Trainer, run: &mut R, event: &StepEvent) -> Result<()> {
        let point = trainer.curve_point(event.step as usize, event.iterations as usize, run.labelled_fraction())?;
        self.0.extend(point);
        Ok(())
    }
}

/// A supervised stage running: its loader and optimizer, one step at a time.
pub struct SupervisedRun {
    stage: SupervisedStage,
    loader: Loader,
    optimizer: Sgd,
    step: u64,
    iterations: u64,
    /// Every step's loss.
    pub losses: Vec<f64>,
}

impl SupervisedRun {
    pub fn start(trainer: &Trainer, stage: SupervisedStage, iterations: usize) -> Result<SupervisedRun> {
        let c = &trainer.config;
        let (set, key, batch_size, domain) = match stage {
            SupervisedStage::Source => (&c.data.source, "data.source", c.train.batch_source, "source"),
            SupervisedStage::TargetSupervised => (&c.data.target, "data.target", c.train.batch_target, "target"),
        };
        let source = match stage {
            SupervisedStage::Source => open_source(c)?,
            SupervisedStage::TargetSupervised => open_set(set, key, c.data.classes)?,
        };
        let augment = c.augment_for(set.as_ref().expect("open_set checked it"));
        let options = trainer.loader_options(domain, batch_size, c.run.seed, 0)?;
        Ok(SupervisedRun {
            stage,
            loader: Loader::spawn(source, &augment, options),
            optimizer: trainer.optimizer(),
            step: 0,
            iterations: iterations as u64,
            losses: Vec::with_capacity(iterations),
        })
    }

    pub fn finish(self) -> Vec<f64> {
        self.loader.stop();
        self.losses
    }
}

impl StageRun for SupervisedRun {
    fn name(&self) -> &'static str {
        self.stage.name()
    }

    fn done(&self) -> bool {
        self.step >= self.iterations
    }

    fn advance(&mut self, trainer: &Trainer) -> Result<StepEvent> {
        let batch = self.loader.batches.recv().context("loader stopped")??;
        let images = trainer.normaliser.to_input(&batch.images);
        let labels = crate::torch_ext::labels_on(&batch.labels, trainer.device);
        let (step, iterations) = (self.step as usize, self.iterations as usize);
        let (loss, lr) = trainer.supervised_step(&mut self.optimizer, &images, &labels, step, iterations)?;
        anyhow::ensure!(
            loss.is_finite(),
            "{} stage: loss is {loss} at step {step}{}",
            self.stage.name(),
            trainer.divergence_hint()
        );
        self.losses.push(loss);
        self.step += 1;
        Ok(StepEvent { step: self.step, iterations: self.iterations, loss, lr })
    }

    fn labelled_fraction(&self) -> f64 {
        match self.stage {
            SupervisedStage::Source => 0.0,
            SupervisedStage::TargetSupervised => 1.0,
        }
    }
}

impl Trainer {
    /// The loader options of `domain` ("source" or "target") for batches of `batch_size`, in
    /// the order `seed` fixes, resumed after `step` steps. Data-parallel, this rank draws its
    /// share of every batch (`data::loader::RankShare`), which must divide evenly.
    pub fn loader_options(
        &self,
        domain: &'static str,
        batch_size: usize,
        seed: u64,
        step: u64,
    ) -> Result<LoaderOptions> {
        let start_at = step * batch_size as u64;
        let mut options = LoaderOptions::for_config(&self.config, domain, batch_size, seed, start_at, self.device);
        if let Some(parallel) = &self.parallel {
            let world = parallel.world();
            let key = if domain == "source" { "train.batch_source" } else { "train.batch_target" };
            anyhow::ensure!(
                batch_size.is_multiple_of(world) && batch_size >= world,
                "{key} = {batch_size}: a data-parallel job of {world} ranks needs a batch that they share evenly \
                 (a multiple of {world})"
            );
            options.batch_size = batch_size / world;
            options.share = RankShare { rank: parallel.rank(), world };
        }
        Ok(options)
    }
}
