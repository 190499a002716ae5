//! The ADA-MCU stage (Algorithm 1, lines 4-17): each iteration takes a source and a target
//! batch, scores the target pixels, buys labels under the budget through the ledger, picks
//! pseudo labels, builds the multi-level contrastive units, updates the DCCM and takes one
//! SGD step on L_seg (Eqs. 4-6) + L_con.

use super::optimizer::{poly_lr, Sgd};
use super::{open_set, segmentation_loss, Trainer};
use crate::active::ledger::{Ledger, LedgerImage};
use crate::active::oracle::{Oracle, SealedLabels};
use crate::active::sampling::{Sampler, Thresholds};
use crate::active::uncertainty::uncertainty;
use crate::contrast::dccm::Dccm;
use crate::contrast::units::{contrastive_losses, DomainBatch};
use crate::data::loader::{Loader, LoaderOptions};
use crate::model::deeplab::upsample;
use anyhow::{anyhow, Context, Result};
use rand::SeedableRng;
use std::path::Path;
use tch::{Kind, Tensor};

/// Loss terms of one iteration (for logs, metrics and the gradient tests).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepLosses {
    pub source: f64,
    pub target: f64,
    pub p2p: f64,
    pub c2c: f64,
    pub total: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AdaSummary {
    pub iterations: usize,
    /// Ma, Me and Mt in pixels.
    pub spent: u64,
    pub budget: u64,
    pub total_pixels: u64,
    pub thresholds: Thresholds,
    pub last_losses: StepLosses,
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
}

fn nearest(t: &Tensor, h: i64, w: i64) -> Tensor {
    t.unsqueeze(1).to_kind(Kind::Float).upsample_nearest2d([h, w], None, None).squeeze_dim(1)
}

impl Trainer {
    /// Opens (or creates) the run's ledger for the configured target training set.
    pub fn open_ledger(&self, path: &Path) -> Result<Ledger> {
        let target = open_set(&self.config.data.target, "data.target", self.config.data.classes)?;
        let images = (0..target.len()).map(|i| {
            let (width, height) = target.dimensions(i).map_err(|e| anyhow!("{e}"))?;
            Ok(LedgerImage { id: target.id(i).to_string(), width, height })
        }).collect::<Result<Vec<_>>>()?;
        let total: u64 = images.iter().map(|i| i.width as u64 * i.height as u64).sum();
        let budget = (self.config.active.budget * total as f64).round() as u64;
        Ledger::open_or_create(path, &images, budget)
    }

    pub fn new_ada_state(&self, ledger: Ledger) -> AdaState {
        AdaState { ledger, sampler: Sampler::new(&self.config.active, None),
            dccm: Dccm::new(self.config.data.classes as i64, self.config.contrast.dccm_momentum, self.device) }
    }

