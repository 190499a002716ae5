//! Optimizer, evaluation, checkpoints, and a short real training run.

mod common;

use adamcu::config::Config;
use adamcu::train::eval::Confusion;
use adamcu::train::optimizer::{poly_lr, Sgd};
use adamcu::train::{SupervisedStage, Trainer};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[test]
fn confusion_iou_on_hand_made_cases() {
    // 3 classes. Labels / predictions over 8 pixels (255 ignored):
    // label:  0 0 0 1 1 255 0 1
    // pred:   0 0 1 1 0   2 0 1
    let labels = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 255, 0, 1]);
    let preds = Tensor::from_slice(&[0i64, 0, 1, 1, 0, 2, 0, 1]);
    let mut c = Confusion::new(3);
    c.add(&preds, &labels);
    // class 0: tp 3, label 4, pred 4 -> 3/5; class 1: tp 2, label 3, pred 3 -> 2/4; class 2 absent
    let iou = c.iou();
    assert!((iou[0].unwrap() - 0.6).abs() < 1e-12);
    assert!((iou[1].unwrap() - 0.5).abs() < 1e-12);
    assert_eq!(iou[2], None, "absent from both: excluded, not zero");
    assert!((c.miou(None) - 0.55).abs() < 1e-12);

    // One matrix over the whole set, not a mean of per-image mIoUs.
    let mut set = Confusion::new(2);
    set.add(&Tensor::from_slice(&[0i64, 0, 0, 0]), &Tensor::from_slice(&[0i64, 0, 0, 0]));
    set.add(&Tensor::from_slice(&[0i64, 1]), &Tensor::from_slice(&[1i64, 1]));
    // class 0: tp 4, union 5 -> 0.8; class 1: tp 1, union 2 -> 0.5; per-image mean would be (1 + 0.5*... )
    assert!((set.miou(None) - 0.65).abs() < 1e-12);

    // A class predicted but never labelled counts with IoU 0.
    let mut fp = Confusion::new(2);
    fp.add(&Tensor::from_slice(&[1i64, 0]), &Tensor::from_slice(&[0i64, 0]));
    assert_eq!(fp.iou()[1], Some(0.0));
}

#[test]
fn the_frechet_feature_distance_on_hand_computed_gaussians() {
    use adamcu::train::embeddings::FeatureFit;
    let fit = |mean: [f64; 2], covariance: [f64; 4]| FeatureFit {
        mean: Tensor::from_slice(&mean),
        covariance: Tensor::from_slice(&covariance).view([2, 2]),
        images: 2,
    };
    // Diagonal: ||mu_a - mu_b||^2 + sum over axes of (sigma_a - sigma_b)^2 = (1 + 4) + (1 + 4).
    let (a, b) = (fit([0.0, 0.0], [4.0, 0.0, 0.0, 1.0]), fit([1.0, 2.0], [1.0, 0.0, 0.0, 9.0]));
    assert!((a.distance(&b) - 10.0).abs() < 1e-9, "{}", a.distance(&b));
    assert!((b.distance(&a) - 10.0).abs() < 1e-9, "symmetric: {}", b.distance(&a));
    // A rotated copy of a Gaussian is at distance 0 from itself, not from the unrotated one.
    let c = fit([0.5, 0.5], [2.5, 1.5, 1.5, 2.5]);
    assert!(c.distance(&c).abs() < 1e-9, "{}", c.distance(&c));
    // c has eigenvalues 4 and 1 along the diagonals; a has them along the axes: the trace term
    // is 4 + 1 + 4 + 1 - 2 Tr((a^1/2 c a^1/2)^1/2) > 0, and the means differ by 0.5.
    let d = a.distance(&c);
    assert!(d > 0.5 && d.is_finite(), "{d}");
}

