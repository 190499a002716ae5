//! Data-parallel training on c10d's Gloo backend, two ranks on this CPU (one thread each).

mod common;

use adamcu::distributed::Launch;
use common::{free_port, tiny_daemon_config, write_config};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `adamcu train --config F` and `args`, run to its end.
fn train_output(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_adamcu")).args(["train", "--config"]).arg(config).args(args).output().unwrap()
}

/// `--stage source` and `extra`: whether it succeeded, and its log.
fn train(config: &Path, extra: &[&str]) -> (bool, String) {
    let out = train_output(config, &[&["--stage", "source"], extra].concat());
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn weights(path: &Path) -> HashMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path).unwrap().into_iter().filter(|(_, t)| t.is_floating_point()).collect()
}

/// The largest absolute difference over every floating-point tensor the two files share.
fn max_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (weights(a), weights(b));
    assert!(a.len() > 10 && a.len() == b.len(), "{} against {} tensors", a.len(), b.len());
    a.iter().map(|(name, t)| (t - &b[name]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

fn last_loss(log: &str) -> String {
    let line = log.lines().rev().find(|l| l.contains("source 3/3")).unwrap_or_else(|| panic!("{log}"));
    line.split("loss ").nth(1).unwrap().split_whitespace().next().unwrap().to_string()
}

/// The equality tests' run: three source steps on batches of 4 (two ranks: 2 each), from
/// `dir`'s run "one-process", BatchNorm on `bn_stats`, not synchronised.
fn three_steps_of_four(dir: &Path, bn_stats: adamcu::config::BnStats) -> adamcu::config::Config {
    let mut config = tiny_daemon_config(dir, "one-process", 0);
    config.train.batch_source = 4;
    config.train.source_iterations = 3;
    config.model.bn_stats = bn_stats;
    config.train.sync_bn = false;
    config
}

/// Run `name`'s source checkpoint in `dir`.
fn source_checkpoint_of(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join("runs").join(name).join("source.safetensors")
}

#[test]
fn two_ranks_take_the_steps_one_process_takes_on_the_combined_batch() {
    let dir = tempfile::tempdir().unwrap();
    // BatchNorm on stored statistics (batch statistics: the test below).
    let mut config = three_steps_of_four(dir.path(), adamcu::config::BnStats::Frozen);
    config.train.log_every = 1;
    let one = write_config(dir.path(), &config);
    config.run.name = "two-ranks".into();
    let two = write_config(dir.path(), &config);
    config.run.name = "half-batch".into();
    config.train.batch_source = 2;
    let half = write_config(dir.path(), &config);

    let (ok, one_log) = train(&one, &[]);
    assert!(ok, "{one_log}");
    let (ok, two_log) = train(&two, &["--nproc", "2"]);
    assert!(ok, "{two_log}");
    assert!(
        two_log.contains("rank 0 of 2: joined the Gloo group") && two_log.contains("rank 1 of 2: joined"),
        "{two_log}"
    );
    let (ok, half_log) = train(&half, &[]);
    assert!(ok, "{half_log}");

    let checkpoint = |name: &str| source_checkpoint_of(dir.path(), name);
    // Three updates from the same start: the two ranks' weights are one process's on the
    // batch of 4, within float rounding (the all-reduce sums in another order).
    let same = max_difference(&checkpoint("one-process"), &checkpoint("two-ranks"));
    assert!(same < 1e-5, "two ranks against one process: {same}");
    // A rank alone on its batch of 2 is another run: the ranks did combine their gradients.
    let other = max_difference(&checkpoint("half-batch"), &checkpoint("two-ranks"));
    assert!(other > 1e-3, "two ranks against one process on half the batch: {other}");
    // Every rank reports the job's loss, the one process's.
    let losses: Vec<String> = two_log.lines().filter(|l| l.contains("source 3/3")).map(last_loss).collect();
    assert_eq!(losses, vec![last_loss(&one_log); 2], "{two_log}");
    // Rank 0 alone wrote the checkpoint; the run folder holds nothing a second rank made.
    let files: Vec<_> =
        std::fs::read_dir(dir.path().join("runs/two-ranks")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files, ["source.safetensors"], "{files:?}");
}

#[test]
fn with_sync_bn_two_ranks_normalise_over_the_combined_batch_as_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = three_steps_of_four(dir.path(), adamcu::config::BnStats::Batch);
    let one = write_config(dir.path(), &config);
    config.run.name = "each-rank-its-own".into();
    let own = write_config(dir.path(), &config);
    config.run.name = "synchronised".into();
    config.train.sync_bn = true;
    let synchronised = write_config(dir.path(), &config);

    for (file, extra) in [(&one, &[][..]), (&own, &["--nproc", "2"][..]), (&synchronised, &["--nproc", "2"][..])] {
        let (ok, log) = train(file, extra);
        assert!(ok, "{log}");
    }
    let checkpoint = |name: &str| source_checkpoint_of(dir.path(), name);
    // Weights and running statistics after three updates: one process's on the batch of 4,
    // within float rounding (SyncBatchNorm sums the statistics, libtorch's kernel averages).
    let same = max_difference(&checkpoint("one-process"), &checkpoint("synchronised"));
    assert!(same < 1e-4, "synchronised BatchNorm against one process: {same}");
    // Without it each rank normalises its half of the batch alone: another update.
    let other = max_difference(&checkpoint("one-process"), &checkpoint("each-rank-its-own"));
    assert!(other > 1e-3, "per-rank BatchNorm against one process: {other}");
}

#[test]
fn a_rank_killed_with_9_makes_the_other_fail_with_an_error_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_daemon_config(dir.path(), "killed", 0);
    config.train.source_iterations = 1_000_000;
    config.train.log_every = 1;
    let path = write_config(dir.path(), &config);
    let port = free_port().to_string();
    let rank = |r| rank_of_two(&path, r, &port, &["--stage", "source"]);
    let (first, mut second) = (rank(0), rank(1));
    // Wait until the ranks step together, then kill the second one.
    let mut lines = BufReader::new(second.stderr.take().unwrap()).lines();
    let stepping = lines.by_ref().map_while(Result::ok).find(|l| l.contains("source 2/"));
    assert!(stepping.is_some(), "rank 1 never stepped");
    second.kill().unwrap();
    second.wait().unwrap();
    let killed_at = Instant::now();
    let out = first.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(killed_at.elapsed() < Duration::from_secs(60), "rank 0 took {:?} to notice", killed_at.elapsed());
    // With train.sync_bn (the embedded default) the loss is seen either in the gradients'
    // all-reduce or inside a BatchNorm layer's forward, which keeps it for the step
    // (tests/model.rs): either way the rank ends with an error, not a panic.
    let reasons = ["all-reduce failed", "broadcast failed", "differentiable all-reduce failed"];
    assert!(reasons.iter().any(|r| log.contains(&format!("rank 0 of 2: {r}"))), "{log}");
    assert!(!log.contains("panicked"), "a lost peer must be an error, not a panic: {log}");
}

