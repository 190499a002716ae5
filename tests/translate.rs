//! The translation stage (Algorithm 1, line 1): CycleGAN's networks and Adam against PyTorch
//! with the same weights (tests/reference/cyclegan.py), FDA's spectrum swap, and
//! `adamcu translate` as users run it: a kill and `--continue`, a corrupt frame, the stamp.

mod common;

use adamcu::config::{Config, FdaWindow, TranslateConfig, TranslateMethod};
use adamcu::model::weights;
use adamcu::translate::cyclegan::CycleGan;
use adamcu::translate::fda;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

fn read(path: &Path) -> HashMap<String, Tensor> {
    weights::read_state_dict(path).unwrap().into_iter().collect()
}

/// Same size, and the largest difference within `tolerance` of the reference's largest value.
fn assert_close(ours: &Tensor, theirs: &Tensor, tolerance: f64, what: &str) {
    assert_eq!(ours.size(), theirs.size(), "{what}: size");
    let scale = theirs.abs().max().double_value(&[]);
    let diff = (ours - theirs).abs().max().double_value(&[]);
    assert!(scale > 0.0 && diff <= tolerance * scale, "{what}: differs by {diff} (largest value {scale})");
}

/// Copies a reference state_dict into the CycleGAN's variables under `prefix`; every variable
/// there must be matched, by name and shape.
fn load_into(gan: &CycleGan, prefix: &str, state: &HashMap<String, Tensor>) {
    let ours: Vec<(String, Tensor)> = gan.vs.variables().into_iter().filter(|(n, _)| n.starts_with(prefix)).collect();
    assert_eq!(ours.len(), state.len(), "{prefix}: variables against the reference's state_dict");
    for (name, mut var) in ours {
        let key = name.strip_prefix(prefix).unwrap();
        let theirs = state.get(key).unwrap_or_else(|| panic!("the reference has no {key}"));
        assert_eq!(var.size(), theirs.size(), "{key}: shape");
        tch::no_grad(|| var.copy_(theirs));
    }
}

#[test]
fn the_cyclegan_networks_and_adam_compute_what_pytorch_computes_with_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(python())
        .args(["tests/reference/cyclegan.py", dir.path().to_str().unwrap(), "--ngf", "8", "--blocks", "2"])
        .args(["--ndf", "8", "--layers", "3"])
        .output()
        .expect("run the Python reference (set ADAMCU_PYTHON to a Python with torch)");
    assert!(out.status.success(), "tests/reference/cyclegan.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let config = TranslateConfig {
        generator_width: 8,
        generator_blocks: 2,
        discriminator_width: 8,
        discriminator_layers: 3,
        beta1: 0.5,
        ..TranslateConfig::default()
    };
    let gan = CycleGan::new(&config, Device::Cpu);
    load_into(&gan, "netG_A.", &read(&dir.path().join("generator.pth")));
    let outputs = read(&dir.path().join("outputs.pth"));
    let input = &outputs["input"];
    // 36x52: not multiples of 4 either way would be padded; 36 and 52 are, as in the reference.
    assert_close(&gan.translate(input), &outputs["generated"], 1e-5, "generator output");

    // The discriminator: through a second CycleGAN's D_A, loaded from the reference.
    load_into(&gan, "netD_A.", &read(&dir.path().join("discriminator.pth")));
    let scores = tch::no_grad(|| gan.discriminator_a().forward(input));
    assert_close(&scores, &outputs["scores"], 1e-5, "PatchGAN scores");

    // Two Adam steps on mean(G(x)^2): the same weights after them.
    let mut adam = adamcu::train::optimizer::Adam::new(
        gan.vs.variables().into_iter().filter(|(n, _)| n.starts_with("netG_A.")).collect(),
        (0.5, 0.999),
    );
    for _ in 0..2 {
        adam.zero_grad();
        gan.g_a.forward(input).square().mean(Kind::Float).backward();
        adam.update(2e-4);
    }
    let after = read(&dir.path().join("adam.pth"));
    for (name, var) in gan.vs.variables().into_iter().filter(|(n, _)| n.starts_with("netG_A.")) {
        let key = name.strip_prefix("netG_A.").unwrap();
        // Adam moves each weight by about lr: the difference is held to 1e-4 of a step.
        let diff = (&var - &after[key]).abs().max().double_value(&[]);
        assert!(diff <= 2e-8, "{key} after two Adam steps differs from torch.optim.Adam by {diff}");
    }
}

