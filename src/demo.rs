//! `make demo`: the main job on the embedded default, end to end: generate the synthetic
//! benchmark if missing, pretrain on the source, evaluate, train the target-supervised upper
//! bound, evaluate, print the table and write `runs/<name>/report.json`.

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

    trainer.train_supervised(SupervisedStage::TargetSupervised, config.train.target_supervised_iterations)?;
    trainer.save(&run_dir.join("target-supervised.safetensors"), None, json!({"stage": "target-supervised"}))?;
    let supervised = trainer.evaluate("target-supervised", 1.0)?;

    let rows = vec![source_only, supervised];
    println!("\n{}", markdown_table(&rows));
    println!("domain gap (target-supervised - source-only): {:.1} mIoU points; demo took {:.0} s",
        rows[1].miou - rows[0].miou, started.elapsed().as_secs_f64());
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
