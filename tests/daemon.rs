//! The daemon: kill -9 and resume without losing or double-charging a label, SIGTERM, the
//! run lock, backpressure, loader errors as metrics, the checkpoint writer.

mod common;

use adamcu::active::ledger::Ledger;
use adamcu::config::Named;
use adamcu::pipeline::writer::CheckpointWriter;
use adamcu::train::ada::AdaRun;
use adamcu::train::checkpoint::{Checkpoint, Rotation};
use adamcu::train::Trainer;
use common::*;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn daemon(config: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["train", "--config"])
        .arg(config)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ledger_bits(run_dir: &Path) -> Vec<u8> {
    std::fs::read(run_dir.join("ledger.bin")).unwrap()
}

#[test]
fn kill_9_at_random_points_then_resume_loses_nothing_and_matches_an_uninterrupted_run() {
    kill_9_then_resume_matches_an_uninterrupted_run(120, |_| {});
}

#[test]
fn kill_9_during_a_ripu_run_then_resume_ends_with_the_uninterrupted_runs_ledger() {
    // Rounds at 0, 20 and 40 of 60 steps: kills fall before, between and after them.
    kill_9_then_resume_matches_an_uninterrupted_run(60, |c| {
        c.active.strategy = adamcu::config::Strategy::Ripu;
        c.active.rounds = vec![0, 20, 40];
    });
}