#[test]
fn a_ranks_environment_is_read_as_torchrun_sets_it() {
    let vars = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(move |name| map.get(name).cloned())
    };
    assert_eq!(vars(&[]).unwrap(), None, "no WORLD_SIZE: one process");
    assert_eq!(vars(&[("WORLD_SIZE", "1")]).unwrap(), None);
    let launch = vars(&[
        ("WORLD_SIZE", "4"),
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(launch, Launch { rank: 3, world: 4, local_rank: 1, master_addr: "node0".into(), master_port: 29500 });
    let error = |pairs: &[(&str, &str)]| format!("{:#}", vars(pairs).unwrap_err());
    assert!(error(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("RANK is not set"));
    assert!(error(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")])
        .contains("RANK=2: expected a rank below WORLD_SIZE=2"));
    assert!(error(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")])
        .contains("MASTER_PORT=\"x\": expected a whole number"));
    assert!(error(&[("WORLD_SIZE", "two")]).contains("WORLD_SIZE=\"two\""));
}

/// A tiny config's source checkpoint after 3 steps, in `dir`, and the config.
fn source_checkpoint(dir: &Path) -> (adamcu::config::Config, std::path::PathBuf) {
    let mut config = tiny_daemon_config(dir, "source", 0);
    config.train.source_iterations = 3;
    let path = write_config(dir, &config);
    let (ok, log) = train(&path, &[]);
    assert!(ok, "{log}");
    (config, source_checkpoint_of(dir, "source"))
}

/// `--stage ada --init source` as run `name` and `extra`: its "bought ..." lines (one per rank)
/// and its run folder.
fn ada_run(
    dir: &Path,
    config: &adamcu::config::Config,
    source: &Path,
    name: &str,
    extra: &[&str],
) -> (Vec<String>, std::path::PathBuf) {
    let mut c = config.clone();
    c.run.name = name.into();
    let path = write_config(dir, &c);
    let out = train_output(&path, &[&["--stage", "ada", "--init", source.to_str().unwrap()], extra].concat());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let bought: Vec<String> = stdout.lines().filter(|l| l.starts_with("bought ")).map(String::from).collect();
    (bought, c.run_dir())
}

/// The run's ledger's bitmap (one bit per pixel bought), after its header.
fn ledger_bits(run_dir: &Path) -> Vec<u8> {
    let file = std::fs::read(run_dir.join("ledger.bin")).unwrap();
    let header = u64::from_le_bytes(file[24..32].try_into().unwrap()) as usize; // the ledger's layout
    file[header..].to_vec()
}

#[test]
fn two_ranks_buy_through_one_ledger_and_spend_what_one_process_spends() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, source) = source_checkpoint(dir.path());
    // 64x32 crops, 6 target images: Me = 10 % of 12,288 pixels, spent within the 20 steps.
    config.active.iterations = 20;
    config.train.log_every = 100;
    let (one, _) = ada_run(dir.path(), &config, &source, "ada-one", &[]);
    let (two, run_dir) = ada_run(dir.path(), &config, &source, "ada-two", &["--nproc", "2"]);
    assert_eq!(one.len(), 1);
    // The whole budget went: "bought Ma of Me ..." with Ma = Me (10 % of 12,288, rounded up).
    let words: Vec<&str> = one[0].split_whitespace().collect();
    let me: u64 = words[3].parse().unwrap();
    assert!(words[1] == words[3] && me == 1229, "{one:?}");
    // Every rank knows the job's purchases: each reports the one process's spend.
    assert_eq!(two, vec![one[0].clone(); 2]);
    // The run's ledger is rank 0's: it holds Me pixels, no more; no replica is left in the run.
    let bits: u64 = ledger_bits(&run_dir).iter().map(|b| b.count_ones() as u64).sum();
    assert_eq!(bits, me, "pixels bought in the run's ledger");
    let files: Vec<_> = std::fs::read_dir(&run_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(files.iter().filter(|f| f.to_string_lossy().contains("ledger")).count() == 1, "{files:?}");
}

#[test]
fn two_ranks_run_ripus_selection_round_and_buy_the_pixels_one_process_buys() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, source) = source_checkpoint(dir.path());
    // One round before the first step, from the same weights: Me at once (10 % of 12,288).
    config.active.strategy = adamcu::config::Strategy::Ripu;
    config.active.rounds = vec![0];
    config.active.iterations = 2;
    let (one, one_dir) = ada_run(dir.path(), &config, &source, "ripu-one", &[]);
    let (two, two_dir) = ada_run(dir.path(), &config, &source, "ripu-two", &["--nproc", "2"]);
    let words: Vec<&str> = one[0].split_whitespace().collect();
    assert!(words[1] == words[3] && words[3] == "1229", "{one:?}");
    assert_eq!(two, vec![one[0].clone(); 2]);
    // The ranks scored half of the images each and bought exactly one process's pixels.
    assert_eq!(ledger_bits(&two_dir), ledger_bits(&one_dir), "the two ledgers' bitmaps");
}

#[test]
fn a_batch_the_ranks_cannot_share_evenly_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_daemon_config(dir.path(), "uneven", 0);
    config.train.batch_source = 3;
    let path = write_config(dir.path(), &config);
    let (ok, log) = train(&path, &["--nproc", "2"]);
    assert!(!ok && log.contains("train.batch_source = 3: a data-parallel job of 2 ranks"), "{log}");
}

