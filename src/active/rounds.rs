//! Selection rounds: RIPU (Xie et al., CVPR 2022) and the uncertainty baselines (entropy,
//! margin, random). At each of `active.rounds` the model, in evaluation mode, scores every
//! target training image at the ledger's size (the training resolution) and buys the best
//! regions or pixels through the ledger, an equal share of Me per round. Training between rounds
//! sees only what the ledger holds (`Trainer::round_losses`), through the oracle.
//!
//! - Scores (`scores`): RIPU's region impurity (entropy of the predicted classes in the
//!   (2k+1)^2 window) times prediction uncertainty (window mean of the normalised pixel entropy)
//!   for regions, or pixel entropy times the unnormalised impurity for pixels, as its
//!   `floating_region.py` and `build.py` compute them; entropy, margin and random per pixel, or
//!   their window means for regions.
//! - Choice (`choose`): greedy in score order, as RIPU's repeated argmax. A region's centre
//!   suppresses the (4k+1)^2 window around it (so two regions never overlap), a pixel the
//!   (2k+1)^2 window. Across rounds the suppression is the ledger's bought pixels dilated by k,
//!   exactly RIPU's `active` mask, so it needs no state of its own: a resumed run recomputes it.
//! - Spending: round r of R brings Ma to floor(Me (r + 1) / R) (the last to Me), split over the
//!   images in order to the pixel (`image_quotas`); a region that would pass an image's quota is
//!   bought in part (raster order). What an image cannot spend is left to the next round.

use super::ledger::Ledger;
use crate::config::{ActiveConfig, Annotation, Strategy};
use tch::{Kind, Tensor};

/// Window sums over (2r+1)^2 with zero padding: [N, C, H, W] -> [N, C, H, W].
fn window_sum(t: &Tensor, radius: i64) -> Tensor {
    let k = 2 * radius + 1;
    t.avg_pool2d([k, k], [1, 1], [radius, radius], false, true, None::<i64>) * (k * k) as f64
}

/// Entropy of each pixel's class distribution, [N, H, W] from probabilities [N, C, H, W] (RIPU
/// adds 1e-6 inside the log).
fn entropy(p: &Tensor) -> Tensor {
    -(p * (p + 1e-6).log()).sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
}

/// The entropy of the predicted classes in each pixel's (2r+1)^2 window (RIPU's region
/// impurity, unnormalised), [N, H, W], and the number of image pixels in the window.
pub fn region_impurity(p: &Tensor, radius: i64) -> (Tensor, Tensor) {
    let classes = p.size()[1];
    let one_hot = p.argmax(1, false).one_hot(classes).permute([0, 3, 1, 2]).to_kind(Kind::Float);
    let summary = window_sum(&one_hot, radius);
    let count = summary.sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
    let dist = &summary / &count;
    (entropy(&dist), count.squeeze_dim(1))
}

/// Each pixel's score, [N, H, W], from probabilities [N, C, H, W]: higher is bought first.
/// `random` draws from torch's generator (seeded by the caller).
pub fn scores(strategy: Strategy, annotation: Annotation, radius: i64, p: &Tensor) -> Tensor {
    let classes = p.size()[1];
    let log_c = (classes as f64).ln();
    let window_mean = |t: &Tensor| {
        let t = t.unsqueeze(1);
        (window_sum(&t, radius) / window_sum(&t.ones_like(), radius)).squeeze_dim(1)
    };
    let per_pixel = match strategy {
        Strategy::Ripu => {
            let (impurity, count) = region_impurity(p, radius);
            return match annotation {
                // floating_region.py: both terms normalised by log C, uncertainty the window mean.
                Annotation::Region => {
                    let uncertainty = window_sum(&(entropy(p) / log_c).unsqueeze(1), radius).squeeze_dim(1) / count;
                    impurity / log_c * uncertainty
                }
                // build.py, PixelSelection: the pixel's entropy times the window's impurity.
                Annotation::Pixel => entropy(p) * impurity,
            };
        }
        Strategy::Entropy => entropy(p) / log_c,
        Strategy::Margin => {
            let (top, _) = p.topk(2, 1, true, true);
            1.0 - (top.select(1, 0) - top.select(1, 1))
        }
        Strategy::Random => {
            let s = p.size();
            Tensor::rand([s[0], s[2], s[3]], (Kind::Float, p.device()))
        }
        Strategy::AdaMcu => panic!("ADA-MCU buys per step, not in rounds"),
    };
    match annotation {
        Annotation::Region if strategy != Strategy::Random => window_mean(&per_pixel),
        _ => per_pixel,
    }
}

