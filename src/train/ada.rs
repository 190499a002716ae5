//! The ADA-MCU stage (Algorithm 1, lines 4-17): each iteration takes a source and a target
//! batch, scores the target pixels, buys labels under the budget through the ledger, picks
//! pseudo labels, builds the multi-level contrastive units, updates the DCCM and takes one
//! SGD step on L_seg (Eqs. 4-6) + L_con.

use super::checkpoint;
use super::optimizer::{poly_lr, Sgd};
use super::{open_set, segmentation_loss, Trainer};
use crate::active::ledger::{Ledger, LedgerImage, LedgerSnapshot};
use crate::active::oracle::{Oracle, SealedLabels};
use crate::active::sampling::{BatchSelection, CropPixels, Sampler, Settled, Thresholds};
use crate::active::uncertainty::uncertainty;
use crate::config::{listed, ConfigChange, DccmFrom};
use crate::contrast::dccm::Dccm;
use crate::contrast::units::{contrastive_losses, DomainBatch};
use crate::data::loader::{Loader, LoaderOptions};
use crate::model::deeplab::upsample;
use crate::model::SegOutput;
use crate::pipeline::writer::CheckpointWriter;
use crate::telemetry;
use anyhow::{anyhow, bail, Context, Result};
use indicatif::HumanBytes;
use std::path::Path;
use std::time::Instant;
use tch::{Kind, Tensor};

/// Loss terms of one iteration (for logs, metrics and the gradient tests).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepLosses {
    pub source: f64,
    pub target: f64,
    pub p2p: f64,
    pub c2c: f64,
    pub total: f64,
    /// What the contrastive units had to work with (None with them off).
    pub contrast: Option<ContrastDiagnostics>,
}

/// Whether the contrastive units do anything, per step: usable p2p anchors (with a positive
/// and a negative) and their positive pairs per level and anchor domain, summed over the
/// batch's units; the ratio of L_con's gradient (weighted) to L_seg's at the backbone's output
/// (on diagnosed steps only: it costs two backward passes through the heads); max(W).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContrastDiagnostics {
    pub levels: Vec<LevelUsage>,
    pub gradient_ratio: Option<f64>,
    pub dccm_max: f64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LevelUsage {
    pub level: String,
    pub source_anchors: f64,
    pub source_positives: f64,
    pub target_anchors: f64,
    pub target_positives: f64,
}

