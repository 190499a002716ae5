//! The benchmarks run on the CPU too (tiny sizes), and the bf16 autocast shim works.

mod common;

#[test]
fn the_step_benchmark_runs_every_variant_on_the_cpu() {
    // Source crops larger than the target's, as in the paper (1280x720 and 1024x512).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args([
            "bench",
            "step",
            "--config",
            "pipelines/synth.toml",
            "--set",
            "model.tiny_width=8",
            "--source-size",
            "40x72",
            "--target-size",
            "32x64",
            "--iterations",
            "2",
            "--warmup",
            "1",
            "--python",
        ])
        .arg(common::python())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // The reference always runs the paper's network: beside the tiny one, the bench says so.
    assert!(
        stdout.contains("NOT LIKE FOR LIKE: this config's network is deeplabv2 tiny, 19 classes, 64-d projection"),
        "{stdout}"
    );
    for row in ["seg    fp32", "full   fp32", "seg    bf16+cl", "full   bf16+cl"] {
        let line = stdout.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row:?} row in {stdout}"));
        let ms: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(ms > 0.0 && ms.is_finite(), "{line}");
    }
    // Operators per step, counted in the warm-up iteration: the full step dispatches the
    // segmentation step's and those of its contrastive units besides.
    let ops = |row: &str| -> u64 {
        let line = stdout.lines().find(|l| l.starts_with(row)).unwrap();
        line.split('|').next().unwrap().split_whitespace().last().unwrap().parse().unwrap_or_else(|_| panic!("{line}"))
    };
    assert!(ops("seg    fp32") > 100, "{stdout}");
    assert!(ops("full   fp32") > ops("seg    fp32") + 100, "{stdout}");
    // The sync check needs CUDA: on the CPU it must say so rather than report a pass.
    let checks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("host waits for the device")).collect();
    assert_eq!(checks.len(), 4, "{stdout}");
    assert!(checks.iter().all(|l| l.ends_with("not checked (needs CUDA and a warm-up iteration)")), "{stdout}");
    // What can be checked here: no operator of the step is one that waits on a GPU.
    let op_checks: Vec<&str> =
        stdout.lines().filter(|l| l.starts_with("operators that wait for a GPU inside")).collect();
    assert_eq!(op_checks.len(), 4, "{stdout}");
    assert!(op_checks.iter().all(|l| l.ends_with("step: none")), "{stdout}");
}

#[test]
fn the_bf16_autocast_region_casts_convolutions_to_bf16_on_the_cpu_and_restores_the_state() {
    use adamcu::torch_ext::{autocast_bf16, autocast_state, AutocastState};
    use tch::{Device, Kind, Tensor};
    let cpu = Device::Cpu;
    let off = autocast_state(cpu);
    assert!(!off.enabled);
    let input = Tensor::randn([1, 3, 8, 8], (Kind::Float, cpu));
    let weight = Tensor::randn([4, 3, 3, 3], (Kind::Float, cpu));
    let conv = || input.conv2d(&weight, None::<Tensor>, 1, 1, 1, 1);
    assert_eq!(conv().kind(), Kind::Float);
    autocast_bf16(cpu, || {
        assert_eq!(autocast_state(cpu), AutocastState { enabled: true, bf16: true });
        assert_eq!(conv().kind(), Kind::BFloat16, "a convolution inside the region runs in bf16");
        autocast_bf16(cpu, || assert!(autocast_state(cpu).enabled));
        assert!(autocast_state(cpu).enabled, "the inner region restores the outer one");
    });
    assert_eq!(autocast_state(cpu), off);
    assert_eq!(conv().kind(), Kind::Float);
    let _ = std::panic::catch_unwind(|| autocast_bf16(cpu, || panic!("inside")));
    assert_eq!(autocast_state(cpu), off, "restored after a panic");
    // CUDA's state is its own: a CUDA region sets bf16 there (libtorch's default is fp16) and
    // puts fp16 back; the CPU's is untouched.
    let cuda = Device::Cuda(0);
    assert_eq!(autocast_state(cuda), AutocastState { enabled: false, bf16: false });
    autocast_bf16(cuda, || {
        assert_eq!(autocast_state(cuda), AutocastState { enabled: true, bf16: true });
        assert!(!autocast_state(cpu).enabled);
    });
    assert_eq!(autocast_state(cuda), AutocastState { enabled: false, bf16: false });
    assert_eq!(adamcu::torch_ext::cuda_peak_bytes(0), None, "no CUDA here");
}

