//! What the contrastive units had to work with on a step: the figures a user watches (log,
//! status, metrics) to see whether the units do anything.

use crate::config::{Level, Named};

/// Whether the contrastive units do anything, per step: usable p2p anchors (with a positive
/// and a negative) and their positive pairs per level and anchor domain, summed over the
/// batch's units; the ratio of L_con's gradient (weighted) to L_seg's at the backbone's output,
/// whole and per level (on diagnosed steps only: it costs 2 + levels backward passes through
/// the heads); max(W).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContrastDiagnostics {
    pub levels: Vec<LevelUsage>,
    pub gradient_ratio: Option<f64>,
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
}

impl ContrastDiagnostics {
    /// Sets the metrics (`/metrics`) to this step's figures.
    pub fn publish(&self) {
        for l in &self.levels {
            let level = l.level.name();
            crate::telemetry::contrast_level(level, "source", l.source_anchors, l.source_positives);
            crate::telemetry::contrast_level(level, "target", l.target_anchors, l.target_positives);
            if let Some(ratio) = l.gradient_ratio {
                crate::telemetry::contrast_level_gradient_ratio(level, ratio);
            }
        }
        crate::telemetry::contrast_step(self.gradient_ratio, self.dccm_max);
    }

    /// One line for logs and `adamcu status`.
    pub fn line(&self) -> String {
        let levels: Vec<String> = self
            .levels
            .iter()
            .map(|l| {
                let ratio = l.gradient_ratio.map_or(String::new(), |r| format!(" (grad {r:.3})"));
                format!("{} {:.0}/{:.0}{ratio}", l.level, l.source_anchors, l.target_anchors)
            })
            .collect();
        format!(
            "p2p anchors (source/target) {}; |grad L_con|/|grad L_seg| {}; max W {:.3}",
            levels.join(", "),
            self.gradient_ratio.map_or("-".into(), |r| format!("{r:.3}")),
            self.dccm_max
        )
    }
}
