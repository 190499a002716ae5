//! adamcu's DeepLab v2 against a PyTorch DeepLab v2 (tests/reference/deeplabv2.py) holding the
//! same random weights, read from the files people download: DeepLab's Caffe-converted
//! ImageNet ResNet (torch's legacy container), torchvision's ResNet, and ADVENT's whole network
//! (a peer's warm-up model). Same weights, same input: same logits, or the layout is wrong.
//! And the supervised stage's step against torch.optim.SGD: same loss, same weight updates.

mod common;

use adamcu::config::Config;
use adamcu::model::weights::{self, Layout};
use adamcu::train::Trainer;
use common::python;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Runs the reference for one bottleneck style; returns the folder with its files.
fn reference(style: &str, blocks: &str, more: &[String]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python())
        .args(["tests/reference/deeplabv2.py", dir.path().to_str().unwrap(), "--style", style, "--blocks", blocks])
        .args(more)
        .output()
        .expect("run the Python reference (set ADAMCU_PYTHON to a Python with torch)");
    assert!(out.status.success(), "tests/reference/deeplabv2.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// The paper's DeepLab v2 config (pipelines/gta5-cityscapes.toml) on the CPU, in eval mode's
/// terms: BatchNorm on the stored statistics.
fn paper_config(backbone: &str, caffe_style: bool, pretrained: Option<PathBuf>) -> Config {
    let mut config =
        Config::from_toml_str(&std::fs::read_to_string("pipelines/gta5-cityscapes.toml").unwrap()).unwrap();
    config.run.device = "cpu".into();
    config.model.backbone = backbone.parse().expect("a backbone");
    config.model.caffe_style = caffe_style;
    config.model.pretrained = pretrained;
    config.train.channels_last = false;
    // Caffe-trained weights take Caffe's input normalisation (the trainer refuses others).
    (config.augment.mean, config.augment.std) =
        if caffe_style { Layout::DeepLabCaffe } else { Layout::Torchvision }.normalisation();
    config
}

/// The reference's Caffe-style network reads its input as B, G, R (as Caffe's did); ours,
/// with conv1's input channels reversed on import, reads R, G, B: the same image reversed.
fn as_ours(reference_input: &Tensor, caffe_style: bool) -> Tensor {
    if caffe_style {
        reference_input.flip([1])
    } else {
        reference_input.shallow_clone()
    }
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    weights::read_state_dict(path).unwrap().into_iter().collect()
}

fn reference_outputs(dir: &Path) -> (Tensor, Tensor, Tensor) {
    let outputs = read(&dir.join("outputs.pth"));
    (outputs["input"].shallow_clone(), outputs["aux"].shallow_clone(), outputs["main"].shallow_clone())
}

/// Same size, and the largest difference within 1e-5 of the reference's largest value.
fn assert_same(ours: &Tensor, theirs: &Tensor, what: &str) {
    assert_eq!(ours.size(), theirs.size(), "{what}: size");
    let scale = theirs.abs().max().double_value(&[]);
    let diff = (ours - theirs).abs().max().double_value(&[]);
    assert!(scale > 0.0 && diff <= 1e-5 * scale, "{what}: differs by {diff} (largest value {scale})");
}

fn assert_computes_the_reference(trainer: &Trainer, dir: &Path, what: &str) {
    let (input, aux, main) = reference_outputs(dir);
    let out = tch::no_grad(|| trainer.forward(&as_ours(&input, trainer.config.model.caffe_style), false));
    assert_same(&out.aux, &aux, &format!("{what}: aux logits (layer5)"));
    assert_same(&out.main, &main, &format!("{what}: main logits (layer6)"));
}

/// Copies ADVENT's classifiers (layer5, layer6) of the reference into aux and main, for the
/// files that hold only a backbone.
fn copy_reference_classifiers(vs: &VarStore, dir: &Path) {
    let variables = vs.variables();
    let mut copied = 0;
    tch::no_grad(|| {
        for (key, tensor) in weights::read_state_dict(&dir.join("deeplabv2.pth")).unwrap() {
            let ours = match key.split_once('.') {
                Some(("layer5", rest)) => format!("aux.{rest}"),
                Some(("layer6", rest)) => format!("main.{rest}"),
                _ => continue,
            };
            variables[&ours].shallow_clone().copy_(&tensor);
            copied += 1;
        }
    });
    assert_eq!(copied, 16, "two classifiers of four dilated convs, weight and bias each");
}

#[test]
fn caffe_imagenet_weights_and_advent_models_compute_what_pytorch_computes() {
    let dir = reference("caffe", "3,4,23,3", &[]);
    let (imagenet, deeplab) = (dir.path().join("imagenet.pth"), dir.path().join("deeplabv2.pth"));

    // ADVENT's whole DeepLab v2 as model.pretrained: backbone and both classifiers.
    let trainer = Trainer::new(&paper_config("resnet101", true, Some(deeplab.clone()))).unwrap();
    assert_computes_the_reference(&trainer, dir.path(), "ADVENT's DeepLab v2 as model.pretrained");

    // The same file as --init, into a model that starts without it.
    let mut trainer = Trainer::new(&paper_config("resnet101", true, None)).unwrap();
    trainer.load_network(&deeplab).unwrap();
    assert_computes_the_reference(&trainer, dir.path(), "ADVENT's DeepLab v2 as --init");
    let error = format!("{:#}", trainer.load_network(&imagenet).unwrap_err());
    assert!(error.contains("without classifiers; give it as model.pretrained"), "{error}");

    // DeepLab's ImageNet file (legacy container, keys under Scale., a 21-class layer5 of its
    // own): the backbone only, its classifier skipped.
    let mut vs = VarStore::new(tch::Device::Cpu);
    let config = paper_config("resnet101", true, None);
    let _net = adamcu::model::SegNet::new(&vs.root(), &config.model, 19).unwrap();
    let imported = weights::import(&mut vs, &imagenet, true).unwrap();
    assert_eq!(imported.layout, Layout::DeepLabCaffe);
    let backbone_variables = vs.variables().keys().filter(|k| k.starts_with("backbone.")).count();
    assert_eq!(imported.tensors, backbone_variables, "every backbone variable, nothing else");
    let trainer = Trainer::new(&paper_config("resnet101", true, Some(imagenet.clone()))).unwrap();
    copy_reference_classifiers(&trainer.vs, dir.path());
    assert_computes_the_reference(&trainer, dir.path(), "DeepLab's Caffe ImageNet file as model.pretrained");

    // Caffe-trained weights on torchvision's normalisation would see other input: refused,
    // with the values to set.
    let mut torchvision_input = paper_config("resnet101", true, Some(deeplab.clone()));
    (torchvision_input.augment.mean, torchvision_input.augment.std) = Layout::Torchvision.normalisation();
    let error = format!("{:#}", Trainer::new(&torchvision_input).err().unwrap());
    assert!(
        error.contains("was trained on other input than augment.mean = [0.485, 0.456, 0.406]")
            && error.contains("[augment]\n  mean = [0.4810")
            && error.contains("std = [0.003921"),
        "{error}"
    );

    // Weights in the other bottleneck layout, or for another number of classes, are refused.
    let error = format!("{:#}", Trainer::new(&paper_config("resnet101", false, Some(imagenet.clone()))).err().unwrap());
    assert!(
        error.contains("imagenet.pth")
            && error.contains(
                "set model.caffe_style = true, and for the input it was \
        trained on\n  [augment]\n  mean = [0.4810"
            ),
        "{error}"
    );
    let mut sixteen = paper_config("resnet101", true, Some(deeplab.clone()));
    sixteen.data.classes = 16;
    let error = format!("{:#}", Trainer::new(&sixteen).err().unwrap());
    assert!(
        error.contains(
            "deeplabv2.pth: layer5.conv2d_list.0.bias has shape [19], the model's aux.conv2d_list.0.bias \
                            has [16] (a model for another number of classes"
        ),
        "{error}"
    );
}

#[test]
fn torchvision_imagenet_weights_compute_what_pytorch_computes() {
    let dir = reference("torchvision", "3,4,6,3", &[]);
    let imagenet = dir.path().join("imagenet.pth");
    let trainer = Trainer::new(&paper_config("resnet50", false, Some(imagenet.clone()))).unwrap();
    copy_reference_classifiers(&trainer.vs, dir.path());
    assert_computes_the_reference(&trainer, dir.path(), "torchvision's ResNet-50 as model.pretrained");

    let error = format!("{:#}", Trainer::new(&paper_config("resnet50", true, Some(imagenet))).err().unwrap());
    assert!(error.contains("set model.caffe_style = false"), "{error}");
    // The depth must match too.
    let error = format!(
        "{:#}",
        Trainer::new(&paper_config("resnet101", false, Some(dir.path().join("imagenet.pth")))).err().unwrap()
    );
    assert!(error.contains("no weights for 255 variable(s) of the model"), "{error}");
    // 17 blocks of 15
}

#[test]
fn a_checkpoint_wrapper_and_dataparallel_prefix_are_taken_off() {
    let dir = tempfile::tempdir().unwrap();
    let script = "import torch, sys\n\
        sd = {'conv1.weight': torch.ones(2, 3), 'layer1.0.conv1.weight': torch.zeros(4, dtype=torch.float16)}\n\
        torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}, 'iteration': 7, \
                    'optimizer': {'lr': 0.1}}, sys.argv[1])\n";
    let path = dir.path().join("wrapped.pth");
    let status = std::process::Command::new(python()).args(["-c", script, path.to_str().unwrap()]).status().unwrap();
    assert!(status.success());
    let mut tensors = weights::read_state_dict(&path).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["conv1.weight", "layer1.0.conv1.weight"]);
    assert_eq!(tensors[0].1.size(), [2, 3]);
    assert_eq!(tensors[1].1.kind(), Kind::Half);
    assert_eq!(Layout::detect(names.iter().copied()), Some(Layout::Torchvision));

    // Something else is named with its keys.
    let other = dir.path().join("other.safetensors");
    Tensor::write_safetensors(&[("encoder.weight", Tensor::ones([2], (Kind::Float, tch::Device::Cpu)))], &other)
        .unwrap();
    let mut vs = VarStore::new(tch::Device::Cpu);
    let error = weights::import(&mut vs, &other, false).unwrap_err().to_string();
    assert!(
        error.contains("other.safetensors: not a state dict adamcu knows") && error.contains("encoder.weight"),
        "{error}"
    );
}

