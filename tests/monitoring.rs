//! A real Prometheus server (Debian's `prometheus`) scrapes a running daemon; every PromQL
//! expression of the Grafana dashboard, every recording rule and every alert's signal must
//! return data, every alert rule must evaluate cleanly, and `promtool check metrics` must
//! accept the endpoint's output. The alerts' own unit test (`promtool test rules`) runs too.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(url: &str) -> Option<String> {
    ureq::get(url).call().ok()?.into_string().ok()
}

fn query(prometheus: u16, expr: &str) -> serde_json::Value {
    let body = ureq::get(&format!("http://127.0.0.1:{prometheus}/api/v1/query"))
        .query("query", expr)
        .call()
        .unwrap_or_else(|e| panic!("query {expr}: {e}"))
        .into_string()
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

/// The expressions a dashboard's panels plot.
fn dashboard_exprs() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("monitoring/grafana/dashboards/adamcu.json").unwrap()).unwrap();
    assert!(dashboard["uid"].is_string(), "the dashboard has a uid");
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn prometheus_scrapes_the_daemon_and_every_dashboard_and_rule_expression_returns_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_daemon_config(dir.path(), "monitored", 1_000_000);
    let metrics_port = free_port();
    config.metrics.listen = format!("127.0.0.1:{metrics_port}");
    (config.train.checkpoint_every, config.train.eval_every) = (20, 20);
    // The daemon translates the source first (the translation panels' data).
    translated_by_a_tiny_cyclegan(&mut config);
    // One unreadable source label, so the loader-error panel has real data (the translation
    // reads the images only).
    std::fs::write(dir.path().join("data/source/labels/00003.png"), b"broken").unwrap();
    let config_path = write_config(dir.path(), &config);
    let daemon_log = dir.path().join("daemon.log");
    let _daemon = Killed(
        Command::new(env!("CARGO_BIN_EXE_adamcu"))
            .args(["train", "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&daemon_log).unwrap())
            .spawn()
            .unwrap(),
    );

    // Prometheus, scraping every second, with our rules.
    let prom_port = free_port();
    let rules = std::fs::canonicalize("monitoring/prometheus/alerts.yml").unwrap();
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(&prom_config, format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: adamcu\n    \
         static_configs:\n      - targets: [\"127.0.0.1:{metrics_port}\"]\n", rules.display())).unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Debian's prometheus package (make test installs it)"),
    );

    // promtool accepts what the endpoint serves.
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = loop {
        if let Some(body) = get(&format!("http://127.0.0.1:{metrics_port}/metrics")) {
            if body.contains("adamcu_eval_miou") && body.contains("adamcu_checkpoint_seconds_bucket") {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never served its metrics; its log:\n{}",
            std::fs::read_to_string(&daemon_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Expressions to check: dashboard panels, recording rules (by name), alert signals.
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let mut exprs = dashboard_exprs();
    exprs.extend(rules_text.lines().filter_map(|l| l.trim().strip_prefix("- record: ")).map(str::to_string));
    exprs.extend(rules_text.lines().filter_map(|l| l.trim().strip_prefix("signal: ")).map(str::to_string));
    assert!(exprs.len() >= 20, "{exprs:?}");

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut missing: Vec<String>;
    loop {
        missing = exprs
            .iter()
            .filter(|e| {
                let r = query(prom_port, e);
                r["status"] != "success" || r["data"]["result"].as_array().is_none_or(|a| a.is_empty())
            })
            .cloned()
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(missing.is_empty(), "expressions without data: {missing:#?}");

    // The checkpoint size it reports is that of the files of the newest checkpoint (a run's
    // later checkpoints differ only by a few bytes of metadata; the one at step 0 has no
    // momentum buffers yet, and may still be there when the daemon is slow).
    let reported = query(prom_port, "adamcu_checkpoint_bytes")["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse::<f64>()
        .unwrap() as u64;
    let rotation = adamcu::train::checkpoint::Rotation { dir: config.run_dir().join("checkpoints"), keep: 3 };
    let step = rotation.latest().unwrap();
    let on_disk: u64 =
        ["safetensors", "ledger"].iter().map(|e| std::fs::metadata(rotation.path_for(step, e)).unwrap().len()).sum();
    assert!(reported.abs_diff(on_disk) < 1024, "reported {reported} bytes, the files have {on_disk}");

    // Every alert rule evaluates without error; none fires on a healthy daemon.
    let rules_api: serde_json::Value =
        serde_json::from_str(&get(&format!("http://127.0.0.1:{prom_port}/api/v1/rules")).unwrap()).unwrap();
    let all: Vec<&serde_json::Value> =
        rules_api["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(all.len(), 10);
    for rule in all {
        assert_eq!(rule["health"], "ok", "{rule}");
        if rule["type"] == "alerting" {
            assert_eq!(rule["state"], "inactive", "{rule}");
        }
    }
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_test() {
    let out = Command::new("promtool")
        .args(["test", "rules", "monitoring/prometheus/alerts.test.yml"])
        .output()
        .expect("promtool, from Debian's prometheus package (make test installs it)");
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
