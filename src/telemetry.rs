//! Metric names in one place (prefix `adamcu_`, base units, counters end in `_total`), the
//! Prometheus exporter, and the helpers stages use to report items, busy time and time
//! blocked on their channels.
//!
//! The standard process metrics (`process_resident_memory_bytes`, `process_open_fds`,
//! `process_threads`, `process_cpu_seconds_total`, ...; unprefixed, as every Prometheus client
//! names them) come from the `metrics-process` crate, refreshed by `report_process_metrics`:
//! a daemon that runs for days shows its memory and file handles over time.
//!
//! Busy and wait times are histograms in seconds: `metrics` counters are integers, and a
//! histogram's `_sum` is the exact total seconds (`rate(..._sum)` is the busy/wait ratio).

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::SocketAddr;
use std::time::Duration;

pub const STAGE_ITEMS: &str = "adamcu_stage_items_total";
pub const STAGE_BUSY: &str = "adamcu_stage_busy_seconds";
pub const STAGE_WAIT: &str = "adamcu_stage_wait_seconds";
pub const CHANNEL_DEPTH: &str = "adamcu_channel_depth";
pub const CHANNEL_CAPACITY: &str = "adamcu_channel_capacity";
pub const STEP_SECONDS: &str = "adamcu_train_step_seconds";
pub const STEPS: &str = "adamcu_train_steps_total";
pub const IMAGES: &str = "adamcu_images_total";
pub const LOSS: &str = "adamcu_train_loss";
pub const LR: &str = "adamcu_train_learning_rate";
pub const BUDGET_LABELED: &str = "adamcu_budget_labeled_pixels";
pub const BUDGET_LIMIT: &str = "adamcu_budget_limit_pixels";
pub const BUDGET_RATIO: &str = "adamcu_budget_spent_ratio";
pub const GROUP_PIXELS: &str = "adamcu_group_pixels";
pub const THRESHOLD: &str = "adamcu_uncertainty_threshold";
pub const EVAL_MIOU: &str = "adamcu_eval_miou";
pub const EVAL_IOU: &str = "adamcu_eval_iou";
pub const EVAL_FAILURES: &str = "adamcu_eval_failures_total";
pub const LOADER_ERRORS: &str = "adamcu_loader_errors_total";
pub const CHECKPOINT_SECONDS: &str = "adamcu_checkpoint_seconds";
pub const CHECKPOINT_BYTES: &str = "adamcu_checkpoint_bytes";
pub const RUN_DIR_FREE: &str = "adamcu_run_dir_free_bytes";
pub const BUILD_INFO: &str = "adamcu_build_info";
pub const GPU_MEMORY_PEAK: &str = "adamcu_gpu_memory_peak_bytes";
pub const CONTRAST_ANCHORS: &str = "adamcu_contrast_anchors";
pub const CONTRAST_POSITIVES: &str = "adamcu_contrast_positive_pairs";
pub const CONTRAST_GRADIENT_RATIO: &str = "adamcu_contrast_gradient_ratio";
pub const CONTRAST_LEVEL_GRADIENT_RATIO: &str = "adamcu_contrast_level_gradient_ratio";
pub const CONTRAST_GRADIENT_COSINE: &str = "adamcu_contrast_gradient_cosine";
pub const CONTRAST_LEVEL_GRADIENT_COSINE: &str = "adamcu_contrast_level_gradient_cosine";
pub const CONTRAST_LEVEL_PAIR_COSINE: &str = "adamcu_contrast_level_pair_gradient_cosine";
pub const DCCM_MAX: &str = "adamcu_dccm_max";
pub const TRANSLATE_ITERATIONS: &str = "adamcu_translate_iterations_total";
pub const TRANSLATE_LOSS: &str = "adamcu_translate_loss";
pub const TRANSLATE_IMAGES_PER_SECOND: &str = "adamcu_translate_images_per_second";
pub const TRANSLATE_WRITTEN: &str = "adamcu_translate_written_images_total";

