//! What the contrastive units had to work with on a step: the figures a user watches (log,
//! status, metrics) to see whether the units do anything.

use crate::config::{Level, Named};

/// Whether the contrastive units do anything, per step: usable p2p anchors (with a positive
/// and a negative) and their positive pairs per level and anchor domain, summed over the
/// batch's units; the ratio of L_con's gradient (weighted) to L_seg's at the backbone's output,
/// whole and per level, and the cosine between those gradients and L_seg's (on diagnosed steps
/// only: it costs 2 + levels backward passes through the heads); max(W).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContrastDiagnostics {
    pub levels: Vec<LevelUsage>,
    pub gradient_ratio: Option<f64>,
    /// cos(grad L_con, grad L_seg) at the backbone's output: below 0, L_con pulls the
    /// features against segmentation.
    #[serde(default)]
    pub gradient_cosine: Option<f64>,
    /// The step the gradient figures were measured at: they are measured on log steps only,
    /// and the steps between keep the last measured ones, so that `adamcu status` shows them.
    #[serde(default)]
    pub gradient_step: Option<u64>,
    pub dccm_max: f64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LevelUsage {
    pub level: Level,
    pub source_anchors: f64,
    pub source_positives: f64,
    pub target_anchors: f64,
    pub target_positives: f64,
    /// |grad of this level's weighted p2p + c2c| / |grad L_seg| at the backbone's output.
    #[serde(default)]
    pub gradient_ratio: Option<f64>,
    /// cos(grad of this level's weighted p2p + c2c, grad L_seg) at the backbone's output.
    #[serde(default)]
    pub gradient_cosine: Option<f64>,
}

impl ContrastDiagnostics {
    /// Sets the metrics (`/metrics`) to this step's figures.
    pub fn publish(&self) {
        for l in &self.levels {
            let level = l.level.name();
            crate::telemetry::contrast_level(level, "source", l.source_anchors, l.source_positives);
            crate::telemetry::contrast_level(level, "target", l.target_anchors, l.target_positives);
            crate::telemetry::contrast_level_gradient(level, l.gradient_ratio, l.gradient_cosine);
        }
        crate::telemetry::contrast_step(self.gradient_ratio, self.gradient_cosine, self.dccm_max);
    }

    /// Marks this step's gradient figures as measured at `step` or, on a step that did not
    /// measure them, takes the last measured ones from `previous` (same levels).
    pub fn gradient_measured_or_kept(&mut self, step: u64, previous: Option<&ContrastDiagnostics>) {
        if self.gradient_ratio.is_some() {
            self.gradient_step = Some(step);
            return;
        }
        let Some(previous) = previous.filter(|p| p.gradient_step.is_some()) else { return };
        (self.gradient_ratio, self.gradient_cosine, self.gradient_step) =
            (previous.gradient_ratio, previous.gradient_cosine, previous.gradient_step);
        for (level, kept) in self.levels.iter_mut().zip(&previous.levels) {
            (level.gradient_ratio, level.gradient_cosine) = (kept.gradient_ratio, kept.gradient_cosine);
        }
    }

    /// One line for logs and `adamcu status`.
    pub fn line(&self) -> String {
        let levels: Vec<String> = self
            .levels
            .iter()
            .map(|l| {
                let gradient = gradient_text(l.gradient_ratio, l.gradient_cosine);
                let gradient = if gradient.is_empty() { gradient } else { format!(" ({gradient})") };
                format!("{} {:.0}/{:.0}{gradient}", l.level, l.source_anchors, l.target_anchors)
            })
            .collect();
        format!(
            "p2p anchors (source/target) {}; L_con vs L_seg at the features: {}; max W {:.3}",
            levels.join(", "),
            match gradient_text(self.gradient_ratio, self.gradient_cosine) {
                text if text.is_empty() => "-".to_string(),
                text => text,
            },
            self.dccm_max
        )
    }
}

/// "grad r, cos c" (the ratio of gradient norms and their cosine), the parts measured; empty
/// on a step that was not diagnosed.
fn gradient_text(ratio: Option<f64>, cosine: Option<f64>) -> String {
    let parts: Vec<String> =
        [ratio.map(|r| format!("grad {r:.3}")), cosine.map(|c| format!("cos {c:+.3}"))].into_iter().flatten().collect();
    parts.join(", ")
}
