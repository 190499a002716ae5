//! Metric names in one place (prefix `adamcu_`, base units, counters end in `_total`) and the
//! small helpers stages use to report items, busy time and time blocked on their channels.
//!
//! Busy and wait times are histograms in seconds: `metrics` counters are integers, and a
//! histogram's `_sum` is the exact total seconds (`rate(..._sum)` is the busy/wait ratio).

use metrics::{counter, histogram, Counter, Histogram};
use std::time::Duration;

pub const STAGE_ITEMS: &str = "adamcu_stage_items_total";
pub const STAGE_BUSY: &str = "adamcu_stage_busy_seconds";
pub const STAGE_WAIT: &str = "adamcu_stage_wait_seconds";
pub const LOADER_ERRORS: &str = "adamcu_loader_errors_total";

/// Counters of one pipeline stage.
pub struct Stage {
    items: Counter,
    busy: Histogram,
    wait_input: Histogram,
    wait_output: Histogram,
}

impl Stage {
    pub fn new(name: &str) -> Stage {
        let stage = name.to_string();
        Stage {
            items: counter!(STAGE_ITEMS, "stage" => stage.clone()),
            busy: histogram!(STAGE_BUSY, "stage" => stage.clone()),
            wait_input: histogram!(STAGE_WAIT, "stage" => stage.clone(), "side" => "input"),
            wait_output: histogram!(STAGE_WAIT, "stage" => stage, "side" => "output"),
        }
    }
    pub fn item(&self) {
        self.items.increment(1);
    }
    pub fn busy(&self, d: Duration) {
        self.busy.record(d.as_secs_f64());
    }
    pub fn waited_input(&self, d: Duration) {
        self.wait_input.record(d.as_secs_f64());
    }
    pub fn waited_output(&self, d: Duration) {
        self.wait_output.record(d.as_secs_f64());
    }
}

pub fn loader_error(domain: &str, kind: &str) {
    counter!(LOADER_ERRORS, "domain" => domain.to_string(), "kind" => kind.to_string()).increment(1);
}
