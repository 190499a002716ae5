//! What changed between the config a run was started with and the current one: the keys a
//! resumed run may change, and those that alter its experiment.

use super::Config;
use std::fmt;

impl Config {
    /// This config as a checkpoint records it (JSON; read back bit-exact, serde_json's
    /// `float_roundtrip` being on).
    pub fn recorded(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a config serialises")
    }

    /// Every key whose value differs between a recorded config (`Config::recorded`) and this
    /// one, in key order.
    pub fn changes_since(&self, recorded: &serde_json::Value) -> Vec<ConfigChange> {
        recorded_changes(recorded, &self.recorded())
    }
}

/// Every key whose value differs between two recorded configs (`Config::recorded`), in key
/// order.
pub fn recorded_changes(was: &serde_json::Value, now: &serde_json::Value) -> Vec<ConfigChange> {
    let (mut was_flat, mut now_flat) = (Default::default(), Default::default());
    flatten("", was, &mut was_flat);
    flatten("", now, &mut now_flat);
    let keys: std::collections::BTreeSet<&String> = was_flat.keys().chain(now_flat.keys()).collect();
    let null = serde_json::Value::Null;
    keys.into_iter()
        .filter_map(|key| {
            let (a, b) = (was_flat.get(key).unwrap_or(&null), now_flat.get(key).unwrap_or(&null));
            (a != b).then(|| ConfigChange { key: key.clone(), was: a.clone(), now: b.clone() })
        })
        .collect()
}

/// Keys a resumed run may change without changing its experiment: where the files are, the
/// device and its threads, the memory layout, how the loaders are staffed, how often the run
/// reports, checkpoints and evaluates, and the parts `adamcu train` does not read.
const KEYS_RESUME_MAY_CHANGE: &[&str] = &[
    "run.name",
    "run.runs_dir",
    "run.device",
    "run.threads",
    "data.on_bad_sample",
    "data.workers",
    "data.channel_capacity",
    "data.source.root",
    "data.source.labels_root",
    "data.target.root",
    "data.target.labels_root",
    "data.target_val.root",
    "data.target_val.labels_root",
    "model.pretrained",
    "train.channels_last",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.target_supervised_iterations",
    "metrics",
    "demo",
    "synth",
];

/// One key whose value differs between the config a run was started with and the current one.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigChange {
    /// Dotted key, as in `--set`.
    pub key: String,
    /// JSON `null` where the key was or is absent (an unconfigured data set).
    pub was: serde_json::Value,
    pub now: serde_json::Value,
}

/// Keys (besides `KEYS_RESUME_MAY_CHANGE`) that source-only pretraining does not read: the
/// target side, the active-learning and contrastive settings, evaluation.
const KEYS_AFTER_SOURCE_STAGE: &[&str] =
    &["data.target", "data.target_val", "train.batch_target", "active", "contrast", "eval"];

impl ConfigChange {
    /// Whether the change alters what the run computes (anything not in
    /// `KEYS_RESUME_MAY_CHANGE`).
    pub fn changes_experiment(&self) -> bool {
        !self.is_under(KEYS_RESUME_MAY_CHANGE)
    }

    /// Whether the change alters what source-only pretraining computes.
    pub fn changes_source_stage(&self) -> bool {
        self.changes_experiment() && !self.is_under(KEYS_AFTER_SOURCE_STAGE)
    }

    pub fn is_under(&self, keys: &[&str]) -> bool {
        keys.iter().any(|k| self.key == *k || self.key.starts_with(&format!("{k}.")))
    }
}

/// Changes one per line, each indented, for an error message or a log line.
pub fn listed(changes: &[ConfigChange]) -> String {
    changes.iter().map(|c| format!("\n  {c}")).collect()
}

impl fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: was {}, now {}", self.key, self.was, self.now)
    }
}

/// `value`'s leaves by dotted key (arrays are leaves: `augment.crop` is one value).
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut std::collections::BTreeMap<String, serde_json::Value>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf.clone());
        }
    }
}
