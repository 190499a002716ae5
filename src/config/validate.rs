//! Validation: every value checked, every problem reported as `key = value: expected ...`.

use super::choices::*;
use super::{parse_device, Config};
use strum::VariantNames;

/// Every key whose value is a closed choice, with the names it allows (arrays: each element).
fn choice_keys() -> Vec<(String, &'static [&'static str])> {
    let mut keys: Vec<(String, &'static [&'static str])> = vec![
        ("data.on_bad_sample".into(), OnBadSample::VARIANTS),
        ("model.arch".into(), Arch::VARIANTS),
        ("model.backbone".into(), Backbone::VARIANTS),
        ("model.bn_stats".into(), BnStats::VARIANTS),
        ("train.precision".into(), Precision::VARIANTS),
        ("active.schedule".into(), Schedule::VARIANTS),
        ("active.strategy".into(), Strategy::VARIANTS),
        ("active.annotation".into(), Annotation::VARIANTS),
        ("demo.paired_against".into(), PairedAgainst::VARIANTS),
        ("contrast.levels".into(), Level::VARIANTS),
        ("contrast.dccm_from".into(), DccmFrom::VARIANTS),
        ("contrast.cross_domain_anchors".into(), CrossDomainAnchors::VARIANTS),
        ("contrast.sampling".into(), ContrastSampling::VARIANTS),
        ("demo.variants".into(), Preset::VARIANTS),
        ("translate.method".into(), TranslateMethod::VARIANTS),
        ("translate.fda_window".into(), FdaWindow::VARIANTS),
        ("translate.fda_mode".into(), FdaMode::VARIANTS),
    ];
    for set in ["data.source", "data.target", "data.target_val"] {
        keys.push((format!("{set}.kind"), DatasetKind::VARIANTS));
        keys.push((format!("{set}.labels_kind"), DatasetKind::VARIANTS));
        keys.push((format!("{set}.split"), Split::VARIANTS));
    }
    keys
}

/// Checks every closed choice on the TOML, before serde reads it: a name outside the set is
/// reported as `key = "name": expected "a", "b" or "c"` and replaced by an allowed one (the
/// config is refused all the same), so that serde, which stops at its first error, goes on to
/// the rest of the file.
/// Values of the wrong type are left to serde's message.
pub(super) fn check_choices(doc: &mut toml::Table, errors: &mut Vec<String>) {
    for (key, names) in choice_keys() {
        let (path, last) = key.rsplit_once('.').expect("dotted");
        let mut table = Some(&mut *doc);
        for part in path.split('.') {
            table = table.and_then(|t| t.get_mut(part)).and_then(|v| v.as_table_mut());
        }
        let Some(table) = table else { continue };
        let bad = |v: &toml::Value| v.as_str().is_some_and(|name| !names.contains(&name));
        let mut report = |v: &mut toml::Value| {
            if bad(v) {
                errors.push(format!("{key} = {v}: expected {}", allowed(names)));
                *v = toml::Value::String(names[0].to_string());
            }
        };
        match table.get_mut(last) {
            Some(toml::Value::Array(items)) => items.iter_mut().for_each(&mut report),
            Some(v) => report(v),
            None => {}
        }
    }
}

impl Config {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        let mut check = |ok: bool, key: &str, value: String, expected: &str| {
            if !ok {
                errors.push(format!("{key} = {value}: expected {expected}"));
            }
        };
        let r = &self.run;
        check(
            !r.name.is_empty() && !r.name.contains('/'),
            "run.name",
            format!("{:?}", r.name),
            "a non-empty name without '/'",
        );
        check(
            parse_device(&r.device).is_some(),
            "run.device",
            format!("{:?}", r.device),
            "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"",
        );

        let d = &self.data;
        check(d.classes == 19 || d.classes == 16, "data.classes", d.classes.to_string(), "19 or 16");
        check(d.workers >= 1, "data.workers", d.workers.to_string(), "at least 1");
        check(d.channel_capacity >= 1, "data.channel_capacity", d.channel_capacity.to_string(), "at least 1");
        for (name, set) in self.data_sets() {
            let Some(set) = set else { continue };
            if set.kind == DatasetKind::Translated {
                check(
                    set.labels_kind.is_some_and(|k| {
                        k != DatasetKind::Translated && k != DatasetKind::Shard && k != DatasetKind::Cityscapes
                    }),
                    &format!("{name}.labels_kind"),
                    format!("{:?}", set.labels_kind.map(|k| k.name())),
                    "the original source set: \"gta5\", \"synthia\" or \"synscapes\"",
                );
                check(
                    set.labels_root.is_some(),
                    &format!("{name}.labels_root"),
                    "(missing)".into(),
                    "the original set's root, whose labels pair with the translated images",
                );
            }
            if set.kind == DatasetKind::Synthia {
                check(
                    d.classes == 16,
                    "data.classes",
                    d.classes.to_string(),
                    "16 with a SYNTHIA set (its 16-class protocol)",
                );
            }
        }

