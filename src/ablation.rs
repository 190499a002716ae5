//! The paper's ablation rows (Tables V and VI) as named presets over a config, so each row is
//! a config: `adamcu train --stage ada --ablation NAME` or `[demo] variants`; the other
//! strategies (RIPU, entropy, margin, random) as rows beside them (`adamcu compare`).

use crate::config::{Config, Level, Preset};

/// Applies a preset's switches to `config` (everything else, budget included, stays).
pub fn apply(config: &Config, preset: Preset) -> Config {
    let mut c = config.clone();
    c.active.strategy = preset.strategy();
    c.active.adaptive_sampling = preset != Preset::AlWoAs;
    // The round strategies train without ADA-MCU's units (their own losses: `round_losses`).
    c.contrast.enabled = !matches!(preset, Preset::AlWoAs | Preset::AlWAs) && !preset.strategy().uses_rounds();
    c.contrast.levels = match preset {
        Preset::McuI => vec![Level::IntraImage, Level::CrossImage],
        _ => Level::ALL.to_vec(),
    };
    c.contrast.p2p = true;
    c.contrast.c2c = preset != Preset::P2p;
    c.contrast.dccm = preset == Preset::Full;
    c
}
