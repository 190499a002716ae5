//! The round strategies (RIPU, entropy, margin, random): their scores against hand-computed
//! values, region and pixel choice, exact spending per round, RIPU's two losses, and that no
//! strategy's training sees a target label the ledger does not hold.

mod common;

use adamcu::active::ledger::{Ledger, LedgerImage};
use adamcu::active::oracle::SealedLabels;
use adamcu::active::rounds::{choose, image_quotas, region_impurity, scores, suppressed, RoundPlan};
use adamcu::config::{Annotation, Strategy};
use adamcu::data::augment::Geometry;
use adamcu::train::ada::{local_consistency_loss, negative_learning_loss};
use adamcu::train::Trainer;
use common::global_generator;
use tch::{Kind, Tensor};

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// -sum q ln(q + 1e-6), as RIPU writes its entropies.
fn h(q: &[f64]) -> f64 {
    -q.iter().map(|&v| v * (v + 1e-6).ln()).sum::<f64>()
}

/// P(class 0) of a 3x3 map of two classes; the two right-hand pixels of the top rows predict class 1.
const P0: [[f64; 3]; 3] = [[0.9, 0.8, 0.2], [0.7, 0.6, 0.3], [0.9, 0.9, 0.9]];

fn probabilities() -> Tensor {
    let p0: Vec<f32> = P0.iter().flatten().map(|&v| v as f32).collect();
    let p0 = Tensor::from_slice(&p0).view([1, 1, 3, 3]);
    Tensor::cat(&[&p0, &(1.0 - &p0)], 1)
}

/// The (x, y) of the 3x3 window around (x, y) inside the image.
fn window(x: usize, y: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for yy in y.saturating_sub(1)..(y + 2).min(3) {
        for xx in x.saturating_sub(1)..(x + 2).min(3) {
            out.push((xx, yy));
        }
    }
    out
}

#[test]
#[allow(clippy::needless_range_loop)] // (x, y) index both the map and the hand-computed windows
fn ripu_scores_match_hand_computed_region_impurity_and_uncertainty() {
    let p = probabilities();
    let class_of = |x: usize, y: usize| usize::from(P0[y][x] < 0.5);
    let pixel_entropy = |x: usize, y: usize| h(&[P0[y][x], 1.0 - P0[y][x]]);
    let ln2 = 2f64.ln();
    let (impurity, count) = region_impurity(&p, 1);
    let (impurity, count) = (values(&impurity), values(&count));
    let region = values(&scores(Strategy::Ripu, Annotation::Region, 1, &p));
    let pixel = values(&scores(Strategy::Ripu, Annotation::Pixel, 1, &p));
    for y in 0..3 {
        for x in 0..3 {
            let w = window(x, y);
            let ones = w.iter().filter(|&&(a, b)| class_of(a, b) == 1).count() as f64;
            let n = w.len() as f64;
            let hand_impurity = h(&[(n - ones) / n, ones / n]);
            let uncertainty = w.iter().map(|&(a, b)| pixel_entropy(a, b) / ln2).sum::<f64>() / n;
            let i = y * 3 + x;
            assert!((count[i] - n).abs() < 1e-9, "({x}, {y}): {} pixels in the window, not {n}", count[i]);
            assert!((impurity[i] - hand_impurity).abs() < 1e-5, "impurity at ({x}, {y})");
            assert!((region[i] - hand_impurity / ln2 * uncertainty).abs() < 1e-5, "RA score at ({x}, {y})");
            assert!((pixel[i] - pixel_entropy(x, y) * hand_impurity).abs() < 1e-5, "PA score at ({x}, {y})");
        }
    }
    // The centre sees 2 of 9 pixels of class 1; the top-left corner's window is pure.
    assert!((impurity[4] - h(&[7.0 / 9.0, 2.0 / 9.0])).abs() < 1e-5);
    assert!(region[0].abs() < 1e-5);

    let entropy = values(&scores(Strategy::Entropy, Annotation::Pixel, 1, &p));
    let margin = values(&scores(Strategy::Margin, Annotation::Pixel, 1, &p));
    let mean_entropy = values(&scores(Strategy::Entropy, Annotation::Region, 1, &p));
    for y in 0..3 {
        for x in 0..3 {
            let i = y * 3 + x;
            assert!((entropy[i] - pixel_entropy(x, y) / ln2).abs() < 1e-5);
            assert!((margin[i] - (1.0 - (2.0 * P0[y][x] - 1.0).abs())).abs() < 1e-5);
            let w = window(x, y);
            let mean = w.iter().map(|&(a, b)| pixel_entropy(a, b) / ln2).sum::<f64>() / w.len() as f64;
            assert!((mean_entropy[i] - mean).abs() < 1e-5, "region entropy at ({x}, {y})");
        }
    }
}

