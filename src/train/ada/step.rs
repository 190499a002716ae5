//! One ADA-MCU iteration: the forward pass of both domains, the uncertainty scores and the
//! labels bought (Eqs. 1-3), pseudo labels (Eq. 5), the DCCM (Eqs. 7-8), the contrastive units
//! (Eqs. 9-11), the update, and the one read-back of the step's figures.

use super::{AdaState, StepLosses, Terms};
use crate::active::oracle::{Oracle, SealedLabels};
use crate::active::sampling::{BatchSelection, CropPixels, JobBatch, Settled};
use crate::active::uncertainty::uncertainty;
use crate::config::{DccmFrom, Level};
use crate::contrast::dccm::Dccm;
use crate::contrast::diagnostics::{
    AgainstSegmentation, ContrastDiagnostics, GradientFigures, LevelGradient, LevelPairCosine, LevelUsage,
};
use crate::contrast::units::{contrastive_losses, DomainBatch};
use crate::model::deeplab::upsample;
use crate::model::SegOutput;
use crate::torch_ext::HostReadback;
use crate::train::optimizer::Sgd;
use crate::train::Trainer;
use anyhow::Result;
use tch::{Kind, Tensor};

/// Everything one iteration computes before the backward pass.
pub struct StepOutput {
    pub total: Tensor,
    /// The terms (p2p and c2c None without contrastive units).
    pub terms: Terms<Option<Tensor>>,
    /// The target draw, recorded in the ledger by `Trainer::ada_settle` after the update.
    pub selection: BatchSelection,
    /// L_seg, and L_con as weighted in the total, whole and per level [levels] (for the
    /// gradient figures).
    seg: Tensor,
    con: Option<Tensor>,
    con_levels: Option<Tensor>,
    /// The backbone's output (one tensor, or one per domain when their crops differ in size).
    features: Vec<Tensor>,
    /// `ContrastLosses::usage` and max(W), read back with the losses.
    usage: Option<Tensor>,
    dccm_max: Option<Tensor>,
    /// Set by `ada_update` on a diagnosed step: the step and its `gradient_figures`.
    gradient_figures: Option<(u64, Tensor)>,
}

fn nearest(t: &Tensor, h: i64, w: i64) -> Tensor {
    t.unsqueeze(1).to_kind(Kind::Float).upsample_nearest2d([h, w], None, None).squeeze_dim(1)
}

/// How L_con and each level's share of it move the backbone against L_seg and against each
/// other, keeping the graph for the update's backward pass. One flat tensor: the ratios
/// ||d con / d features|| / ||d seg / d features|| over all feature tensors (L_con first, then
/// each level: 1 + levels), the cosines between those gradients and L_seg's (1 + levels), then
/// the cosine between each pair of levels' gradients (levels x (levels - 1) / 2, in the order
/// of `level_pairs`). A level whose loss is flat, or whose units have no usable anchor, has a
/// ratio near 0; one whose cosine is near -1 pulls the features against segmentation, one near
/// 0 in directions segmentation does not care about. None when a loss does not reach the
/// features.
fn gradient_figures(seg: &Tensor, con: &Tensor, con_levels: &Tensor, features: &[Tensor]) -> Option<Tensor> {
    let gradient = |loss: &Tensor| -> Option<Vec<Tensor>> {
        let grads = Tensor::f_run_backward(&[loss], features, true, false).ok()?;
        Some(grads.iter().map(|g| g.to_kind(Kind::Float)).collect())
    };
    // Sum over the feature tensors of the element-wise products of two gradients.
    let dot = |a: &[Tensor], b: &[Tensor]| -> Tensor {
        let parts: Vec<Tensor> = a.iter().zip(b).map(|(x, y)| (x * y).sum(Kind::Float)).collect();
        Tensor::stack(&parts, 0).sum(Kind::Float)
    };
    let norm = |g: &[Tensor]| dot(g, g).sqrt();
    let cosine = |a: &[Tensor], b: &[Tensor]| dot(a, b) / (norm(a) * norm(b)).clamp_min(1e-20);
    let seg = gradient(seg)?;
    let seg_norm = norm(&seg).clamp_min(1e-20);
    let levels = con_levels.size()[0];
    let grads: Vec<Vec<Tensor>> = std::iter::once(con.shallow_clone())
        .chain((0..levels).map(|l| con_levels.get(l)))
        .map(|l| gradient(&l))
        .collect::<Option<_>>()?;
    let ratios = grads.iter().map(|g| norm(g) / &seg_norm);
    let cosines = grads.iter().map(|g| cosine(g, &seg));
    let between = level_pairs(levels as usize).map(|(i, j)| cosine(&grads[1 + i], &grads[1 + j]));
    Some(Tensor::stack(&ratios.chain(cosines).chain(between).collect::<Vec<_>>(), 0))
}