#[test]
fn fda_swaps_the_low_frequency_amplitudes_and_keeps_the_phase() {
    // The paper's window (beta H, beta W) and the authors' code's (beta min(H, W) on both axes).
    assert_eq!(fda::window(0.01, 512, 1024, FdaWindow::PerSide), (5, 10));
    assert_eq!(fda::window(0.01, 512, 1024, FdaWindow::Square), (5, 5));
    tch::manual_seed(0);
    let source = Tensor::rand([1, 3, 32, 48], (Kind::Float, Device::Cpu));
    let target = Tensor::rand([1, 3, 32, 48], (Kind::Float, Device::Cpu)) * 0.5 + 0.4;
    // A source with its own amplitudes is itself.
    assert_close(
        &fda::transfer(&source, &source, 0.1, FdaWindow::PerSide),
        &source,
        1e-5,
        "FDA of an image with itself",
    );
    let out = fda::transfer(&source, &target, 0.1, FdaWindow::PerSide);
    // The DC term is in the window: the result has the target's per-channel mean.
    let mean = |t: &Tensor| t.mean_dim([2, 3].as_slice(), false, Kind::Float);
    assert_close(&mean(&out), &mean(&target), 1e-5, "per-channel mean after FDA");
    // Inside the window the amplitudes are the target's, outside the source's; the phase is the source's.
    let spectrum = |t: &Tensor| t.fft_rfft2(None::<&[i64]>, [-2, -1], "backward");
    let (o, s, t) = (spectrum(&out), spectrum(&source), spectrum(&target));
    let (bh, bw) = fda::window(0.1, 32, 48, FdaWindow::PerSide);
    assert_eq!((bh, bw), (3, 4));
    let amplitude_rows =
        |x: &Tensor, first: i64, rows: i64, cols: (i64, i64)| x.abs().narrow(2, first, rows).narrow(3, cols.0, cols.1);
    for (first, rows) in [(0, bh + 1), (32 - bh, bh)] {
        let window = (0, bw + 1);
        assert_close(
            &amplitude_rows(&o, first, rows, window),
            &amplitude_rows(&t, first, rows, window),
            1e-4,
            "window",
        );
        let right = (bw + 1, 25 - bw - 1);
        assert_close(
            &amplitude_rows(&o, first, rows, right),
            &amplitude_rows(&s, first, rows, right),
            1e-4,
            "beside it",
        );
    }
    let middle = |x: &Tensor| x.abs().narrow(2, bh + 1, 32 - 2 * bh - 1);
    assert_close(&middle(&o), &middle(&s), 1e-4, "outside the window");
    let phase_gap = (o.angle() - s.angle()).remainder(2.0 * std::f64::consts::PI);
    let wrapped = phase_gap.minimum(&(2.0 * std::f64::consts::PI - &phase_gap));
    assert!(
        wrapped.narrow(2, bh + 1, 32 - 2 * bh - 1).max().double_value(&[]) < 1e-3,
        "phase changed outside the window"
    );
}

/// A tiny benchmark in the real layouts (GTA5 source, Cityscapes target) and a config that
/// translates it with a small CycleGAN.
fn tiny_benchmark(root: &Path, method: &str) -> PathBuf {
    let config = format!(
        r#"
[run]
name = "tr"
runs_dir = "{root}/runs"
device = "cpu"
threads = 1
[metrics]
listen = ""
[data.source]
kind = "translated"
root = "{root}/translated"
labels_kind = "gta5"
labels_root = "{root}/gta5"
[data.target]
kind = "cityscapes"
root = "{root}/cityscapes"
split = "train"
[translate]
method = "{method}"
generator_width = 4
generator_blocks = 1
discriminator_width = 4
discriminator_layers = 2
load_size = [0, 0]
crop = [16, 32]
epochs = 20
epochs_decay = 20
checkpoint_every = 40
"#,
        root = root.display()
    );
    for i in 1..=6u32 {
        let name = format!("{i:05}.png");
        write_rgb(&root.join("gta5/images").join(&name), 48, 24, |x, y| [(x * 5) as u8, (y * 9) as u8, (30 * i) as u8]);
        write_label8(&root.join("gta5/labels").join(&name), 48, 24, stripes);
    }
    cityscapes(&root.join("cityscapes"), "train", 4, 48, 24);
    let path = root.join("tr.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn adamcu(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_adamcu"));
    c.args(args);
    c
}

