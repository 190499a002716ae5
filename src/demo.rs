//! `make demo`: the main job on the embedded default, end to end: generate the synthetic
//! benchmark if missing, pretrain on the source, run ADA-MCU and its ablations from that
//! checkpoint under the budget, train the target-supervised upper bound, evaluate each, print
//! a table in the layout of the paper's Table VI and write `runs/<name>/report.json`.
//! With `demo.repeats = N` all of it runs for the seeds `run.seed` .. `run.seed + N - 1` (each
//! in `runs/<name>/seed-<s>/`) and the table gives each row's mean, and its mIoU's ± std.
//! Each demo run is a fresh experiment: the variants' ledgers from an earlier demo are removed.

use crate::config::{Config, RunConfig};
use crate::train::ada::AdaSummary;
use crate::train::eval::{markdown_table, EvalRow};
use crate::train::{SupervisedStage, Trainer};
use anyhow::Result;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// One seed's table: source-only, the variants, target-supervised; and what each variant bought.
struct SeedRun {
    seed: u64,
    rows: Vec<EvalRow>,
    budgets: Vec<AdaSummary>,
}

pub fn run(config: &Config) -> Result<Vec<EvalRow>> {
    let started = Instant::now();
    crate::data::synth::generate(&config.synth)?;
    let seeds: Vec<u64> = (0..config.demo.repeats as u64).map(|i| config.run.seed + i).collect();
    let mut runs = Vec::new();
    for &seed in &seeds {
        let dir = if seeds.len() == 1 { config.run_dir() } else { config.run_dir().join(format!("seed-{seed}")) };
        let seeded = Config { run: RunConfig { seed, ..config.run.clone() }, ..config.clone() };
        runs.push(one_seed(&seeded, &dir)?);
    }
    let rows: Vec<EvalRow> = (0..runs[0].rows.len())
        .map(|i| EvalRow::mean(&runs.iter().map(|r| r.rows[i].clone()).collect::<Vec<_>>()))
        .collect();

    if seeds.len() > 1 {
        println!("\nmean over seeds {seeds:?} (mIoU ± its standard deviation)");
    }
    println!("\n{}", markdown_table(&rows));
    let (low, high) = (rows[0].miou, rows[rows.len() - 1].miou);
    println!("domain gap (target-supervised - source-only): {:.1} mIoU points", high - low);
    for (v, row) in rows[1..rows.len() - 1].iter().enumerate() {
        let spent = runs.iter().map(|r| r.budgets[v].spent as f64).sum::<f64>() / runs.len() as f64;
        let AdaSummary { budget, total_pixels, .. } = runs[0].budgets[v];
        println!("{:<26} closes {:>5.1}% of the gap; bought {spent:.0} of Me = {budget} pixels ({:.3}% of Mt = \
                  {total_pixels})", row.name, 100.0 * (row.miou - low) / (high - low),
            100.0 * spent / total_pixels as f64);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("demo took {seconds:.0} s");
    let per_seed: Vec<_> = runs.iter().map(|r| json!({ "seed": r.seed, "rows": r.rows })).collect();
    let report = json!({ "run": config.run.name, "seconds": seconds, "seeds": seeds, "rows": rows,
        "per_seed": per_seed, "config": config.recorded() });
    let path = config.run_dir().join("report.json");
    crate::train::checkpoint::write_atomically(&path, |temp| {
        std::fs::write(temp, serde_json::to_vec_pretty(&report)?)?;
        Ok(())
    })?;
    println!("report: {}", path.display());
    Ok(rows)
}

/// The whole table for one seed (`config.run.seed`), its checkpoints and ledgers in `run_dir`.
fn one_seed(config: &Config, run_dir: &Path) -> Result<SeedRun> {
    std::fs::create_dir_all(run_dir)?;
    let mut trainer = Trainer::new(config)?;
    tracing::info!("device {:?}; seed {}; run dir {}", trainer.device, config.run.seed, run_dir.display());

    trainer.train_supervised(SupervisedStage::Source, config.train.source_iterations)?;
    let source = run_dir.join("source.safetensors");
    trainer.save(&source, None, json!({"stage": "source"}))?;
    let source_only = trainer.evaluate("source-only", 0.0)?;
    tracing::info!("source-only mIoU {:.1}", source_only.miou);
    let mut rows = vec![source_only];
    let mut budgets = Vec::new();
    for variant in &config.demo.variants {
        let variant_config = crate::ablation::apply(config, variant)?;
        let mut ada = Trainer::new(&variant_config)?;
        ada.load(&source)?;
        let dir = run_dir.join(variant);
        std::fs::create_dir_all(&dir)?;
        let ledger = dir.join("ledger.bin");
        let _ = std::fs::remove_file(&ledger);
        let (summary, _) = ada.train_ada(&ledger, config.active.iterations)?;
        ada.save(&dir.join("model.safetensors"), None, json!({"stage": "ada", "variant": variant, "summary": summary}))?;
        let fraction = summary.spent as f64 / summary.total_pixels as f64;
        let row = ada.evaluate(crate::ablation::row_name(variant), fraction)?;
        tracing::info!("{}: mIoU {:.1}, bought {} of {} pixels", row.name, row.miou, summary.spent, summary.budget);
        budgets.push(summary);
        rows.push(row);
    }

    trainer.train_supervised(SupervisedStage::TargetSupervised, config.train.target_supervised_iterations)?;
    trainer.save(&run_dir.join("target-supervised.safetensors"), None, json!({"stage": "target-supervised"}))?;
    rows.push(trainer.evaluate("target-supervised", 1.0)?);
    Ok(SeedRun { seed: config.run.seed, rows, budgets })
}
