//! Progress of a long job (a training stage, the translation, data-set synthesis, packing, an
//! evaluation): a bar with rate and ETA (and the loss, for training) on a terminal, plain log
//! lines every N items otherwise (daemons, CI, files). Depends on nothing in the crate.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    name: String,
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    /// Steps done before this process started (a resumed job): not in the rate.
    first: u64,
    /// Items between log lines off a terminal; none for a bar-only job.
    every: Option<u64>,
    started: Instant,
    recent_loss: f64,
}

impl Progress {
    pub fn new(name: &str, total: u64, every: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            bar.set_prefix(name.to_string());
            bar
        });
        Progress {
            name: name.to_string(),
            bar,
            total,
            done: 0,
            first: 0,
            every: Some(every.max(1)),
            started: Instant::now(),
            recent_loss: f64::NAN,
        }
    }

    /// A bar on a terminal and nothing otherwise: for short jobs that run often inside others
    /// (an evaluation every N steps would fill a log with lines of its own).
    pub fn bar_only(name: &str, total: u64) -> Progress {
        Progress { every: None, ..Progress::new(name, total, 1) }
    }

    /// A job resumed at `done` of its steps: the bar starts there, the rate counts from there.
    pub fn resume_at(&mut self, done: u64) {
        (self.done, self.first) = (done, done);
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
        self.started = Instant::now();
    }

    /// One training step with its loss and learning rate.
    pub fn step(&mut self, loss: f64, lr: f64) {
        // A smoothed loss reads better than the noisy per-step value.
        self.recent_loss = if self.recent_loss.is_nan() { loss } else { 0.95 * self.recent_loss + 0.05 * loss };
        let message = format!("loss {:.4} lr {lr:.2e}", self.recent_loss);
        self.advance(&message);
    }

    /// One item of a job without a loss (writing images, evaluating).
    pub fn tick(&mut self) {
        self.advance("");
    }

    fn advance(&mut self, message: &str) {
        self.done += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_message(message.to_string());
                bar.inc(1);
            }
            None if self.every.is_some_and(|every| self.done.is_multiple_of(every) || self.done == self.total) => {
                let elapsed = self.started.elapsed().as_secs_f64();
                let rate = (self.done - self.first) as f64 / elapsed.max(1e-9);
                let eta = (self.total - self.done) as f64 / rate.max(1e-9);
                tracing::info!("{} {}/{} {:.2} it/s ETA {:.0}s {message}", self.name, self.done, self.total, rate, eta);
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