    /// The forward pass and every loss of one ADA-MCU iteration.
    pub fn ada_losses(&self, state: &mut AdaState, source_images: &Tensor, source_labels: &Tensor,
        target_images: &Tensor, target_labels: &SealedLabels, target_samples: &[usize],
        target_geometry: &[crate::data::augment::Geometry], iteration: u64) -> StepOutput {
        let c = &self.config;
        let classes = c.data.classes as i64;
        let (xs, xt) = (self.normaliser.to_input(source_images), self.normaliser.to_input(target_images));
        let ns = xs.size()[0];
        let (out_s, out_t) = if xs.size()[1..] == xt.size()[1..] {
            let out = self.model.forward_t(&Tensor::cat(&[&xs, &xt], 0), true);
            let split = |t: &Tensor| (t.narrow(0, 0, ns), t.narrow(0, ns, t.size()[0] - ns));
            let ((ms, mt), (as_, at), (es, et)) = (split(&out.main), split(&out.aux), split(&out.embedding));
            ((ms, as_, es), (mt, at, et))
        } else {
            let (s, t) = (self.model.forward_t(&xs, true), self.model.forward_t(&xt, true));
            ((s.main, s.aux, s.embedding), (t.main, t.aux, t.embedding))
        };
        let source_labels = source_labels.to_device(self.device);
        let loss_source = segmentation_loss(&out_s.0, &source_labels) + segmentation_loss(&out_s.1, &source_labels) * c.train.aux_weight;

        // Score, group and sample the target crops (Eqs. 1-3, Algorithm 1).
        let (h, w) = (xt.size()[2], xt.size()[3]);
        let (main_t, aux_t) = (upsample(&out_t.0, h, w), upsample(&out_t.1, h, w));
        let scores = uncertainty(&main_t, &aux_t, c.active.gamma).to_device(tch::Device::Cpu);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.run.seed ^ iteration.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (mut labelled, mut pseudo, mut high, mut low) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (b, (&image, geometry)) in target_samples.iter().zip(target_geometry).enumerate() {
            let crop_scores: Vec<f32> = Vec::try_from(scores.get(b as i64).flatten(0, -1)).expect("f32 scores");
            let sel = state.sampler.select(&crop_scores, image, geometry, &mut state.ledger, &mut rng);
            labelled.extend(sel.labelled);
            pseudo.extend(sel.pseudo);
            high.extend(sel.high);
            low.extend(sel.low);
        }
        let bt = target_samples.len() as i64;
        let mask = |v: &[bool]| Tensor::from_slice(v).view([bt, h, w]).to_device(self.device);
        let (labelled, pseudo, high, low) = (mask(&labelled), mask(&pseudo), mask(&high), mask(&low));
        let revealed = Oracle::reveal(target_labels, &labelled);
        let prediction_t = main_t.detach().argmax(1, false);
        // Eq. 5: the pseudo label is the prediction itself (one-hot; see docs/algorithm.md).
        let train_labels_t = prediction_t.where_self(&pseudo, &revealed);
        let loss_target = if train_labels_t.ne(255).any().int64_value(&[]) != 0 {
            segmentation_loss(&out_t.0, &train_labels_t) + segmentation_loss(&out_t.1, &train_labels_t) * c.train.aux_weight
        } else {
            Tensor::zeros([], (Kind::Float, self.device))
        };

        // DCCM (Eqs. 7-8) from every pixel whose true label is known this iteration.
        let prediction_s = upsample(&out_s.0, source_labels.size()[1], source_labels.size()[2]).detach().argmax(1, false);
        if c.contrast.enabled && c.contrast.dccm {
            state.dccm.update(&Tensor::cat(&[source_labels.flatten(0, -1), revealed.flatten(0, -1)], 0),
                &Tensor::cat(&[prediction_s.flatten(0, -1), prediction_t.flatten(0, -1)], 0));
        }

        let mut total = &loss_source + &loss_target;
        let (mut p2p, mut c2c) = (None, None);
        if c.contrast.enabled && c.contrast.weight > 0.0 {
            let (fh, fw) = (out_s.2.size()[2], out_s.2.size()[3]);
            let down = |t: &Tensor| nearest(t, fh, fw).to_kind(Kind::Int64);
            let (labels_s, pred_s) = (down(&source_labels), down(&prediction_s));
            let (labels_t, pred_t) = (down(&train_labels_t), down(&prediction_t));
            let scores_s = uncertainty(&upsample(&out_s.0, fh, fw), &upsample(&out_s.1, fh, fw), c.active.gamma);
            let t = state.sampler.thresholds;
            let source = DomainBatch {
                embedding: out_s.2.shallow_clone(),
                anchors: labels_s.ne(255).logical_and(&pred_s.ne_tensor(&labels_s)),
                low: scores_s.lt(t.pi_low).logical_and(&labels_s.ne(255)),
                center_classes: labels_s.clamp_max(classes - 1),
                labels: labels_s,
            };
            let bought_high = down(&labelled.logical_and(&high)).ne(0);
            let target = DomainBatch {
                embedding: out_t.2.shallow_clone(),
                anchors: bought_high.logical_and(&pred_t.ne_tensor(&labels_t)),
                low: down(&low).ne(0),
                center_classes: pred_t,
                labels: labels_t,
            };
            let dccm = c.contrast.dccm.then_some(&state.dccm);
            let losses = contrastive_losses(&source, &target, &c.contrast, dccm, classes);
            for term in [&losses.p2p, &losses.c2c].into_iter().flatten() {
                total = total + term * c.contrast.weight;
            }
            (p2p, c2c) = (losses.p2p, losses.c2c);
        }
        StepOutput { total, terms: [Some(loss_source), Some(loss_target), p2p, c2c] }
    }