        let s = &self.synth;
        check(
            s.width >= 64 && s.width.is_multiple_of(8),
            "synth.width",
            s.width.to_string(),
            "a multiple of 8, at least 64",
        );
        check(
            s.height >= 32 && s.height.is_multiple_of(8),
            "synth.height",
            s.height.to_string(),
            "a multiple of 8, at least 32",
        );
        check(s.source_images >= 1, "synth.source_images", s.source_images.to_string(), "at least 1");
        check(s.target_train_images >= 1, "synth.target_train_images", s.target_train_images.to_string(), "at least 1");
        check(s.target_val_images >= 1, "synth.target_val_images", s.target_val_images.to_string(), "at least 1");

        let t = &self.translate;
        if t.method != TranslateMethod::None {
            let source = self.data.source.as_ref();
            check(
                source.is_some_and(|s| {
                    s.kind == DatasetKind::Translated && s.labels_kind.is_some() && s.labels_root.is_some()
                }),
                "data.source.kind",
                source.map_or("(no data.source)".into(), |s| format!("{:?}", s.kind.name())),
                "\"translated\" with labels_kind and labels_root (the original set) when translate.method is not \"none\": \
                 the translation reads the original set and writes data.source.root",
            );
            check(
                self.data.target.is_some(),
                "data.target",
                "(missing)".into(),
                "the target train set the translation looks like",
            );
        }
        check(
            t.generator_width >= 1 && t.discriminator_width >= 1,
            "translate.generator_width / discriminator_width",
            format!("{} / {}", t.generator_width, t.discriminator_width),
            "at least 1",
        );
        check(t.generator_blocks >= 0, "translate.generator_blocks", t.generator_blocks.to_string(), "at least 0");
        check(
            (1..=6).contains(&t.discriminator_layers),
            "translate.discriminator_layers",
            t.discriminator_layers.to_string(),
            "1 to 6 (3: the 70x70 PatchGAN)",
        );
        check(
            t.crop[0] >= 16 && t.crop[1] >= 16 && t.crop.iter().all(|c| c.is_multiple_of(4)),
            "translate.crop",
            format!("{:?}", t.crop),
            "[height, width], each a multiple of 4 and at least 16",
        );
        check(
            t.load_size == [0, 0] || (t.load_size[0] >= t.crop[0] && t.load_size[1] >= t.crop[1]),
            "translate.load_size",
            format!("{:?}", t.load_size),
            "[0, 0] (as stored) or [height, width] at least translate.crop",
        );
        check(
            t.epochs + t.epochs_decay >= 1,
            "translate.epochs",
            t.epochs.to_string(),
            "epochs + epochs_decay at least 1",
        );
        check(t.lr > 0.0, "translate.lr", t.lr.to_string(), "a positive learning rate");
        check((0.0..1.0).contains(&t.beta1), "translate.beta1", t.beta1.to_string(), "in [0, 1)");
        check(t.cycle_weight >= 0.0, "translate.cycle_weight", t.cycle_weight.to_string(), "at least 0");
        check(t.identity_weight >= 0.0, "translate.identity_weight", t.identity_weight.to_string(), "at least 0");
        check(t.checkpoint_every >= 1, "translate.checkpoint_every", t.checkpoint_every.to_string(), "at least 1");
        check(
            t.fda_beta > 0.0 && t.fda_beta <= 0.5,
            "translate.fda_beta",
            t.fda_beta.to_string(),
            "in (0, 0.5] (FDA's beta: 0.01 to 0.09 in its paper)",
        );

        let a = &self.augment;
        check(
            a.crop[0] >= 8 && a.crop[1] >= 8,
            "augment.crop",
            format!("{:?}", a.crop),
            "[height, width], each at least 8",
        );
        check(
            a.scale[0] > 0.0 && a.scale[0] <= a.scale[1],
            "augment.scale",
            format!("{:?}", a.scale),
            "[min, max] with 0 < min <= max",
        );
        check(
            (a.resize[0] == 0) == (a.resize[1] == 0),
            "augment.resize",
            format!("{:?}", a.resize),
            "[height, width], both 0 or both positive",
        );
        check(a.std.iter().all(|&v| v > 0.0), "augment.std", format!("{:?}", a.std), "three positive numbers");

        let m = &self.model;
        check(m.tiny_width >= 4, "model.tiny_width", m.tiny_width.to_string(), "at least 4");
        check(m.projection_dim >= 2, "model.projection_dim", m.projection_dim.to_string(), "at least 2");
        check(
            !m.aspp_dilations.is_empty()
                && m.aspp_dilations.iter().all(|&d| d >= 1)
                && (m.arch != Arch::Deeplabv3plus || m.aspp_dilations.len() >= 2),
            "model.aspp_dilations",
            format!("{:?}", m.aspp_dilations),
            "a list of dilations >= 1 (at least two for deeplabv3plus)",
        );
        check(m.v3plus_width >= 8, "model.v3plus_width", m.v3plus_width.to_string(), "at least 8");

