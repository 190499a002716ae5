//! `adamcu doctor` on CPU: a real smoke check that must lower the loss.

#[test]
fn smoke_check_lowers_the_loss_on_cpu() {
    let r = adamcu::doctor::smoke_check(tch::Device::Cpu, 30).expect("smoke check passes");
    assert!(r.last_loss < r.first_loss * 0.9, "{} -> {}", r.first_loss, r.last_loss);
}

#[test]
fn doctor_command_reports_versions_and_passes_on_cpu() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["doctor", "--device", "cpu"])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("libtorch    2.11.0"), "{stdout}");
    assert!(stdout.contains("smoke check ok"), "{stdout}");
    // With a CUDA libtorch (PyPI's wheel) the NCCL backend is built in: the setup script adds
    // the headers ProcessGroupNCCL needs, and build.rs finds them.
    let cuda_wheel = std::path::Path::new(env!("ADAMCU_LIBTORCH_LIB")).join("libtorch_cuda.so").exists();
    let backends = if cuda_wheel { "c10d        gloo, nccl" } else { "c10d        gloo" };
    assert!(stdout.contains(backends), "{stdout}");
}

#[test]
fn a_cuda_device_that_is_not_there_is_a_clear_error_not_a_crash() {
    // An index past what libtorch sees: none here, one past the last on a GPU machine.
    let missing = format!("cuda:{}", tch::Cuda::device_count());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["doctor", "--device", &missing])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("--device \"{missing}\"")) && stderr.contains("CUDA device(s)"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The same for a config's run.device, through any command that builds the network.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args([
            "bench",
            "step",
            "--config",
            "pipelines/synth.toml",
            "--set",
            &format!("run.device=\"{missing}\""),
            "--iterations",
            "1",
            "--warmup",
            "0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("run.device = \"{missing}\"")), "{stderr}");
}