#[test]
fn sgd_matches_pytorch_semantics_and_poly_schedule() {
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let w = (&root / "backbone").var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0]));
    let h = (&root / "main").var_copy("h", &Tensor::from_slice(&[0.5f32]));
    let mut sgd = Sgd::new(&vs, 0.9, 0.1, 10.0);
    assert_eq!(sgd.lr_multiplier("main.h"), Some(10.0));
    assert_eq!(sgd.lr_multiplier("backbone.w"), Some(1.0));
    // loss = sum(w^2) + 3h -> grad w = 2w, grad h = 3
    let step = |sgd: &mut Sgd| {
        sgd.zero_grad();
        (w.square().sum(Kind::Float) + &h * 3.0).sum(Kind::Float).backward();
        sgd.update(0.01);
    };
    step(&mut sgd);
    // w: d = 2w + 0.1w = 2.1w = [2.1, -4.2]; buf = d; w -= 0.01 * d -> [0.979, -1.958]
    let got: Vec<f32> = Vec::try_from(&w.detach()).unwrap();
    assert!((got[0] - 0.979).abs() < 1e-6 && (got[1] + 1.958).abs() < 1e-6, "{got:?}");
    // h: d = 3 + 0.05 = 3.05; h -= 0.1 * 3.05 -> 0.195
    assert!((h.double_value(&[0]) - 0.195).abs() < 1e-6);
    step(&mut sgd);
    // second step: buf = 0.9 * 2.1 + 2.1 * 0.979 = 1.89 + 2.0559 = 3.9459; w0 = 0.979 - 0.039459
    assert!((w.double_value(&[0]) - (0.979 - 0.039459)).abs() < 1e-6);
    assert_eq!(sgd.step, 2);
    sgd.zero_grad();
    assert!(!w.grad().defined() && !h.grad().defined(), "gradients are set to none");
    // Without momentum: plain (decayed) gradient steps, no buffers kept.
    let mut plain = Sgd::new(&vs, 0.0, 0.0, 10.0);
    let before = h.double_value(&[0]);
    (&h * 3.0).sum(Kind::Float).backward();
    plain.update(0.01);
    assert!((h.double_value(&[0]) - (before - 0.1 * 3.0)).abs() < 1e-6);
    assert!(plain.state().iter().all(|(n, _)| !n.starts_with("momentum.")));
    assert_eq!(poly_lr(1.0, 0, 100, 0.9), 1.0);
    assert!((poly_lr(1.0, 50, 100, 0.9) - 0.5f64.powf(0.9)).abs() < 1e-12);
    assert_eq!(poly_lr(1.0, 100, 100, 0.9), 0.0);
}

fn tiny_config(dir: &std::path::Path) -> Config {
    common::synthetic_config(dir, (128, 64), (12, 12, 6))
}

#[test]
fn a_short_run_lowers_the_loss_and_beats_the_untrained_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let mut trainer = Trainer::new(&config).unwrap();
    let before = trainer.evaluate("untrained", 0.0).unwrap();
    let config_every = config.train.eval_every;
    assert_eq!(config_every, 0, "no val curve by default");
    let losses = trainer.train_supervised(SupervisedStage::TargetSupervised, 150).unwrap().losses;
    let first: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(last < 0.6 * first, "loss {first:.3} -> {last:.3}");
    let after = trainer.evaluate("trained", 1.0).unwrap();
    // Chance on 19 classes is about 100/19/… a few points; the untrained net predicts ~one class.
    assert!(after.miou > before.miou + 10.0 && after.miou > 15.0, "mIoU {:.1} -> {:.1}", before.miou, after.miou);
}