/// Kills a daemon with SIGKILL at random points (up to three times) and resumes it each time;
/// every checkpoint left behind loads, the ledger never passes Me, and the run ends with the
/// ledger of an uninterrupted run with the same source checkpoint.
fn kill_9_then_resume_matches_an_uninterrupted_run(iterations: usize, setup: impl Fn(&mut adamcu::config::Config)) {
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str| {
        let mut c = tiny_daemon_config(dir.path(), name, iterations);
        setup(&mut c);
        c
    };
    // One source checkpoint for both runs, so they differ only by the kills.
    let reference = config("uninterrupted");
    let reference_path = write_config(dir.path(), &reference);
    let (ok, log) = finish(daemon(&reference_path, &[]));
    assert!(ok, "{log}");
    let source = reference.run_dir().join("source.safetensors");

    let killed = config("killed");
    let killed_path = write_config(dir.path(), &killed);
    let init = source.to_str().unwrap().to_string();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut kills = 0;
    loop {
        // The one command a supervisor repeats after every crash: a new run the first time,
        // a resume from then on.
        let mut child = daemon(&killed_path, &["--continue", "--init", &init]);
        // The random delay counts from the first checkpoint (a fresh run writes one at step 0).
        let checkpoints = killed.run_dir().join("checkpoints");
        while std::fs::read_dir(&checkpoints).map_or(true, |d| d.count() == 0) && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let deadline = Instant::now() + Duration::from_millis(rng.gen_range(200..1500));
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().unwrap().is_some() || kills == 3 {
            let (ok, log) = finish(child);
            assert!(ok, "{log}");
            if log.contains("finished")
                || adamcu::pipeline::status::Status::read(&killed.run_dir()).unwrap().state == "finished"
            {
                break;
            }
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        // Every checkpoint left behind loads; the ledger never passes the budget and each
        // charge is one distinct pixel.
        let rotation = Rotation { dir: killed.run_dir().join("checkpoints"), keep: 2 };
        for step in rotation.steps() {
            let mut trainer = adamcu::train::Trainer::new(&killed).unwrap();
            trainer.load(&rotation.path_for(step, "safetensors")).expect("checkpoint loads");
            assert!(rotation.path_for(step, "ledger").exists(), "checkpoint {step} has its ledger snapshot");
        }
        let trainer = adamcu::train::Trainer::new(&killed).unwrap();
        let ledger = trainer.open_ledger(&killed.run_dir().join("ledger.bin")).unwrap();
        let bits: u64 = (0..ledger.images().len()).map(|i| ledger.bought_in(i)).sum();
        assert_eq!(bits, ledger.charged());
        assert!(ledger.charged() <= ledger.budget());
    }
    assert!(kills >= 1, "the run was never interrupted");
    // The same pixels were bought as in the uninterrupted run.
    assert!(
        ledger_bits(&killed.run_dir()) == ledger_bits(&reference.run_dir()),
        "ledgers differ after {kills} kill(s) and resumes"
    );
    let trainer = adamcu::train::Trainer::new(&killed).unwrap();
    let images = trainer.open_ledger(&killed.run_dir().join("ledger.bin")).unwrap();
    let ledger =
        Ledger::open_or_create(&killed.run_dir().join("ledger.bin"), images.images(), images.budget()).unwrap();
    assert_eq!(ledger.charged(), ledger.budget(), "the whole budget was spent");
}

#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_exits_0_and_the_lock_stops_a_second_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_daemon_config(dir.path(), "term", 100_000);
    config.train.eval_every = 5;
    let path = write_config(dir.path(), &config);
    // What a kill in the middle of a checkpoint write leaves (of a step this run never
    // checkpoints, so no write of its own replaces it): removed when a daemon starts.
    let unfinished = config.run_dir().join("checkpoints/.step-00000003.ledger.tmp");
    std::fs::create_dir_all(unfinished.parent().unwrap()).unwrap();
    std::fs::write(&unfinished, b"half a snapshot").unwrap();
    // What a kill before the first step leaves: a ledger with nothing bought, no checkpoint.
    // A new run takes it over.
    let trainer = adamcu::train::Trainer::new(&config).unwrap();
    drop(trainer.open_ledger(&config.run_dir().join("ledger.bin")).unwrap());
    let child = daemon(&path, &[]);
    let status = config.run_dir().join("status.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !status.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // A second daemon on the same run directory is refused.
    let (ok, log) = finish(daemon(&path, &["--resume"]));
    assert!(!ok && log.contains("another daemon"), "{log}");

    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let started = Instant::now();
    let (ok, log) = finish(child);
    assert!(ok, "exit 0 on SIGTERM: {log}");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded shutdown time");
    let s = adamcu::pipeline::status::Status::read(&config.run_dir()).unwrap();
    assert_eq!(s.state, "stopped");
    assert!(
        s.last_eval.is_some_and(|e| e.step > 0 && e.step % 5 == 0),
        "the last periodic evaluation: {:?}",
        s.last_eval
    );
    let rotation = Rotation { dir: config.run_dir().join("checkpoints"), keep: 2 };
    assert_eq!(rotation.latest(), Some(s.step), "the final checkpoint is at the step it stopped");
    assert!(rotation.steps().len() <= 2, "only the last N are kept");
    assert!(!unfinished.exists(), "the interrupted write's temporary file was removed");
    // `adamcu status` reads it.
    let out = Command::new(env!("CARGO_BIN_EXE_adamcu")).arg("status").arg(config.run_dir()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stopped") && text.contains("bottleneck:") && text.contains("it/s"), "{text}");
    // The free space it reports is what df shows for that file system (other tests write
    // meanwhile: within 1% and 256 MiB).
    let df = Command::new("df").args(["--output=avail", "-B1"]).arg(config.run_dir()).output().unwrap();
    let available: u64 = String::from_utf8_lossy(&df.stdout).lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(
        s.disk_free_bytes.abs_diff(available) < available / 100 + (256 << 20),
        "status says {} bytes free, df {available}",
        s.disk_free_bytes
    );
    assert!(text.contains(" free"), "{text}");
    // And a fresh start on it is refused instead of silently mixing runs.
    let (ok, log) = finish(daemon(&path, &[]));
    assert!(!ok && log.contains("--resume"), "{log}");
}

#[test]
fn a_slow_consumer_makes_the_loader_block_with_a_bounded_queue() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_daemon_config(dir.path(), "slow", 1);
    let source = adamcu::train::open_set(&config.data.source, "s", 19).unwrap();
    let capacity = 3;
    let loader = adamcu::data::loader::Loader::spawn(
        source,
        &config.augment,
        adamcu::data::loader::LoaderOptions {
            domain: "source",
            batch_size: 2,
            workers: 2,
            capacity,
            seed: 0,
            on_bad_sample: adamcu::config::OnBadSample::Stop,
            start_at: 0,
            pinned: false,
            share: adamcu::data::loader::RankShare::WHOLE,
        },
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(loader.batches.len(), capacity, "the channel fills to its capacity and no further");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(loader.batches.len(), capacity, "the producer is blocked, nothing queued beyond the bound");
    let first = loader.batches.recv().unwrap().unwrap();
    assert_eq!(first.sequence, 0, "nothing was dropped");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(loader.batches.len(), capacity, "one taken, one produced");
    let sequences: Vec<u64> = (0..capacity).map(|_| loader.batches.recv().unwrap().unwrap().sequence).collect();
    assert_eq!(sequences, [1, 2, 3]);
    loader.stop();
}

#[test]
fn loader_errors_show_up_as_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_daemon_config(dir.path(), "errors", 100_000);
    let port = free_port();
    config.metrics.listen = format!("127.0.0.1:{port}");
    std::fs::write(dir.path().join("data/source/images/00002.png"), b"not a png").unwrap();
    let path = write_config(dir.path(), &config);
    let child = daemon(&path, &[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut found = String::new();
    while Instant::now() < deadline {
        if let Some(body) =
            ureq::get(&format!("http://127.0.0.1:{port}/metrics")).call().ok().and_then(|r| r.into_string().ok())
        {
            if let Some(line) =
                body.lines().find(|l| l.starts_with("adamcu_loader_errors_total{") && l.contains("corrupt"))
            {
                found = line.to_string();
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let (ok, log) = finish(child);
    assert!(ok, "{log}");
    assert!(found.contains("domain=\"source\""), "no loader error metric: {found:?}");
    assert!(log.contains("skipping sample") && log.contains("00002.png"), "the skip is logged with its path");
}

/// A tiny run's ADA-MCU stage, started from random weights, for the checkpoint writer's tests.
fn ada_run(dir: &Path, name: &str) -> (adamcu::config::Config, Trainer, AdaRun) {
    let config = tiny_daemon_config(dir, name, 1000);
    let trainer = Trainer::new(&config).unwrap();
    let state = trainer.new_ada_state(trainer.open_ledger(&config.run_dir().join("ledger.bin")).unwrap());
    let run = AdaRun::start(&trainer, state, None, 1000).unwrap();
    (config, trainer, run)
}

#[test]
fn a_checkpoint_written_while_training_goes_on_holds_the_state_of_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let (config, trainer, mut run) = ada_run(dir.path(), "writer");
    for _ in 0..3 {
        run.step(&trainer).unwrap();
    }
    let captured = run.capture_checkpoint(&trainer);
    let weights: Vec<(String, tch::Tensor)> = trainer.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let charged = run.state.ledger.charged();
    // Training goes on: weights, momentum and the ledger change in place before the write.
    for _ in 0..3 {
        run.step(&trainer).unwrap();
    }
    assert!(weights.iter().any(|(n, t)| !t.equal(&trainer.vs.variables()[n])), "the weights changed");
    assert!(run.state.ledger.charged() > charged, "labels were bought after the capture");
    let rotation = Rotation { dir: config.run_dir().join("checkpoints"), keep: 2 };
    let mut writer = CheckpointWriter::start(rotation.clone()).unwrap();
    writer.submit(captured).unwrap();
    writer.finish().unwrap();

    let mut fresh = Trainer::new(&config).unwrap();
    let loaded = fresh.load(&rotation.path_for(3, "safetensors")).unwrap();
    assert_eq!(loaded.meta["step"], 3);
    for (name, t) in &weights {
        assert!(t.equal(&fresh.vs.variables()[name]), "{name} is not its value at step 3");
    }
    // The snapshot is the ledger of step 3: resumed from it, the later purchases are pending.
    let (images, budget) = (run.state.ledger.images().to_vec(), run.state.ledger.budget());
    let resumed =
        Ledger::open_resumed(&config.run_dir().join("ledger.bin"), &images, budget, &rotation.path_for(3, "ledger"))
            .unwrap();
    assert_eq!(resumed.spent(), charged);
    assert_eq!(loaded.meta["charged"], charged);
}

#[test]
fn a_failed_checkpoint_write_comes_back_to_the_trainer_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_, trainer, mut run) = ada_run(dir.path(), "unwritable");
    // The checkpoint folder cannot be made: a file stands where a folder would be.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, b"").unwrap();
    let rotation = Rotation { dir: blocked.join("checkpoints"), keep: 2 };
    let mut writer = CheckpointWriter::start(rotation.clone()).unwrap();
    writer.submit(run.capture_checkpoint(&trainer)).unwrap();
    let error = writer.submit(run.capture_checkpoint(&trainer)).unwrap_err();
    assert!(format!("{error:#}").contains("writing the checkpoint of step 0"), "{error:#}");
    let mut writer = CheckpointWriter::start(rotation).unwrap();
    writer.submit(run.capture_checkpoint(&trainer)).unwrap();
    let error = writer.finish().unwrap_err();
    assert!(format!("{error:#}").contains("writing the checkpoint of step 0"), "{error:#}");
}

#[test]
fn a_ledger_unchanged_since_the_last_checkpoint_is_not_copied_again() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (config, trainer, mut run) = ada_run(dir.path(), "unchanged");
    let rotation = Rotation { dir: config.run_dir().join("checkpoints"), keep: 3 };
    let inode = |step: u64| std::fs::metadata(rotation.path_for(step, "ledger")).unwrap().ino();
    run.step(&trainer).unwrap();
    run.capture_checkpoint(&trainer).write(&rotation).unwrap();
    // Nothing bought in between (here: no step): the same file under the new name.
    run.step = 2;
    run.capture_checkpoint(&trainer).write(&rotation).unwrap();
    assert_eq!(inode(2), inode(1));
    // A step that buys labels: a fresh copy, holding exactly the ledger as it is.
    let charged = run.state.ledger.charged();
    run.step(&trainer).unwrap();
    assert!(run.state.ledger.charged() > charged, "the step bought labels");
    run.capture_checkpoint(&trainer).write(&rotation).unwrap();
    assert_ne!(inode(3), inode(2));
    let (images, budget) = (run.state.ledger.images().to_vec(), run.state.ledger.budget());
    for (step, expected) in [(2, charged), (3, run.state.ledger.charged())] {
        let resumed = Ledger::open_resumed(
            &config.run_dir().join("ledger.bin"),
            &images,
            budget,
            &rotation.path_for(step, "ledger"),
        )
        .unwrap();
        assert_eq!(resumed.spent(), expected, "snapshot of step {step}");
    }
}

#[test]
fn a_resume_that_would_change_the_experiment_is_refused_unless_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_daemon_config(dir.path(), "changed", 7);
    let path = write_config(dir.path(), &config);
    let (ok, log) = finish(daemon(&path, &[]));
    assert!(ok, "{log}");
    let step = || adamcu::pipeline::status::Status::read(&config.run_dir()).unwrap().step;
    assert_eq!(step(), 7);

    // Changed keys that alter what the run computes: refused, each named with both values.
    let (ok, log) =
        finish(daemon(&path, &["--resume", "--set", "contrast.temperature=0.2", "--set", "active.iterations=14"]));
    assert!(!ok, "{log}");
    assert!(
        log.contains("active.iterations: was 7, now 14")
            && log.contains("contrast.temperature: was 0.1, now 0.2")
            && log.contains("--accept-config-changes"),
        "{log}"
    );
    assert_eq!(step(), 7, "nothing ran");

    // Where it reports and how the loaders are staffed leave the experiment as it was.
    let (ok, log) = finish(daemon(&path, &["--resume", "--set", "train.log_every=3", "--set", "data.workers=2"]));
    assert!(ok && log.contains("resume: train.log_every: was 5, now 3"), "{log}");

    // Accepted, the run goes on with the new values, and its checkpoints record them.
    let (ok, log) = finish(daemon(&path, &["--resume", "--accept-config-changes", "--set", "active.iterations=14"]));
    assert!(ok && log.contains("changed experiment") && log.contains("active.iterations: was 7, now 14"), "{log}");
    assert_eq!(step(), 14);
    let (ok, log) = finish(daemon(&path, &["--resume", "--set", "active.iterations=14"]));
    assert!(ok && !log.contains("changed experiment"), "{log}");
}

#[test]
fn the_runs_source_checkpoint_is_reused_only_if_pretraining_would_be_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_daemon_config(dir.path(), "reuse", 7);
    let path = write_config(dir.path(), &config);
    let out = Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["train", "--stage", "source", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let source = config.run_dir().join("source.safetensors");
    let pretrained = std::fs::read(&source).unwrap();

    // A longer pretraining schedule would give another source model: refused, named.
    let (ok, log) = finish(daemon(&path, &["--set", "train.source_iterations=11", "--set", "augment.flip=false"]));
    assert!(
        !ok && log.contains("train.source_iterations: was 10, now 11")
            && log.contains("augment.flip: was true, now false")
            && log.contains("--init"),
        "{log}"
    );
    // Settings that only ADA-MCU reads leave it as it was: reused, not retrained.
    let (ok, log) = finish(daemon(&path, &["--set", "active.budget=0.05", "--set", "contrast.temperature=0.2"]));
    assert!(ok, "{log}");
    assert!(std::fs::read(&source).unwrap() == pretrained, "the source checkpoint was retrained");
    let status = adamcu::pipeline::status::Status::read(&config.run_dir()).unwrap();
    assert_eq!(status.state, "finished");
    // The final evaluation is in the status, as `adamcu status` shows it.
    let last = status.last_eval.expect("the final evaluation");
    assert!(last.step == 7 && (0.0..=100.0).contains(&last.miou), "{last:?}");
    assert!(log.contains(&format!("step 7: mIoU {:.1} on the target val set", last.miou)), "{log}");
    assert!(status.line().contains(&format!("mIoU {:.1} at step 7", last.miou)), "{}", status.line());
    // So are the contrastive units' diagnostics of the last step: every configured level, and the
    // budget says what it counts.
    let contrast = status.contrast.as_ref().expect("the contrastive diagnostics");
    let levels: Vec<&str> = contrast.levels.iter().map(|l| l.level.name()).collect();
    assert_eq!(levels, ["intra-image", "cross-image", "cross-domain"]);
    assert!(contrast.levels.iter().any(|l| l.source_anchors > 0.0), "{contrast:?}");
    assert!(status.line().contains("contrastive units: p2p anchors (source/target) intra-image"), "{}", status.line());
    assert_eq!(status.budget_pixels, "pixels at the training resolution (64x32 per image)");
    // The gradient ratio and cosine are measured on log steps (every 5): step 5 was one, and
    // they were logged.
    assert!(
        log.contains("ada-mcu step 5: p2p anchors") && log.contains("L_con vs L_seg at the features: grad "),
        "{log}"
    );
    // And per level: the step-5 line gives each level's own ratio and cosine, in the status too.
    let line = log.lines().find(|l| l.contains("ada-mcu step 5: p2p anchors")).unwrap();
    assert_eq!(line.matches("(grad ").count(), 3, "{line}");
    assert_eq!(line.matches(", cos ").count(), 4, "{line}");
    let gradient = contrast.gradient.as_ref().expect("the gradient figures");
    let cosines: Vec<f64> = gradient.levels.iter().map(|l| l.against_seg.cosine).chain([gradient.con.cosine]).collect();
    assert!(cosines.len() == 4 && cosines.iter().all(|c| (-1.0..=1.0).contains(c)), "{contrast:?}");
    // And each pair of levels against each other, in the line and the status.
    let pairs: Vec<[&str; 2]> = gradient.between_levels.iter().map(|p| p.levels.map(|l| l.name())).collect();
    assert_eq!(
        pairs,
        [["intra-image", "cross-image"], ["intra-image", "cross-domain"], ["cross-image", "cross-domain"]]
    );
    assert!(gradient.between_levels.iter().all(|p| (-1.0..=1.0).contains(&p.cosine)), "{contrast:?}");
    assert!(
        line.contains(&format!("cos between levels intra-image/cross-image {:+.3}", gradient.between_levels[0].cosine)),
        "{line}"
    );
    // The status is of step 7, which did not measure them: they are step 5's, and it says so.
    assert_eq!(gradient.step, 5, "{contrast:?}");
    assert!(status.line().contains("(gradient figures of step 5)"), "{}", status.line());
    assert!(line.contains(&format!("L_con vs L_seg at the features: grad {:.3}", gradient.con.ratio)), "{line}");
}

#[test]
fn a_failed_evaluation_is_logged_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_daemon_config(dir.path(), "evaluated", 10);
    config.train.eval_every = 4;
    let path = write_config(dir.path(), &config);
    // A run whose evaluations succeed, then one more evaluation (a resume of the finished
    // run) that fails: the status keeps showing the last figure it had.
    let mut earlier = config.clone();
    earlier.run.name = "evaluated-earlier".into();
    let earlier_path = write_config(dir.path(), &earlier);
    let (ok, log) = finish(daemon(&earlier_path, &[]));
    assert!(ok, "{log}");
    let last = adamcu::pipeline::status::Status::read(&earlier.run_dir()).unwrap().last_eval.expect("evaluated");
    assert_eq!(last.step, 10);

    let val = dir.path().join("data/target/leftImg8bit/val");
    let city = std::fs::read_dir(&val).unwrap().next().unwrap().unwrap().path();
    let image = std::fs::read_dir(&city).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&image, b"not a PNG").unwrap();
    let (ok, log) = finish(daemon(&earlier_path, &["--resume"]));
    assert!(ok && log.matches("the evaluation failed, training goes on").count() == 1, "{log}");
    let kept = adamcu::pipeline::status::Status::read(&earlier.run_dir()).unwrap().last_eval.expect("kept");
    assert!(kept.step == last.step && kept.miou == last.miou, "{kept:?} after {last:?}");

    let (ok, log) = finish(daemon(&path, &[]));
    assert!(ok, "{log}");
    assert!(log.matches("the evaluation failed, training goes on").count() == 3, "steps 4, 8 and the end: {log}");
    assert!(log.contains(image.file_name().unwrap().to_str().unwrap()), "the failure names the file: {log}");
    let status = adamcu::pipeline::status::Status::read(&config.run_dir()).unwrap();
    assert_eq!(status.state, "finished");
    assert!(status.last_eval.is_none(), "no evaluation succeeded");
}