/// The pairs (i, j), i < j, of `levels` levels: the order of `gradient_figures`' between-level cosines.
fn level_pairs(levels: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..levels).flat_map(move |i| (i + 1..levels).map(move |j| (i, j)))
}

/// `gradient_figures`' values, read back, as the diagnostics' figures of `step`.
fn read_gradient_figures(step: u64, values: &[f32], levels: &[Level]) -> GradientFigures {
    let n = 1 + levels.len();
    let against = |i: usize| AgainstSegmentation { ratio: values[i] as f64, cosine: values[n + i] as f64 };
    GradientFigures {
        step,
        con: against(0),
        levels: levels
            .iter()
            .enumerate()
            .map(|(l, &level)| LevelGradient { level, against_seg: against(1 + l) })
            .collect(),
        between_levels: level_pairs(levels.len())
            .zip(&values[2 * n..])
            .map(|((i, j), &cosine)| LevelPairCosine { levels: [levels[i], levels[j]], cosine: cosine as f64 })
            .collect(),
    }
}

impl StepOutput {
    /// A step of a round strategy: L_seg and RIPU's weighted terms (`ripu`: negative learning,
    /// local consistency; None when not used), nothing bought in it, no units.
    pub fn supervised(
        source: Tensor,
        target: Tensor,
        ripu: [Option<Tensor>; 2],
        selection: BatchSelection,
        features: Vec<Tensor>,
    ) -> StepOutput {
        let [negative_learning, local_consistency] = ripu;
        let seg = [&negative_learning, &local_consistency].into_iter().flatten().fold(&source + &target, |a, t| a + t);
        StepOutput {
            total: seg.shallow_clone(),
            terms: Terms {
                source: Some(source),
                target: Some(target),
                p2p: None,
                c2c: None,
                negative_learning,
                local_consistency,
            },
            selection,
            seg,
            con: None,
            con_levels: None,
            features,
            usage: None,
            dccm_max: None,
            gradient_figures: None,
        }
    }
}

impl Trainer {
    /// The forward pass of a source and a target batch (bytes [B, H, W, 3]): one pass when
    /// their crops have one size, two otherwise. Returns each domain's outputs and the
    /// backbone's output tensors (for the gradient ratio).
    pub(super) fn forward_domains(
        &self,
        source_images: &Tensor,
        target_images: &Tensor,
    ) -> (SegOutput, SegOutput, Vec<Tensor>) {
        let (xs, xt) = (self.normaliser.to_input(source_images), self.normaliser.to_input(target_images));
        let ns = xs.size()[0];
        if xs.size()[1..] == xt.size()[1..] {
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
        }
    }