/// One rank of a job of two (`adamcu train --config F` and `extra`, with torchrun's
/// environment), its output piped.
fn rank_of_two(config: &Path, rank: usize, port: &str, extra: &[&str]) -> std::process::Child {
    let r = rank.to_string();
    Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["train", "--config"])
        .arg(config)
        .args(extra)
        .envs([("RANK", r.as_str()), ("LOCAL_RANK", r.as_str()), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")])
        .env("MASTER_PORT", port)
        .env("ADAMCU_DIST_TIMEOUT_S", "60")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `child`'s log shows ADA-MCU step `step` or later; returns the log so far and
/// the rest of the stream.
fn wait_for_step(child: &mut std::process::Child, step: u64) -> std::io::Lines<BufReader<std::process::ChildStderr>> {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // A rank logs its contrastive units every train.log_every steps: "ada-mcu step N: ...".
    let mut seen = Vec::new();
    let reached = lines.by_ref().map_while(Result::ok).any(|l| {
        let at = l.split("ada-mcu step ").nth(1).and_then(|rest| rest.split(':').next()?.parse::<u64>().ok());
        seen.push(l);
        at.is_some_and(|s| s >= step)
    });
    assert!(reached, "the rank never reached step {step}:\n{}", seen.join("\n"));
    lines
}

#[test]
fn the_daemon_across_two_ranks_stops_together_on_sigterm_and_resumes_after_a_kill_9_with_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_daemon_config(dir.path(), "daemon-ranks", 40);
    config.train.log_every = 1;
    let path = write_config(dir.path(), &config);
    let run_dir = config.run_dir();
    let checkpoints = || -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(run_dir.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        files
    };

    // SIGTERM to rank 1 alone: both ranks stop at one step, rank 0 writes one final checkpoint.
    let port = free_port().to_string();
    let (first, mut second) = (rank_of_two(&path, 0, &port, &[]), rank_of_two(&path, 1, &port, &[]));
    let rest = wait_for_step(&mut second, 3);
    let drain = std::thread::spawn(move || rest.map_while(Result::ok).count());
    Command::new("kill").args(["-TERM", &second.id().to_string()]).status().unwrap();
    let (out0, out1) = (first.wait_with_output().unwrap(), second.wait_with_output().unwrap());
    drain.join().unwrap();
    let log0 = String::from_utf8_lossy(&out0.stderr);
    assert!(out0.status.success() && out1.status.success(), "{log0}");
    assert!(String::from_utf8_lossy(&out0.stdout).contains("stopped"), "{log0}");
    let status = adamcu::pipeline::status::Status::read(&run_dir).unwrap();
    assert_eq!(status.state, "stopped");
    let stopped_at = status.step;
    assert!(stopped_at > 0 && stopped_at < 30, "{stopped_at}");
    let last = checkpoints().pop().unwrap();
    assert!(last.to_string_lossy().ends_with(&format!("step-{stopped_at:08}.safetensors")), "{last:?}");

    // Go on as two ranks, kill -9 rank 1 on the way: rank 0 fails with an error, not a hang.
    let port = free_port().to_string();
    let (first, mut second) =
        (rank_of_two(&path, 0, &port, &["--continue"]), rank_of_two(&path, 1, &port, &["--continue"]));
    let rest = wait_for_step(&mut second, stopped_at + 3);
    second.kill().unwrap();
    second.wait().unwrap();
    drop(rest);
    let out0 = first.wait_with_output().unwrap();
    let log0 = String::from_utf8_lossy(&out0.stderr);
    assert!(!out0.status.success() && log0.contains("rank 0 of 2"), "{log0}");

    // --continue as one process (another world size) finishes the run.
    let out = train_output(&path, &["--continue"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = adamcu::pipeline::status::Status::read(&run_dir).unwrap();
    assert_eq!((status.state.as_str(), status.step), ("finished", 40));
    assert!(status.budget_spent_pixels <= status.budget_limit_pixels && status.budget_spent_pixels > 0, "{status:?}");
    // Every checkpoint left behind loads.
    for file in checkpoints() {
        assert!(tch::Tensor::read_safetensors(&file).is_ok(), "{} does not load", file.display());
    }
}

#[test]
fn the_step_benchmark_reports_two_ranks_scaling_beside_one_process() {
    let out = Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["bench", "step", "--config", "pipelines/synth.toml", "--set", "model.tiny_width=8", "--set"])
        .args(["run.threads=1", "--source-size", "32x64", "--target-size", "32x64", "--iterations", "2"])
        .args(["--warmup", "1", "--nproc", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let table = stdout.split("data-parallel scaling").nth(1).unwrap_or_else(|| panic!("{stdout}"));
    for row in ["full bf16+cl", "full fp32", "seg bf16+cl", "seg fp32"] {
        let line = table.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row:?} in {table}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (one, two): (f64, f64) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
        let efficiency: f64 = fields[4].trim_end_matches('%').parse().unwrap();
        assert!(one > 0.0 && two > 0.0, "{line}");
        // The throughputs are printed to 0.1 and the efficiency to 1 %, each from the unrounded
        // figures: it lies within what the rounded throughputs allow.
        let (low, high) = (100.0 * (two - 0.05) / (2.0 * (one + 0.05)), 100.0 * (two + 0.05) / (2.0 * (one - 0.05)));
        assert!(efficiency >= low - 0.5 && efficiency <= high + 0.5, "{line}");
    }
}
