//! The ADA-MCU stage (Algorithm 1, lines 4-17): each iteration takes a source and a target
//! batch, scores the target pixels, buys labels under the budget through the ledger, picks
//! pseudo labels, builds the multi-level contrastive units, updates the DCCM and takes one
//! SGD step on L_seg (Eqs. 4-6) + L_con.
//!
//! - `step.rs`: one iteration's maths: the forward pass, every loss, the update, and the one
//!   read-back of the step's figures;
//! - `run.rs`: a running stage, its loaders and optimizer, one step at a time;
//! - `checkpoint.rs`: capturing, writing and resuming from its checkpoints.

mod checkpoint;
mod rounds;
mod run;
mod step;

pub use rounds::{local_consistency_loss, negative_learning_loss};

pub use checkpoint::{resume, AdaCheckpoint, ConfigChanges, ResumePoint};
pub use run::AdaRun;
pub use step::StepOutput;

use super::{open_set, Trainer};
use crate::active::ledger::{Ledger, LedgerImage};
use crate::active::sampling::{Sampler, Thresholds};
use crate::contrast::dccm::Dccm;
use crate::contrast::diagnostics::ContrastDiagnostics;
use anyhow::Result;
use std::path::Path;
use tch::Tensor;

/// The terms of the ADA-MCU loss (Section III-D), named once: L_seg on the source and on the
/// target (bought and pseudo labels), and L_con's pixel-to-pixel and center-to-center InfoNCE;
/// then RIPU's two (`active.strategy = "ripu"`), each with its weight: negative learning on the
/// target and local consistency on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossTerm {
    Source,
    Target,
    P2p,
    C2c,
    NegativeLearning,
    LocalConsistency,
}

impl LossTerm {
    pub const ALL: [LossTerm; 6] = [
        LossTerm::Source,
        LossTerm::Target,
        LossTerm::P2p,
        LossTerm::C2c,
        LossTerm::NegativeLearning,
        LossTerm::LocalConsistency,
    ];
    /// The terms of an ADA-MCU step (`active.strategy = "ada-mcu"`).
    pub const ADA_MCU: [LossTerm; 4] = [LossTerm::Source, LossTerm::Target, LossTerm::P2p, LossTerm::C2c];

    /// Its name in status.json, the log and the `term` label of `adamcu_loss`.
    pub fn name(self) -> &'static str {
        match self {
            LossTerm::Source => "source",
            LossTerm::Target => "target",
            LossTerm::P2p => "p2p",
            LossTerm::C2c => "c2c",
            LossTerm::NegativeLearning => "negative_learning",
            LossTerm::LocalConsistency => "local_consistency",
        }
    }

    /// Whether it is a term of L_con (weighted by `contrast.weight`, reaching the projection head).
    pub fn is_contrastive(self) -> bool {
        matches!(self, LossTerm::P2p | LossTerm::C2c)
    }
}

/// One value per loss term (tensors in a step, their values after it).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Terms<T> {
    pub source: T,
    pub target: T,
    pub p2p: T,
    pub c2c: T,
    pub negative_learning: T,
    pub local_consistency: T,
}

impl<T> Terms<T> {
    pub fn get(&self, term: LossTerm) -> &T {
        match term {
            LossTerm::Source => &self.source,
            LossTerm::Target => &self.target,
            LossTerm::P2p => &self.p2p,
            LossTerm::C2c => &self.c2c,
            LossTerm::NegativeLearning => &self.negative_learning,
            LossTerm::LocalConsistency => &self.local_consistency,
        }
    }

    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> Terms<U> {
        Terms {
            source: f(&self.source),
            target: f(&self.target),
            p2p: f(&self.p2p),
            c2c: f(&self.c2c),
            negative_learning: f(&self.negative_learning),
            local_consistency: f(&self.local_consistency),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (LossTerm, &T)> {
        LossTerm::ALL.into_iter().map(move |term| (term, self.get(term)))
    }
}

/// Loss terms of one iteration (for logs, metrics and the gradient tests).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepLosses {
    #[serde(flatten)]
    pub terms: Terms<f64>,
    pub total: f64,
    /// What the contrastive units had to work with (None with them off).
    pub contrast: Option<ContrastDiagnostics>,
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
    pub curve: Vec<crate::train::CurvePoint>,
    /// Every step's loss and labelled fraction (`train_ada`; empty from the daemon). Not in
    /// records: the demo plots it.
    #[serde(skip)]
    pub trace: Vec<crate::train::driver::TracePoint>,
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
    /// L_con's factor for each configured level, `contrast.weight` x its level weight, in
    /// `contrast.levels` order [levels] on the device: built here once, not uploaded each step.
    pub level_factors: Tensor,
}

impl Trainer {
    /// The ledger's images (the configured target training set) at the size the network is
    /// trained on them (`data.target.resize`, else `augment.resize`, else as stored), and its
    /// budget Me in those pixels: "5 %" is 5 % of what the network can see, as RIPU counts
    /// (a Cityscapes frame stored at 2048x1024 and trained at 1024x512 counts 524,288 pixels).
    pub(crate) fn ledger_layout(&self) -> Result<(Vec<LedgerImage>, u64)> {
        let target = open_set(&self.config.data.target, "data.target", self.config.data.classes)?;
        let [resize_h, resize_w] =
            self.config.augment_for(self.config.data.target.as_ref().expect("open_set checked it")).resize;
        let images = (0..target.len())
            .map(|i| {
                let (width, height) = if resize_h > 0 { (resize_w, resize_h) } else { target.dimensions(i)? };
                Ok(LedgerImage { id: target.id(i).to_string(), width, height })
            })
            .collect::<Result<Vec<_>>>()?;
        let total: u64 = images.iter().map(|i| i.width as u64 * i.height as u64).sum();
        let budget = match self.config.active.pixels_per_image {
            Some(per_image) => (per_image * images.len() as u64).min(total),
            None => (self.config.active.budget * total as f64).round() as u64,
        };
        Ok((images, budget))
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
            level_factors: self.level_factors(),
        }
    }

    fn level_factors(&self) -> Tensor {
        let c = &self.config.contrast;
        let factors: Vec<f32> = c.levels.iter().map(|&l| (c.weight * c.level_weights.of(l)) as f32).collect();
        crate::torch_ext::upload(&Tensor::from_slice(&factors), self.device)
    }
}
