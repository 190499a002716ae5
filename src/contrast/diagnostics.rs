//! What the contrastive units had to work with on a step: the figures a user watches (log,
//! status, metrics) to see whether the units do anything.

use crate::config::{Level, Named};

/// Whether the contrastive units do anything, per step: usable p2p anchors (with a positive
/// and a negative) and their positive pairs per level and anchor domain, summed over the
/// batch's units; how L_con's gradient at the backbone's output compares with L_seg's and
/// the levels' with each other (`GradientFigures`, on diagnosed steps only); max(W).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContrastDiagnostics {
    pub levels: Vec<LevelUsage>,
    /// The last measured gradient figures: they are measured on log steps only, and the steps
    /// between keep the last ones, so that `adamcu status` shows them. (Status files of adamcu
    /// before 2026-12-03 held them as flat fields: they read as none.)
    #[serde(default)]
    pub gradient: Option<GradientFigures>,
    pub dccm_max: f64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LevelUsage {
    pub level: Level,
    pub source_anchors: f64,
    pub source_positives: f64,
    pub target_anchors: f64,
    pub target_positives: f64,
}

/// L_con's gradient at the backbone's output (weighted as in the total loss), whole and per
/// level, against L_seg's, and the levels' against each other. It costs 2 + levels backward
/// passes through the heads, so it is measured on log steps only.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GradientFigures {
    /// The step they were measured at.
    pub step: u64,
    /// All of L_con.
    pub con: AgainstSegmentation,
    /// Each configured level's weighted p2p + c2c, in `contrast.levels` order.
    pub levels: Vec<LevelGradient>,
    /// cos between two levels' gradients, each pair once: near 1, a level pushes the features
    /// where another already does; near 0, somewhere else.
    pub between_levels: Vec<LevelPairCosine>,
}

/// |grad L| / |grad L_seg| and cos(grad L, grad L_seg): a ratio near 0 moves nothing; a
/// cosine below 0 pulls the features against segmentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AgainstSegmentation {
    pub ratio: f64,
    pub cosine: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LevelGradient {
    pub level: Level,
    #[serde(flatten)]
    pub against_seg: AgainstSegmentation,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LevelPairCosine {
    pub levels: [Level; 2],
    pub cosine: f64,
}

impl AgainstSegmentation {
    fn text(&self) -> String {
        format!("grad {:.3}, cos {:+.3}", self.ratio, self.cosine)
    }
}

impl ContrastDiagnostics {
    /// Sets the metrics (`/metrics`) to this step's figures.
    pub fn publish(&self) {
        for l in &self.levels {
            let level = l.level.name();
            crate::telemetry::contrast_level(level, "source", l.source_anchors, l.source_positives);
            crate::telemetry::contrast_level(level, "target", l.target_anchors, l.target_positives);
        }
        if let Some(g) = &self.gradient {
            for l in &g.levels {
                crate::telemetry::contrast_level_gradient(l.level.name(), l.against_seg.ratio, l.against_seg.cosine);
            }
            for p in &g.between_levels {
                crate::telemetry::contrast_level_pair_cosine(p.levels[0].name(), p.levels[1].name(), p.cosine);
            }
            crate::telemetry::contrast_gradient(g.con.ratio, g.con.cosine);
        }
        crate::telemetry::dccm_max(self.dccm_max);
    }

    /// On a step that did not measure the gradient figures, takes the last measured ones
    /// from `previous`.
    pub fn keep_gradient_of(&mut self, previous: Option<&ContrastDiagnostics>) {
        if self.gradient.is_none() {
            self.gradient = previous.and_then(|p| p.gradient.clone());
        }
    }

    /// One line for logs and `adamcu status`.
    pub fn line(&self) -> String {
        let gradient = self.gradient.as_ref();
        let levels: Vec<String> = self
            .levels
            .iter()
            .map(|l| {
                let own = gradient.and_then(|g| g.levels.iter().find(|g| g.level == l.level));
                let own = own.map_or(String::new(), |g| format!(" ({})", g.against_seg.text()));
                format!("{} {:.0}/{:.0}{own}", l.level, l.source_anchors, l.target_anchors)
            })
            .collect();
        let between = gradient.filter(|g| !g.between_levels.is_empty()).map_or(String::new(), |g| {
            let pairs: Vec<String> =
                g.between_levels.iter().map(|p| format!("{}/{} {:+.3}", p.levels[0], p.levels[1], p.cosine)).collect();
            format!("; cos between levels {}", pairs.join(", "))
        });
        format!(
            "p2p anchors (source/target) {}; L_con vs L_seg at the features: {}{between}; max W {:.3}",
            levels.join(", "),
            gradient.map_or("-".to_string(), |g| g.con.text()),
            self.dccm_max
        )
    }
}
