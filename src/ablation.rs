//! The paper's ablation rows (Tables V and VI) as named presets over a config, so each row is
//! a config: `adamcu train --stage ada --ablation NAME` or `[demo] variants`.

use crate::config::Config;

pub const PRESETS: [&str; 7] = ["al-wo-as", "al-w-as", "mcu-i", "mcu-d", "p2p", "p2p-c2c", "full"];

/// Human-readable row name of a preset, as in the paper's tables.
pub fn row_name(preset: &str) -> &'static str {
    match preset {
        "al-wo-as" => "AL w/o AS",
        "al-w-as" => "AL w AS",
        "mcu-i" => "AL w AS + MCU-i",
        "mcu-d" => "AL w AS + MCU-i + MCU-d",
        "p2p" => "p2p only",
        "p2p-c2c" => "p2p + c2c",
        "full" => "full model (DCCM)",
        _ => "unknown",
    }
}

/// Applies a preset's switches to `config` (everything else, budget included, stays).
pub fn apply(config: &Config, preset: &str) -> anyhow::Result<Config> {
    let mut c = config.clone();
    let all_levels = vec!["intra-image".to_string(), "cross-image".into(), "cross-domain".into()];
    c.active.adaptive_sampling = preset != "al-wo-as";
    c.contrast.enabled = !matches!(preset, "al-wo-as" | "al-w-as");
    c.contrast.levels = if preset == "mcu-i" { all_levels[..2].to_vec() } else { all_levels };
    c.contrast.p2p = true;
    c.contrast.c2c = preset != "p2p";
    c.contrast.dccm = preset == "full";
    anyhow::ensure!(PRESETS.contains(&preset), "ablation {preset:?}: expected one of {PRESETS:?}");
    Ok(c)
}