fn images(n: usize, w: u32, h: u32) -> Vec<LedgerImage> {
    (0..n).map(|i| LedgerImage { id: format!("img{i}"), width: w, height: h }).collect()
}

/// Random probabilities [1, C, H, W] from a seed.
fn random_probabilities(seed: i64, classes: i64, h: i64, w: i64) -> Tensor {
    tch::manual_seed(seed);
    (Tensor::randn([1, classes, h, w], (Kind::Float, tch::Device::Cpu)) * 3.0).softmax(1, Kind::Float)
}

fn bought_pixels(ledger: &Ledger, image: usize) -> Vec<(i64, i64)> {
    let width = ledger.images()[image].width as usize;
    let mask = ledger.bought_mask(image);
    (0..mask.len()).filter(|&p| mask[p]).map(|p| ((p % width) as i64, (p / width) as i64)).collect()
}

#[test]
fn region_annotation_never_overlaps_a_region_and_charges_each_pixel_once() {
    let _generator = global_generator();
    let (w, h) = (24usize, 12usize);
    let p = random_probabilities(3, 5, h as i64, w as i64);
    let score = scores(Strategy::Ripu, Annotation::Region, 1, &p).flatten(0, -1);
    let order = Vec::<i64>::try_from(score.sort_stable(true, 0, true).1).unwrap();
    let first = choose(&order, w, h, vec![false; w * h], Annotation::Region, 1, 40);
    assert_eq!(first.len(), 40, "the quota is spent");
    let mut seen = std::collections::HashSet::new();
    assert!(first.iter().all(|&i| seen.insert(i)), "no pixel chosen twice");
    // The best-scoring pixel is a centre: its whole 3x3 window is bought.
    let (bx, by) = ((order[0] as usize) % w, (order[0] as usize) / w);
    for yy in by.saturating_sub(1)..(by + 2).min(h) {
        for xx in bx.saturating_sub(1)..(bx + 2).min(w) {
            assert!(seen.contains(&((yy * w + xx) as u32)), "({xx}, {yy}) of the best region");
        }
    }
    // A second round, blocked by the first's purchases dilated by k, never touches them.
    let mut bought = vec![false; w * h];
    for &i in &first {
        bought[i as usize] = true;
    }
    let second = choose(&order, w, h, suppressed(&bought, w, h, 1), Annotation::Region, 1, 1000);
    assert!(!second.is_empty());
    assert!(second.iter().all(|i| !seen.contains(i)), "a region overlaps an earlier one");
    let mut again = std::collections::HashSet::new();
    assert!(second.iter().all(|&i| again.insert(i)));

    // Through the ledger: each bought pixel is charged once, over two rounds of one image.
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open_or_create(&dir.path().join("l.bin"), &images(1, w as u32, h as u32), 200).unwrap();
    let plan = RoundPlan { strategy: Strategy::Ripu, annotation: Annotation::Region, radius: 1 };
    let a = plan.buy_in_image(&p, &mut ledger, 0, 60);
    let b = plan.buy_in_image(&p, &mut ledger, 0, 60);
    assert_eq!((a, b), (60, 60));
    assert_eq!(ledger.charged(), 120);
    assert_eq!(ledger.bought_in(0), 120, "one bit per charged pixel");
}

#[test]
fn pixel_annotation_keeps_every_chosen_pixel_more_than_k_from_the_others_across_rounds() {
    let _generator = global_generator();
    let (w, h) = (40u32, 20u32);
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open_or_create(&dir.path().join("l.bin"), &images(1, w, h), 1000).unwrap();
    let plan = RoundPlan { strategy: Strategy::Ripu, annotation: Annotation::Pixel, radius: 3 };
    for round in 0..3 {
        let p = random_probabilities(10 + round, 4, h as i64, w as i64);
        assert_eq!(plan.buy_in_image(&p, &mut ledger, 0, 5), 5, "round {round} buys its 5 pixels");
    }
    let bought = bought_pixels(&ledger, 0);
    assert_eq!(bought.len(), 15);
    for (i, a) in bought.iter().enumerate() {
        for b in &bought[i + 1..] {
            assert!((a.0 - b.0).abs().max((a.1 - b.1).abs()) > 3, "{a:?} and {b:?} within k = 3");
        }
    }
}

