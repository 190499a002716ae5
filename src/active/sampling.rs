//! Pixel groups and Algorithm 1's budget control, with adaptive sampling (Section III-B).
//!
//! Per target crop, pixels fall in G_h (S > pi_high), G_l (S < pi_low) or G_m (between).
//! Each crop may buy up to `quota = ceil(budget * crop pixels)` labels, so the budget is
//! spread over the data set rather than spent on the first images seen. Which groups the
//! bought pixels come from follows `active.schedule` (see docs/algorithm.md):
//! - "sequential" (Algorithm 1): half of G_h, drawn uniformly, until Ma = Me/2 (footnote 3),
//!   then G_m uniformly until Ma = Me, then pseudo labels only;
//! - "simultaneous" (Section III-B): each crop draws the same number from G_h and G_m.
//! In both, pi_high decays by r whenever half of G_h is too small to fill its share
//! (Algorithm 1 line 7: lowering pi_high is how the annotation rate is controlled).
//! Adaptive sampling draws as many pseudo-labelled pixels from G_l as were labelled; without
//! it ("AL w/o AS") all labels come from G_h and every G_l pixel is pseudo-labelled.

use super::ledger::Ledger;
use crate::config::{ActiveConfig, Schedule};
use crate::data::augment::Geometry;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// What changes over a run and must survive a resume.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub pi_high: f64,
    pub pi_low: f64,
}

/// One crop's groups and picks (indices into the crop, row-major).
#[derive(Debug, Default, Clone)]
pub struct CropSelection {
    /// Every pixel whose label is known: bought now or earlier (the ledger is reused).
    pub labelled: Vec<bool>,
    /// Pixels trained on with the model's own prediction as the label (Eq. 5).
    pub pseudo: Vec<bool>,
    /// Pixels of G_h and G_l (G_m is the rest).
    pub high: Vec<bool>,
    pub low: Vec<bool>,
    pub bought_now: u64,
}

pub struct Sampler {
    pub config: ActiveConfig,
    pub thresholds: Thresholds,
}

/// A uniform random subset of `n` candidates (all of them when there are fewer). A partial
/// Fisher-Yates shuffle: O(n), not O(candidates), since G_h and G_m can hold most of a crop.
fn pick<R: Rng>(candidates: &mut [u32], n: usize, rng: &mut R) -> Vec<u32> {
    candidates.partial_shuffle(rng, n).0.to_vec()
}

/// The crop pixels (of `n`) for which `member` holds; none when the group is not `wanted`.
fn members(n: usize, wanted: bool, member: impl Fn(usize) -> bool) -> Vec<u32> {
    if !wanted {
        return Vec::new();
    }
    (0..n).filter(|&i| member(i)).map(|i| i as u32).collect()
}

impl Sampler {
    pub fn new(config: &ActiveConfig, thresholds: Option<Thresholds>) -> Sampler {
        Sampler { config: config.clone(),
            thresholds: thresholds.unwrap_or(Thresholds { pi_high: config.pi_high, pi_low: config.pi_low }) }
    }

    fn decay(&mut self) {
        // pi_high never falls below pi_low: G_h and G_l stay disjoint.
        self.thresholds.pi_high = (self.thresholds.pi_high * self.config.decay).max(self.thresholds.pi_low);
    }

    /// Groups one crop, buys labels through the ledger and picks pseudo labels.
    /// `scores`: the crop's S values (row-major, crop_height x crop_width).
    pub fn select<R: Rng>(&mut self, scores: &[f32], image: usize, geometry: &Geometry, ledger: &mut Ledger,
        rng: &mut R) -> CropSelection {
        let (w, h) = (geometry.crop_width as usize, geometry.crop_height as usize);
        let n = w * h;
        let t = self.thresholds;
        // Per axis (computed per pixel, the mapping dominated the step's host time).
        let (xs, ys) = (geometry.original_columns(), geometry.original_rows());
        let original = |i: usize| (xs[i % w], ys[i / w]);
        let was_bought = ledger.bought_mask(image, &xs, &ys);
        let high: Vec<bool> = scores.iter().map(|&s| s as f64 > t.pi_high).collect();
        let low: Vec<bool> = scores.iter().map(|&s| (s as f64) < t.pi_low).collect();
        let quota = (self.config.budget * n as f64).ceil() as usize;
        let half_budget = ledger.budget() / 2;

        // How many to draw from G_h and G_m in this crop.
        let (from_high, from_medium) = if ledger.remaining() == 0 {
            (0, 0)
        } else if !self.config.adaptive_sampling {
            (quota, 0)
        } else {
            match self.config.schedule {
                Schedule::Sequential if ledger.spent() < half_budget => (quota, 0),
                Schedule::Sequential => (0, quota),
                Schedule::Simultaneous => (quota.div_ceil(2), quota / 2),
            }
        };
        // Only the groups drawn from are listed (G_m can hold most of a crop).
        let mut high_candidates = members(n, from_high > 0, |i| high[i] && !was_bought[i]);
        let mut medium_candidates = members(n, from_medium > 0, |i| !high[i] && !low[i] && !was_bought[i]);
        // Footnote 3: half of G_h is drawn; a G_h too small for its share lowers pi_high.
        let high_available = high_candidates.len().div_ceil(2);
        if from_high > 0 && high_available < from_high {
            self.decay();
        }
        let mut buys = pick(&mut high_candidates, from_high.min(high_available), rng);
        // In the sequential schedule the G_h phase stops at exactly Me/2.
        if self.config.adaptive_sampling && self.config.schedule == Schedule::Sequential && ledger.spent() < half_budget {
            buys.truncate((half_budget - ledger.spent()) as usize);
        }
        buys.extend(pick(&mut medium_candidates, from_medium, rng));

        let mut bought_now = 0;
        for &i in &buys {
            let (x, y) = original(i as usize);
            if ledger.buy(image, x, y) {
                bought_now += 1;
            }
        }
        // Every crop pixel whose original pixel is bought (several crop pixels may share one
        // when the crop is upscaled; they share its label).
        let labelled = ledger.bought_mask(image, &xs, &ys);

        let mut low_candidates = members(n, self.config.pseudo_labels, |i| low[i] && !labelled[i]);
        let pseudo_count = if self.config.adaptive_sampling {
            // As many as were labelled here; once the budget is spent, Algorithm 1 line 12.
            (bought_now as usize).max(quota.div_ceil(2))
        } else {
            low_candidates.len()
        };
        let mut pseudo = vec![false; n];
        if self.config.pseudo_labels {
            for i in pick(&mut low_candidates, pseudo_count, rng) {
                pseudo[i as usize] = true;
            }
        }
        CropSelection { labelled, pseudo, high, low, bought_now }
    }
}