#[test]
fn a_run_directory_held_by_a_live_daemon_is_refused_with_its_pid() {
    use adamcu::pipeline::lock::{AnotherDaemon, RunLock};
    let dir = tempfile::tempdir().unwrap();
    let _held = RunLock::acquire(dir.path()).unwrap();
    assert!(RunLock::is_held(dir.path()));
    let error = RunLock::acquire(dir.path()).err().expect("a second lock is refused");
    let refused: &AnotherDaemon = error.downcast_ref().expect("a typed refusal");
    assert_eq!(refused.pid, std::process::id().to_string());
    assert!(error.to_string().contains("another daemon"), "{error}");
}

#[test]
fn a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let iterations = 30;
    let reference = tiny_daemon_config(dir.path(), "whole", iterations);
    let (ok, log) = finish(daemon(&write_config(dir.path(), &reference), &[]));
    assert!(ok, "{log}");
    let source = reference.run_dir().join("source.safetensors");
    let init = source.to_str().unwrap().to_string();
    // Truncated (a copy cut short) and one flipped byte in the tensor data (which safetensors'
    // own checks do not see; the checksum recorded when written does).
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 2] = [
        ("truncated", |bytes| bytes.truncate(bytes.len() / 3)),
        ("flipped", |bytes| {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x10;
        }),
    ];
    for (name, damage) in damages {
        let run = tiny_daemon_config(dir.path(), name, iterations);
        let path = write_config(dir.path(), &run);
        let (ok, log) = finish(daemon(&path, &["--continue", "--init", &init]));
        assert!(ok, "{log}");
        let rotation = Rotation { dir: run.run_dir().join("checkpoints"), keep: 2 };
        let steps = rotation.steps();
        assert!(steps.len() >= 2, "{steps:?}");
        let newest = rotation.path_for(*steps.last().unwrap(), "safetensors");
        let mut bytes = std::fs::read(&newest).unwrap();
        damage(&mut bytes);
        std::fs::write(&newest, bytes).unwrap();
        let mut trainer = Trainer::new(&run).unwrap();
        let Err(error) = trainer.load(&newest) else { panic!("{name}: the damaged checkpoint loads") };
        assert!(error.downcast_ref::<adamcu::train::checkpoint::DamagedCheckpoint>().is_some(), "{name}: {error:#}");

        // The supervisor's one command: it names the damaged file, sets it aside, resumes from
        // the checkpoint before it and finishes with the same purchases as the whole run.
        let (ok, log) = finish(daemon(&path, &["--continue"]));
        assert!(ok, "{name}: {log}");
        assert!(log.contains("damaged checkpoint") && log.contains(&newest.display().to_string()), "{name}: {log}");
        let moved = rotation.dir.join("damaged").join(newest.file_name().unwrap());
        assert!(moved.exists() && moved.with_extension("ledger").exists(), "{name}: not set aside");
        assert!(rotation
            .steps()
            .iter()
            .all(|&s| Trainer::new(&run).unwrap().load(&rotation.path_for(s, "safetensors")).is_ok()));
        let ledger = Trainer::new(&run).unwrap().open_ledger(&run.run_dir().join("ledger.bin")).unwrap();
        let bits: u64 = (0..ledger.images().len()).map(|i| ledger.bought_in(i)).sum();
        assert_eq!(bits, ledger.charged(), "{name}: a pixel charged twice");
        assert!(ledger.charged() <= ledger.budget());
        assert!(
            ledger_bits(&run.run_dir()) == ledger_bits(&reference.run_dir()),
            "{name}: ledger differs from the whole run's"
        );
    }
}