#[test]
fn checkpoint_round_trip_gives_identical_outputs_and_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let a = Trainer::new(&config).unwrap();
    let mut opt_a = a.optimizer();
    let input = Tensor::randn([2, 3, 64, 128], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(19, [2, 64, 128], (Kind::Int64, Device::Cpu));
    let step = |t: &Trainer, opt: &mut Sgd| {
        let out = t.model.forward_t(&input, true);
        let loss = adamcu::train::segmentation_loss(&out.main, &labels);
        opt.zero_grad();
        loss.backward();
        opt.update(0.01);
    };
    for _ in 0..3 {
        step(&a, &mut opt_a);
    }
    let path = dir.path().join("ckpt.safetensors");
    a.save(&path, Some(&opt_a), serde_json::json!({"stage": "test", "step": 3})).unwrap();

    let mut config_b = config.clone();
    config_b.run.seed = 99; // different init: everything must come from the checkpoint
    let mut b = Trainer::new(&config_b).unwrap();
    let loaded = b.load(&path).unwrap();
    assert_eq!(loaded.meta["step"], 3);
    let mut opt_b = b.optimizer();
    opt_b.load_state(&loaded.optimizer).unwrap();
    assert_eq!(opt_b.step, 3);

    let eval = |t: &Trainer| tch::no_grad(|| t.model.forward_t(&input, false).main);
    assert!(eval(&a).equal(&eval(&b)), "outputs differ after load");
    step(&a, &mut opt_a);
    step(&b, &mut opt_b);
    for (name, va) in a.vs.variables() {
        let vb = &b.vs.variables()[&name];
        assert!(va.equal(vb), "{name} differs after the next step");
    }
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn predicted_masks_scored_as_a_folder_match_the_checkpoint_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let mut trainer = Trainer::new(&config).unwrap();
    trainer.train_supervised(SupervisedStage::TargetSupervised, 30).unwrap();
    let direct = trainer.evaluate("direct", 1.0).unwrap();
    let images = dir.path().join("data/target/leftImg8bit/val/synthcity");
    let out = dir.path().join("predictions");
    let options = adamcu::train::eval::EvalOptions { flip: false, input_size: [0, 0] };
    assert_eq!(adamcu::predict::predict_folder(&trainer, &images, &out, &options).unwrap(), 6);
    let first = "synthcity_000000_000001";
    for suffix in ["", "_color", "_overlay"] {
        assert!(out.join(format!("{first}{suffix}.png")).exists(), "{first}{suffix}.png");
    }
    let labels = adamcu::train::open_set(&config.data.target_val, "v", 19).unwrap();
    let scored = adamcu::predict::score_folder(&out, &labels, 19, adamcu::predict::PredictionIds::Auto).unwrap();
    let row = adamcu::train::eval::EvalRow::from_confusion("folder", &scored, 1.0);
    assert!((row.miou - direct.miou).abs() < 1e-9, "{} vs {}", row.miou, direct.miou);
    // A colour mask uses the Cityscapes palette: road is (128, 64, 128).
    let colour = image::open(out.join(format!("{first}_color.png"))).unwrap().into_rgb8();
    let ids = image::open(out.join(format!("{first}.png"))).unwrap().into_luma8();
    for (id, px) in ids.pixels().zip(colour.pixels()) {
        if id.0[0] == 0 {
            assert_eq!(px.0, [128, 64, 128]);
        }
    }
}

#[test]
fn resnet101_on_untrained_frozen_statistics_diverges_and_the_error_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::synthetic_config(dir.path(), (64, 32), (4, 4, 2));
    config.model.backbone = adamcu::config::Backbone::Resnet101;
    config.model.bn_stats = adamcu::config::BnStats::Frozen;
    config.model.pretrained = None;
    config.train.lr = 2.5e-4; // the paper's
    (config.train.batch_source, config.run.threads) = (2, 2);
    let mut trainer = Trainer::new(&config).unwrap();
    let error = trainer.train_supervised(SupervisedStage::Source, 6).unwrap_err().to_string();
    assert!(error.starts_with("source stage: loss is "), "{error}");
    assert!(error.contains("model.bn_stats = \"frozen\" without model.pretrained"), "{error}");
    // The remedy the message gives: the same network on batch statistics trains.
    config.model.bn_stats = adamcu::config::BnStats::Batch;
    let losses = Trainer::new(&config).unwrap().train_supervised(SupervisedStage::Source, 6).unwrap().losses;
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
}

#[test]
fn a_missing_imagenet_file_is_reported_with_its_key_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::synthetic_config(dir.path(), (64, 32), (2, 2, 1));
    for name in ["resnet-imagenet.safetensors", "resnet-imagenet.pth"] {
        config.model.pretrained = Some(dir.path().join(name));
        let error = format!("{:#}", Trainer::new(&config).err().expect("no weights file"));
        assert!(
            error.starts_with("model.pretrained = ") && error.contains(name) && error.contains("No such file"),
            "{error}"
        );
    }
}