impl ContrastDiagnostics {
    /// One line for logs and `adamcu status`.
    pub fn line(&self) -> String {
        let levels: Vec<String> = self
            .levels
            .iter()
            .map(|l| format!("{} {:.0}/{:.0}", l.level, l.source_anchors, l.target_anchors))
            .collect();
        format!(
            "p2p anchors (source/target) {}; |grad L_con|/|grad L_seg| {}; max W {:.3}",
            levels.join(", "),
            self.gradient_ratio.map_or("-".into(), |r| format!("{r:.3}")),
            self.dccm_max
        )
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AdaSummary {
    pub iterations: usize,
    /// What Ma, Me and Mt count (`Ledger::pixel_unit`: pixels at the training resolution).
    pub pixels: String,
    /// Ma, Me and Mt in those pixels.
    pub spent: u64,
    pub budget: u64,
    pub total_pixels: u64,
    pub thresholds: Thresholds,
    pub last_losses: StepLosses,
    /// The val curve before the last step (`Trainer::curve_every`; the caller evaluates the
    /// finished stage: `Trainer::curve_end`). Empty from the daemon, which reports its own.
    pub curve: Vec<super::CurvePoint>,
}

impl AdaSummary {
    /// Ma / Mt.
    pub fn labelled_fraction(&self) -> f64 {
        self.spent as f64 / self.total_pixels as f64
    }
}

/// The ADA-MCU state that lives beside the model.
pub struct AdaState {
    pub ledger: Ledger,
    pub sampler: Sampler,
    pub dccm: Dccm,
}

/// Everything one iteration computes before the backward pass.
pub struct StepOutput {
    pub total: Tensor,
    pub terms: [Option<Tensor>; 4],
    /// The target draw, recorded in the ledger by `Trainer::ada_settle` after the update.
    pub selection: BatchSelection,
    /// L_seg, and L_con as weighted in the total (for the gradient ratio).
    seg: Tensor,
    con: Option<Tensor>,
    /// The backbone's output (one tensor, or one per domain when their crops differ in size).
    features: Vec<Tensor>,
    /// `ContrastLosses::usage` and max(W), read back with the losses.
    usage: Option<Tensor>,
    dccm_max: Option<Tensor>,
    /// Set by `ada_update` on a diagnosed step.
    gradient_ratio: Option<Tensor>,
}

fn nearest(t: &Tensor, h: i64, w: i64) -> Tensor {
    t.unsqueeze(1).to_kind(Kind::Float).upsample_nearest2d([h, w], None, None).squeeze_dim(1)
}

/// ||d con / d features|| / ||d seg / d features|| over all feature tensors, keeping the graph
/// for the update's backward pass. None when a loss does not reach the features.
fn gradient_ratio(seg: &Tensor, con: &Tensor, features: &[Tensor]) -> Option<Tensor> {
    let norm = |loss: &Tensor| -> Option<Tensor> {
        let grads = Tensor::f_run_backward(&[loss], features, true, false).ok()?;
        let squares: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
        Some(Tensor::stack(&squares, 0).sum(Kind::Float).sqrt())
    };
    Some(norm(con)? / norm(seg)?.clamp_min(1e-20))
}

impl Trainer {
    /// The ledger's images (the configured target training set) at the size the network is
    /// trained on them (`data.target.resize`, else `augment.resize`, else as stored), and its
    /// budget Me in those pixels: "5 %" is 5 % of what the network can see, as RIPU counts
    /// (a Cityscapes frame stored at 2048x1024 and trained at 1024x512 counts 524,288 pixels).
    fn ledger_layout(&self) -> Result<(Vec<LedgerImage>, u64)> {
        let target = open_set(&self.config.data.target, "data.target", self.config.data.classes)?;
        let [resize_h, resize_w] =
            self.config.augment_for(self.config.data.target.as_ref().expect("open_set checked it")).resize;
        let images = (0..target.len())
            .map(|i| {
                let (width, height) = if resize_h > 0 {
                    (resize_w, resize_h)
                } else {
                    target.dimensions(i).map_err(|e| anyhow!("{e}"))?
                };
                Ok(LedgerImage { id: target.id(i).to_string(), width, height })
            })
            .collect::<Result<Vec<_>>>()?;
        let total: u64 = images.iter().map(|i| i.width as u64 * i.height as u64).sum();
        Ok((images, (self.config.active.budget * total as f64).round() as u64))
    }

    /// Opens (or creates) the run's ledger for the configured target training set.
    pub fn open_ledger(&self, path: &Path) -> Result<Ledger> {
        let (images, budget) = self.ledger_layout()?;
        Ledger::open_or_create(path, &images, budget)
    }

    pub fn new_ada_state(&self, ledger: Ledger) -> AdaState {
        AdaState {
            ledger,
            sampler: Sampler::new(&self.config.active, None),
            dccm: Dccm::new(self.config.data.classes as i64, self.config.contrast.dccm_momentum, self.device),
        }
    }

    /// The forward pass and every loss of one ADA-MCU iteration.
    #[allow(clippy::too_many_arguments)]
    pub fn ada_losses(
        &self,
        state: &mut AdaState,
        source_images: &Tensor,
        source_labels: &Tensor,
        target_images: &Tensor,
        target_labels: &SealedLabels,
        target_samples: &[usize],
        target_geometry: &[crate::data::augment::Geometry],
    ) -> StepOutput {
        let c = &self.config;
        let classes = c.data.classes as i64;
        let (xs, xt) = (self.normaliser.to_input(source_images), self.normaliser.to_input(target_images));
        let ns = xs.size()[0];
        let (out_s, out_t, features) = if xs.size()[1..] == xt.size()[1..] {
            let out = self.forward(&Tensor::cat(&[&xs, &xt], 0), true);
            let split = |t: &Tensor| (t.narrow(0, 0, ns), t.narrow(0, ns, t.size()[0] - ns));
            let ((ms, mt), (as_, at), (es, et)) = (split(&out.main), split(&out.aux), split(&out.embedding));
            (
                SegOutput { main: ms, aux: as_, embedding: es, features: out.features.shallow_clone() },
                SegOutput { main: mt, aux: at, embedding: et, features: out.features.shallow_clone() },
                vec![out.features],
            )
        } else {
            let (s, t) = (self.forward(&xs, true), self.forward(&xt, true));
            let features = vec![s.features.shallow_clone(), t.features.shallow_clone()];
            (s, t, features)
        };
        let source_labels = crate::torch_ext::labels_on(source_labels, self.device);
        let loss_source = segmentation_loss(&out_s.main, &source_labels)
            + segmentation_loss(&out_s.aux, &source_labels) * c.train.aux_weight;

        // Score, group and sample the target crops (Eqs. 1-3, Algorithm 1), on the device.
        let (h, w) = (xt.size()[2], xt.size()[3]);
        let (main_t, aux_t) = (upsample(&out_t.main, h, w), upsample(&out_t.aux, h, w));
        let scores = uncertainty(&main_t, &aux_t, c.active.gamma);
        let crops: Vec<CropPixels> =
            target_samples.iter().zip(target_geometry).map(|(&i, g)| CropPixels::of(i, g, &state.ledger)).collect();
        let selection = state.sampler.select(&scores, &crops, &state.ledger);
        let (labelled, pseudo) = (&selection.labelled, &selection.pseudo);
        let revealed = Oracle::reveal(target_labels, labelled);
        let prediction_t = main_t.detach().argmax(1, false);
        // Eq. 5: the pseudo label is the prediction itself (one-hot; see docs/algorithm.md).
        let train_labels_t = prediction_t.where_self(pseudo, &revealed);
        // A crop may have no labelled or pseudo-labelled pixel: the loss is then 0, with no host check.
        // On the logits already upsampled for the scores (one copy at crop size per head, not two).
        let loss_target = segmentation_loss(&main_t, &train_labels_t)
            + segmentation_loss(&aux_t, &train_labels_t) * c.train.aux_weight;

        // DCCM (Eqs. 7-8) from the pixels whose true label is known this iteration: the
        // target's revealed labels, and with `dccm_from = "both"` the source's ground truth.
        let prediction_s =
            upsample(&out_s.main, source_labels.size()[1], source_labels.size()[2]).detach().argmax(1, false);
        let dccm_on = c.contrast.enabled && c.contrast.dccm;
        if dccm_on {
            let (labels, predictions) = match c.contrast.dccm_from {
                DccmFrom::Target => (revealed.flatten(0, -1), prediction_t.flatten(0, -1)),
                DccmFrom::Both => (
                    Tensor::cat(&[source_labels.flatten(0, -1), revealed.flatten(0, -1)], 0),
                    Tensor::cat(&[prediction_s.flatten(0, -1), prediction_t.flatten(0, -1)], 0),
                ),
            };
            state.dccm.update(&labels, &predictions);
        }

        let seg = &loss_source + &loss_target;
        let mut total = seg.shallow_clone();
        let (mut p2p, mut c2c, mut con, mut usage) = (None, None, None, None);
        if c.contrast.enabled && c.contrast.weight > 0.0 {
            // Keys and anchors at each crop's own resolution (every bought label can be one);
            // G_l and the category centers' classes at the embedding's (stride 8). Source and
            // target crops differ in size in the paper's setting (1280x720 and 1024x512).
            let ((fh, fw), (th, tw)) = (
                (out_s.embedding.size()[2], out_s.embedding.size()[3]),
                (out_t.embedding.size()[2], out_t.embedding.size()[3]),
            );
            let down_t = |t: &Tensor| nearest(t, th, tw).to_kind(Kind::Int64);
            let labels_s_low = nearest(&source_labels, fh, fw).to_kind(Kind::Int64);
            let scores_s = uncertainty(&upsample(&out_s.main, fh, fw), &upsample(&out_s.aux, fh, fw), c.active.gamma);
            let t = state.sampler.thresholds;
            let source = DomainBatch {
                embedding: out_s.embedding.shallow_clone(),
                anchors: source_labels.ne(255).logical_and(&prediction_s.ne_tensor(&source_labels)),
                low: scores_s.lt(t.pi_low).logical_and(&labels_s_low.ne(255)),
                center_classes: labels_s_low.clamp_max(classes - 1),
                labels: source_labels.shallow_clone(),
            };
            // Target anchors (Section III-C.1): labels bought while in G_h, misclassified.
            let bought_high = labelled.logical_and(&selection.high).logical_and(&revealed.ne(255));
            let target = DomainBatch {
                embedding: out_t.embedding.shallow_clone(),
                anchors: bought_high.logical_and(&prediction_t.ne_tensor(&revealed)),
                low: down_t(&selection.low).ne(0),
                center_classes: down_t(&prediction_t),
                labels: train_labels_t.shallow_clone(),
            };
            let dccm = c.contrast.dccm.then_some(&state.dccm);
            let losses = contrastive_losses(&source, &target, &c.contrast, dccm, classes);
            let weighted: Vec<Tensor> =
                [&losses.p2p, &losses.c2c].into_iter().flatten().map(|t| t * c.contrast.weight).collect();
            if !weighted.is_empty() {
                let sum = Tensor::stack(&weighted, 0).sum(Kind::Float);
                total = total + &sum;
                con = Some(sum);
            }
            (p2p, c2c, usage) = (losses.p2p, losses.c2c, losses.usage);
        }
        let dccm_max = dccm_on.then(|| state.dccm.w.max());
        StepOutput {
            total,
            terms: [Some(loss_source), Some(loss_target), p2p, c2c],
            selection,
            seg,
            con,
            features,
            usage,
            dccm_max,
            gradient_ratio: None,
        }
    }

    /// The backward pass and the SGD update at `lr`: queued on the device, nothing read back.
    /// A `diagnose`d step first measures the gradient ratio of `ContrastDiagnostics`.
    pub fn ada_update(&self, out: &mut StepOutput, optimizer: &mut Sgd, lr: f64, diagnose: bool) {
        optimizer.zero_grad();
        if diagnose {
            out.gradient_ratio = out.con.as_ref().and_then(|con| gradient_ratio(&out.seg, con, &out.features));
        }
        out.total.backward();
        optimizer.update(lr);
    }

    /// The end of an iteration and its one wait for the device: reads the loss values (and
    /// the diagnostics) and records the step's target draw in the ledger.
    pub fn ada_settle(&self, state: &mut AdaState, out: &StepOutput) -> (StepLosses, Settled) {
        // Every value in one device-to-host copy: the five losses, max(W), the gradient ratio
        // (-1 where not measured), then the usage table.
        let scalar = |t: Option<&Tensor>, none: f64| {
            t.map_or_else(
                || Tensor::full([1], none, (Kind::Float, self.device)),
                |t| t.detach().to_kind(Kind::Float).reshape([1]),
            )
        };
        let mut parts: Vec<Tensor> = out.terms.iter().map(|t| scalar(t.as_ref(), 0.0)).collect();
        parts.extend([
            scalar(Some(&out.total), 0.0),
            scalar(out.dccm_max.as_ref(), 0.0),
            scalar(out.gradient_ratio.as_ref(), -1.0),
        ]);
        parts.extend(out.usage.iter().map(|u| u.flatten(0, -1)));
        let values = Vec::<f32>::try_from(Tensor::cat(&parts, 0).to_device(tch::Device::Cpu)).expect("f32 losses");
        let settled = state.sampler.settle(&out.selection, &mut state.ledger);
        let contrast = out.con.as_ref().map(|_| ContrastDiagnostics {
            levels: self
                .config
                .contrast
                .levels
                .iter()
                .zip(values[7..].chunks(4))
                .map(|(level, u)| LevelUsage {
                    level: level.clone(),
                    source_anchors: u[0] as f64,
                    source_positives: u[1] as f64,
                    target_anchors: u[2] as f64,
                    target_positives: u[3] as f64,
                })
                .collect(),
            gradient_ratio: (values[6] >= 0.0).then_some(values[6] as f64),
            dccm_max: values[5] as f64,
        });
        let losses = StepLosses {
            source: values[0] as f64,
            target: values[1] as f64,
            p2p: values[2] as f64,
            c2c: values[3] as f64,
            total: values[4] as f64,
            contrast,
        };
        (losses, settled)
    }

    /// Runs the ADA-MCU stage from the current weights to the end; the ledger lives at
    /// `ledger_path` (a fresh run: see `pipeline::daemon` for checkpoints and resume).
    pub fn train_ada(&mut self, ledger_path: &Path, iterations: usize) -> Result<(AdaSummary, AdaState)> {
        let state = self.new_ada_state(self.open_ledger(ledger_path)?);
        let mut run = AdaRun::start(self, state, None, iterations as u64)?;
        let mut progress =
            super::progress::Progress::new("ada-mcu", iterations as u64, self.config.train.log_every as u64);
        let mut curve = Vec::new();
        while !run.done() {
            let total = run.step(self)?.total;
            progress.step(total, poly_lr(self.config.train.lr, run.step, run.iterations, self.config.train.poly_power));
            curve.extend(self.curve_point(run.step as usize, iterations, run.state.ledger.labelled_fraction())?);
        }
        progress.finish();
        let ledger = &run.state.ledger;
        tracing::info!(
            "ada-mcu: bought {} of {} {} ({:.2}% of the target set), pi_high {:.4}",
            ledger.charged(),
            ledger.budget(),
            ledger.pixel_unit(),
            100.0 * ledger.labelled_fraction(),
            run.state.sampler.thresholds.pi_high
        );
        let (mut summary, state) = run.finish()?;
        summary.curve = curve;
        Ok((summary, state))
    }
}

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

impl AdaCheckpoint {
    /// Writes the ledger snapshot, then the checkpoint (so a checkpoint file never exists
    /// without its snapshot), then prunes the old ones. Seconds at the paper's scale: the
    /// daemon runs it on its writer thread.
    pub fn write(&self, rotation: &checkpoint::Rotation) -> Result<std::path::PathBuf> {
        let started = Instant::now();
        let ledger_path = rotation.path_for(self.step, "ledger");
        match &self.ledger {
            LedgerCopy::Taken(snapshot) => snapshot.write(&ledger_path)?,
            // A second name for the earlier file (it is still there: pruning comes after).
            LedgerCopy::SameAs(step) => checkpoint::write_atomically(&ledger_path, |temp| {
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

/// A running ADA-MCU stage: its loaders, optimizer and state, one `step` at a time.
pub struct AdaRun {
    pub state: AdaState,
    pub optimizer: Sgd,
    source: Loader,
    target: Loader,
    pub step: u64,
    pub iterations: u64,
    pub last: StepLosses,
    stage: telemetry::Stage,
    /// Seconds this run's steps spent waiting for batches, and in all (for the bottleneck).
    pub waited: f64,
    pub stepped: f64,
    /// Pixels charged when this run last captured the ledger, and at which step.
    last_snapshot: Option<(u64, u64)>,
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
        let options = |domain, batch_size: usize, seed| LoaderOptions {
            domain,
            batch_size,
            workers: c.data.workers,
            capacity: c.data.channel_capacity,
            seed,
            on_bad_sample: c.data.on_bad_sample,
            start_at: step * batch_size as u64,
            pinned: trainer.device.is_cuda(),
        };
        let (source_cfg, target_cfg) = (c.data.source.as_ref(), c.data.target.as_ref());
        let source_set = open_set(&c.data.source, "data.source", c.data.classes)?;
        let target_set = open_set(&c.data.target, "data.target", c.data.classes)?;
        let source = Loader::spawn(
            source_set,
            &c.augment_for(source_cfg.unwrap()),
            options("source", c.train.batch_source, c.run.seed),
        );
        let target = Loader::spawn(
            target_set,
            &c.augment_for(target_cfg.unwrap()),
            options("target", c.train.batch_target, c.run.seed.wrapping_add(1)),
        );
        Ok(AdaRun {
            state,
            optimizer,
            source,
            target,
            step,
            iterations,
            last: StepLosses::default(),
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
        let started = Instant::now();
        let sb = self.source.batches.recv().context("source loader stopped")?.map_err(|e| anyhow!("{e}"))?;
        let tb = self.target.batches.recv().context("target loader stopped")?.map_err(|e| anyhow!("{e}"))?;
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
        );
        let lr = poly_lr(c.train.lr, self.step, self.iterations, c.train.poly_power);
        // The gradient ratio costs two backward passes through the heads: on log steps only.
        let diagnose = c.train.log_every > 0 && self.step.is_multiple_of(c.train.log_every as u64);
        trainer.ada_update(&mut out, &mut self.optimizer, lr, diagnose);
        let (losses, settled) = trainer.ada_settle(&mut self.state, &out);
        self.last = losses;
        self.stage.busy(busy.elapsed());
        self.stage.item();
        self.step += 1;
        let seconds = started.elapsed().as_secs_f64();
        (self.waited, self.stepped) = (self.waited + waited.as_secs_f64(), self.stepped + seconds);
        let l = &self.last;
        telemetry::step(
            seconds,
            lr,
            &[("source", l.source), ("target", l.target), ("p2p", l.p2p), ("c2c", l.c2c), ("total", l.total)],
        );
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
            telemetry::contrast(d);
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

    /// Captures this step's checkpoint and hands it to the writer thread. The pause it costs
    /// the trainer (the copies, and waiting while the writer is still busy with the previous
    /// checkpoint) is recorded as the train stage's output wait.
    pub fn checkpoint(&mut self, trainer: &Trainer, writer: &mut CheckpointWriter) -> Result<()> {
        let started = Instant::now();
        writer.submit(self.capture_checkpoint(trainer))?;
        self.stage.waited_output(started.elapsed());
        Ok(())
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
        };
        Ok((summary, self.state))
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