        let t = &self.train;
        check(t.batch_source >= 1, "train.batch_source", t.batch_source.to_string(), "at least 1");
        check(t.batch_target >= 1, "train.batch_target", t.batch_target.to_string(), "at least 1");
        check(t.lr > 0.0 && t.lr.is_finite(), "train.lr", t.lr.to_string(), "a positive number");
        check((0.0..1.0).contains(&t.momentum), "train.momentum", t.momentum.to_string(), "a number in [0, 1)");
        check(t.weight_decay >= 0.0, "train.weight_decay", t.weight_decay.to_string(), "a number >= 0");
        check(t.poly_power >= 0.0, "train.poly_power", t.poly_power.to_string(), "a number >= 0");
        check(t.head_lr_mult > 0.0, "train.head_lr_mult", t.head_lr_mult.to_string(), "a positive number");
        check(t.aux_weight >= 0.0, "train.aux_weight", t.aux_weight.to_string(), "a number >= 0");
        check(t.log_every >= 1, "train.log_every", t.log_every.to_string(), "at least 1");
        check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every.to_string(), "at least 1");
        check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints.to_string(), "at least 1");
        check(
            !t.sync_bn || self.model.bn_stats == BnStats::Batch,
            "train.sync_bn",
            "true".into(),
            "false with model.bn_stats = \"frozen\" (stored statistics are the same on every rank)",
        );
        check(
            self.metrics.listen.is_empty() || self.metrics.listen.parse::<std::net::SocketAddr>().is_ok(),
            "metrics.listen",
            format!("{:?}", self.metrics.listen),
            "\"host:port\" (e.g. \"127.0.0.1:9464\") or \"\"",
        );

        let a = &self.active;
        check(a.budget > 0.0 && a.budget <= 1.0, "active.budget", a.budget.to_string(), "a fraction in (0, 1]");
        check(a.gamma >= 0.0, "active.gamma", a.gamma.to_string(), "a number >= 0");
        check(
            a.pi_low >= 0.0 && a.pi_low < a.pi_high,
            "active.pi_low",
            a.pi_low.to_string(),
            "a number >= 0 and below active.pi_high",
        );
        check(a.decay > 0.0 && a.decay < 1.0, "active.decay", a.decay.to_string(), "a rate in (0, 1)");
        if a.strategy.uses_rounds() {
            check(
                !a.rounds.is_empty()
                    && a.rounds.windows(2).all(|w| w[0] < w[1])
                    && a.rounds.last().is_some_and(|&r| r < a.iterations),
                "active.rounds",
                format!("{:?}", a.rounds),
                "increasing iterations below active.iterations (one selection round at each)",
            );
        }
        check(
            a.pixels_per_image.is_none_or(|p| p >= 1),
            "active.pixels_per_image",
            format!("{:?}", a.pixels_per_image),
            "at least 1 (or absent: the budget is active.budget)",
        );
        check(
            a.poly_horizon.is_none_or(|h| h >= a.iterations),
            "active.poly_horizon",
            format!("{:?}", a.poly_horizon),
            "at least active.iterations (or absent)",
        );
        let r = &a.ripu;
        check(
            r.negative_weight >= 0.0 && r.consistency_weight >= 0.0,
            "active.ripu",
            format!("negative_weight {}, consistency_weight {}", r.negative_weight, r.consistency_weight),
            "weights >= 0",
        );
        check(
            r.negative_threshold > 0.0 && r.negative_threshold < 1.0,
            "active.ripu.negative_threshold",
            r.negative_threshold.to_string(),
            "a probability in (0, 1)",
        );

        let c = &self.contrast;
        check(
            (0.0..1.0).contains(&c.dccm_momentum),
            "contrast.dccm_momentum",
            c.dccm_momentum.to_string(),
            "a number in [0, 1)",
        );
        check(c.temperature > 0.0, "contrast.temperature", c.temperature.to_string(), "a positive number");
        check(c.weight >= 0.0, "contrast.weight", c.weight.to_string(), "a number >= 0");
        for &level in Level::ALL {
            let w = c.level_weights.of(level);
            check(w >= 0.0, &format!("contrast.level_weights.{level}"), w.to_string(), "a number >= 0");
        }
        check(c.max_anchors >= 1, "contrast.max_anchors", c.max_anchors.to_string(), "at least 1");
        check(c.max_keys >= 2, "contrast.max_keys", c.max_keys.to_string(), "at least 2");
        check(self.demo.repeats >= 1, "demo.repeats", self.demo.repeats.to_string(), "at least 1");
        check(
            self.demo.budgets.iter().all(|b| *b > 0.0 && *b <= 1.0),
            "demo.budgets",
            format!("{:?}", self.demo.budgets),
            "fractions in (0, 1] of the target's pixels",
        );

        let e = &self.eval;
        check(
            (e.input_size[0] == 0) == (e.input_size[1] == 0),
            "eval.input_size",
            format!("{:?}", e.input_size),
            "[height, width], both 0 or both positive",
        );
    }
}