/// Pixels that may not be chosen in a round: those within `radius` (Chebyshev) of a pixel
/// bought before it (`bought`: `Ledger::bought_mask`). RIPU's `active` mask.
pub fn suppressed(bought: &[bool], width: usize, height: usize, radius: usize) -> Vec<bool> {
    let mut out = vec![false; width * height];
    for y in 0..height {
        for x in 0..width {
            if bought[y * width + x] {
                mark(&mut out, width, height, x, y, radius);
            }
        }
    }
    out
}

/// Sets the (2r+1)^2 window around (x, y), clipped to the image.
fn mark(mask: &mut [bool], width: usize, height: usize, x: usize, y: usize, radius: usize) {
    for yy in y.saturating_sub(radius)..(y + radius + 1).min(height) {
        mask[yy * width + x.saturating_sub(radius)..yy * width + (x + radius + 1).min(width)].fill(true);
    }
}

/// One image's purchases this round: pixel indices (y * width + x), at most `quota`, none
/// already bought and none twice. `order`: the pixels by descending score (ties by index);
/// `blocked`: `suppressed` for this image's ledger bits.
pub fn choose(
    order: &[i64],
    width: usize,
    height: usize,
    mut blocked: Vec<bool>,
    annotation: Annotation,
    radius: usize,
    quota: u64,
) -> Vec<u32> {
    let mut chosen = Vec::new();
    let mut taken = vec![false; width * height];
    for &i in order {
        if chosen.len() as u64 >= quota {
            break;
        }
        let i = i as usize;
        if blocked[i] {
            continue;
        }
        let (x, y) = (i % width, i / width);
        match annotation {
            Annotation::Pixel => {
                chosen.push(i as u32);
                mark(&mut blocked, width, height, x, y, radius);
            }
            Annotation::Region => {
                for yy in y.saturating_sub(radius)..(y + radius + 1).min(height) {
                    for xx in x.saturating_sub(radius)..(x + radius + 1).min(width) {
                        let j = yy * width + xx;
                        if (chosen.len() as u64) < quota && !taken[j] {
                            taken[j] = true;
                            chosen.push(j as u32);
                        }
                    }
                }
                mark(&mut blocked, width, height, x, y, 2 * radius);
            }
        }
    }
    chosen
}

/// What round `round` (0-based) of `rounds` may spend in each of `images` images: Ma goes to
/// floor(Me (round + 1) / rounds) (Me at the last), split over the images in order.
pub fn image_quotas(ledger: &Ledger, round: usize, rounds: usize, images: usize) -> Vec<u64> {
    let budget = ledger.budget() as u128;
    let goal = if round + 1 >= rounds { budget } else { budget * (round as u128 + 1) / rounds as u128 };
    let share = (goal as u64).saturating_sub(ledger.spent()) as u128;
    let n = images as u128;
    (0..n).map(|i| (share * (i + 1) / n - share * i / n) as u64).collect()
}

/// Which strategy a round runs, and how.
#[derive(Debug, Clone, Copy)]
pub struct RoundPlan {
    pub strategy: Strategy,
    pub annotation: Annotation,
    pub radius: usize,
}

impl RoundPlan {
    pub fn of(config: &ActiveConfig) -> RoundPlan {
        RoundPlan { strategy: config.strategy, annotation: config.annotation, radius: config.radius }
    }

    /// The pixels (row-major indices at the ledger's size, in the order they are bought) one
    /// image's purchase takes from its probabilities [1, C, H, W]: at most `quota`, none
    /// already bought. Nothing is charged (`buy_chosen`).
    pub fn choose_in_image(&self, probabilities: &Tensor, ledger: &Ledger, image: usize, quota: u64) -> Vec<u32> {
        if quota == 0 {
            return Vec::new();
        }
        let (width, height) = (ledger.images()[image].width as usize, ledger.images()[image].height as usize);
        let score = scores(self.strategy, self.annotation, self.radius as i64, probabilities).flatten(0, -1);
        let (_, order) = score.sort_stable(true, 0, true);
        let order = Vec::<i64>::try_from(order.to_device(tch::Device::Cpu)).expect("i64 order");
        let blocked = suppressed(&ledger.bought_mask(image), width, height, self.radius);
        choose(&order, width, height, blocked, self.annotation, self.radius, quota)
    }

    /// One image's purchases from its probabilities [1, C, H, W] at the ledger's size; returns
    /// the pixels newly charged.
    pub fn buy_in_image(&self, probabilities: &Tensor, ledger: &mut Ledger, image: usize, quota: u64) -> u64 {
        let chosen = self.choose_in_image(probabilities, ledger, image, quota);
        buy_chosen(ledger, image, &chosen)
    }
}

/// Charges `chosen` (row-major pixel indices of `image`) through the ledger, in order; returns
/// the pixels newly charged.
pub fn buy_chosen(ledger: &mut Ledger, image: usize, chosen: &[u32]) -> u64 {
    let width = ledger.images()[image].width;
    chosen.iter().filter(|&&i| ledger.buy(image, i % width, i / width)).count() as u64
}
