//! `make demo`: the main job on the embedded default, end to end: generate the synthetic
//! benchmark if missing, pretrain on the source, run ADA-MCU and its ablations from that
//! checkpoint under the budget, train the target-supervised upper bound, evaluate each, print
//! a table in the layout of the paper's Table VI and write `runs/<name>/report.json`.
//! With `demo.repeats = N` all of it runs for the seeds `run.seed` .. `run.seed + N - 1` (each
//! in `runs/<name>/seed-<s>/`) and the table gives each row's mean, and its mIoU's ± std.
//! Each demo run is a fresh experiment: the variants' ledgers from an earlier demo are removed.

use crate::config::{Config, Named, PairedAgainst, Preset, RunConfig, TranslateMethod};
use crate::train::ada::AdaSummary;
use crate::train::embeddings::{compactness, draw_panels, val_embeddings, Compactness};
use crate::train::eval::{markdown_table, EvalRow};
use crate::train::{CurvePoint, SupervisedStage, Trainer};
use anyhow::Result;
use serde_json::json;
use std::path::Path;
use std::time::Instant;
use tch::Tensor;

/// One seed's rows, as its report's `per_seed` entry records them: what the table over seeds
/// and the paired gains are computed from, so that `adamcu demo --merge` computes them from
/// reports exactly as the demo does from its runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SeedTable {
    pub seed: u64,
    /// Source-only trained on the raw (untranslated) source, when the config translates it:
    /// the paper's Table III compares the two.
    pub untranslated: Option<EvalRow>,
    /// Source-only, the variants in `demo.variants`' order, target-supervised.
    pub rows: Vec<EvalRow>,
    /// Each row's target val mIoU over its steps (`demo.eval_every`; empty when 0).
    pub curves: Vec<(String, Vec<CurvePoint>)>,
}

/// One seed's table and what else the demo draws and reports from it: what each variant
/// bought, Fig. 5's embeddings, the losses, Fig. 4's predictions.
struct SeedRun {
    table: SeedTable,
    budgets: Vec<AdaSummary>,
    /// Fig. 5's rows (AL w AS, the full model): target val pixel embeddings, their classes and
    /// their compactness.
    embeddings: Vec<(Preset, Tensor, Tensor, Compactness)>,
    /// Each row's loss at every step.
    losses: Vec<(String, Vec<f64>)>,
    /// Each ADA row's labelled fraction after every step.
    spending: Vec<(String, Vec<(u64, f64)>)>,
    /// Fig. 4: each row's predictions of the first `FIG4_IMAGES` target val images.
    fig4: Vec<(String, Vec<Vec<u8>>)>,
    /// Each variant at each of `demo.budgets` (budget, variant, its row): Fig. 1(c).
    at_budgets: Vec<(f64, Preset, EvalRow)>,
    /// The raw and the translated source's feature distance to the target train images, in
    /// the target-supervised network (when the config translates).
    feature_distance: Option<crate::translate::FeatureDistance>,
}

/// Target val images in Fig. 4.
const FIG4_IMAGES: usize = 4;

/// The first `FIG4_IMAGES` target val images and their ground truth (training ids).
fn fig4_images(config: &Config) -> Result<Vec<(crate::data::datasets::Rgb, Vec<u8>)>> {
    let val = crate::train::open_set(&config.data.target_val, "data.target_val", config.data.classes)?;
    (0..val.len().min(FIG4_IMAGES))
        .map(|i| {
            let (rgb, label) = val.load_full(i).map_err(anyhow::Error::msg)?;
            Ok((rgb, label.ids))
        })
        .collect()
}

/// `trainer`'s predictions (training ids at full size) of the Fig. 4 images.
fn fig4_predictions(trainer: &Trainer, images: &[(crate::data::datasets::Rgb, Vec<u8>)]) -> Result<Vec<Vec<u8>>> {
    let options =
        crate::train::eval::EvalOptions { flip: trainer.config.eval.flip, input_size: trainer.config.eval.input_size };
    images
        .iter()
        .map(|(rgb, _)| {
            let ids =
                tch::no_grad(|| crate::train::eval::predict_full(&trainer.model, &trainer.normaliser, rgb, &options))
                    .to_kind(tch::Kind::Uint8)
                    .to_device(tch::Device::Cpu);
            Ok(Vec::<u8>::try_from(ids.flatten(0, -1))?)
        })
        .collect()
}