    /// The forward pass and every loss of one ADA-MCU iteration (or, with a round strategy,
    /// `round_losses`).
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
    ) -> Result<StepOutput> {
        let c = &self.config;
        if c.active.strategy.uses_rounds() {
            return Ok(self.round_losses(
                state,
                source_images,
                source_labels,
                target_images,
                target_labels,
                target_samples,
                target_geometry,
            ));
        }
        let classes = c.data.classes as i64;
        let xt_size = [target_images.size()[1], target_images.size()[2]];
        let (out_s, out_t, features) = self.forward_domains(source_images, target_images);
        let source_labels = crate::torch_ext::labels_on(source_labels, self.device);
        let loss_source = self.main_and_aux_loss(&out_s.main, &out_s.aux, &source_labels);

        // Score, group and sample the target crops (Eqs. 1-3, Algorithm 1), on the device.
        let [h, w] = xt_size;
        let (main_t, aux_t) = (upsample(&out_t.main, h, w), upsample(&out_t.aux, h, w));
        let scores = uncertainty(&main_t, &aux_t, c.active.gamma);
        let crops: Vec<CropPixels> =
            target_samples.iter().zip(target_geometry).map(|(&i, g)| CropPixels::of(i, g, &state.ledger)).collect();
        let job = self.job_batch(&crops)?;
        let selection = state.sampler.select_in_job(&scores, &crops, &state.ledger, &job);
        let (labelled, pseudo) = (&selection.labelled, &selection.pseudo);
        let revealed = Oracle::reveal(target_labels, labelled);
        let prediction_t = main_t.detach().argmax(1, false);
        // Eq. 5: the pseudo label is the prediction itself (one-hot; see docs/algorithm.md).
        let train_labels_t = prediction_t.where_self(pseudo, &revealed);
        // A crop may have no labelled or pseudo-labelled pixel: the loss is then 0, with no host check.
        // On the logits already upsampled for the scores (one copy at crop size per head, not two).
        let loss_target = self.main_and_aux_loss(&main_t, &aux_t, &train_labels_t);

        // DCCM (Eqs. 7-8) from the pixels whose true label is known this iteration: the
        // target's revealed labels, and with `dccm_from = "both"` the source's ground truth.
        // The source prediction only when something uses it (source anchors, `dccm_from =
        // "both"`): an AL row without units skips a full-resolution argmax a step.
        let prediction_s_once = std::cell::OnceCell::new();
        let prediction_s = || {
            prediction_s_once.get_or_init(|| {
                upsample(&out_s.main, source_labels.size()[1], source_labels.size()[2]).detach().argmax(1, false)
            })
        };
        let dccm_on = c.contrast.enabled && c.contrast.dccm;
        if dccm_on {
            let (labels, predictions) = match c.contrast.dccm_from {
                DccmFrom::Target => (revealed.flatten(0, -1), prediction_t.flatten(0, -1)),
                DccmFrom::Both => (
                    Tensor::cat(&[source_labels.flatten(0, -1), revealed.flatten(0, -1)], 0),
                    Tensor::cat(&[prediction_s().flatten(0, -1), prediction_t.flatten(0, -1)], 0),
                ),
            };
            // Data-parallel, the job's counts: every rank's W stays the one of the whole batch.
            let counts = Dccm::counts(&labels, &predictions, classes);
            if let Some(parallel) = &self.parallel {
                parallel.sum(&counts)?;
            }
            state.dccm.update_from_counts(counts);
        }

        let seg = &loss_source + &loss_target;
        let mut total = seg.shallow_clone();
        let (mut p2p, mut c2c, mut con, mut con_levels, mut usage) = (None, None, None, None, None);
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
                anchors: source_labels.ne(255).logical_and(&prediction_s().ne_tensor(&source_labels)),
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
            if let Some(per_level) = &losses.per_level {
                // L_con = weight x sum over levels of level weight x (p2p + c2c) (Section III-D).
                let weighted = per_level * &state.level_factors;
                let sum = weighted.sum(Kind::Float);
                total = total + &sum;
                con = Some(sum);
                con_levels = Some(weighted);
            }
            (p2p, c2c, usage) = (losses.p2p, losses.c2c, losses.usage);
        }
        let dccm_max = dccm_on.then(|| state.dccm.w.max());
        Ok(StepOutput {
            total,
            terms: Terms {
                source: Some(loss_source),
                target: Some(loss_target),
                p2p,
                c2c,
                negative_learning: None,
                local_consistency: None,
            },
            selection,
            seg,
            con,
            con_levels,
            features,
            usage,
            dccm_max,
            gradient_figures: None,
        })
    }

    /// The images of the step's target crops over the job (one process: its own), gathered in
    /// rank order, and where this rank's start: every rank then plans the job's purchases.
    fn job_batch(&self, crops: &[CropPixels]) -> Result<JobBatch> {
        let images: Vec<usize> = crops.iter().map(|c| c.image).collect();
        let Some(parallel) = &self.parallel else { return Ok(JobBatch { images, first: 0 }) };
        let local = Tensor::from_slice(&images.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(self.device);
        let all = Tensor::cat(&parallel.all_gather(&local)?, 0).to_device(tch::Device::Cpu);
        let images = Vec::<i64>::try_from(&all)?.into_iter().map(|i| i as usize).collect();
        Ok(JobBatch { images, first: parallel.rank() * crops.len() })
    }

    /// The backward pass and the SGD update at `lr`: queued on the device, nothing read back.
    /// With `diagnose_step` (the step's number) it first measures the gradient figures of
    /// `ContrastDiagnostics` (`GradientFigures`).
    pub fn ada_update(
        &self,
        out: &mut StepOutput,
        optimizer: &mut Sgd,
        lr: f64,
        diagnose_step: Option<u64>,
    ) -> Result<()> {
        optimizer.zero_grad();
        if let (Some(step), Some(con), Some(levels)) = (diagnose_step, &out.con, &out.con_levels) {
            out.gradient_figures = gradient_figures(&out.seg, con, levels, &out.features).map(|f| (step, f));
        }
        self.backward(&out.total)?;
        optimizer.update(lr);
        Ok(())
    }

    /// The end of an iteration and its one wait for the device: reads the loss values (and
    /// the diagnostics) and records the step's target draw in the ledger.
    ///
    /// Data-parallel, every rank's purchases are gathered and applied in rank order on every
    /// rank: one ledger for the job, the same on every rank (`Sampler::settle_job`).
    pub fn ada_settle(&self, state: &mut AdaState, out: &StepOutput) -> Result<(StepLosses, Settled)> {
        // Every value in one device-to-host copy; a term not computed reads 0.
        let mut readback = HostReadback::new(self.device);
        let terms = out.terms.map(|t| readback.scalar(t.as_ref(), 0.0));
        let total = readback.scalar(Some(&out.total), 0.0);
        let dccm_max = readback.scalar(out.dccm_max.as_ref(), 0.0);
        let figures = out.gradient_figures.as_ref().map(|(step, f)| (*step, readback.values(f)));
        // [levels, 2 (source, target), 2 (anchors, positives)]: see `ContrastLosses::usage`.
        let usage = out.usage.as_ref().map(|u| readback.values(u));
        let values = readback.read();
        let report = out.selection.report();
        let job_report = match &self.parallel {
            Some(parallel) => Tensor::cat(&parallel.all_gather(report)?, 0),
            None => report.shallow_clone(),
        };
        let settled = state.sampler.settle_job(&out.selection, &job_report, &mut state.ledger);
        let levels = &self.config.contrast.levels;
        let contrast = out.con.as_ref().map(|_| ContrastDiagnostics {
            levels: match &usage {
                Some(usage) => levels
                    .iter()
                    .zip(values[usage.clone()].chunks(4))
                    .map(|(&level, u)| LevelUsage {
                        level,
                        source_anchors: u[0] as f64,
                        source_positives: u[1] as f64,
                        target_anchors: u[2] as f64,
                        target_positives: u[3] as f64,
                    })
                    .collect(),
                None => Vec::new(),
            },
            gradient: figures.map(|(step, range)| read_gradient_figures(step, &values[range], levels)),
            dccm_max: values[dccm_max] as f64,
        });
        let losses = StepLosses { terms: terms.map(|&i| values[i] as f64), total: values[total] as f64, contrast };
        Ok((losses, settled))
    }
}

