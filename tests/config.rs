//! Pipeline config: parsing, validation that reports every error, unknown keys, `${VAR}`.

use adamcu::config::{Config, ContrastConfig, ContrastSampling};
use std::process::Command;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_embedded_default_config_is_valid() {
    let config = Config::load("pipelines/synth.toml".as_ref()).expect("synth.toml is valid");
    assert_eq!(config.run.name, "synth");
}

#[test]
fn a_good_file_is_read_with_defaults_filled_in() {
    let config = Config::from_toml_str("[run]\nname = \"x\"\nseed = 3\n[train]\nlr = 0.01\n").expect("valid");
    assert_eq!(config.run.seed, 3);
    assert_eq!(config.train.lr, 0.01);
    assert_eq!(config.train.momentum, 0.9, "unset keys take their defaults");
}

#[test]
fn several_mistakes_are_all_reported_with_key_value_and_expectation() {
    let errors = Config::from_toml_str(
        "[run]\ndevice = \"gpu\"\n[train]\nmomentum = 1.5\nlr = -1.0\n[model]\nbackbone = \"vgg\"\n",
    )
    .unwrap_err();
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(errors.iter().any(|e| e.starts_with("run.device = \"gpu\": expected")), "{errors:#?}");
    assert!(errors.iter().any(|e| e.starts_with("train.momentum = 1.5: expected a number in [0, 1)")));
    assert!(errors.iter().any(|e| e.starts_with("train.lr = -1: expected a positive number")));
    assert!(errors.iter().any(|e| e.starts_with("model.backbone = \"vgg\": expected")));
}

#[test]
fn unknown_keys_are_refused_by_their_full_path() {
    let errors = Config::from_toml_str("[train]\nlearning_rate = 0.1\n[runn]\nx = 1\n").unwrap_err();
    assert!(errors.contains(&"train.learning_rate: unknown key".to_string()), "{errors:#?}");
    assert!(errors.contains(&"runn: unknown key".to_string()), "{errors:#?}");
}

#[test]
fn environment_variables_expand_in_paths_and_a_missing_one_is_named() {
    std::env::set_var("ADAMCU_TEST_DATA_ROOT", "/data/x");
    let config = Config::from_toml_str("[synth]\nroot = \"${ADAMCU_TEST_DATA_ROOT}/synth\"\n").unwrap();
    assert_eq!(config.synth.root, std::path::PathBuf::from("/data/x/synth"));
    let config = Config::from_toml_str("[synth]\nroot = \"${ADAMCU_TEST_UNSET_A:-/d}/s\"\n").unwrap();
    assert_eq!(config.synth.root, std::path::PathBuf::from("/d/s"));

    let errors = Config::from_toml_str("[synth]\nroot = \"${ADAMCU_TEST_UNSET_B}/synth\"\n").unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with(
            "synth.root = \"${ADAMCU_TEST_UNSET_B}/synth\": environment \
        variable ${ADAMCU_TEST_UNSET_B} is not set"
        ),
        "{errors:#?}"
    );
}

#[test]
fn config_check_prints_the_resolved_config_or_every_error_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_adamcu");
    let good = write(&dir, "good.toml", "[run]\nname = \"ok\"\n");
    let out = Command::new(bin).args(["config", "check"]).arg(&good).output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("name = \"ok\"") && printed.contains("momentum = 0.9"), "{printed}");

    let bad = write(&dir, "bad.toml", "[train]\nmomentum = 2.0\nbatch_source = 0\n[data]\nclasses = 20\n");
    let out = Command::new(bin).args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("3 error(s)"), "{stderr}");
    for expected in [
        "train.momentum = 2: expected",
        "train.batch_source = 0: expected at least 1",
        "data.classes = 20: expected 19 or 16",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in {stderr}");
    }
}

#[test]
fn every_benchmark_config_in_pipelines_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir("pipelines").unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 5, "the paper's four benchmarks and synth.toml");
    let synthia = Config::load("pipelines/synthia-cityscapes.toml".as_ref()).unwrap();
    assert_eq!(synthia.data.classes, 16);
}

