//! The loader stage of one domain: worker threads decode and augment samples, a batcher
//! collates them into tensors, and a bounded crossbeam channel carries batches to the trainer
//! (a full channel blocks the loader: backpressure, nothing dropped).
//!
//! Determinism: the sample order of epoch `e` is a permutation seeded by (seed, e), and the
//! augmentation of the k-th sample drawn is seeded by (seed, k). Worker w handles k = w mod W
//! and the batcher reads the workers round-robin, so the stream of batches is the same for a
//! given seed whatever the thread timing (and whatever the worker count). A data-parallel rank
//! (`RankShare`) draws its own share of each batch of that stream.

use super::augment::{Augmented, Augmenter, Geometry};
use super::error::DataError;
use super::source::SampleSource;
use crate::config::{AugmentConfig, OnBadSample};
use crate::telemetry;
use crossbeam_channel::{bounded, Receiver, Sender};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// A collated batch and where each of its samples came from.
#[derive(Debug)]
pub struct Batch {
    /// 0, 1, 2, ... in the order the loader produced them.
    pub sequence: u64,
    pub sample_indices: Vec<usize>,
    pub ids: Vec<String>,
    pub geometries: Vec<Geometry>,
    /// [B, H, W, 3] u8 RGB; `data::normalise::Normaliser` makes the network input on the device.
    pub images: Tensor,
    /// [B, H, W] u8 training ids, 255 = ignore (`torch_ext::labels_on` makes the i64 labels
    /// on the device).
    pub labels: Tensor,
}

pub struct LoaderOptions {
    pub domain: &'static str,
    pub batch_size: usize,
    pub workers: usize,
    pub capacity: usize,
    pub seed: u64,
    pub on_bad_sample: OnBadSample,
    /// Start after this many samples have been drawn (to resume a run's data order).
    pub start_at: u64,
    /// Page-lock collated batches (for a CUDA run), so the copy to the device is asynchronous.
    pub pinned: bool,
    /// Which share of each batch this process draws (data-parallel ranks).
    pub share: RankShare,
}

/// A data-parallel rank's share of every batch: with `world` ranks and `batch_size` samples a
/// rank, batch b of the one-process stream (world x batch_size draws) gives rank r the draws
/// b·world·batch_size + r·batch_size + 0..batch_size, augmentation seeds included. The ranks'
/// batches together are that batch, in rank order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankShare {
    pub rank: usize,
    pub world: usize,
}

impl RankShare {
    /// One process: every draw.
    pub const WHOLE: RankShare = RankShare { rank: 0, world: 1 };

    /// The draw of the one-process stream that is this rank's `local`-th, for batches of
    /// `batch_size` a rank.
    pub fn draw(self, local: u64, batch_size: usize) -> u64 {
        let b = batch_size as u64;
        (local / b) * b * self.world as u64 + self.rank as u64 * b + local % b
    }
}

impl LoaderOptions {
    /// A loader of `domain` staffed as `[data]` says, drawing `batch_size` samples a batch in
    /// the order `seed` fixes, from the `start_at`-th on (a resumed run's), page-locked for CUDA.
    pub fn for_config(
        config: &crate::config::Config,
        domain: &'static str,
        batch_size: usize,
        seed: u64,
        start_at: u64,
        device: tch::Device,
    ) -> LoaderOptions {
        LoaderOptions {
            domain,
            batch_size,
            workers: config.data.workers,
            capacity: config.data.channel_capacity,
            seed,
            on_bad_sample: config.data.on_bad_sample,
            start_at,
            pinned: device.is_cuda(),
            share: RankShare::WHOLE,
        }
    }
}

/// A running loader; dropping it stops its threads.
pub struct Loader {
    pub batches: Receiver<Result<Batch, DataError>>,
    threads: Vec<JoinHandle<()>>,
}

