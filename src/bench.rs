//! `adamcu bench loader`: our loader's per-core throughput on the PNG path and the shard path,
//! side by side with the PIL/PyTorch reference (`bench/reference/loader_bench.py`) on the same
//! files in the same run.

use crate::config::{AugmentConfig, DatasetConfig, DatasetKind};
use crate::data::augment::Augmenter;
use crate::data::normalise::Normaliser;
use crate::data::source::SampleSource;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

pub struct LoaderBenchOptions {
    pub dir: PathBuf,
    pub images: usize,
    pub python: PathBuf,
    pub reference: PathBuf,
}

/// Images per second of one thread over every sample, median of three passes. With
/// `normalise`, each sample is also turned into the network's float input on the CPU (what a
/// CPU run does; on CUDA that step runs on the device).
fn images_per_second(source: &SampleSource, augment: &AugmentConfig, normalise: bool) -> Result<f64> {
    let mut augmenter = Augmenter::new(augment);
    let normaliser = Normaliser::new(augment, tch::Device::Cpu);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut rates = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        for i in 0..source.len() {
            let sample = source.load_augmented(i, &mut augmenter, &mut rng)?;
            if normalise {
                let g = sample.geometry;
                let bytes = tch::Tensor::from_slice(&sample.image)
                    .view([1, g.crop_height as i64, g.crop_width as i64, 3]);
                let _ = std::hint::black_box(normaliser.to_input(&bytes));
            }
            std::hint::black_box(sample);
        }
        rates.push(source.len() as f64 / started.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[1])
}

fn run_reference(options: &LoaderBenchOptions, make: bool) -> Result<f64> {
    let mut cmd = Command::new(&options.python);
    cmd.arg(&options.reference).arg("--dir").arg(&options.dir);
    if make {
        cmd.args(["--make", &options.images.to_string(), "--size", "1280x720"]);
    }
    let out = cmd.output().with_context(|| format!("running {}", options.python.display()))?;
    if !out.status.success() {
        bail!("reference loader failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("reference printed {line:?}, expected one JSON line"))?;
    json["images_per_s"].as_f64().context("reference JSON lacks images_per_s")
}

pub fn loader(options: &LoaderBenchOptions) -> Result<()> {
    // One core each: the reference pins torch to one thread and runs one process.
    tch::set_num_threads(1);
    let have_frames = options.dir.join("images").is_dir()
        && std::fs::read_dir(options.dir.join("images"))?.count() >= options.images;
    let reference = run_reference(options, !have_frames)?;

    let set = DatasetConfig::at(DatasetKind::Gta5, options.dir.clone());
    let augment = AugmentConfig { resize: [0, 0], crop: [512, 1024], scale: [0.5, 1.5], flip: true,
        ..AugmentConfig::default() };
    let files = SampleSource::open(&set, 19).map_err(anyhow::Error::msg)?;
    let png = images_per_second(&files, &augment, true)?;

    let shard_path = options.dir.join("bench.shard");
    crate::data::pack::pack(&files, &shard_path, 19, None)?;
    let shard_set = DatasetConfig { kind: DatasetKind::Shard, root: shard_path, ..set };
    let shard_source = SampleSource::open(&shard_set, 19).map_err(anyhow::Error::msg)?;
    let shard_loader_only = images_per_second(&shard_source, &augment, false)?;
    let shard = images_per_second(&shard_source, &augment, true)?;

    println!("loader benchmark: {} GTA5-layout 1280x720 frames in {}, random scale 0.5-1.5, \
        512x1024 crop, flip, normalise; one core each", files.len(), options.dir.display());
    println!("{:<28} {:>14} {:>10} {:>13}", "path", "images/s/core", "ms/image", "vs reference");
    for (name, rate) in [("reference (PIL + torch)", reference), ("adamcu PNG", png), ("adamcu shard", shard),
        ("adamcu shard, loader only", shard_loader_only)] {
        println!("{name:<28} {rate:>14.1} {:>10.2} {:>12.2}x", 1e3 / rate, rate / reference);
    }
    println!("(every row but the last includes normalising to float on the CPU, as the reference does; \
        \"loader only\" is the loader thread's share when normalisation runs on the GPU)");
    println!("targets: PNG >= 3x, shard >= 20x the reference");
    Ok(())
}