fn translated_bytes(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(root.join("translated"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn a_translation_killed_with_sigkill_goes_on_with_continue_to_the_same_images_as_an_uninterrupted_one() {
    let whole = tempfile::tempdir().unwrap();
    let config = tiny_benchmark(whole.path(), "cyclegan");
    let out = adamcu(&["translate", "--config", config.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "translate failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let uninterrupted = translated_bytes(whole.path());
    assert_eq!(uninterrupted.len(), 6);

    let killed = tempfile::tempdir().unwrap();
    let config = tiny_benchmark(killed.path(), "cyclegan");
    let mut child = adamcu(&["translate", "--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = killed.path().join("runs/tr/translate");
    let first = checkpoints.join("step-00000040.safetensors");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !first.exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint within 120 s");
        assert!(child.try_wait().unwrap().is_none(), "translate exited before its first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.path().join("translated").join(adamcu::translate::STAMP).exists(), "killed before the write-out");
    let out = adamcu(&["translate", "--config", config.to_str().unwrap(), "--continue"]).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "translate --continue failed:\n{log}");
    assert!(log.contains("going on from"), "--continue did not resume from a checkpoint:\n{log}");
    assert_eq!(
        translated_bytes(killed.path()),
        uninterrupted,
        "resumed translation differs from the uninterrupted one"
    );
}

#[test]
fn a_corrupt_source_frame_is_named_and_skipped_and_the_stamp_makes_a_second_run_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_benchmark(dir.path(), "fda");
    let bad = dir.path().join("gta5/images/00003.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let out = adamcu(&["translate", "--config", path.to_str().unwrap()]).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "translate failed:\n{log}");
    assert!(log.contains("00003.png") && log.contains("skipped"), "the corrupt frame is not named:\n{log}");
    assert!(!log.contains('\x1b'), "a log to a pipe carries colour codes:\n{log}");
    let names: Vec<String> = translated_bytes(dir.path()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["00001.png", "00002.png", "00004.png", "00005.png", "00006.png"]);
    // The translated reader pairs the rest with their own labels and reports the missing frame.
    let config = Config::load_with_overrides(&path, &[]).unwrap();
    let listing = adamcu::data::datasets::list(config.data.source.as_ref().unwrap()).unwrap();
    assert_eq!(listing.samples.len(), 5);
    assert!(listing.samples.iter().all(|s| s.image.file_name() == s.label.file_name()));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("translated").join(adamcu::translate::STAMP)).unwrap())
            .unwrap();
    assert_eq!(report["written"], 5);
    assert!(report["skipped"][0].as_str().unwrap().contains("00003.png"));

    // Current: ensure() does nothing; another beta makes it stale.
    assert!(adamcu::translate::ensure(&config, Device::Cpu).unwrap().is_none());
    let changed = Config { translate: TranslateConfig { fda_beta: 0.2, ..config.translate.clone() }, ..config.clone() };
    assert_eq!(changed.translate.method, TranslateMethod::Fda);
    let report = adamcu::translate::ensure(&changed, Device::Cpu).unwrap().expect("stale: translated again");
    assert_eq!(report.written, 5);
}

#[test]
fn colour_codes_only_on_a_terminal_and_never_with_no_color() {
    // `script` (util-linux) gives the command a terminal; its typescript is the terminal's output.
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_benchmark(dir.path(), "fda");
    let on_terminal = |no_color: bool| {
        let command = format!("{} translate --config {}", env!("CARGO_BIN_EXE_adamcu"), path.display());
        let mut c = Command::new("script");
        c.args(["-qec", &command, "/dev/null"]);
        if no_color {
            c.env("NO_COLOR", "1");
        } else {
            c.env_remove("NO_COLOR");
        }
        let out = c.output().expect("util-linux's script");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_terminal(false);
    assert!(coloured.contains("\x1b[") && coloured.contains("translated 6 images"), "{coloured}");
    let plain = on_terminal(true);
    assert!(plain.contains("translated 6 images"), "{plain}");
    // Without colour, the only escapes left are the progress bar's cursor moves, never SGR colours.
    assert!(!plain.contains("\x1b[32m") && !plain.contains("\x1b[2m"), "NO_COLOR still colours:\n{plain}");
}

/// Bytes of a `width` x `height` RGB image from `f`.
fn rgb_of(width: u32, height: u32, f: impl Fn(u32, u32, usize) -> u8) -> adamcu::data::datasets::Rgb {
    let pixels = (0..height)
        .flat_map(|y| (0..width).flat_map(move |x| (0..3).map(move |c| (x, y, c))))
        .map(|(x, y, c)| f(x, y, c))
        .collect();
    adamcu::data::datasets::Rgb { width, height, pixels }
}

/// Per-channel means of an RGB byte image.
fn channel_means(rgb: &adamcu::data::datasets::Rgb) -> [f64; 3] {
    let n = (rgb.pixels.len() / 3) as f64;
    [0, 1, 2].map(|c| rgb.pixels.iter().skip(c).step_by(3).map(|&v| v as f64).sum::<f64>() / n)
}

#[test]
fn the_loader_threads_fda_on_rustfft_computes_what_the_libtorch_fda_computes() {
    use adamcu::data::fda::Swap;
    let mut rng = 7u64;
    let mut noise = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng as u8
    };
    // Odd and even sizes, both windows; a textured dark source against a brighter target.
    for (width, height, beta, shape) in
        [(48, 24, 0.1, FdaWindow::PerSide), (33, 25, 0.15, FdaWindow::Square), (64, 32, 0.05, FdaWindow::PerSide)]
    {
        let dark: Vec<u8> = (0..width * height * 3).map(|_| noise() / 4).collect();
        let bright: Vec<u8> = (0..width * height * 3).map(|_| 128 + noise() / 3).collect();
        let source =
            rgb_of(width, height, |x, y, c| dark[((y * width + x) * 3) as usize + c].wrapping_add((x + y) as u8));
        let target = rgb_of(width, height, |x, y, c| bright[((y * width + x) * 3) as usize + c]);
        let swap = Swap::new(height, width, beta, shape);
        let ours = swap.apply(&source, &swap.target_amplitudes(&target));
        let tensor = |rgb: &adamcu::data::datasets::Rgb| {
            Tensor::from_slice(&rgb.pixels)
                .view([1, height as i64, width as i64, 3])
                .permute([0, 3, 1, 2])
                .to_kind(Kind::Float)
        };
        let theirs = fda::transfer(&tensor(&source), &tensor(&target), beta, shape)
            .round()
            .clamp(0.0, 255.0)
            .permute([0, 2, 3, 1])
            .contiguous()
            .to_kind(Kind::Uint8);
        let ours_t = Tensor::from_slice(&ours.pixels).view([1, height as i64, width as i64, 3]);
        let diff = (ours_t.to_kind(Kind::Int) - theirs.to_kind(Kind::Int)).abs();
        let (largest, differing) =
            (diff.max().int64_value(&[]), diff.gt(0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]));
        let what = format!("{width}x{height}, beta {beta}, {shape:?}");
        // Float rounding may move a value across .5: at most 1 apart, and rarely.
        assert!(
            largest <= 1 && differing < 0.02,
            "{what}: rustfft and libtorch differ by up to {largest} ({differing})"
        );
        // The DC term is swapped on 0-255 values: the dark source takes the bright target's means.
        let (got, wanted) = (channel_means(&ours), channel_means(&target));
        for c in 0..3 {
            assert!(
                (got[c] - wanted[c]).abs() < 1.0,
                "{what}: channel {c} mean {} against the target's {}",
                got[c],
                wanted[c]
            );
        }
        // An image with its own amplitudes is itself.
        assert_eq!(
            swap.apply(&target, &swap.target_amplitudes(&target)).pixels,
            target.pixels,
            "{what}: FDA with itself"
        );
    }
}

#[test]
fn online_fda_restyles_in_the_loader_deterministically_for_a_seed_and_writes_nothing() {
    use adamcu::data::loader::{Loader, LoaderOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_benchmark(dir.path(), "fda");
    // Four target images of their own colours, so the draw shows in the result.
    for i in 1..=4u32 {
        let file = dir.path().join(format!("cityscapes/leftImg8bit/train/aachen/aachen_000000_{i:06}_leftImg8bit.png"));
        write_rgb(&file, 48, 24, |x, y| [(50 * i) as u8, (x * 4) as u8, (200 - 40 * i + y) as u8]);
    }
    let config =
        Config::load_with_overrides(&path, &["translate.fda_mode=\"online\"".into(), "augment.crop=[16, 32]".into()])
            .unwrap();
    // Nothing to write: no plan, `adamcu translate` says why, and data.source.root is never made.
    assert!(adamcu::translate::Plan::for_config(&config).unwrap().is_none());
    let out = adamcu(&["translate", "--config", path.to_str().unwrap(), "--set", "translate.fda_mode=\"online\""])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fda_mode = \"online\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = adamcu::train::open_source(&config).unwrap();
    assert!(!dir.path().join("translated").exists());
    assert_eq!(source.len(), 6);
    let raw = adamcu::train::open_set(&config.data.original_source(), "original", 19).unwrap();
    let target_means: Vec<[f64; 3]> =
        (1..=4u32).map(|i| [(50 * i) as f64, 4.0 * 23.5, (200 - 40 * i) as f64 + 11.5]).collect();
    for i in 0..6 {
        let ((restyled, label), (original, raw_label)) = (source.load_full(i).unwrap(), raw.load_full(i).unwrap());
        assert_eq!(label.ids, raw_label.ids, "labels are untouched");
        assert_ne!(restyled.pixels, original.pixels);
        // It took one target's means (the DC term; the clamp to 0-255 moves them a little):
        // which one, the draw decided. The targets' red means are 50 apart.
        let means = channel_means(&restyled);
        assert!(
            target_means.iter().any(|t| (0..3).all(|c| (means[c] - t[c]).abs() < 12.0)),
            "image {i}: means {means:?} are no target's"
        );
    }
    let batches = |seed: u64| {
        let options = LoaderOptions {
            domain: "source",
            batch_size: 3,
            workers: 2,
            capacity: 2,
            seed,
            on_bad_sample: adamcu::config::OnBadSample::Stop,
            start_at: 0,
            pinned: false,
            share: adamcu::data::loader::RankShare::WHOLE,
        };
        let loader = Loader::spawn(source.clone(), &config.augment_for(config.data.source.as_ref().unwrap()), options);
        let out: Vec<(Vec<usize>, Tensor)> = (0..6)
            .map(|_| {
                let b = loader.batches.recv().unwrap().unwrap();
                (b.sample_indices, b.images)
            })
            .collect();
        loader.stop();
        out
    };
    let (first, again, other) = (batches(3), batches(3), batches(4));
    for ((ia, a), (ib, b)) in first.iter().zip(&again) {
        assert_eq!(ia, ib);
        assert!(a.equal(b), "the same seed restyles the same way");
    }
    assert!(first.iter().zip(&other).any(|((_, a), (_, b))| !a.equal(b)), "another seed, other draws");
    // Other draws of one image (other epochs) meet other targets.
    use adamcu::data::source::Restyle;
    let fda = adamcu::data::fda::OnlineFda::new(
        (1..=4u32)
            .map(|i| {
                dir.path().join(format!("cityscapes/leftImg8bit/train/aachen/aachen_000000_{i:06}_leftImg8bit.png"))
            })
            .collect(),
        &config.translate,
    );
    let original = raw.load_full(0).unwrap().0;
    let mut reds: Vec<i64> =
        (0..16).map(|draw| channel_means(&fda.restyle(&original, draw).unwrap())[0].round() as i64).collect();
    reds.sort();
    reds.dedup();
    assert!(reds.len() >= 3, "16 draws met only the targets of red means {reds:?}");
}
