//! The daemon's status at a glance: written to `<run dir>/status.json` every log interval
//! (atomically) and printed by `adamcu status RUN_DIR`.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// "running", "stopped" (by a signal, resumable) or "finished".
    pub state: String,
    pub step: u64,
    pub iterations: u64,
    pub iterations_per_second: f64,
    pub eta_seconds: f64,
    /// Ma and Me, in `budget_pixels` (pixels at the training resolution).
    pub budget_spent_pixels: u64,
    pub budget_limit_pixels: u64,
    #[serde(default)]
    pub budget_pixels: String,
    pub labeled_fraction: f64,
    /// Share of the trainer's step time spent waiting for batches.
    pub trainer_wait_share: f64,
    /// The stage the others wait on.
    pub bottleneck: String,
    pub loss: f64,
    /// Bytes free on the run directory's file system (0 in status files of older adamcu).
    #[serde(default)]
    pub disk_free_bytes: u64,
    /// The contrastive units' diagnostics of the last step (none with them off).
    #[serde(default)]
    pub contrast: Option<crate::contrast::diagnostics::ContrastDiagnostics>,
    /// The last evaluation on the target val set (none yet, or `train.eval_every = 0`).
    #[serde(default)]
    pub last_eval: Option<LastEval>,
    pub updated_unix: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LastEval {
    pub step: u64,
    pub miou: f64,
}

impl Status {
    pub fn line(&self) -> String {
        format!("step {}/{} | {:.2} it/s | ETA {:.0}s | budget {}/{} px at training resolution ({:.2}% of target) | bottleneck: {} \
                 (trainer waits {:.1}% of step time for data) | loss {:.4} | disk {} free{}{}",
            self.step, self.iterations, self.iterations_per_second, self.eta_seconds, self.budget_spent_pixels,
            self.budget_limit_pixels, 100.0 * self.labeled_fraction, self.bottleneck, 100.0 * self.trainer_wait_share,
            self.loss, indicatif::HumanBytes(self.disk_free_bytes),
            self.last_eval.map_or(String::new(), |e| format!(" | mIoU {:.1} at step {}", e.miou, e.step)),
            self.contrast.as_ref().map_or(String::new(), |d| format!(
                "\n  contrastive units: {}{}",
                d.line(),
                d.gradient.as_ref().map_or(String::new(), |g| format!(" (gradient figures of step {})", g.step))
            )))
    }

    pub fn write(&self, run_dir: &Path) -> Result<()> {
        crate::files::write_json(&run_dir.join("status.json"), self)
    }

    pub fn read(run_dir: &Path) -> Result<Status> {
        let path = run_dir.join("status.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: no status (has a daemon run here?)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a status file", path.display()))
    }
}

/// Which stage the others wait on, from the trainer's share of time blocked on its input.
pub fn bottleneck(trainer_wait_share: f64) -> &'static str {
    if trainer_wait_share > 0.05 {
        "loaders"
    } else {
        "trainer"
    }
}