#[test]
fn each_round_spends_exactly_its_share_of_the_budget_and_the_last_reaches_me() {
    let _generator = global_generator();
    let (n, w, h) = (7usize, 20u32, 10u32);
    let dir = tempfile::tempdir().unwrap();
    // Me = 137 over 3 rounds: Ma goes to 45, 91, then 137; the shares do not divide by 7 images.
    let mut ledger = Ledger::open_or_create(&dir.path().join("l.bin"), &images(n, w, h), 137).unwrap();
    let goals = [45, 91, 137];
    for (round, &goal) in goals.iter().enumerate() {
        let quotas = image_quotas(&ledger, round, 3, n);
        assert_eq!(quotas.iter().sum::<u64>() + ledger.spent(), goal, "round {round}'s quotas");
        assert!(quotas.iter().max().unwrap() - quotas.iter().min().unwrap() <= 1, "an even split: {quotas:?}");
        let strategy = [Strategy::Ripu, Strategy::Entropy, Strategy::Margin][round];
        let plan = RoundPlan { strategy, annotation: Annotation::Region, radius: 1 };
        for (image, &quota) in quotas.iter().enumerate() {
            let p = random_probabilities((round * 10 + image) as i64, 3, h as i64, w as i64);
            assert_eq!(plan.buy_in_image(&p, &mut ledger, image, quota), quota);
        }
        assert_eq!(ledger.charged(), goal, "Ma after round {round}");
    }
    assert_eq!(ledger.charged(), ledger.budget());
    let bits: u64 = (0..n).map(|i| ledger.bought_in(i)).sum();
    assert_eq!(bits, ledger.charged());
    // Nothing is left to spend: a further round buys nothing.
    assert!(image_quotas(&ledger, 2, 3, n).iter().all(|&q| q == 0));
}

#[test]
fn ripu_negative_learning_and_local_consistency_match_hand_computed_values() {
    // Two pixels, three classes: only the probabilities below 0.05 count.
    let p = Tensor::from_slice(&[0.01f32, 0.6, 0.02, 0.39, 0.9, 0.08]).view([1, 3, 1, 2]);
    let hand = -((1.0f64 - 0.01 + 1e-6).ln() + (1.0f64 - 0.02 + 1e-6).ln()) / 2.0;
    assert!((values(&negative_learning_loss(&p, 0.05))[0] - hand).abs() < 1e-6);

    // A 1x3 strip, two classes, labels [1, 1, 255]: with RIPU's zero padding both labelled
    // pixels are boundaries (their neighbourhood holds the padding's 0); 255 never counts.
    let logits = Tensor::from_slice(&[2.0f32, 0.0, -1.0, 0.0, 0.0, 1.0]).view([1, 2, 1, 3]);
    let labels = Tensor::from_slice(&[1i64, 1, 255]).view([1, 1, 3]);
    let p0: Vec<f64> =
        [2.0f64, 0.0, -1.0].iter().zip([0.0f64, 0.0, 1.0]).map(|(a, b)| 1.0 / (1.0 + (b - a).exp())).collect();
    // Replicate padding: the 3x3 mean of a 1-high strip is the mean over x-1, x, x+1 (clamped).
    let mean = |x: usize| (p0[x.saturating_sub(1)] + p0[x] + p0[(x + 1).min(2)]) / 3.0;
    let l1 = |x: usize| 2.0 * (p0[x] - mean(x)).abs();
    let hand = (l1(0) + l1(1)) / 2.0;
    assert!((values(&local_consistency_loss(&logits, &labels))[0] - hand).abs() < 1e-6);
}

/// A tiny trainer with the given strategy.
fn tiny_trainer(dir: &std::path::Path, strategy: Strategy) -> Trainer {
    let mut c = common::synthetic_config(dir, (32, 16), (2, 2, 1));
    c.run.threads = 1;
    c.active.strategy = strategy;
    c.active.iterations = 10;
    c.active.rounds = vec![0];
    c.model.aspp_dilations = vec![1, 2];
    c.model.projection_dim = 8;
    Trainer::new(&c).unwrap()
}

