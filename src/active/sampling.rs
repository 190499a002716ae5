//! Pixel groups and Algorithm 1's budget control, with adaptive sampling (Section III-B),
//! drawn on the device.
//!
//! Per target crop, pixels fall in G_h (S > pi_high), G_l (S < pi_low) or G_m (between).
//! Each crop may buy up to `quota = ceil(budget * crop pixels)` labels, so the budget is
//! spread over the data set rather than spent on the first images seen. Which groups the
//! bought pixels come from follows `active.schedule` (see docs/algorithm.md):
//! - "sequential" (Algorithm 1): half of G_h, drawn uniformly, until Ma = Me/2 (footnote 3),
//!   then G_m uniformly until Ma = Me, then pseudo labels only;
//! - "simultaneous" (Section III-B): each crop draws the same number from G_h and G_m.
//!
//! In both, pi_high decays by r whenever half of G_h is too small to fill its share
//! (Algorithm 1 line 7: lowering pi_high is how the annotation rate is controlled).
//! Adaptive sampling draws as many pseudo-labelled pixels from G_l as were labelled; without
//! it ("AL w/o AS") all labels come from G_h and every G_l pixel is pseudo-labelled.
//!
//! A step never waits for the device: `select` fixes each crop's caps on the host from the
//! ledger as the step starts (so Ma <= Me holds whatever the device draws), uploads the
//! ledger's bits for the crops' images, and queues the grouping and the draws (random keys,
//! top-k) as a few batched device ops. `settle`, after the step's update, reads one small
//! report back, records the purchases in the ledger and applies the pi_high decay.

use super::ledger::Ledger;
use crate::config::{ActiveConfig, Schedule};
use crate::data::augment::Geometry;
use crate::torch_ext::{random_subset, upload};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// What changes over a run and must survive a resume.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub pi_high: f64,
    pub pi_low: f64,
}

/// Which ledger pixels a crop shows: crop pixel (x, y) is pixel (`columns[x]`, `rows[y]`) of
/// target image `image` on the ledger's grid (the size the target is trained at).
#[derive(Debug, Clone)]
pub struct CropPixels {
    pub image: usize,
    pub columns: Vec<u32>,
    pub rows: Vec<u32>,
}

impl CropPixels {
    /// The crop of target image `image` drawn with `geometry`, on the ledger's grid for that
    /// image.
    pub fn of(image: usize, geometry: &Geometry, ledger: &Ledger) -> CropPixels {
        let grid = &ledger.images()[image];
        CropPixels { image, columns: geometry.grid_columns(grid.width), rows: geometry.grid_rows(grid.height) }
    }
}

/// How many labels a crop may buy this step, fixed on the host before the draw.
#[derive(Debug, Clone, Copy)]
struct CropPlan {
    image: usize,
    /// What Algorithm 1 asks of G_h (before the budget caps): a G_h too small for it decays pi_high.
    wanted_high: i64,
    cap_high: i64,
    cap_medium: i64,
}

/// One step's draw, queued on the device. The masks feed the losses; `Sampler::settle`
/// records the purchases in the ledger once the step is done.
pub struct BatchSelection {
    /// [B, H, W] bool: labels known (bought now or earlier: the ledger is reused), pixels
    /// trained on their own prediction (Eq. 5), G_h and G_l (G_m is the rest).
    pub labelled: Tensor,
    pub pseudo: Tensor,
    pub high: Tensor,
    pub low: Tensor,
    /// [B, 3 + picks] i64: G_h candidates (not yet bought), |G_h|, |G_l|, then the original
    /// pixel index (y * width + x) of each purchase, -1 where none.
    report: Tensor,
    /// The caps of every crop of the job's batch (one process: this batch), and where this
    /// batch's crops start among them.
    plans: Vec<CropPlan>,
    first: usize,
    crop_pixels: u64,
}

/// The images of every crop of the step's batch over a data-parallel job, in rank order, and
/// where this rank's crops start among them. Every rank plans the whole batch from the same
/// ledger, so the caps together never pass what is left of Me, exactly as one process's.
pub struct JobBatch {
    pub images: Vec<usize>,
    pub first: usize,
}