/// Target training images in each `labels-<variant>.png`.
const LABEL_IMAGES: usize = 4;

/// Where a variant's labels went: the first `LABEL_IMAGES` target training images at the
/// ledger's size, each with the pixels its ledger bought.
fn draw_labels(config: &Config, ledger: &crate::active::ledger::Ledger, variant: Preset, path: &Path) -> Result<()> {
    let target = crate::train::open_set(&config.data.target, "data.target", config.data.classes)?;
    let tiles = (0..target.len().min(LABEL_IMAGES))
        .map(|i| {
            let rgb = target.load_image(i).map_err(anyhow::Error::msg)?;
            let grid = &ledger.images()[i];
            let image = image::RgbImage::from_raw(rgb.width, rgb.height, rgb.pixels).expect("sized image");
            let image = if (image.width(), image.height()) == (grid.width, grid.height) {
                image
            } else {
                image::imageops::resize(&image, grid.width, grid.height, image::imageops::FilterType::Triangle)
            };
            Ok((image, ledger.bought_mask(i), ledger.bought_in(i)))
        })
        .collect::<Result<Vec<_>>>()?;
    let title = format!("{}: labels bought (red) on the first target training images", variant.row_name());
    crate::figures::label_grid(path, &title, &tiles)
}

/// The row of source-only trained on the raw source.
const UNTRANSLATED: &str = "source-only, untranslated";

/// Images per set of the translation's feature distance.
const FEATURE_IMAGES: usize = 100;

/// The variants whose embeddings Fig. 5 compares.
const FIG5_VARIANTS: [Preset; 2] = [Preset::AlWAs, Preset::Full];

