//! scripts/gpu-check.sh, dry-run on the CPU (DEVICE=cpu) at tiny sizes: the script runs only in
//! the rare sessions lent a GPU, so it is kept from rotting here (a renamed flag, a config key,
//! a command that fails at the paper's settings).

#[test]
fn the_gpu_check_script_runs_its_checks_on_the_cpu() {
    let work = tempfile::tempdir().unwrap();
    // The paper config's network head and settings, on the tiny backbone at small crops (the
    // source's larger than the target's, as there); metrics off so that no port is shared.
    let extra = ["model.backbone=\"tiny\"", "model.tiny_width=8", "data.source.resize=[96,160]",
        "data.source.crop=[96,160]", "data.target.resize=[64,128]", "data.target.crop=[64,128]",
        "eval.input_size=[64,128]", "data.workers=1", "metrics.listen=\"\""]
        .map(|s| format!("--set {s}")).join(" ");
    let out = std::process::Command::new("bash").arg("scripts/gpu-check.sh")
        .env("ADAMCU_BIN", env!("CARGO_BIN_EXE_adamcu"))
        .envs([("DEVICE", "cpu"), ("SYNTH_IMAGES", "4"), ("SOURCE_STEPS", "2"), ("ADA_STEPS", "3")])
        .env("WORK", work.path()).env("EXTRA_SETS", extra).env_remove("OUT")
        .output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let log = format!("{stdout}{stderr}");
    assert!(out.status.success(), "{log}");
    assert!(stdout.contains("smoke check ok") && stdout.contains("== data wait"), "{log}");
    assert!(stdout.contains("step 3/3") && stdout.contains("trainer waits"), "no final status line: {log}");
    assert!(stdout.trim_end().ends_with("all GPU checks ran"), "{log}");
    assert!(stderr.trim().is_empty(), "the script's own noise: {stderr}");
}