impl BatchSelection {
    /// This crop batch's report ([B, 3 + picks] i64), for a data-parallel job to gather.
    pub fn report(&self) -> &Tensor {
        &self.report
    }

    /// A step that buys nothing and trains on the labels already bought (`labelled`, [B, H, W]
    /// bool): the round strategies' steps.
    pub fn known(labelled: Tensor) -> BatchSelection {
        let none = labelled.zeros_like();
        let b = labelled.size()[0];
        BatchSelection {
            pseudo: none.shallow_clone(),
            high: none.shallow_clone(),
            low: none,
            labelled,
            report: Tensor::zeros([b, 3], (Kind::Int64, Device::Cpu)),
            plans: Vec::new(),
            first: 0,
            crop_pixels: 0,
        }
    }
}

/// What a step's draw did, once recorded in the ledger.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settled {
    /// Pixels newly charged to the budget (a pixel shown twice is charged once).
    pub bought: u64,
    /// Pixels of the batch in G_h, G_m and G_l.
    pub groups: [u64; 3],
}

pub struct Sampler {
    pub config: ActiveConfig,
    pub thresholds: Thresholds,
}

/// For each crop pixel, [B, N]: its ledger pixel index (y * width + x, training resolution) and whether
/// the ledger shows it bought (as of the current step: pending purchases are not yet).
pub fn bought_before(ledger: &Ledger, crops: &[CropPixels], device: Device) -> (Tensor, Tensor) {
    let b = crops.len() as i64;
    let i64s = |values: Vec<i64>| upload(&Tensor::from_slice(&values), device);
    let columns = i64s(crops.iter().flat_map(|c| c.columns.iter().map(|&x| x as i64)).collect()).view([b, 1, -1]);
    let rows = i64s(crops.iter().flat_map(|c| c.rows.iter().map(|&y| y as i64)).collect()).view([b, -1, 1]);
    let widths = i64s(crops.iter().map(|c| ledger.images()[c.image].width as i64).collect()).view([b, 1, 1]);
    let original = (rows * widths + columns).view([b, -1]);
    // The crops' images' bitsets, one after the other; each crop reads from its own.
    let mut bits = Vec::new();
    let mut starts = Vec::with_capacity(crops.len());
    for crop in crops {
        starts.push(bits.len() as i64);
        bits.extend(ledger.bought_bits(crop.image));
    }
    let bits = upload(&Tensor::from_slice(&bits), device);
    let byte = i64s(starts).view([b, 1]) + original.bitwise_right_shift_tensor_scalar(3);
    let bought = bits
        .index_select(0, &byte.flatten(0, -1))
        .view([b, -1])
        .to_kind(Kind::Int64)
        .bitwise_right_shift(&original.bitwise_and(7))
        .bitwise_and(1)
        .ne(0);
    (original, bought)
}

impl Sampler {
    pub fn new(config: &ActiveConfig, thresholds: Option<Thresholds>) -> Sampler {
        Sampler {
            config: config.clone(),
            thresholds: thresholds.unwrap_or(Thresholds { pi_high: config.pi_high, pi_low: config.pi_low }),
        }
    }

    fn decay(&mut self) {
        // pi_high never falls below pi_low: G_h and G_l stay disjoint.
        self.thresholds.pi_high = (self.thresholds.pi_high * self.config.decay).max(self.thresholds.pi_low);
    }

    /// Labels a crop of `pixels` pixels may buy.
    fn quota(&self, pixels: i64) -> i64 {
        (self.config.budget * pixels as f64).ceil() as i64
    }