#[test]
fn set_overrides_dotted_keys_and_is_validated_like_the_file() {
    let path = std::path::Path::new("pipelines/gta5-cityscapes.toml");
    let config = Config::load_with_overrides(path, &["active.budget=0.017".into(), "run.name=b17".into()]).unwrap();
    assert_eq!(config.active.budget, 0.017);
    assert_eq!(config.run.name, "b17");
    let errors = Config::load_with_overrides(path, &["active.budget=1.5".into()]).unwrap_err();
    assert_eq!(errors.errors, ["active.budget = 1.5: expected a fraction in (0, 1]"]);
    let errors = Config::load_with_overrides(path, &["active.budgt=0.1".into()]).unwrap_err();
    assert_eq!(errors.errors, ["active.budgt: unknown key"]);
    // A level's weight by the level's name; the others keep the paper's 1.
    let config = Config::load_with_overrides(path, &["contrast.level_weights.cross-domain=0.5".into()]).unwrap();
    let weights = config.contrast.level_weights;
    assert_eq!((weights.intra_image, weights.cross_image, weights.cross_domain), (1.0, 1.0, 0.5));
    let errors = Config::load_with_overrides(path, &["contrast.level_weights.cross-domain=-1".into()]).unwrap_err();
    assert_eq!(errors.errors, ["contrast.level_weights.cross-domain = -1: expected a number >= 0"]);
    let errors = Config::load_with_overrides(path, &["contrast.level_weights.cross_domain=0.5".into()]).unwrap_err();
    assert_eq!(errors.errors, ["contrast.level_weights.cross_domain: unknown key"]);
    // How anchors and keys are drawn: class-balanced in the configs and unless set, a closed choice.
    assert_eq!(Config::load(path).unwrap().contrast.sampling, ContrastSampling::ClassBalanced);
    assert_eq!(ContrastConfig::default().sampling, ContrastSampling::ClassBalanced);
    let config = Config::load_with_overrides(path, &["contrast.sampling=\"uniform\"".into()]).unwrap();
    assert_eq!(config.contrast.sampling, ContrastSampling::Uniform);
    let errors = Config::load_with_overrides(path, &["contrast.sampling=\"balanced\"".into()]).unwrap_err();
    assert_eq!(errors.errors, ["contrast.sampling = \"balanced\": expected \"uniform\" or \"class-balanced\""]);
}

#[test]
fn changes_since_a_recorded_config_name_each_key_and_whether_it_alters_the_experiment() {
    let path = std::path::Path::new("pipelines/gta5-cityscapes.toml");
    // A budget that serde_json's default float parsing reads back one unit in the last place off.
    let budget = "active.budget=0.10726684331893921".to_string();
    let base = Config::load_with_overrides(path, std::slice::from_ref(&budget)).unwrap();
    // Read back from JSON text, as a checkpoint's copy is: no spurious differences.
    let recorded: serde_json::Value = serde_json::from_slice(&serde_json::to_vec(&base.recorded()).unwrap()).unwrap();
    assert_eq!(base.changes_since(&recorded), []);

    let changed = Config::load_with_overrides(
        path,
        &[
            budget,
            "contrast.temperature=0.2".into(),
            "train.log_every=7".into(),
            "data.target.root=/elsewhere".into(),
            "augment.crop=[256, 512]".into(),
        ],
    )
    .unwrap();
    let changes: Vec<(String, bool)> =
        changed.changes_since(&recorded).iter().map(|c| (c.key.clone(), c.changes_experiment())).collect();
    assert_eq!(
        changes,
        [
            ("augment.crop".to_string(), true),
            ("contrast.temperature".into(), true),
            ("data.target.root".into(), false),
            ("train.log_every".into(), false)
        ]
    );
    let temperature = changed.changes_since(&recorded).into_iter().find(|c| c.key == "contrast.temperature").unwrap();
    assert_eq!(temperature.to_string(), "contrast.temperature: was 0.1, now 0.2");

    // A data set configured on one side only: each of its keys, absent (null) on the other.
    let mut without_val = base.clone();
    without_val.data.target_val = None;
    let changes = without_val.changes_since(&recorded);
    assert!(
        changes.iter().any(|c| c.key == "data.target_val.kind" && c.now.is_null() && c.changes_experiment()),
        "{changes:?}"
    );
    assert!(changes.iter().any(|c| c.key == "data.target_val.root" && !c.changes_experiment()), "{changes:?}");
}

#[test]
fn a_misspelt_choice_names_its_key_and_the_allowed_values_beside_the_other_mistakes() {
    let errors = Config::from_toml_str(
        "[model]\narch = \"deeplabv4\"\n[contrast]\nlevels = [\"intra-image\", \"cross-imag\"]\n\
         [demo]\nvariants = [\"full\", \"mcu\"]\n[train]\nlr = -1.0\n",
    )
    .unwrap_err();
    assert_eq!(
        errors,
        [
            "model.arch = \"deeplabv4\": expected \"deeplabv2\" or \"deeplabv3plus\"",
            "contrast.levels = \"cross-imag\": expected \"intra-image\", \"cross-image\" or \"cross-domain\"",
            "demo.variants = \"mcu\": expected \"al-wo-as\", \"al-w-as\", \"mcu-i\", \"mcu-d\", \"p2p\", \"p2p-c2c\", \"full\", \"ripu\", \"entropy\", \"margin\" or \"random\"",
            "train.lr = -1: expected a positive number",
        ]
    );
}