/// This process's data-parallel rank, a label on every metric it serves (`set_rank`).
static RANK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Labels every metric with `rank` (a data-parallel rank's, before its endpoint starts).
pub fn set_rank(rank: usize) {
    let _ = RANK.set(rank);
}

/// Explicit buckets of the step-time histogram (seconds): CPU steps take 0.05-2 s, GPU ones
/// 0.02-0.5 s.
pub const STEP_BUCKETS: [f64; 14] = [0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0];
/// Buckets of the per-item busy and wait histograms and of checkpoint durations.
pub const DURATION_BUCKETS: [f64; 12] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// How often the process metrics are read from /proc: under a typical scrape interval.
pub const PROCESS_METRICS_EVERY: Duration = Duration::from_secs(5);

/// Starts the Prometheus endpoint on `address` (serves `/metrics`) and records build info.
pub fn install_exporter(address: SocketAddr) -> anyhow::Result<()> {
    let mut builder = PrometheusBuilder::new();
    if let Some(rank) = RANK.get() {
        builder = builder.add_global_label("rank", rank.to_string());
    }
    builder
        .with_http_listener(address)
        .set_buckets(&DURATION_BUCKETS)?
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(STEP_SECONDS.into()), &STEP_BUCKETS)?
        .install()
        .map_err(|e| anyhow::anyhow!("metrics endpoint on {address}: {e}"))?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "libtorch" => crate::doctor::LIBTORCH_VERSION).set(1.0);
    Ok(())
}

/// Refreshes the process metrics every `PROCESS_METRICS_EVERY`, for ever (a task on the
/// control plane's runtime; the first reading is taken at once).
pub async fn report_process_metrics() {
    let collector = metrics_process::Collector::default();
    collector.describe();
    let mut every = tokio::time::interval(PROCESS_METRICS_EVERY);
    loop {
        every.tick().await;
        collector.collect();
    }
}