pub fn run(config: &Config) -> Result<Vec<EvalRow>> {
    let started = Instant::now();
    crate::data::synth::generate(&config.synth)?;
    // Algorithm 1, line 1 (when the config asks and the translated set is missing or stale).
    crate::translate::ensure(config, config.device()?)?;
    let translation = crate::translate::Plan::for_config(config)?
        .and_then(|plan| std::fs::read(plan.output.join(crate::translate::STAMP)).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    let seeds: Vec<u64> = (0..config.demo.repeats as u64).map(|i| config.run.seed + i).collect();
    let mut runs = Vec::new();
    for &seed in &seeds {
        let dir = if seeds.len() == 1 { config.run_dir() } else { config.run_dir().join(format!("seed-{seed}")) };
        let seeded = Config { run: RunConfig { seed, ..config.run.clone() }, ..config.clone() };
        runs.push(one_seed(&seeded, &dir)?);
    }
    let tables: Vec<&SeedTable> = runs.iter().map(|r| &r.table).collect();
    let (rows, untranslated) = print_table(&tables);
    if let Some(t) = &translation {
        println!(
            "translated source: colour distance to the target {:.1} (raw source {:.1}; RGB 0-255, per-channel Gaussian W2)",
            t["translated_to_target"].as_f64().unwrap_or(f64::NAN),
            t["raw_to_target"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(first) = runs[0].feature_distance {
        let mean = |f: fn(&crate::translate::FeatureDistance) -> f64| {
            runs.iter().filter_map(|r| r.feature_distance.as_ref()).map(f).sum::<f64>() / runs.len() as f64
        };
        println!(
            "translated source: feature distance to the target {:.3} (raw source {:.3}; Fréchet distance of \
             image-pooled layer4 features in the target-supervised network, {} images a set{})",
            mean(|d| d.translated_to_target),
            mean(|d| d.raw_to_target),
            first.images,
            if runs.len() > 1 { ", mean over seeds" } else { "" }
        );
    }
    let gains = print_steps(&config.demo.variants, config.demo.paired_against, &tables);
    let (low, high) = (rows[0].miou, rows[rows.len() - 1].miou);
    println!("domain gap (target-supervised - source-only): {:.1} mIoU points", high - low);
    for (v, row) in rows[1..rows.len() - 1].iter().enumerate() {
        let spent = runs.iter().map(|r| r.budgets[v].spent as f64).sum::<f64>() / runs.len() as f64;
        let AdaSummary { budget, total_pixels, pixels, .. } = &runs[0].budgets[v];
        println!(
            "{:<26} closes {:>5.1}% of the gap; bought {spent:.0} of Me = {budget} ({:.3}% of Mt = \
                  {total_pixels} {pixels})",
            row.name,
            100.0 * (row.miou - low) / (high - low),
            100.0 * spent / *total_pixels as f64
        );
    }
    // Fig. 5 from the first seed; compactness for every seed.
    let mut compactness_rows = Vec::new();
    for (i, (variant, _, _, _)) in runs[0].embeddings.iter().enumerate() {
        let per_seed: Vec<Compactness> = runs.iter().map(|r| r.embeddings[i].3).collect();
        let mean = |f: fn(&Compactness) -> f64| per_seed.iter().map(f).sum::<f64>() / per_seed.len() as f64;
        println!(
            "{:<26} target val embeddings: mean cosine same class {:.3}, other classes {:.3} (gap {:.3})",
            variant.row_name(),
            mean(|c| c.intra),
            mean(|c| c.inter),
            mean(|c| c.intra - c.inter)
        );
        compactness_rows.push(json!({ "variant": variant, "row": variant.row_name(),
            "intra_mean": mean(|c| c.intra), "inter_mean": mean(|c| c.inter), "per_seed": per_seed }));
    }
    let fig5 = config.run_dir().join("fig5.png");
    if !runs[0].embeddings.is_empty() {
        let panels: Vec<(Tensor, Tensor)> =
            runs[0].embeddings.iter().map(|(_, e, c, _)| (e.shallow_clone(), c.shallow_clone())).collect();
        draw_panels(&panels, config.data.classes, 480, &fig5)?;
        println!(
            "Fig. 5 (PCA of target val pixel embeddings, Cityscapes colours; {}): {}",
            runs[0].embeddings.iter().map(|e| e.0.row_name()).collect::<Vec<_>>().join(" | "),
            fig5.display()
        );
    }
    let mut figures = draw_figures(config, &runs)?;
    let by_budget = budget_table(config, &runs, &rows)?;
    if let Some(path) = by_budget.get("figure").and_then(|f| f.as_str()) {
        figures["fig1c"] = path.into();
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("demo took {seconds:.0} s");
    let per_seed: Vec<_> = runs
        .iter()
        .map(|r| {
            let mut seed = serde_json::to_value(&r.table).expect("a table serialises");
            seed["budgets"] = json!(r.budgets);
            seed["feature_distance"] = json!(r.feature_distance);
            seed
        })
        .collect();
    let report = json!({ "run": config.run.name, "seconds": seconds, "seeds": seeds, "rows": rows,
        "untranslated": untranslated, "translation": translation,
        "paired_gains": gains, "compactness": compactness_rows, "figures": figures, "by_budget": by_budget, "per_seed": per_seed, "budget_pixels": runs[0].budgets.first().map(|b| b.pixels.clone()),
        "config": config.recorded() });
    let path = config.run_dir().join("report.json");
    crate::files::write_json(&path, &report)?;
    println!("report: {}", path.display());
    Ok(rows)
}

/// Prints the table over seeds (each row's mean and ± std; source-only on the raw source first
/// when the config translates) and the translation's paired gain over the raw source; returns
/// the mean rows and the untranslated mean row.
fn print_table(tables: &[&SeedTable]) -> (Vec<EvalRow>, Option<EvalRow>) {
    let rows: Vec<EvalRow> = (0..tables[0].rows.len())
        .map(|i| EvalRow::mean(&tables.iter().map(|t| t.rows[i].clone()).collect::<Vec<_>>()))
        .collect();
    if tables.len() > 1 {
        let seeds: Vec<u64> = tables.iter().map(|t| t.seed).collect();
        println!("\nmean over seeds {seeds:?} (mIoU ± its standard deviation)");
    }
    let untranslated = tables[0].untranslated.is_some().then(|| {
        EvalRow::mean(&tables.iter().map(|t| t.untranslated.clone().expect("every seed has it")).collect::<Vec<_>>())
    });
    let table: Vec<EvalRow> = untranslated.iter().chain(rows.iter()).cloned().collect();
    println!("\n{}", markdown_table(&table));
    if let Some(raw) = &untranslated {
        let per_seed: Vec<f64> =
            tables.iter().map(|t| t.rows[0].miou - t.untranslated.as_ref().expect("every seed has it").miou).collect();
        println!(
            "translation (Algorithm 1, line 1): source-only {:.1} on the translated source against {:.1} on the raw \
             source ({:+.2} mIoU points{})",
            rows[0].miou,
            raw.miou,
            rows[0].miou - raw.miou,
            match paired_interval(&per_seed) {
                Some((lo, hi)) => format!(", paired over {} seeds: 95 % interval [{lo:+.2}, {hi:+.2}]", per_seed.len()),
                None => ", one seed".into(),
            }
        );
    }
    (rows, untranslated)
}

/// Prints each row's val curve (mean over seeds) and each variant's paired gain (`paired_gains`);
/// returns the gains.
fn print_steps(variants: &[Preset], against: PairedAgainst, tables: &[&SeedTable]) -> Vec<PairedGain> {
    if tables[0].curves.iter().any(|(_, c)| !c.is_empty()) {
        println!(
            "\ntarget val mIoU over each row's steps (demo.eval_every; mean over seeds): does more training help?"
        );
        for (i, (name, curve)) in tables[0].curves.iter().enumerate() {
            let points: Vec<String> = curve
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let mean = tables.iter().map(|t| t.curves[i].1[k].miou).sum::<f64>() / tables.len() as f64;
                    format!("{}: {mean:.1}", p.step)
                })
                .collect();
            println!("  {name:<26} {}", points.join(", "));
        }
    }
    let gains = paired_gains(variants, against, tables);
    if !gains.is_empty() {
        let over = match against {
            PairedAgainst::Previous => "each step over the row before",
            PairedAgainst::First => "each row over the first variant (the first over source-only)",
        };
        println!("\npaired gain of {over} (same seed: same source checkpoint and data order)");
        for g in &gains {
            println!("{g}");
        }
    }
    gains
}

/// Keys in which demo runs of one experiment may differ and still be merged: which seeds
/// (`run.seed`, `demo.repeats`), where they were written, and their threads.
const KEYS_MERGE_MAY_DIFFER: &[&str] = &["run.name", "run.runs_dir", "run.seed", "run.threads", "demo.repeats"];

/// `adamcu demo --merge DIR,DIR,... --out OUT`: one table over the seeds of demo (or compare)
/// runs made apart, for instance seeds split over processes or machines: each `DIR/report.json`
/// is read, their configs must agree on every key but `KEYS_MERGE_MAY_DIFFER`, no seed may
/// appear twice, and the table, the val curves and the paired gains are computed from their
/// seeds as one demo run over all of them computes them. Writes `OUT/report.json` (the
/// pictures stay with each run).
pub fn merge(dirs: &[std::path::PathBuf], out: &Path) -> Result<Vec<EvalRow>> {
    use anyhow::{bail, Context};
    let mut first: Option<(std::path::PathBuf, serde_json::Value)> = None;
    let mut tables: Vec<(std::path::PathBuf, SeedTable)> = Vec::new();
    for dir in dirs {
        let path = dir.join("report.json");
        let bytes = std::fs::read(&path).with_context(|| format!("{}: a demo's report to merge", path.display()))?;
        let report: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: expected the JSON report of `adamcu demo`", path.display()))?;
        let (Some(config), Some(per_seed)) = (report.get("config"), report.get("per_seed")) else {
            bail!("{}: expected the report of `adamcu demo`, with \"config\" and \"per_seed\"", path.display());
        };
        match &first {
            None => first = Some((path.clone(), config.clone())),
            Some((first_path, first_config)) => {
                let differing: Vec<_> = crate::config::recorded_changes(first_config, config)
                    .into_iter()
                    .filter(|c| !c.is_under(KEYS_MERGE_MAY_DIFFER))
                    .collect();
                if !differing.is_empty() {
                    bail!(
                        "{} and {} are not one experiment: their configs differ in (was: the first, now: the \
                         second){}\nonly {} may differ between merged runs",
                        first_path.display(),
                        path.display(),
                        crate::config::listed(&differing),
                        KEYS_MERGE_MAY_DIFFER.join(", ")
                    );
                }
            }
        }
        let seeds: Vec<SeedTable> = serde_json::from_value(per_seed.clone())
            .with_context(|| format!("{}: \"per_seed\" is not a list of seeds' rows", path.display()))?;
        for table in seeds {
            if let Some((other, _)) = tables.iter().find(|(_, t)| t.seed == table.seed) {
                bail!(
                    "seed {} is in both {} and {}: a seed may be merged once",
                    table.seed,
                    other.display(),
                    path.display()
                );
            }
            tables.push((path.clone(), table));
        }
    }
    let (_, recorded) = first.context("--merge: expected at least one run folder")?;
    let config: Config = serde_json::from_value(recorded.clone()).context("the merged reports' \"config\"")?;
    tables.sort_by_key(|(_, t)| t.seed);
    let by_seed: Vec<&SeedTable> = tables.iter().map(|(_, t)| t).collect();
    let (rows, untranslated) = print_table(&by_seed);
    let gains = print_steps(&config.demo.variants, config.demo.paired_against, &by_seed);
    let seeds: Vec<u64> = by_seed.iter().map(|t| t.seed).collect();
    let report = json!({ "merged_from": dirs, "seeds": seeds, "rows": rows, "untranslated": untranslated,
        "paired_gains": gains, "per_seed": by_seed, "config": recorded });
    let path = out.join("report.json");
    crate::files::write_json(&path, &report)?;
    println!("report: {}", path.display());
    Ok(rows)
}

/// The whole table for one seed (`config.run.seed`), its checkpoints and ledgers in `run_dir`.
fn one_seed(config: &Config, run_dir: &Path) -> Result<SeedRun> {
    std::fs::create_dir_all(run_dir)?;
    let mut trainer = Trainer::new(config)?;
    trainer.curve_every = config.demo.eval_every;
    tracing::info!("device {:?}; seed {}; run dir {}", trainer.device, config.run.seed, run_dir.display());

    let source_record = trainer.train_supervised(SupervisedStage::Source, config.train.source_iterations)?;
    let source_curve = source_record.curve;
    let source = run_dir.join("source.safetensors");
    trainer.save(&source, None, json!({"stage": "source"}))?;
    let source_only = trainer.evaluate("source-only", 0.0)?;
    tracing::info!("source-only mIoU {:.1}", source_only.miou);
    let mut curves = vec![(
        "source-only".to_string(),
        trainer.curve_end(source_curve, config.train.source_iterations, &source_only),
    )];
    // The Fig. 4 images, read once for every row's predictions.
    let fig4_set = fig4_images(config)?;
    let mut losses = vec![("source-only".to_string(), source_record.losses)];
    let mut fig4 = vec![("source-only".to_string(), fig4_predictions(&trainer, &fig4_set)?)];
    let mut spending = Vec::new();
    let untranslated =
        match crate::translate::untranslated(config).filter(|_| config.translate.method != TranslateMethod::None) {
            Some(raw_config) => {
                let mut raw = Trainer::new(&raw_config)?;
                raw.curve_every = config.demo.eval_every;
                let record = raw.train_supervised(SupervisedStage::Source, config.train.source_iterations)?;
                let curve = record.curve;
                losses.push((UNTRANSLATED.to_string(), record.losses));
                fig4.insert(0, (UNTRANSLATED.to_string(), fig4_predictions(&raw, &fig4_set)?));
                raw.save(
                    &run_dir.join("source-untranslated.safetensors"),
                    None,
                    json!({"stage": "source", "translated": false}),
                )?;
                let row = raw.evaluate(UNTRANSLATED, 0.0)?;
                tracing::info!("{UNTRANSLATED} mIoU {:.1}", row.miou);
                curves.push((UNTRANSLATED.to_string(), raw.curve_end(curve, config.train.source_iterations, &row)));
                Some(row)
            }
            None => None,
        };
    let mut rows = vec![source_only];
    let mut budgets = Vec::new();
    let mut embeddings = Vec::new();
    for &variant in &config.demo.variants {
        let variant_config = crate::ablation::apply(config, variant);
        let mut ada = Trainer::new(&variant_config)?;
        ada.curve_every = config.demo.eval_every;
        ada.load(&source)?;
        let dir = run_dir.join(variant.name());
        std::fs::create_dir_all(&dir)?;
        let ledger = dir.join("ledger.bin");
        let _ = std::fs::remove_file(&ledger);
        let (summary, state) = ada.train_ada(&ledger, config.active.iterations)?;
        let labels_png = run_dir.join(format!("labels-{}.png", variant.name()));
        draw_labels(config, &state.ledger, variant, &labels_png)?;
        ada.save(
            &dir.join("model.safetensors"),
            None,
            json!({"stage": "ada", "variant": variant, "summary": summary}),
        )?;
        let row = ada.evaluate(variant.row_name(), summary.labelled_fraction())?;
        tracing::info!(
            "{}: mIoU {:.1}, bought {} of {} {}",
            row.name,
            row.miou,
            summary.spent,
            summary.budget,
            summary.pixels
        );
        if FIG5_VARIANTS.contains(&variant) {
            // 200 labelled pixels from each of 20 val images: 4,000 points, as Fig. 5 plots.
            let (points, classes) = val_embeddings(&ada, 20, 200, config.run.seed as i64)?;
            let c = compactness(&points, &classes);
            tracing::info!(
                "{}: target val embeddings: mean cosine same class {:.3}, other classes {:.3}",
                row.name,
                c.intra,
                c.inter
            );
            embeddings.push((variant, points, classes, c));
        }
        curves.push((row.name.clone(), ada.curve_end(summary.curve.clone(), config.active.iterations, &row)));
        losses.push((row.name.clone(), summary.trace.iter().map(|t| t.loss).collect()));
        spending.push((row.name.clone(), summary.trace.iter().map(|t| (t.step, t.labelled_fraction)).collect()));
        fig4.push((row.name.clone(), fig4_predictions(&ada, &fig4_set)?));
        budgets.push(summary);
        rows.push(row);
    }

    // Fig. 1(c): every variant again at each further budget, from the same source checkpoint.
    let mut at_budgets = Vec::new();
    for &budget in &config.demo.budgets {
        for &variant in &config.demo.variants {
            let mut variant_config = crate::ablation::apply(config, variant);
            variant_config.active.budget = budget;
            let mut ada = Trainer::new(&variant_config)?;
            ada.load(&source)?;
            let dir = run_dir.join(format!("{}-budget-{budget}", variant.name()));
            std::fs::create_dir_all(&dir)?;
            let ledger = dir.join("ledger.bin");
            let _ = std::fs::remove_file(&ledger);
            let (summary, _) = ada.train_ada(&ledger, config.active.iterations)?;
            let name = format!("{} @ {:.1} %", variant.row_name(), 100.0 * budget);
            let row = ada.evaluate(&name, summary.labelled_fraction())?;
            tracing::info!(
                "{name}: mIoU {:.1}, bought {} of {} {}",
                row.miou,
                summary.spent,
                summary.budget,
                summary.pixels
            );
            at_budgets.push((budget, variant, row));
        }
    }

    let iterations = config.train.target_supervised_iterations;
    let record = trainer.train_supervised(SupervisedStage::TargetSupervised, iterations)?;
    trainer.save(&run_dir.join("target-supervised.safetensors"), None, json!({"stage": "target-supervised"}))?;
    let row = trainer.evaluate("target-supervised", 1.0)?;
    curves.push(("target-supervised".to_string(), trainer.curve_end(record.curve, iterations, &row)));
    losses.push(("target-supervised".to_string(), record.losses));
    fig4.push(("target-supervised".to_string(), fig4_predictions(&trainer, &fig4_set)?));
    rows.push(row);
    let feature_distance = crate::translate::feature_distance(config, &trainer, FEATURE_IMAGES)?;
    Ok(SeedRun {
        feature_distance,
        table: SeedTable { seed: config.run.seed, untranslated, rows, curves },
        budgets,
        embeddings,
        losses,
        spending,
        fig4,
        at_budgets,
    })
}

/// With `demo.budgets`: each variant's mIoU (mean over seeds) at every budget, printed as a
/// table and drawn as the paper's Fig. 1(c) (`fig1c.png`: mIoU against the labelled fraction,
/// from source-only at 0, with the target-supervised bound). `rows` are the means of the main
/// table (source-only, the variants at `active.budget`, target-supervised).
fn budget_table(config: &Config, runs: &[SeedRun], rows: &[EvalRow]) -> Result<serde_json::Value> {
    use crate::figures::{charts, Chart, Series};
    if config.demo.budgets.is_empty() {
        return Ok(json!({}));
    }
    let mut budgets = vec![config.active.budget];
    budgets.extend(&config.demo.budgets);
    let mut series = Vec::new();
    let mut table = Vec::new();
    println!("\nmIoU against the labelled fraction (the paper's Fig. 1(c); mean over seeds)");
    for (v, &variant) in config.demo.variants.iter().enumerate() {
        let mut points = vec![(0.0, rows[0].miou)];
        let mut line = format!("  {:<26}", variant.row_name());
        for &budget in &budgets {
            let row = if budget == config.active.budget {
                rows[v + 1].clone()
            } else {
                let per_seed: Vec<EvalRow> = runs
                    .iter()
                    .map(|r| {
                        r.at_budgets.iter().find(|(b, p, _)| *b == budget && *p == variant).expect("run").2.clone()
                    })
                    .collect();
                EvalRow::mean(&per_seed)
            };
            points.push((100.0 * row.target_labeled_fraction, row.miou));
            line.push_str(&format!(" {:.1} % -> {:.1}", 100.0 * budget, row.miou));
            table.push(json!({ "variant": variant, "budget": budget, "row": row }));
        }
        println!("{line}");
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push(Series { name: variant.row_name().to_string(), points });
    }
    let path = config.run_dir().join("fig1c.png");
    let bound = rows[rows.len() - 1].miou;
    let chart = Chart {
        title: "target val mIoU against the labelled fraction of the target (Fig. 1(c))",
        x: "labelled target pixels (%)",
        y: "mIoU (%)",
        series: &series,
        limit: Some(("target-supervised", bound)),
    };
    charts(&path, &[chart], 720, 480)?;
    println!("Fig. 1(c): {}", path.display());
    Ok(json!({ "rows": table, "figure": path }))
}

/// Fig. 4 (`fig4.png`), the val mIoU and loss over each row's steps (`curves.png`) and the
/// labelled pixels over each ADA row's steps (`budget.png`), beside `report.json`; the mIoU
/// curves are the mean over seeds, the rest from the first seed. Returns the files by name.
fn draw_figures(config: &Config, runs: &[SeedRun]) -> Result<serde_json::Value> {
    use crate::figures::{charts, prediction_grid, smoothed, Chart, Series};
    let dir = config.run_dir();
    let first = &runs[0];
    let fig4 = dir.join("fig4.png");
    prediction_grid(&fig4, &fig4_images(config)?, &first.fig4, config.data.classes)?;
    let miou: Vec<Series> = first
        .table
        .curves
        .iter()
        .enumerate()
        .map(|(i, (name, curve))| Series {
            name: name.clone(),
            points: (0..curve.len())
                .map(|k| {
                    let mean = runs.iter().map(|r| r.table.curves[i].1[k].miou).sum::<f64>() / runs.len() as f64;
                    (curve[k].step as f64, mean)
                })
                .collect(),
        })
        .collect();
    let loss: Vec<Series> = first
        .losses
        .iter()
        .map(|(name, values)| Series {
            name: name.clone(),
            points: smoothed(values, 25).into_iter().enumerate().map(|(k, v)| ((k + 1) as f64, v)).collect(),
        })
        .collect();
    let curves = dir.join("curves.png");
    let miou_chart =
        Chart { title: "target val mIoU over each row's steps", x: "step", y: "mIoU (%)", series: &miou, limit: None };
    let loss_chart =
        Chart { title: "training loss (moving average of 25 steps)", x: "step", y: "loss", series: &loss, limit: None };
    charts(&curves, &[miou_chart, loss_chart], 720, 480)?;
    let mut files = json!({ "fig4": fig4, "curves": curves });
    if let Some(summary) = first.budgets.first() {
        let total = summary.total_pixels as f64;
        let spent: Vec<Series> = first
            .spending
            .iter()
            .map(|(name, trace)| Series {
                name: name.clone(),
                points: trace.iter().map(|&(step, fraction)| (step as f64, fraction * total / 1000.0)).collect(),
            })
            .collect();
        let budget = dir.join("budget.png");
        let y = "labelled target pixels Ma, thousands (training resolution)".to_string();
        let chart = Chart {
            title: "annotation spent over each ADA row's steps",
            x: "step",
            y: &y,
            series: &spent,
            limit: Some(("budget Me", summary.budget as f64 / 1000.0)),
        };
        charts(&budget, &[chart], 720, 480)?;
        files["budget"] = budget.display().to_string().into();
    }
    println!(
        "pictures: {} (Fig. 4: image, ground truth, each row), {} (val mIoU and loss over steps){}",
        fig4.display(),
        curves.display(),
        files
            .get("budget")
            .and_then(|b| b.as_str())
            .map_or(String::new(), |b| format!(", {b} (labelled pixels over steps)"))
    );
    Ok(files)
}

/// One row's mIoU gain over the row before, paired by seed (same seed: same source checkpoint
/// and data order): the mean of the per-seed differences and its 95 % interval (Student's t
/// with n - 1 degrees of freedom; none with one seed). `step` is the row's variant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairedGain {
    pub step: Preset,
    pub from: String,
    pub to: String,
    pub per_seed: Vec<f64>,
    pub mean: f64,
    pub interval95: Option<(f64, f64)>,
}

impl std::fmt::Display for PairedGain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "  {:<26} over {:<26} {:+.2} mIoU points", self.to, self.from, self.mean)?;
        match self.interval95 {
            Some((lo, hi)) => write!(
                f,
                ", 95 % interval [{lo:+.2}, {hi:+.2}] over {} seeds{}",
                self.per_seed.len(),
                if lo > 0.0 {
                    ": a gain"
                } else if hi < 0.0 {
                    ": a loss"
                } else {
                    ": not told from noise"
                }
            ),
            None => write!(f, " (one seed: no interval)"),
        }
    }
}

