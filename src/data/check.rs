//! `adamcu datasets check`: counts, class histogram, image sizes and every problem found.

use super::error::{DataError, DataErrorKind};
use super::labels::LabelMap;
use super::source::SampleSource;
use crate::config::DatasetConfig;
use std::collections::BTreeMap;

pub struct CheckReport {
    pub name: String,
    pub samples: usize,
    /// Pixels per training id (index = id), ignore excluded.
    pub class_pixels: Vec<u64>,
    pub ignored_pixels: u64,
    pub sizes: BTreeMap<(u32, u32), usize>,
    /// Problems that make a sample unusable.
    pub errors: Vec<DataError>,
    /// Frames skipped because a counterpart is missing (the set is still usable).
    pub skipped: Vec<DataError>,
}

impl CheckReport {
    pub fn usable(&self) -> bool {
        self.errors.is_empty() && self.samples > 0
    }

    pub fn print(&self, classes: usize) {
        println!("== {}: {} sample(s) ==", self.name, self.samples);
        for ((w, h), n) in &self.sizes {
            println!("  size {w}x{h}: {n}");
        }
        let total: u64 = self.class_pixels.iter().sum::<u64>() + self.ignored_pixels;
        if total > 0 {
            println!("  class histogram (share of pixels):");
            for (name, n) in LabelMap::class_names(classes).iter().zip(&self.class_pixels) {
                println!("    {name:<12} {:>7.3}%", 100.0 * *n as f64 / total as f64);
            }
            println!("    {:<12} {:>7.3}%", "(ignored)", 100.0 * self.ignored_pixels as f64 / total as f64);
        }
        for e in &self.skipped {
            println!("  skipped ({}): {e}", e.kind.as_str());
        }
        for e in &self.errors {
            println!("  ERROR ({}): {e}", e.kind.as_str());
        }
        println!("  {}", if self.usable() { "usable" } else { "NOT usable" });
    }
}

/// Decodes every sample of a configured set and collects what it finds.
pub fn check(name: &str, set: &DatasetConfig, classes: usize) -> CheckReport {
    let mut report = CheckReport {
        name: name.to_string(),
        samples: 0,
        class_pixels: vec![0; classes],
        ignored_pixels: 0,
        sizes: BTreeMap::new(),
        errors: Vec::new(),
        skipped: Vec::new(),
    };
    let source = match SampleSource::open(set, classes) {
        Ok(s) => s,
        Err(e) => {
            report.errors.push(e);
            return report;
        }
    };
    report.skipped = source.skipped().to_vec();
    for i in 0..source.len() {
        match source.load_full(i) {
            Ok((image, label)) => {
                report.samples += 1;
                *report.sizes.entry((image.width, image.height)).or_default() += 1;
                for &id in &label.ids {
                    match report.class_pixels.get_mut(id as usize) {
                        Some(n) => *n += 1,
                        None => report.ignored_pixels += 1,
                    }
                }
            }
            Err(e) => report.errors.push(e),
        }
    }
    if report.samples == 0 && report.errors.is_empty() {
        report.errors.push(DataError::new(DataErrorKind::Empty, &set.root, "no usable samples"));
    }
    report
}