/// Help texts (`# HELP`), one per metric.
fn describe() {
    describe_counter!(STAGE_ITEMS, "Items (batches or steps) a pipeline stage has produced.");
    describe_histogram!(STAGE_BUSY, "Seconds a stage spent working per item.");
    describe_histogram!(STAGE_WAIT, "Seconds a stage spent blocked on its input or output channel per item.");
    describe_gauge!(CHANNEL_DEPTH, "Batches waiting in a bounded channel.");
    describe_gauge!(CHANNEL_CAPACITY, "Capacity of a bounded channel in batches.");
    describe_histogram!(STEP_SECONDS, "Seconds per training step, data wait included.");
    describe_counter!(STEPS, "Training steps taken.");
    describe_counter!(IMAGES, "Images trained on, per domain.");
    describe_gauge!(LOSS, "Loss of the last step, per term (source, target, p2p, c2c, total).");
    describe_gauge!(LR, "Base learning rate of the last step.");
    describe_gauge!(BUDGET_LABELED, "Target pixels whose labels were bought (Ma), at the training resolution.");
    describe_gauge!(BUDGET_LIMIT, "The annotation budget (Me) in pixels at the training resolution.");
    describe_gauge!(BUDGET_RATIO, "Ma / Me.");
    describe_gauge!(GROUP_PIXELS, "Target pixels of the last batch in each uncertainty group.");
    describe_gauge!(THRESHOLD, "Uncertainty thresholds pi_high and pi_low.");
    describe_gauge!(EVAL_MIOU, "Mean IoU (0-1) on the target val set at the last evaluation.");
    describe_gauge!(EVAL_IOU, "IoU (0-1) per class on the target val set at the last evaluation.");
    describe_counter!(EVAL_FAILURES, "Evaluations of the target val set that failed (the daemon trains on).");
    // Served as 0 from the start, so that an alert on its increase has a series to watch.
    counter!(EVAL_FAILURES).absolute(0);
    describe_counter!(LOADER_ERRORS, "Samples a loader could not use, by domain and kind.");
    describe_histogram!(
        CHECKPOINT_SECONDS,
        "Seconds to write a checkpoint (on the writer thread; the pause it \
        costs training is adamcu_stage_wait_seconds{stage=\"train\",side=\"output\"})."
    );
    describe_gauge!(GPU_MEMORY_PEAK, "Peak bytes allocated on the CUDA device (CUDA runs only).");
    describe_gauge!(CHECKPOINT_BYTES, "Bytes of the last checkpoint (model, optimizer, ledger snapshot).");
    describe_gauge!(RUN_DIR_FREE, "Bytes free to the daemon on the file system of its run directory.");
    describe_gauge!(
        CONTRAST_ANCHORS,
        "Usable p2p anchors (a positive and a negative) of the last step, by level \
        and anchor domain, summed over its contrastive units."
    );
    describe_gauge!(CONTRAST_POSITIVES, "Positive pairs of those anchors, by level and anchor domain.");
    describe_gauge!(
        CONTRAST_GRADIENT_RATIO,
        "|grad of weighted L_con| / |grad of L_seg| at the backbone's output, \
        measured on log steps."
    );
    describe_gauge!(
        CONTRAST_LEVEL_GRADIENT_RATIO,
        "|grad of one level's weighted p2p + c2c| / |grad of L_seg| at the backbone's output, \
        measured on log steps."
    );
    describe_gauge!(
        CONTRAST_GRADIENT_COSINE,
        "Cosine between the gradients of weighted L_con and of L_seg at the backbone's output \
        (below 0: L_con pulls against segmentation), measured on log steps."
    );
    describe_gauge!(
        CONTRAST_LEVEL_GRADIENT_COSINE,
        "Cosine between the gradients of one level's weighted p2p + c2c and of L_seg at the \
        backbone's output, measured on log steps."
    );
    describe_gauge!(
        CONTRAST_LEVEL_PAIR_COSINE,
        "Cosine between two levels' gradients (weighted p2p + c2c) at the backbone's output \
        (near 1: the levels push the features the same way), measured on log steps."
    );
    describe_gauge!(DCCM_MAX, "The largest entry of the DCCM W.");
    describe_counter!(
        TRANSLATE_ITERATIONS,
        "CycleGAN training iterations taken (one source and one target image each)."
    );
    describe_gauge!(TRANSLATE_LOSS, "CycleGAN loss of the last iteration, per term (g_gan, cycle, identity, d).");
    describe_gauge!(
        TRANSLATE_IMAGES_PER_SECOND,
        "Images per second of the translation stage: training (source and target images) or writing."
    );
    describe_counter!(TRANSLATE_WRITTEN, "Translated source images written.");
    describe_gauge!(BUILD_INFO, "Always 1; labels give the adamcu and libtorch versions.");
}

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

pub fn channel(name: &'static str, depth: usize, capacity: usize) {
    gauge!(CHANNEL_DEPTH, "channel" => name).set(depth as f64);
    gauge!(CHANNEL_CAPACITY, "channel" => name).set(capacity as f64);
}

pub fn images(domain: &'static str, n: usize) {
    counter!(IMAGES, "domain" => domain).increment(n as u64);
}

