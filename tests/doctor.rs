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
}