#[cfg(test)]
mod tests {
    use super::{gradient_figures, read_gradient_figures};
    use crate::config::Level;
    use tch::{Kind, Tensor};

    #[test]
    fn gradient_figures_are_taken_against_the_segmentation_gradient() {
        // Linear losses of the features x: each gradient is its coefficient vector. L_seg's is
        // (1, 0, 0, 0); L_con's (2, 2, 0, 0) is the sum of three levels', (1, 0, 0, 0),
        // (0, 1, 0, 0) and (1, 1, 0, 0): ratios 2 sqrt 2, 1, 1, sqrt 2; cosines with L_seg's
        // 1/sqrt 2, 1, 0, 1/sqrt 2; between the levels (0, 1) 0, (0, 2) and (1, 2) 1/sqrt 2.
        let x = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let linear = |c: [f32; 4]| (&x * Tensor::from_slice(&c).view([2, 2])).sum(Kind::Float);
        let seg = linear([1.0, 0.0, 0.0, 0.0]);
        let levels = Tensor::stack(
            &[linear([1.0, 0.0, 0.0, 0.0]), linear([0.0, 1.0, 0.0, 0.0]), linear([1.0, 1.0, 0.0, 0.0])],
            0,
        );
        let con = levels.sum(Kind::Float);
        let figures = gradient_figures(&seg, &con, &levels, &[x.shallow_clone()]).unwrap();
        let figures = Vec::<f32>::try_from(figures.flatten(0, -1)).unwrap();
        let (r2, h) = (2f32.sqrt(), 1.0 / 2f32.sqrt());
        let expected = [2.0 * r2, 1.0, 1.0, r2, h, 1.0, 0.0, h, 0.0, h, h];
        assert_eq!(figures.len(), expected.len(), "{figures:?}");
        assert!(figures.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{figures:?}");
        // Read back as the diagnostics' figures, each pair named by its levels.
        let read = read_gradient_figures(7, &figures, Level::ALL);
        assert_eq!((read.step, read.levels.len(), read.between_levels.len()), (7, 3, 3));
        assert_eq!(read.between_levels[1].levels, [Level::IntraImage, Level::CrossDomain]);
        assert!(
            (read.between_levels[1].cosine - h as f64).abs() < 1e-6
                && (read.levels[2].against_seg.ratio - r2 as f64).abs() < 1e-6
        );
        // A level pulling against segmentation has cosine -1.
        let against = linear([-2.0, 0.0, 0.0, 0.0]);
        let figures = gradient_figures(&seg, &against, &against.unsqueeze(0), &[x.shallow_clone()]).unwrap();
        assert_eq!(Vec::<f32>::try_from(figures.flatten(0, -1)).unwrap(), [2.0, 2.0, -1.0, -1.0]);
    }
}