    /// Runs the ADA-MCU stage from the current weights; the ledger lives at `ledger_path`.
    pub fn train_ada(&mut self, ledger_path: &Path, iterations: usize) -> Result<(AdaSummary, AdaState)> {
        let c = self.config.clone();
        let mut state = self.new_ada_state(self.open_ledger(ledger_path)?);
        let options = |domain, batch_size, seed| LoaderOptions { domain, batch_size, workers: c.data.workers,
            capacity: c.data.channel_capacity, seed, on_bad_sample: c.data.on_bad_sample, start_at: 0 };
        let source_set = open_set(&c.data.source, "data.source", c.data.classes)?;
        let target_set = open_set(&c.data.target, "data.target", c.data.classes)?;
        let (source_augment, target_augment) = (c.augment_for(c.data.source.as_ref().unwrap()),
            c.augment_for(c.data.target.as_ref().unwrap()));
        let source = Loader::spawn(source_set, &source_augment, options("source", c.train.batch_source, c.run.seed));
        let target = Loader::spawn(target_set, &target_augment, options("target", c.train.batch_target,
            c.run.seed.wrapping_add(1)));
        let mut optimizer: Sgd = self.optimizer();
        let mut progress = super::progress::Progress::new("ada-mcu", iterations as u64, c.train.log_every as u64);
        let mut last = StepLosses::default();
        for step in 0..iterations {
            let sb = source.batches.recv().context("source loader stopped")?.map_err(|e| anyhow!("{e}"))?;
            let tb = target.batches.recv().context("target loader stopped")?.map_err(|e| anyhow!("{e}"))?;
            let sealed = SealedLabels::seal(tb.labels);
            let out = self.ada_losses(&mut state, &sb.images, &sb.labels, &tb.images, &sealed, &tb.sample_indices,
                &tb.geometries, step as u64);
            optimizer.zero_grad();
            out.total.backward();
            let lr = poly_lr(c.train.lr, step as u64, iterations as u64, c.train.poly_power);
            optimizer.update(lr);
            let value = |t: &Option<Tensor>| t.as_ref().map_or(0.0, |t| t.double_value(&[]));
            last = StepLosses { source: value(&out.terms[0]), target: value(&out.terms[1]), p2p: value(&out.terms[2]),
                c2c: value(&out.terms[3]), total: out.total.double_value(&[]) };
            anyhow::ensure!(last.total.is_finite(), "ada-mcu: loss is {} at step {step}", last.total);
            progress.step(last.total, lr);
            if (step + 1) % c.train.log_every == 0 {
                tracing::info!("budget {}/{} pixels ({:.2}% of target), pi_high {:.4}, losses {last:?}",
                    state.ledger.spent(), state.ledger.budget(),
                    100.0 * state.ledger.spent() as f64 / state.ledger.total_pixels() as f64, state.sampler.thresholds.pi_high);
            }
        }
        progress.finish();
        source.stop();
        target.stop();
        state.ledger.flush()?;
        Ok((AdaSummary { iterations, spent: state.ledger.spent(), budget: state.ledger.budget(),
            total_pixels: state.ledger.total_pixels(), thresholds: state.sampler.thresholds, last_losses: last }, state))
    }
}