#[test]
fn channels_last_keeps_values_and_changes_strides() {
    let t = tch::Tensor::arange(2 * 3 * 4 * 5, (tch::Kind::Float, tch::Device::Cpu)).view([2, 3, 4, 5]);
    let cl = adamcu::train::channels_last(&t);
    assert!(cl.equal(&t));
    assert_eq!(cl.stride(), [60, 1, 15, 3]);
}

#[test]
fn pinning_goes_through_the_shim_and_says_why_when_it_cannot() {
    let t = tch::Tensor::arange(6, (tch::Kind::Float, tch::Device::Cpu));
    let copy = || adamcu::torch_ext::pinned(&t);
    // A page-locked allocation (the loader collates CUDA batches into one).
    let allocate = || adamcu::torch_ext::empty_pinned(&[2, 3, 4], tch::Kind::Uint8);
    if tch::Cuda::is_available() {
        let p = copy();
        assert!(p.is_pinned(tch::Device::Cuda(0)));
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let p = allocate();
        assert!(p.is_pinned(tch::Device::Cuda(0)));
        assert_eq!((p.size(), p.kind(), p.device()), (vec![2, 3, 4], tch::Kind::Uint8, tch::Device::Cpu));
    } else {
        let refused = |call: &dyn Fn() -> tch::Tensor| {
            let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_err();
            let message = e.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(message.starts_with("cannot page-lock a tensor: "), "{message}");
        };
        refused(&copy);
        refused(&allocate);
    }
}

#[test]
fn every_benchmark_configs_step_runs_with_its_classes_network_head_and_crop_sizes() {
    // The paper's settings at a quarter of their crop sizes (the source's and the target's
    // differ, as there), on the tiny backbone so that it runs here.
    for file in ["gta5-cityscapes", "synthia-cityscapes", "synscapes-cityscapes", "gta5-cityscapes-v3plus"] {
        let path = format!("pipelines/{file}.toml");
        let config = adamcu::config::Config::load(path.as_ref()).unwrap();
        let quarter = |set: &Option<adamcu::config::DatasetConfig>| {
            let [h, w] = config.augment_for(set.as_ref().unwrap()).crop;
            format!("{}x{}", h / 4, w / 4)
        };
        let (source, target) = (quarter(&config.data.source), quarter(&config.data.target));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_adamcu"))
            .args([
                "bench",
                "step",
                "--config",
                &path,
                "--set",
                "model.backbone=\"tiny\"",
                "--set",
                "model.tiny_width=8",
                "--source-size",
                &source,
                "--target-size",
                &target,
                "--iterations",
                "1",
                "--warmup",
                "0",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{file} ({source} and {target}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.lines().any(|l| l.starts_with("full   bf16+cl")), "{file}: {stdout}");
    }
}

#[test]
fn the_operator_count_sees_outermost_forward_ops_and_backward_nodes_then_stops() {
    use adamcu::torch_ext::count_ops;
    use tch::{Device, Kind, Tensor};
    let x = Tensor::randn([1, 2, 6, 6], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w = Tensor::randn([3, 2, 3, 3], (Kind::Float, Device::Cpu));
    let (loss, count) = count_ops(|| {
        // conv2d calls convolution and a backend kernel inside: one outermost op.
        let loss = x.conv2d(&w, None::<Tensor>, 1, 0, 1, 1).relu().sum(Kind::Float);
        loss.backward();
        loss
    });
    let calls = |name: &str| count.by_name.iter().find(|(_, _, n)| n == name).map_or(0, |(c, _, _)| *c);
    assert_eq!(calls("aten::conv2d"), 1, "{count:?}");
    assert_eq!(calls("aten::convolution"), 0, "inner ops are not counted: {count:?}");
    assert_eq!(calls("aten::relu"), 1, "{count:?}");
    assert_eq!(calls("autograd::engine::evaluate_function: ConvolutionBackward0"), 1, "{count:?}");
    assert_eq!(count.total, count.by_name.iter().map(|(c, _, _)| c).sum::<u64>());
    assert!(loss.requires_grad());
    // A panic inside goes through; the next count holds its own operators only.
    let inside = std::panic::catch_unwind(|| {
        count_ops(|| {
            let _ = x.relu();
            panic!("inside")
        })
    });
    assert!(inside.is_err());
    let (_, next) = count_ops(|| x.sigmoid());
    assert_eq!((next.total, next.by_name[0].2.as_str()), (1, "aten::sigmoid"), "{next:?}");
    // Another thread's operators are its own.
    let (_, alone) = count_ops(|| {
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = Tensor::ones([4], (Kind::Float, Device::Cpu)).relu();
            });
        })
    });
    assert_eq!(alone.total, 0, "{alone:?}");
}