/// The 95 % interval of the mean of paired differences (Student's t with n - 1 degrees of
/// freedom); none with one seed.
fn paired_interval(per_seed: &[f64]) -> Option<(f64, f64)> {
    let n = per_seed.len() as f64;
    (per_seed.len() > 1).then(|| {
        let mean = per_seed.iter().sum::<f64>() / n;
        let sd = crate::train::eval::sample_std(per_seed);
        let t = statrs::distribution::ContinuousCDF::inverse_cdf(
            &statrs::distribution::StudentsT::new(0.0, 1.0, n - 1.0).expect("n > 1"),
            0.975,
        );
        (mean - t * sd / n.sqrt(), mean + t * sd / n.sqrt())
    })
}

/// Each variant's gain over the row before it (the variant listed before it in
/// `demo.variants`; the first over source-only), from the per-seed rows (`tables[s].rows[0]` is
/// source-only, then the variants in order). With the paper's order (AL w/o AS, AL w AS,
/// MCU-i, MCU-d, full) these are Table VI's steps: AS, MCU-i, MCU-d and the DCCM.
/// With `demo.paired_against = "first"` every variant after the first is measured against the
/// first (`adamcu compare`: each strategy against the first listed).
fn paired_gains(variants: &[Preset], against: PairedAgainst, tables: &[&SeedTable]) -> Vec<PairedGain> {
    (1..=variants.len())
        .map(|b| {
            let a = if against == PairedAgainst::First && b > 1 { 1 } else { b - 1 };
            let per_seed: Vec<f64> = tables.iter().map(|r| r.rows[b].miou - r.rows[a].miou).collect();
            let n = per_seed.len() as f64;
            let mean = per_seed.iter().sum::<f64>() / n;
            let interval95 = paired_interval(&per_seed);
            PairedGain {
                step: variants[b - 1],
                from: tables[0].rows[a].name.clone(),
                to: tables[0].rows[b].name.clone(),
                per_seed,
                mean,
                interval95,
            }
        })
        .collect()
}
