//! The round strategies' side of the stage (`active.strategy` = ripu, entropy, margin,
//! random): a selection round over the whole target set at each of `active.rounds`, and the
//! step's losses between rounds, on the labels the ledger holds (revealed by the oracle).
//! RIPU adds its negative learning on the target and local consistency on the source.

use super::step::StepOutput;
use super::AdaState;
use crate::active::ledger::Ledger;
use crate::active::oracle::{Oracle, SealedLabels};
use crate::active::rounds::{buy_chosen, image_quotas, RoundPlan};
use crate::active::sampling::{bought_before, BatchSelection, CropPixels};
use crate::config::Strategy;
use crate::model::deeplab::upsample;
use crate::train::eval::network_input;
use crate::train::{open_set, Trainer};
use anyhow::{Context, Result};
use tch::{Kind, Tensor};

/// RIPU's negative learning (`negative_learning_loss.py`): over every pixel and class whose
/// probability is below `threshold`, the mean of -log(1 - p).
pub fn negative_learning_loss(probabilities: &Tensor, threshold: f64) -> Tensor {
    let mask = probabilities.lt(threshold).detach().to_kind(Kind::Float);
    let per_class = -((probabilities.neg() + 1.0 + 1e-6).log()) * &mask;
    per_class.sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0)
}

/// RIPU's local consistency (`local_consistent_loss.py`, L1): at the labels' semantic
/// boundaries (a pixel whose 3x3 neighbourhood, zero-padded, differs from it) that are not
/// ignored, the mean L1 distance of the softmax to its 3x3 mean (replicate-padded).
/// `logits` [B, C, H, W] at the labels' size; `labels` [B, H, W] i64.
pub fn local_consistency_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let p = logits.softmax(1, Kind::Float);
    let mean = p.pad([1, 1, 1, 1], "replicate", None).avg_pool2d([3, 3], [1, 1], [0, 0], false, true, None::<i64>);
    let discrepancy = (&p - mean).abs().sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let l = labels.to_kind(Kind::Float).unsqueeze(1);
    let neighbourhood = l.avg_pool2d([3, 3], [1, 1], [1, 1], false, true, None::<i64>) * 9.0;
    let boundary = (&l * 9.0 - neighbourhood).squeeze_dim(1).ne(0).logical_and(&labels.ne(255));
    let mask = boundary.to_kind(Kind::Float);
    (discrepancy * &mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0)
}

impl Trainer {
    /// Selection round `round` (0-based) of `active.rounds`: scores every target training image
    /// at the ledger's size with the model in evaluation mode and buys its share through the
    /// ledger. Returns the pixels newly charged.
    ///
    /// Data-parallel, rank r scores the images i with i mod N = r; the ranks then gather every
    /// image's chosen pixels and each applies them all in image order. An image's choice
    /// depends only on the model (the same on every rank), its own ledger pixels (the same at
    /// the round's start, and no other image's purchase touches them) and its quota (fixed at
    /// the start), so every rank's ledger ends as one process's does.
    pub fn selection_round(&self, ledger: &mut Ledger, round: usize) -> Result<u64> {
        let a = &self.config.active;
        let plan = RoundPlan::of(a);
        let target = open_set(&self.config.data.target, "data.target", self.config.data.classes)?;
        let quotas = image_quotas(ledger, round, a.rounds.len(), target.len());
        let (rank, world) = self.parallel.as_ref().map_or((0, 1), |p| (p.rank(), p.world()));
        let mine: Vec<usize> = (rank..target.len()).step_by(world).collect();
        let mut progress = crate::progress::Progress::bar_only("selection round", mine.len() as u64);
        let mut chosen: Vec<(usize, Vec<u32>)> = Vec::new();
        for &image in &mine {
            let quota = quotas[image];
            if quota > 0 {
                let rgb = target.load_image(image).map_err(anyhow::Error::msg)?;
                let grid = &ledger.images()[image];
                let (h, w) = (grid.height as i64, grid.width as i64);
                // The random baseline's draws depend on (seed, round, image) alone: a resumed
                // run, or another number of ranks, buys the same pixels.
                tch::manual_seed((self.config.run.seed ^ ((round as u64) << 32) ^ image as u64) as i64);
                let probabilities = tch::no_grad(|| {
                    // At the size the target is trained at, resized as the loader resizes it.
                    let input = network_input(&self.normaliser, &rgb, [grid.height, grid.width]);
                    upsample(&self.forward(&input, false).main, h, w).softmax(1, Kind::Float)
                });
                chosen.push((image, plan.choose_in_image(&probabilities, ledger, image, quota)));
            }
            progress.tick();
        }
        progress.finish();
        if let Some(parallel) = &self.parallel {
            chosen = gather_choices(parallel, &chosen, self.device)?;
        }
        let bought: u64 = chosen.iter().map(|(image, pixels)| buy_chosen(ledger, *image, pixels)).sum();
        tracing::info!(
            "{} round {} of {}: bought {bought} {}; {} of {} spent",
            a.strategy,
            round + 1,
            a.rounds.len(),
            ledger.pixel_unit(),
            ledger.charged(),
            ledger.budget()
        );
        ledger.flush().context("after a selection round")?;
        Ok(bought)
    }