    /// Each crop's caps from the ledger as the step starts. Crops are served in order and
    /// their caps together never pass what is left of the budget (or of the G_h phase).
    fn plan(&self, images: &[usize], pixels: i64, ledger: &Ledger) -> Vec<CropPlan> {
        let quota = self.quota(pixels);
        let (spent, half_budget) = (ledger.spent() as i64, ledger.budget() as i64 / 2);
        let sequential_high_phase =
            self.config.adaptive_sampling && self.config.schedule == Schedule::Sequential && spent < half_budget;
        let mut left = ledger.remaining() as i64;
        let mut high_phase_left = half_budget - spent;
        images
            .iter()
            .map(|&image| {
                let (wanted_high, wanted_medium) = if left == 0 {
                    (0, 0)
                } else if !self.config.adaptive_sampling {
                    (quota, 0)
                } else {
                    match self.config.schedule {
                        Schedule::Sequential if sequential_high_phase => (quota, 0),
                        Schedule::Sequential => (0, quota),
                        Schedule::Simultaneous => ((quota + 1) / 2, quota / 2),
                    }
                };
                let mut cap_high = wanted_high.min(left);
                // In the sequential schedule the G_h phase stops at exactly Me/2.
                if sequential_high_phase {
                    cap_high = cap_high.min(high_phase_left);
                    high_phase_left -= cap_high;
                }
                left -= cap_high;
                let cap_medium = wanted_medium.min(left);
                left -= cap_medium;
                CropPlan { image, wanted_high, cap_high, cap_medium }
            })
            .collect()
    }

    /// Groups a batch of crops by their scores ([B, H, W] f32, on the device), and queues the
    /// purchases and the pseudo labels. Nothing is read back: see `settle`.
    pub fn select(&self, scores: &Tensor, crops: &[CropPixels], ledger: &Ledger) -> BatchSelection {
        let job = JobBatch { images: crops.iter().map(|c| c.image).collect(), first: 0 };
        self.select_in_job(scores, crops, ledger, &job)
    }

    /// `select` for one rank's crops of a data-parallel job's batch (`job`). The purchases'
    /// columns are as many on every rank (the job's largest caps), so that their reports can
    /// be gathered for `settle_job`.
    pub fn select_in_job(
        &self,
        scores: &Tensor,
        crops: &[CropPixels],
        ledger: &Ledger,
        job: &JobBatch,
    ) -> BatchSelection {
        let device = scores.device();
        let size = scores.size();
        let (b, pixels) = (size[0], size[1] * size[2]);
        let scores = scores.view([b, pixels]);
        let t = self.thresholds;
        let (high, low) = (scores.gt(t.pi_high), scores.lt(t.pi_low));
        let job_plans = self.plan(&job.images, pixels, ledger);
        let plans = &job_plans[job.first..job.first + b as usize];
        let caps = |cap: fn(&CropPlan) -> i64| {
            (
                upload(&Tensor::from_slice(&plans.iter().map(cap).collect::<Vec<_>>()), device),
                job_plans.iter().map(cap).max().unwrap_or(0),
            )
        };
        let (original, was_bought) = bought_before(ledger, crops, device);
        let not_bought = was_bought.logical_not();

        // Footnote 3: half of G_h (its pixels not bought yet) is drawn from.
        let candidates_high = high.logical_and(&not_bought);
        let available_high = candidates_high.sum_dim_intlist([1i64].as_slice(), false, Kind::Int64);
        let (cap_high, max_high) = caps(|p| p.cap_high);
        let take_high = cap_high.minimum(&(&available_high + 1).floor_divide_scalar(2));
        let (from_high, high_valid) = random_subset(&candidates_high, max_high, Some(&take_high));
        let candidates_medium = high.logical_or(&low).logical_not().logical_and(&not_bought);
        let (cap_medium, max_medium) = caps(|p| p.cap_medium);
        let (from_medium, medium_valid) = random_subset(&candidates_medium, max_medium, Some(&cap_medium));
        let picks = Tensor::cat(&[from_high, from_medium], 1);
        let bought =
            original.gather(1, &picks, false).where_scalarother(&Tensor::cat(&[high_valid, medium_valid], 1), -1);
        let (bought_now, shown_bought) = shows_any(&original, &bought);
        let labelled = was_bought.logical_or(&shown_bought);

        let candidates_low = low.logical_and(&labelled.logical_not());
        let pseudo = if !self.config.pseudo_labels {
            candidates_low.zeros_like()
        } else if self.config.adaptive_sampling {
            // As many as were labelled here; once the budget is spent, Algorithm 1 line 12.
            let at_least = (self.quota(pixels) + 1) / 2;
            let most = plans.iter().map(|p| p.cap_high + p.cap_medium).max().unwrap_or(0).max(at_least);
            let (picks, valid) = random_subset(&candidates_low, most, Some(&bought_now.clamp_min(at_least)));
            positions_mask(&picks, &valid, pixels)
        } else {
            candidates_low
        };
        let count = |m: &Tensor| m.sum_dim_intlist([1i64].as_slice(), true, Kind::Int64);
        let report = Tensor::cat(&[available_high.unsqueeze(1), count(&high), count(&low), bought], 1);
        let crop = |m: Tensor| m.view(size.as_slice());
        BatchSelection {
            labelled: crop(labelled),
            pseudo: crop(pseudo),
            high: crop(high),
            low: crop(low),
            report,
            plans: job_plans,
            first: job.first,
            crop_pixels: pixels as u64,
        }
    }