pub fn step(seconds: f64, lr: f64, losses: &[(&'static str, f64)]) {
    histogram!(STEP_SECONDS).record(seconds);
    counter!(STEPS).increment(1);
    gauge!(LR).set(lr);
    for &(term, value) in losses {
        gauge!(LOSS, "term" => term).set(value);
    }
}

pub fn budget(labeled: u64, limit: u64) {
    gauge!(BUDGET_LABELED).set(labeled as f64);
    gauge!(BUDGET_LIMIT).set(limit as f64);
    gauge!(BUDGET_RATIO).set(if limit > 0 { labeled as f64 / limit as f64 } else { 0.0 });
}

pub fn groups(high: u64, medium: u64, low: u64, pi_high: f64, pi_low: f64) {
    for (group, n) in [("high", high), ("medium", medium), ("low", low)] {
        gauge!(GROUP_PIXELS, "group" => group).set(n as f64);
    }
    gauge!(THRESHOLD, "name" => "pi_high").set(pi_high);
    gauge!(THRESHOLD, "name" => "pi_low").set(pi_low);
}

/// One level's usable p2p anchors and positive pairs of one anchor domain on the last step
/// (`contrast::diagnostics::ContrastDiagnostics::publish`).
pub fn contrast_level(level: &'static str, domain: &'static str, anchors: f64, positives: f64) {
    gauge!(CONTRAST_ANCHORS, "level" => level, "domain" => domain).set(anchors);
    gauge!(CONTRAST_POSITIVES, "level" => level, "domain" => domain).set(positives);
}

/// One level's gradient ratio and cosine against L_seg on the last diagnosed step.
pub fn contrast_level_gradient(level: &'static str, ratio: f64, cosine: f64) {
    gauge!(CONTRAST_LEVEL_GRADIENT_RATIO, "level" => level).set(ratio);
    gauge!(CONTRAST_LEVEL_GRADIENT_COSINE, "level" => level).set(cosine);
}

/// The cosine between two levels' gradients on the last diagnosed step.
pub fn contrast_level_pair_cosine(level: &'static str, other: &'static str, cosine: f64) {
    gauge!(CONTRAST_LEVEL_PAIR_COSINE, "level" => level, "other" => other).set(cosine);
}

/// L_con's gradient ratio and cosine against L_seg on the last diagnosed step.
pub fn contrast_gradient(ratio: f64, cosine: f64) {
    gauge!(CONTRAST_GRADIENT_RATIO).set(ratio);
    gauge!(CONTRAST_GRADIENT_COSINE).set(cosine);
}

/// max(W) of the last step.
pub fn dccm_max(value: f64) {
    gauge!(DCCM_MAX).set(value);
}

/// One CycleGAN training iteration: its losses and the recent images per second.
pub fn translate_iteration(losses: &[(&'static str, f64)], images_per_second: f64) {
    counter!(TRANSLATE_ITERATIONS).increment(1);
    gauge!(TRANSLATE_IMAGES_PER_SECOND, "phase" => "train").set(images_per_second);
    for &(term, value) in losses {
        gauge!(TRANSLATE_LOSS, "term" => term).set(value);
    }
}

/// Translated images written so far and the recent rate.
pub fn translate_written(images: u64, images_per_second: f64) {
    counter!(TRANSLATE_WRITTEN).increment(images);
    gauge!(TRANSLATE_IMAGES_PER_SECOND, "phase" => "write").set(images_per_second);
}

pub fn evaluation_failed() {
    counter!(EVAL_FAILURES).increment(1);
}

pub fn evaluation(miou_percent: f64, per_class: &[(String, Option<f64>)]) {
    gauge!(EVAL_MIOU).set(miou_percent / 100.0);
    for (class, iou) in per_class {
        if let Some(iou) = iou {
            gauge!(EVAL_IOU, "class" => class.clone()).set(iou / 100.0);
        }
    }
}

pub fn checkpoint(seconds: f64, bytes: u64) {
    histogram!(CHECKPOINT_SECONDS).record(seconds);
    gauge!(CHECKPOINT_BYTES).set(bytes as f64);
}

pub fn run_dir_free(bytes: u64) {
    gauge!(RUN_DIR_FREE).set(bytes as f64);
}

pub fn gpu_memory(device: tch::Device) {
    if let tch::Device::Cuda(index) = device {
        if let Some(bytes) = crate::torch_ext::cuda_peak_bytes(index) {
            gauge!(GPU_MEMORY_PEAK, "device" => index.to_string()).set(bytes as f64);
        }
    }
}