    /// One step's losses for a round strategy: L_seg on the source and on the target pixels
    /// the ledger holds (nothing is bought in a step), and RIPU's two terms.
    #[allow(clippy::too_many_arguments)]
    pub fn round_losses(
        &self,
        state: &AdaState,
        source_images: &Tensor,
        source_labels: &Tensor,
        target_images: &Tensor,
        target_labels: &SealedLabels,
        target_samples: &[usize],
        target_geometry: &[crate::data::augment::Geometry],
    ) -> StepOutput {
        let c = &self.config;
        let (out_s, out_t, features) = self.forward_domains(source_images, target_images);
        let source_labels = crate::torch_ext::labels_on(source_labels, self.device);
        let (sh, sw) = (source_labels.size()[1], source_labels.size()[2]);
        let main_s = upsample(&out_s.main, sh, sw);
        let loss_source = self.main_and_aux_loss(&main_s, &out_s.aux, &source_labels);
        let (h, w) = (target_images.size()[1], target_images.size()[2]);
        let (main_t, aux_t) = (upsample(&out_t.main, h, w), upsample(&out_t.aux, h, w));
        let crops: Vec<CropPixels> =
            target_samples.iter().zip(target_geometry).map(|(&i, g)| CropPixels::of(i, g, &state.ledger)).collect();
        let labelled = bought_before(&state.ledger, &crops, self.device).1.view([-1, h, w]);
        let revealed = Oracle::reveal(target_labels, &labelled);
        let loss_target = self.main_and_aux_loss(&main_t, &aux_t, &revealed);
        let r = &c.active.ripu;
        let ripu = c.active.strategy == Strategy::Ripu;
        let negative_learning = (ripu && r.negative_weight > 0.0)
            .then(|| negative_learning_loss(&main_t.softmax(1, Kind::Float), r.negative_threshold) * r.negative_weight);
        let local_consistency = (ripu && r.consistency_weight > 0.0)
            .then(|| local_consistency_loss(&main_s, &source_labels) * r.consistency_weight);
        StepOutput::supervised(
            loss_source,
            loss_target,
            [negative_learning, local_consistency],
            BatchSelection::known(labelled),
            features,
        )
    }
}

/// Every rank's `(image, chosen pixels)`, in image order. Each rank's list travels as one
/// i64 tensor, [image, count, pixels...] per image, padded with -1 to the longest rank's.
fn gather_choices(
    parallel: &crate::distributed::DataParallel,
    chosen: &[(usize, Vec<u32>)],
    device: tch::Device,
) -> Result<Vec<(usize, Vec<u32>)>> {
    let mut flat: Vec<i64> = Vec::new();
    for (image, pixels) in chosen {
        flat.extend([*image as i64, pixels.len() as i64]);
        flat.extend(pixels.iter().map(|&p| p as i64));
    }
    // On the rank's device: NCCL gathers device tensors.
    let length = Tensor::from_slice(&[flat.len() as i64]).to_device(device);
    let longest = parallel.all_gather(&length)?.iter().map(|t| t.int64_value(&[0])).max().unwrap_or(0);
    flat.resize(longest.max(1) as usize, -1);
    let mut all = Vec::new();
    for list in parallel.all_gather(&Tensor::from_slice(&flat).to_device(device))? {
        let list = Vec::<i64>::try_from(&list.to_device(tch::Device::Cpu))?;
        let mut at = 0;
        while at + 1 < list.len() && list[at] >= 0 {
            let (image, count) = (list[at] as usize, list[at + 1] as usize);
            all.push((image, list[at + 2..at + 2 + count].iter().map(|&p| p as u32).collect()));
            at += 2 + count;
        }
    }
    all.sort_by_key(|(image, _)| *image);
    Ok(all)
}