/// A Caffe-layout variable as the file holds it (conv1's input channels back in B, G, R order).
fn file_order(name: &str, ours: &Tensor) -> Tensor {
    if name == "backbone.conv1.weight" {
        ours.flip([1])
    } else {
        ours.shallow_clone()
    }
}

#[test]
fn the_supervised_step_changes_the_weights_as_torch_optim_sgd_does() {
    let mut config = paper_config("resnet50", true, None);
    // A larger rate than the paper's, so that the updates stand well above fp32 rounding.
    config.train.lr = 0.01;
    let t = &config.train;
    let (steps, iterations) = (3, 10);
    let args: Vec<String> = [
        ("--sgd-steps", steps as f64),
        ("--iterations", iterations as f64),
        ("--lr", t.lr),
        ("--momentum", t.momentum),
        ("--weight-decay", t.weight_decay),
        ("--head-lr-mult", t.head_lr_mult),
        ("--aux-weight", t.aux_weight),
        ("--poly-power", t.poly_power),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .collect();
    let dir = reference("caffe", "3,4,6,3", &args);
    config.model.pretrained = Some(dir.path().join("deeplabv2.pth"));
    let trainer = Trainer::new(&config).unwrap();
    let initial: HashMap<String, Tensor> = trainer.vs.variables().into_iter().map(|(n, v)| (n, v.copy())).collect();

    let batch = read(&dir.path().join("sgd.pth"));
    let mut optimizer = trainer.optimizer();
    for step in 0..steps {
        let images = as_ours(&batch["images"], true);
        let (loss, _) = trainer.supervised_step(&mut optimizer, &images, &batch["labels"], step, iterations).unwrap();
        let theirs = batch["losses"].double_value(&[step as i64]);
        assert!((loss - theirs).abs() <= 1e-5 * theirs, "step {step}: loss {loss}, torch's {theirs}");
    }

    let ours = trainer.vs.variables();
    let mut moved = 0;
    for (key, after) in read(&dir.path().join("trained.pth")) {
        let Some(name) = Layout::AdventDeepLabV2.our_name(&key) else { continue };
        let their_update = &after - &file_order(&name, &initial[&name]);
        let our_update = file_order(&name, &ours[&name]) - file_order(&name, &initial[&name]);
        // Relative to the update's norm: single weights can differ by a rounding unit, which
        // is most of a tiny update.
        let size = their_update.norm().double_value(&[]);
        let error = (&our_update - &their_update).norm().double_value(&[]);
        assert!(error <= 1e-3 * size, "{name}: update differs from torch's by {error} (its norm {size})");
        moved += usize::from(size > 0.0);
    }
    // Every conv and classifier moved; BatchNorm (frozen) did not.
    let trainable = ours.iter().filter(|(n, v)| v.requires_grad() && !n.starts_with("projection.")).count();
    assert_eq!(moved, trainable, "every trainable tensor of the network was updated");
}

#[test]
fn a_peers_deeplab_v2_is_evaluated_and_predicted_from_the_command_line() {
    let dir = reference("caffe", "3,4,6,3", &[]);
    let cityscapes = dir.path().join("cityscapes");
    common::cityscapes(&cityscapes, "val", 2, 96, 64);
    let (mean, std) = Layout::DeepLabCaffe.normalisation();
    // The paper's config as written names an ImageNet file that is not here: with every weight
    // from --checkpoint it is not read.
    let sets = [
        "model.backbone=\"resnet50\"".to_string(),
        "model.caffe_style=true".into(),
        format!("augment.mean={mean:?}"),
        format!("augment.std={std:?}"),
        "eval.input_size=[0, 0]".into(),
        format!("data.target_val.root=\"{}\"", cityscapes.display()),
    ];
    let adamcu = |args: &[&str], sets: &[String]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_adamcu"));
        command.args(args).args(["--config", "pipelines/gta5-cityscapes.toml"]);
        for set in sets {
            command.args(["--set", set]);
        }
        command.output().unwrap()
    };
    let deeplab = dir.path().join("deeplabv2.pth");
    // `adamcu weights` tells what the file is and the config lines that use it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_adamcu")).arg("weights").arg(&deeplab).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("ADVENT's naming")
            && text.contains("classes = 19")
            && text.contains("backbone = \"resnet50\"")
            && text.contains("caffe_style = true")
            && text.contains(&format!("mean = {mean:?}")),
        "{text}"
    );
    let json = dir.path().join("row.json");
    let out = adamcu(&["eval", "--checkpoint", deeplab.to_str().unwrap(), "--json", json.to_str().unwrap()], &sets);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let row: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();

    // The same figure as the network loaded here and evaluated in this process.
    let mut config = paper_config("resnet50", true, None);
    config.eval.input_size = [0, 0];
    config.data.target_val.as_mut().unwrap().root = cityscapes.clone();
    let trainer = Trainer::with_network(&config, &deeplab).unwrap();
    let here = trainer.evaluate("here", f64::NAN).unwrap();
    assert_eq!(row["miou"].as_f64().unwrap(), here.miou, "{row}");

    let masks = dir.path().join("masks");
    let images = cityscapes.join("leftImg8bit/val/aachen");
    let out = adamcu(
        &[
            "predict",
            "--checkpoint",
            deeplab.to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--out",
            masks.to_str().unwrap(),
        ],
        &sets,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("for 2 image(s)"));

    // On torchvision's normalisation it is refused, with the lines to set.
    let without_normalisation = [&sets[..2], &sets[4..]].concat();
    let out = adamcu(&["eval", "--checkpoint", deeplab.to_str().unwrap()], &without_normalisation);
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && error.contains("was trained on other input") && error.contains("[augment]"),
        "{error}"
    );
}
