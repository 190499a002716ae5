//! `adamcu eval --predictions` against the Cityscapes evaluation scripts (PyPI
//! cityscapesscripts, through tests/reference/cityscapes_eval.py): on a Cityscapes-layout val
//! set and label-id predictions in the scripts' own format, the same IoU per class and mIoU.

mod common;

use common::{python, write_label8};
use rand::{Rng, SeedableRng};
use std::process::Command;

/// Cityscapes label ids: void ones (0, 1, 4: ignored in evaluation) and the 19 classes.
const IDS: [u8; 22] = [0, 1, 4, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33];

#[test]
fn eval_of_label_id_predictions_agrees_with_the_cityscapes_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cityscapes");
    let predictions = dir.path().join("predictions");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (w, h) = (64u32, 32u32);
    for (city, frames) in [("aachen", 3), ("bremen", 2)] {
        for i in 1..=frames {
            let stem = format!("{city}_000000_{i:06}");
            // Labels in 8x8 blocks; class 33 (bicycle) nowhere, so one class is absent.
            let blocks: Vec<u8> = (0..(w / 8) * (h / 8)).map(|_| IDS[rng.gen_range(0..IDS.len() - 1)]).collect();
            let label = |x: u32, y: u32| blocks[((y / 8) * (w / 8) + x / 8) as usize];
            write_label8(&root.join(format!("gtFine/val/{city}/{stem}_gtFine_labelIds.png")), w, h, label);
            common::write_rgb(&root.join(format!("leftImg8bit/val/{city}/{stem}_leftImg8bit.png")), w, h, |_, _| {
                [0; 3]
            });
            // Right 60 % of the time, else any id (void ones too: misses of the true class).
            let guesses: Vec<u8> = (0..w * h)
                .map(|p| if rng.gen_bool(0.6) { label(p % w, p / w) } else { IDS[rng.gen_range(0..IDS.len())] })
                .collect();
            write_label8(&predictions.join(format!("{stem}_labelIds.png")), w, h, |x, y| guesses[(y * w + x) as usize]);
        }
    }
    let config = dir.path().join("eval.toml");
    std::fs::write(
        &config,
        format!("[data.target_val]\nkind = \"cityscapes\"\nroot = {:?}\nsplit = \"val\"\n", root.display().to_string()),
    )
    .unwrap();
    let json = dir.path().join("ours.json");
    let out = Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["eval", "--config", config.to_str().unwrap(), "--predictions", predictions.to_str().unwrap()])
        .args(["--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // No budget is known for a folder of predictions: "-", not "NaN%".
    assert!(stdout.contains("| - |") && !stdout.contains("NaN"), "{stdout}");
    let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();

    let reference = Command::new(python())
        .args(["tests/reference/cityscapes_eval.py", root.to_str().unwrap(), predictions.to_str().unwrap()])
        .output()
        .expect("run the Cityscapes scripts' reference (make test installs cityscapesscripts)");
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let theirs: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&reference.stdout).lines().last().unwrap()).unwrap();
    let their_miou = 100.0 * theirs["miou"].as_f64().unwrap();
    let our_miou = ours["miou"].as_f64().unwrap();
    assert!((our_miou - their_miou).abs() <= 0.01, "mIoU: ours {our_miou}, the scripts' {their_miou}");
    let names = [
        "road",
        "sidewalk",
        "building",
        "wall",
        "fence",
        "pole",
        "traffic light",
        "traffic sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ];
    let per_class = ours["per_class"].as_array().unwrap();
    assert_eq!(per_class.len(), 19);
    for (i, name) in names.iter().enumerate() {
        let our = per_class[i][1].as_f64();
        let their = theirs["classes"][name].as_f64().map(|v| 100.0 * v);
        match (our, their) {
            (Some(a), Some(b)) => assert!((a - b).abs() <= 0.01, "{name}: ours {a}, the scripts' {b}"),
            (a, b) => assert_eq!(a, b, "{name}: present in one only"),
        }
    }
    assert!(per_class[18][1].as_f64().is_some_and(|v| v == 0.0), "bicycle: predicted, never labelled: IoU 0");

    // Training-id masks of the same folder are refused with the fix named; a missing frame is named.
    std::fs::remove_file(predictions.join("bremen_000000_000002_labelIds.png")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["eval", "--config", config.to_str().unwrap(), "--predictions", predictions.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("1 of the 5 val images have no prediction"), "{stderr}");
    assert!(stderr.contains("bremen_000000_000002"), "{stderr}");
}