    /// Reads a step's draw back (the step's one wait for the device, after its update),
    /// records the purchases in the ledger and lowers pi_high where G_h fell short.
    pub fn settle(&mut self, selection: &BatchSelection, ledger: &mut Ledger) -> Settled {
        assert_eq!(selection.first, 0, "a data-parallel rank's draw settles with the job's reports (settle_job)");
        self.settle_job(selection, &selection.report, ledger)
    }

    /// `settle` with the reports of every rank's crops of the job's batch, in rank order
    /// (`job_report`: theirs gathered; one process: its own). Every rank applies the same
    /// purchases in the same order, so every rank's ledger and thresholds stay one process's.
    pub fn settle_job(&mut self, selection: &BatchSelection, job_report: &Tensor, ledger: &mut Ledger) -> Settled {
        let report = Vec::<i64>::try_from(job_report.to_device(Device::Cpu).flatten(0, -1)).expect("i64 report");
        let mut settled = Settled::default();
        if selection.plans.is_empty() {
            return settled;
        }
        for (plan, row) in selection.plans.iter().zip(report.chunks(report.len() / selection.plans.len())) {
            let (available_high, high, low) = (row[0], row[1] as u64, row[2] as u64);
            if plan.wanted_high > 0 && (available_high + 1) / 2 < plan.wanted_high {
                self.decay();
            }
            let width = ledger.images()[plan.image].width as i64;
            for &pixel in row[3..].iter().filter(|&&p| p >= 0) {
                if ledger.buy(plan.image, (pixel % width) as u32, (pixel / width) as u32) {
                    settled.bought += 1;
                }
            }
            settled.groups[0] += high;
            settled.groups[1] += selection.crop_pixels - high - low;
            settled.groups[2] += low;
        }
        settled
    }
}

/// Per crop, which pixels show a ledger pixel listed in `bought` ([B, K] ledger indices, -1
/// for none; `original`: [B, N] as from `bought_before`): an upscaled crop shows one ledger
/// pixel several times and every copy gets its label. Also returns how many distinct ledger
/// pixels each crop bought ([B] i64).
fn shows_any(original: &Tensor, bought: &Tensor) -> (Tensor, Tensor) {
    let (b, k) = (bought.size()[0], bought.size()[1]);
    if k == 0 {
        return (Tensor::zeros([b], (Kind::Int64, bought.device())), original.zeros_like().to_kind(Kind::Bool));
    }
    let (sorted, _) = bought.sort(1, false);
    let real = sorted.ge(0);
    let first_of_its_value =
        real.narrow(1, 1, k - 1).logical_and(&sorted.narrow(1, 1, k - 1).ne_tensor(&sorted.narrow(1, 0, k - 1)));
    let distinct = Tensor::cat(&[real.narrow(1, 0, 1), first_of_its_value], 1).sum_dim_intlist(
        [1i64].as_slice(),
        false,
        Kind::Int64,
    );
    let at = original.searchsorted(&sorted, false, false, "left", None::<Tensor>).clamp_max(k - 1);
    (distinct, sorted.gather(1, &at, false).eq_tensor(original))
}

/// A [B, N] mask, true at the valid `positions` ([B, K]).
fn positions_mask(positions: &Tensor, valid: &Tensor, n: i64) -> Tensor {
    let b = positions.size()[0];
    // Invalid positions write to an extra column that is dropped.
    Tensor::zeros([b, n + 1], (Kind::Bool, positions.device()))
        .scatter_value(1, &positions.where_scalarother(valid, n), 1)
        .narrow(1, 0, n)
}