/// A fresh stage state (a new DCCM: the step updates it) over a ledger holding a few purchases.
fn state_with_purchases(trainer: &Trainer, path: &std::path::Path) -> adamcu::train::ada::AdaState {
    let mut ledger = trainer.open_ledger(path).unwrap();
    for (x, y) in [(1, 1), (5, 3), (20, 9), (31, 15), (7, 0)] {
        for image in 0..2 {
            ledger.buy(image, x, y);
        }
    }
    trainer.new_ada_state(ledger)
}

#[test]
fn no_strategy_trains_on_a_target_label_the_ledger_does_not_hold() {
    let _generator = global_generator();
    let dir = tempfile::tempdir().unwrap();
    let image = |seed: i64| {
        tch::manual_seed(seed);
        Tensor::randint(256, [2, 16, 32, 3], (Kind::Uint8, tch::Device::Cpu))
    };
    let (source, target) = (image(1), image(2));
    let source_labels = Tensor::randint(19, [2, 16, 32], (Kind::Uint8, tch::Device::Cpu));
    let truth = Tensor::randint(19, [2, 16, 32], (Kind::Uint8, tch::Device::Cpu));
    let geometry = [Geometry::identity(32, 16); 2];
    let losses = |trainer: &Trainer, state: &mut adamcu::train::ada::AdaState, labels: &Tensor| {
        let labels = SealedLabels::seal(labels.shallow_clone());
        trainer.ada_losses(state, &source, &source_labels, &target, &labels, &[0, 1], &geometry).unwrap()
    };
    for strategy in [Strategy::AdaMcu, Strategy::Ripu, Strategy::Entropy, Strategy::Margin, Strategy::Random] {
        let trainer = tiny_trainer(&dir.path().join(strategy.to_string()), strategy);
        let ledger = dir.path().join(format!("{strategy}.bin"));
        // The step's loss on `labels`, and the pixels it trained on as labelled (bought before
        // or by this step: the draw never reads a label, so it is the same for every `labels`).
        let step = |labels: &Tensor| {
            let mut state = state_with_purchases(&trainer, &ledger);
            tch::manual_seed(42);
            let out = losses(&trainer, &mut state, labels);
            (values(&out.total)[0], out.selection.labelled.shallow_clone())
        };
        let (reference, labelled) = step(&truth);
        let held = {
            let state = state_with_purchases(&trainer, &ledger);
            let m: Vec<bool> = (0..2).flat_map(|image| state.ledger.bought_mask(image)).collect();
            Tensor::from_slice(&m).view([2, 16, 32])
        };
        let shifted = (&truth + 1).remainder(19).to_kind(Kind::Uint8);
        let other = truth.where_self(&labelled.logical_or(&held), &shifted);
        assert_eq!(step(&other).0, reference, "{strategy}: a label the ledger does not hold changed the loss");
        // The test can fail: a changed label at a held pixel changes the loss.
        let changed = shifted.where_self(&held, &truth);
        assert_ne!(step(&changed).0, reference, "{strategy}: the held labels are not used");
    }
    // RIPU's two terms are reported apart from L_seg (metrics, status), and the total is the
    // sum of what is reported; the other round strategies have neither.
    use adamcu::train::ada::LossTerm;
    for strategy in [Strategy::Ripu, Strategy::Entropy] {
        let trainer = tiny_trainer(&dir.path().join(format!("terms-{strategy}")), strategy);
        let mut state = state_with_purchases(&trainer, &dir.path().join(format!("terms-{strategy}.bin")));
        let out = losses(&trainer, &mut state, &truth);
        let ripu = [LossTerm::NegativeLearning, LossTerm::LocalConsistency];
        for term in ripu {
            let value = out.terms.get(term).as_ref().map(|t| values(t)[0]);
            match strategy {
                Strategy::Ripu => assert!(value.is_some_and(|v| v > 0.0), "{}: {value:?}", term.name()),
                _ => assert!(value.is_none(), "{strategy} has {}", term.name()),
            }
        }
        let sum: f64 = out.terms.iter().filter_map(|(_, t)| t.as_ref()).map(|t| values(t)[0]).sum();
        assert!(
            (sum - values(&out.total)[0]).abs() < 1e-4,
            "{strategy}: total {} against the terms' {sum}",
            values(&out.total)[0]
        );
    }
}