#[test]
fn bf16_channels_last_runs_the_network_in_bf16_keeps_fp32_outside_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let fp32 = tiny_config(dir.path());
    let mut bf16 = fp32.clone();
    bf16.train.precision = adamcu::config::Precision::Bf16;
    bf16.train.channels_last = true;
    let (a, mut b) = (Trainer::new(&fp32).unwrap(), Trainer::new(&bf16).unwrap());
    // The same weights (a test running beside this one may draw from the global generator
    // between the two initialisations).
    b.vs.copy(&a.vs).unwrap();
    let input = Tensor::randn([2, 3, 64, 128], (Kind::Float, Device::Cpu));
    let (out_a, out_b) = tch::no_grad(|| (a.forward(&input, false), b.forward(&input, false)));
    for (name, x, y) in [
        ("main", &out_a.main, &out_b.main),
        ("aux", &out_a.aux, &out_b.aux),
        ("embedding", &out_a.embedding, &out_b.embedding),
    ] {
        assert_eq!(y.kind(), Kind::Float, "{name}: the losses and the uncertainty take fp32");
        // bf16's 8-bit mantissa moves the outputs a little, not much.
        let difference = (x - y).abs().max().double_value(&[]);
        let scale = x.abs().max().double_value(&[]);
        // Measured here: bf16 about 1e-2 of the scale, channels-last alone in fp32 about 5e-7.
        assert!(difference > 1e-3 * scale, "{name}: off by {difference} at scale {scale}, so not computed in bf16");
        assert!(difference < 5e-2 * scale, "{name}: bf16 is off by {difference} at scale {scale}");
    }
    // bf16 steps train as fp32 ones do: gradients reach every part in fp32, and the losses
    // follow the fp32 run's down.
    let labels = Tensor::randint(19, [2, 64, 128], (Kind::Int64, Device::Cpu));
    let run = |t: &Trainer| {
        let mut optimizer = t.optimizer();
        let losses = (0..20)
            .map(|step| t.supervised_step(&mut optimizer, &input, &labels, step, 20).unwrap().0)
            .collect::<Vec<f64>>();
        (losses, optimizer)
    };
    let ((losses_fp32, _), (losses, optimizer)) = (run(&a), run(&b));
    for (name, var) in b.vs.variables() {
        assert_eq!(var.kind(), Kind::Float, "{name}: the weights stay fp32");
        if var.requires_grad() && !name.starts_with("projection.") {
            assert!(var.grad().defined() && var.grad().kind() == Kind::Float, "{name}: no fp32 gradient");
        }
    }
    // Its checkpoint (channels-last weights) is written and gives the same network back, and
    // the momentum buffers come back in their parameters' layout.
    let path = dir.path().join("bf16.safetensors");
    b.save(&path, Some(&optimizer), serde_json::json!({"stage": "test"})).unwrap();
    let mut c = Trainer::new(&bf16).unwrap();
    let loaded = c.load(&path).unwrap();
    let (out_b, out_c) = tch::no_grad(|| (b.forward(&input, false), c.forward(&input, false)));
    assert!(out_b.main.equal(&out_c.main), "the reloaded channels-last network differs");
    let mut reloaded = c.optimizer();
    reloaded.load_state(&loaded.optimizer).unwrap();
    let variables = c.vs.variables();
    let buffers = reloaded.state();
    assert!(buffers.len() > 10, "{} optimizer tensors", buffers.len());
    for (name, buffer) in buffers.iter().filter_map(|(n, b)| Some((n.strip_prefix("momentum.")?, b))) {
        assert_eq!(buffer.stride(), variables[name].stride(), "momentum.{name}: not in its parameter's layout");
    }
    assert!(losses_fp32[19] < losses_fp32[0] - 0.05, "fp32 losses {losses_fp32:?}");
    for (step, (x, y)) in losses_fp32.iter().zip(&losses).enumerate() {
        assert!((x - y).abs() < 0.01 * x, "step {step}: bf16 loss {y}, fp32 {x}");
    }
}
