//! `make demo`: the main job on the embedded default, end to end: generate the synthetic
//! benchmark if missing, pretrain on the source, run ADA-MCU and its ablations from that
//! checkpoint under the budget, train the target-supervised upper bound, evaluate each, print
//! a table in the layout of the paper's Table VI and write `runs/<name>/report.json`.
//! Each demo run is a fresh experiment: the variants' ledgers from an earlier demo are removed.

use crate::config::Config;
use crate::train::eval::{markdown_table, EvalRow};
use crate::train::{SupervisedStage, Trainer};
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

pub fn run(config: &Config) -> Result<Vec<EvalRow>> {
    let started = Instant::now();
    crate::data::synth::generate(&config.synth)?;
    let run_dir = config.run_dir();
    std::fs::create_dir_all(&run_dir)?;
    let mut trainer = Trainer::new(config)?;
    tracing::info!("device {:?}; run dir {}", trainer.device, run_dir.display());

    trainer.train_supervised(SupervisedStage::Source, config.train.source_iterations)?;
    trainer.save(&run_dir.join("source.safetensors"), None, json!({"stage": "source"}))?;
    let source_only = trainer.evaluate("source-only", 0.0)?;
    tracing::info!("source-only mIoU {:.1}", source_only.miou);
    let mut rows = vec![source_only];
    let mut budgets = Vec::new();
    for variant in &config.demo.variants {
        let variant_config = crate::ablation::apply(config, variant)?;
        let mut ada = Trainer::new(&variant_config)?;
        ada.load(&run_dir.join("source.safetensors"))?;
        let dir = run_dir.join(variant);
        std::fs::create_dir_all(&dir)?;
        let ledger = dir.join("ledger.bin");
        let _ = std::fs::remove_file(&ledger);
        let (summary, _) = ada.train_ada(&ledger, config.active.iterations)?;
        ada.save(&dir.join("model.safetensors"), None, json!({"stage": "ada", "variant": variant, "summary": summary}))?;
        let fraction = summary.spent as f64 / summary.total_pixels as f64;
        let row = ada.evaluate(crate::ablation::row_name(variant), fraction)?;
        tracing::info!("{}: mIoU {:.1}, bought {} of {} pixels", row.name, row.miou, summary.spent, summary.budget);
        budgets.push((variant.clone(), summary));
        rows.push(row);
    }

    trainer.train_supervised(SupervisedStage::TargetSupervised, config.train.target_supervised_iterations)?;
    trainer.save(&run_dir.join("target-supervised.safetensors"), None, json!({"stage": "target-supervised"}))?;
    let supervised = trainer.evaluate("target-supervised", 1.0)?;

    rows.push(supervised);
    println!("\n{}", markdown_table(&rows));
    let (low, high) = (rows[0].miou, rows[rows.len() - 1].miou);
    println!("domain gap (target-supervised - source-only): {:.1} mIoU points", high - low);
    for (row, (variant, summary)) in rows[1..].iter().zip(&budgets) {
        println!("{:<26} closes {:>5.1}% of the gap; bought {} of Me = {} pixels ({:.3}% of Mt = {})",
            row.name, 100.0 * (row.miou - low) / (high - low), summary.spent, summary.budget,
            100.0 * summary.spent as f64 / summary.total_pixels as f64, summary.total_pixels);
        let _ = variant;
    }
    println!("demo took {:.0} s", started.elapsed().as_secs_f64());
    write_report(config, &rows, started.elapsed().as_secs_f64())?;
    Ok(rows)
}

pub fn write_report(config: &Config, rows: &[EvalRow], seconds: f64) -> Result<()> {
    let path = config.run_dir().join("report.json");
    let report = json!({ "run": config.run.name, "seconds": seconds, "rows": rows });
    crate::train::checkpoint::write_atomically(&path, |temp| {
        std::fs::write(temp, serde_json::to_vec_pretty(&report)?)?;
        Ok(())
    })?;
    println!("report: {}", path.display());
    Ok(())
}