impl Loader {
    pub fn spawn(source: Arc<SampleSource>, augment: &AugmentConfig, options: LoaderOptions) -> Loader {
        assert!(!source.is_empty(), "a loader needs at least one sample");
        let workers = options.workers.max(1);
        let mut threads = Vec::new();
        let mut worker_outputs = Vec::new();
        for w in 0..workers {
            let (tx, rx) = bounded::<(usize, Result<Augmented, DataError>)>(options.batch_size * 2);
            worker_outputs.push(rx);
            let (source, augment, seed) = (source.clone(), augment.clone(), options.seed);
            // `start_at` counts the job's draws; this rank has made its share of them.
            let (share, batch) = (options.share, options.batch_size);
            let start = options.start_at / share.world as u64;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("load-{}-{w}", options.domain))
                    .spawn(move || worker(&source, &augment, seed, start, w as u64, workers as u64, (share, batch), tx))
                    .expect("spawn loader worker"),
            );
        }
        let (tx, rx) = bounded(options.capacity);
        threads.push(
            std::thread::Builder::new()
                .name(format!("batch-{}", options.domain))
                .spawn(move || batcher(&source, worker_outputs, options, tx))
                .expect("spawn batcher"),
        );
        Loader { batches: rx, threads }
    }

    /// Stops the threads (they notice the closed channel) and waits for them.
    pub fn stop(self) {
        let Loader { batches, threads } = self;
        drop(batches);
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The sample order of one epoch: a permutation seeded by (seed, epoch).
pub fn epoch_order(epoch: u64, len: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    order
}

#[allow(clippy::too_many_arguments)]
fn worker(
    source: &SampleSource,
    augment: &AugmentConfig,
    seed: u64,
    start: u64,
    w: u64,
    workers: u64,
    (share, batch_size): (RankShare, usize),
    tx: Sender<(usize, Result<Augmented, DataError>)>,
) {
    let mut augmenter = Augmenter::new(augment);
    let len = source.len();
    let mut epoch_cache: Option<(u64, Vec<usize>)> = None;
    let mut local = start + w;
    loop {
        let k = share.draw(local, batch_size);
        let epoch = k / len as u64;
        if epoch_cache.as_ref().map(|c| c.0) != Some(epoch) {
            epoch_cache = Some((epoch, epoch_order(epoch, len, seed)));
        }
        let index = epoch_cache.as_ref().unwrap().1[(k % len as u64) as usize];
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ k);
        let result = source.load_augmented(index, &mut augmenter, &mut rng);
        if tx.send((index, result)).is_err() {
            return;
        }
        local += workers;
    }
}

fn batcher(
    source: &SampleSource,
    workers: Vec<Receiver<(usize, Result<Augmented, DataError>)>>,
    options: LoaderOptions,
    tx: Sender<Result<Batch, DataError>>,
) {
    let stage = telemetry::Stage::new(&format!("load_{}", options.domain));
    let mut next_worker = 0;
    let mut sequence = 0u64;
    let mut consecutive_failures = 0usize;
    loop {
        let mut samples = Vec::with_capacity(options.batch_size);
        while samples.len() < options.batch_size {
            let waited = Instant::now();
            let Ok((index, result)) = workers[next_worker].recv() else { return };
            stage.waited_input(waited.elapsed());
            next_worker = (next_worker + 1) % workers.len();
            match result {
                Ok(sample) => {
                    consecutive_failures = 0;
                    samples.push((index, sample));
                }
                Err(error) => {
                    telemetry::loader_error(options.domain, error.kind.as_str());
                    consecutive_failures += 1;
                    let give_up = consecutive_failures >= source.len();
                    if options.on_bad_sample == OnBadSample::Stop || give_up {
                        let error = if give_up {
                            DataError {
                                reason: format!(
                                    "every sample of the {} set failed; last: {}",
                                    options.domain, error.reason
                                ),
                                ..error
                            }
                        } else {
                            error
                        };
                        let _ = tx.send(Err(error));
                        return;
                    }
                    tracing::warn!(domain = options.domain, "skipping sample: {error}");
                }
            }
        }
        let started = Instant::now();
        let batch = collate(sequence, source, samples, options.pinned);
        stage.busy(started.elapsed());
        let waited = Instant::now();
        if tx.send(Ok(batch)).is_err() {
            return;
        }
        stage.waited_output(waited.elapsed());
        stage.item();
        sequence += 1;
    }
}

fn collate(sequence: u64, source: &SampleSource, samples: Vec<(usize, Augmented)>, pinned: bool) -> Batch {
    let b = samples.len() as i64;
    let (h, w) = (samples[0].1.geometry.crop_height as i64, samples[0].1.geometry.crop_width as i64);
    // Allocated where the batch will be read from (page-locked for a CUDA trainer) and filled
    // in place: one copy of each sample.
    let new = |size: &[i64]| {
        if pinned {
            crate::torch_ext::empty_pinned(size, Kind::Uint8)
        } else {
            Tensor::empty(size, (Kind::Uint8, Device::Cpu))
        }
    };
    let (mut images, mut labels) = (new(&[b, h, w, 3]), new(&[b, h, w]));
    // SAFETY: both tensors were just created here and are not shared yet.
    let (image_bytes, label_bytes) = unsafe {
        (crate::torch_ext::cpu_data_mut::<u8>(&mut images), crate::torch_ext::cpu_data_mut::<u8>(&mut labels))
    };
    let mut sample_indices = Vec::new();
    let mut ids = Vec::new();
    let mut geometries = Vec::new();
    let per_sample =
        image_bytes.chunks_exact_mut((h * w * 3) as usize).zip(label_bytes.chunks_exact_mut((h * w) as usize));
    for ((index, s), (image, label)) in samples.into_iter().zip(per_sample) {
        image.copy_from_slice(&s.image);
        label.copy_from_slice(&s.label);
        sample_indices.push(index);
        ids.push(source.id(index).to_string());
        geometries.push(s.geometry);
    }
    Batch { sequence, sample_indices, ids, geometries, images, labels }
}
