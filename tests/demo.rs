//! `adamcu demo`, the main job, end to end on a tiny synthetic benchmark: the table of the
//! paper's Table VI layout, the report, and the spread over seeds.

mod common;

use adamcu::config::Preset;
use std::process::Command;

#[test]
fn the_demo_prints_the_table_and_with_two_seeds_their_mean_and_spread() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::tiny_daemon_config(dir.path(), "demo", 12);
    config.train.target_supervised_iterations = 10;
    config.demo.variants = vec![Preset::AlWoAs, Preset::Full];
    config.demo.repeats = 2;
    config.run.seed = 5;
    // One more budget than active.budget (0.1): Fig. 1(c).
    config.demo.budgets = vec![0.05];
    // Algorithm 1 from line 1: the demo translates the raw source first.
    common::translated_by_a_tiny_cyclegan(&mut config);
    let path = common::write_config(dir.path(), &config);
    let out = Command::new(env!("CARGO_BIN_EXE_adamcu")).args(["demo", "--config"]).arg(&path).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // One table row per method, in the paper's order, each mIoU with its spread over the seeds.
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| method")).collect();
    let names: Vec<&str> = rows.iter().map(|l| l.split('|').nth(1).unwrap().trim()).collect();
    assert_eq!(
        names,
        ["source-only, untranslated", "source-only", "AL w/o AS", "full model (DCCM)", "target-supervised"],
        "{stdout}"
    );
    // Source-only on the translated source beside the raw one, paired by seed (Table III).
    assert!(stdout.contains("translation (Algorithm 1, line 1): source-only"), "{stdout}");
    assert!(config.synth.root.join("source_translated").join(adamcu::translate::STAMP).exists());
    assert!(rows.iter().all(|l| l.contains(" ± ")), "{stdout}");
    assert!(stdout.contains("mean over seeds [5, 6]") && stdout.contains("closes"), "{stdout}");

    // Each seed is a run of its own, in its own folder, and the seed changes the results.
    let run_dir = config.run_dir();
    for seed in [5, 6] {
        assert!(run_dir.join(format!("seed-{seed}/full/ledger.bin")).exists());
        assert!(run_dir.join(format!("seed-{seed}/target-supervised.safetensors")).exists());
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["seeds"], serde_json::json!([5, 6]));
    assert_eq!(report["translation"]["method"], "cyclegan");
    assert!(report["per_seed"][1]["untranslated"]["miou"].is_number());
    // Each source's feature distance to the target, in the target-supervised network.
    for key in ["raw_to_target", "translated_to_target"] {
        let d = report["per_seed"][0]["feature_distance"][key].as_f64().unwrap_or_else(|| panic!("{key}: {report}"));
        assert!(d.is_finite() && d >= 0.0, "{key} = {d}");
    }
    assert!(stdout.contains("feature distance to the target"), "{stdout}");
    assert_eq!(report["config"]["demo"]["repeats"], 2, "the report records its config");
    let miou = |seed: usize, row: usize| report["per_seed"][seed]["rows"][row]["miou"].as_f64().unwrap();
    assert!((0..4).any(|row| miou(0, row) != miou(1, row)), "both seeds gave the same results: {report}");
    // The table's values are the mean and the sample standard deviation of the two runs.
    for row in 0..4 {
        let (a, b) = (miou(0, row), miou(1, row));
        let mean = report["rows"][row]["miou"].as_f64().unwrap();
        let std = report["rows"][row]["miou_std"].as_f64().unwrap();
        assert!(
            (mean - (a + b) / 2.0).abs() < 1e-9 && (std - (a - b).abs() / 2f64.sqrt()).abs() < 1e-9,
            "row {row}: {a} and {b} gave {mean} ± {std}"
        );
        assert!(stdout.contains(&format!("**{mean:.1}** ± {std:.1}")), "{stdout}");
    }
    // Each variant's gain over the row before, paired by seed: the mean of the per-seed
    // differences and its 95 % interval (Student's t with 1 degree of freedom: 12.706).
    let gains = report["paired_gains"].as_array().unwrap();
    assert_eq!(gains.len(), 2, "{report}");
    for (gain, (from, to)) in gains.iter().zip([(0, 1), (1, 2)]) {
        let d: Vec<f64> = (0..2).map(|seed| miou(seed, to) - miou(seed, from)).collect();
        let mean = (d[0] + d[1]) / 2.0;
        let half = 12.7062 * (d[0] - d[1]).abs() / 2.0;
        assert!((gain["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{gain}");
        let (lo, hi) = (gain["interval95"][0].as_f64().unwrap(), gain["interval95"][1].as_f64().unwrap());
        assert!((lo - (mean - half)).abs() < 1e-3 && (hi - (mean + half)).abs() < 1e-3, "{gain} vs {mean} ± {half}");
    }
    assert!(stdout.contains("95 % interval"), "{stdout}");
    // The pictures beside the report: Fig. 4 (2 val images here: image, ground truth and a
    // column per row), the curves and the budget spent over steps.
    let fig4 = image::open(run_dir.join("fig4.png")).unwrap();
    assert_eq!(fig4.width(), 7 * 64 + 6 * 4, "7 columns of 64 pixels and the gaps between them");
    assert_eq!(fig4.height(), 28 + 2 * (32 + 4), "a header and one line per val image");
    for name in ["curves.png", "budget.png"] {
        let picture = image::open(run_dir.join(name)).unwrap().to_rgb8();
        let distinct: std::collections::HashSet<_> = picture.pixels().map(|p| p.0).collect();
        assert!(distinct.len() > 20, "{name} is close to blank: {} colours", distinct.len());
    }
    assert_eq!(report["figures"]["budget"], run_dir.join("budget.png").display().to_string());
    // Fig. 1(c): each variant at both budgets; at 5 % each spends half what it does at 10 %.
    assert!(stdout.contains("mIoU against the labelled fraction") && run_dir.join("fig1c.png").exists(), "{stdout}");
    let by_budget = report["by_budget"]["rows"].as_array().unwrap();
    assert_eq!(by_budget.len(), 4, "{report}");
    let labelled = |i: usize| by_budget[i]["row"]["target_labeled_fraction"].as_f64().unwrap();
    assert!((labelled(1) - 0.05).abs() < 1e-3 && (labelled(0) - 0.1).abs() < 1e-3, "{by_budget:?}");
    // Fig. 5 and the compactness of the full model's target val embeddings.
    assert!(run_dir.join("fig5.png").exists());
    let compactness = &report["compactness"][0];
    assert_eq!(compactness["variant"], "full");
    assert!(compactness["intra_mean"].as_f64().unwrap() > compactness["inter_mean"].as_f64().unwrap(), "{compactness}");
    // Val curves (train.eval_every): the last point of an ADA row is the row's own figure.
    let curves = report["per_seed"][0]["curves"].as_array().unwrap();
    assert_eq!(curves.len(), 5);
    assert_eq!(curves[1][0], "source-only, untranslated");
    let last = curves[3][1].as_array().unwrap().last().unwrap();
    assert_eq!(last["step"], 12);
    assert!((last["miou"].as_f64().unwrap() - miou(0, 2)).abs() < 1e-9, "{last} vs {}", miou(0, 2));
    // The budget says what it counts.
    assert_eq!(report["budget_pixels"], "pixels at the training resolution (64x32 per image)");

    // --merge of the run alone recomputes its paired gains from its report; of the run with
    // itself it is refused, since each seed would count twice.
    let merged = dir.path().join("merged");
    let merge = |dirs: &str| {
        Command::new(env!("CARGO_BIN_EXE_adamcu"))
            .args(["demo", "--merge", dirs, "--out"])
            .arg(&merged)
            .output()
            .unwrap()
    };
    let out = merge(&run_dir.display().to_string());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(merged.join("report.json")).unwrap()).unwrap();
    assert_eq!(again["paired_gains"], report["paired_gains"]);
    assert_eq!(again["rows"], report["rows"]);
    let out = merge(&format!("{0},{0}", run_dir.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("seed 5 is in both"), "{stderr}");
}

/// A demo report of `seeds` as `adamcu demo` writes it: its config and each seed's rows
/// (source-only, AL w AS, full model, target-supervised; mIoU `base + row + seed offset`).
fn write_report(dir: &std::path::Path, config: &adamcu::config::Config, seeds: &[(u64, [f64; 4])]) {
    let names = ["source-only", "AL w AS", "full model (DCCM)", "target-supervised"];
    let per_seed: Vec<_> = seeds
        .iter()
        .map(|(seed, miou)| {
            let rows: Vec<_> = names
                .iter()
                .zip(miou)
                .map(|(name, m)| {
                    serde_json::json!({ "name": name, "miou": m, "per_class": [["road", m], ["sidewalk", null]],
                        "target_labeled_fraction": 0.05 })
                })
                .collect();
            serde_json::json!({ "seed": seed, "untranslated": null, "rows": rows,
                "curves": [["AL w AS", [{ "step": 6, "miou": miou[1] - 1.0 }, { "step": 12, "miou": miou[1] }]]] })
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    let report = serde_json::json!({ "per_seed": per_seed, "config": config.recorded() });
    std::fs::write(dir.join("report.json"), serde_json::to_vec(&report).unwrap()).unwrap();
}

#[test]
fn merged_reports_give_the_paired_gains_over_all_their_seeds_and_refuse_another_experiment() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::tiny_daemon_config(dir.path(), "a", 12);
    config.demo.variants = vec![Preset::AlWAs, Preset::Full];
    config.demo.repeats = 2;
    write_report(&dir.path().join("a"), &config, &[(1, [10.0, 40.0, 43.0, 60.0]), (0, [11.0, 42.0, 44.0, 61.0])]);
    // Seed 2 apart, as another process would run it: another name, seed, repeats and threads.
    config.run.name = "b".into();
    config.run.seed = 2;
    config.run.threads = 1;
    config.demo.repeats = 1;
    write_report(&dir.path().join("b"), &config, &[(2, [12.0, 41.0, 47.0, 62.0])]);
    // Another experiment: the same seeds at another L_con weight.
    config.contrast.weight = 0.5;
    write_report(&dir.path().join("c"), &config, &[(3, [12.0, 41.0, 47.0, 62.0])]);

    let out_dir = dir.path().join("merged");
    let merge = |dirs: &[&str], extra: &[&str]| {
        let list: Vec<String> = dirs.iter().map(|d| dir.path().join(d).display().to_string()).collect();
        Command::new(env!("CARGO_BIN_EXE_adamcu"))
            .args(["demo", "--merge", &list.join(","), "--out"])
            .arg(&out_dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = merge(&["a", "b"], &[]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("mean over seeds [0, 1, 2]"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["seeds"], serde_json::json!([0, 1, 2]));
    // Seeds in order 0, 1, 2. AL w AS over source-only: 31, 30, 29; the full model over AL w
    // AS: 2, 3, 6, mean 11/3, sample std sqrt(13/3), t(0.975, 2 degrees of freedom) = 4.3027.
    let gains = report["paired_gains"].as_array().unwrap();
    assert_eq!(gains[0]["per_seed"], serde_json::json!([31.0, 30.0, 29.0]));
    assert_eq!(gains[1]["per_seed"], serde_json::json!([2.0, 3.0, 6.0]));
    let (mean, half) = (11.0 / 3.0, 4.3027 * (13.0f64 / 3.0).sqrt() / 3f64.sqrt());
    let interval = &gains[1]["interval95"];
    assert!((gains[1]["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{}", gains[1]);
    assert!((interval[0].as_f64().unwrap() - (mean - half)).abs() < 1e-3, "{interval} vs {mean} ± {half}");
    assert!((interval[1].as_f64().unwrap() - (mean + half)).abs() < 1e-3, "{interval} vs {mean} ± {half}");
    assert!((report["rows"][2]["miou"].as_f64().unwrap() - 134.0 / 3.0).abs() < 1e-9, "{}", report["rows"][2]);
    // The val curve's mean over the three seeds.
    assert!(stdout.contains("12: 41.0") && stdout.contains("6: 40.0"), "{stdout}");

    // Another experiment is refused, naming the key and both reports.
    let out = merge(&["a", "c"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("contrast.weight: was 1.0, now 0.5"), "{stderr}");
    assert!(stderr.contains("a/report.json") && stderr.contains("c/report.json"), "{stderr}");
    // --set does not apply to reports already made.
    let out = merge(&["a", "b"], &["--set", "contrast.weight=0.5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("does not apply"), "{stderr}");
}

#[test]
fn compare_trains_each_strategy_at_one_budget_and_pairs_each_with_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::tiny_daemon_config(dir.path(), "compare", 12);
    config.train.target_supervised_iterations = 4;
    config.active.rounds = vec![0, 6];
    let path = common::write_config(dir.path(), &config);
    let out = Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["compare", "--strategies", "ada-mcu,ripu,random", "--repeats", "2", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| method")).collect();
    let names: Vec<&str> = rows.iter().map(|l| l.split('|').nth(1).unwrap().trim()).collect();
    assert_eq!(names, ["source-only", "full model (DCCM)", "RIPU", "random", "target-supervised"], "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(config.run_dir().join("report.json")).unwrap()).unwrap();
    // Every strategy spent the same budget, all of it.
    let budgets = report["per_seed"][0]["budgets"].as_array().unwrap_or_else(|| panic!("{report}"));
    let spent: Vec<_> = budgets.iter().map(|b| (b["spent"].clone(), b["budget"].clone())).collect();
    assert!(spent.iter().all(|s| *s == spent[0] && s.0 == s.1), "{spent:?}");
    // Paired differences against the first strategy (ADA-MCU), the first over source-only.
    let gains = report["paired_gains"].as_array().unwrap();
    let pairs: Vec<(&str, &str)> =
        gains.iter().map(|g| (g["from"].as_str().unwrap(), g["to"].as_str().unwrap())).collect();
    assert_eq!(
        pairs,
        [("source-only", "full model (DCCM)"), ("full model (DCCM)", "RIPU"), ("full model (DCCM)", "random")],
        "{report}"
    );
    assert!(stdout.contains("over the first variant"), "{stdout}");
    // Where each strategy's labels went, per seed; the random one's differ from RIPU's.
    for seed in [0, 1] {
        for strategy in ["full", "ripu", "random"] {
            let png = config.run_dir().join(format!("seed-{seed}/labels-{strategy}.png"));
            let picture = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display())).to_rgb8();
            assert!(picture.pixels().any(|p| p.0 == [255, 0, 0]), "{}: no bought pixel drawn", png.display());
        }
    }
    let ledger = |s: &str| std::fs::read(config.run_dir().join(format!("seed-0/{s}/ledger.bin"))).unwrap();
    assert_ne!(ledger("ripu"), ledger("random"));
}
