//! Model shapes and strides, gradients into every head, torchvision weight names.

use adamcu::config::ModelConfig;
use adamcu::model::weights::Layout;
use adamcu::model::SegNet;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn model(arch: &str, backbone: &str, classes: usize) -> (VarStore, SegNet) {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let config = ModelConfig {
        arch: arch.parse().expect("an arch"),
        backbone: backbone.parse().expect("a backbone"),
        tiny_width: 8,
        projection_dim: 16,
        bn_stats: adamcu::config::BnStats::Batch,
        aspp_dilations: vec![1, 2, 3, 4],
        v3plus_width: 32,
        ..ModelConfig::default()
    };
    let net = SegNet::new(&vs.root(), &config, classes).unwrap();
    (vs, net)
}

#[test]
fn output_shapes_and_strides_of_each_model() {
    let input = Tensor::randn([2, 3, 64, 96], (Kind::Float, Device::Cpu));
    for (arch, backbone, main_stride) in [
        ("deeplabv2", "tiny", 8),
        ("deeplabv2", "resnet18", 8),
        ("deeplabv2", "resnet50", 8),
        ("deeplabv2", "resnet101", 8),
        ("deeplabv3plus", "tiny", 4),
        ("deeplabv3plus", "resnet50", 4),
    ] {
        let (_, net) = model(arch, backbone, 19);
        let out = tch::no_grad(|| net.forward_t(&input, false));
        assert_eq!(out.main.size(), [2, 19, 64 / main_stride, 96 / main_stride], "{arch} {backbone} main");
        assert_eq!(out.aux.size(), [2, 19, 8, 12], "{arch} {backbone} aux");
        assert_eq!(out.embedding.size(), [2, 16, 8, 12], "{arch} {backbone} embedding");
        let norms = out.embedding.norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-4, "embeddings are unit vectors");
    }
}

#[test]
fn main_aux_and_projection_heads_all_receive_gradient() {
    for arch in ["deeplabv2", "deeplabv3plus"] {
        let (vs, net) = model(arch, "tiny", 5);
        let input = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let labels = Tensor::randint(5, [2, 32, 32], (Kind::Int64, Device::Cpu));
        let out = net.forward_t(&input, true);
        let main = adamcu::train::segmentation_loss(&out.main, &labels);
        let aux = adamcu::train::segmentation_loss(&out.aux, &labels);
        // Any function of the embeddings stands in for L_con here (its own test is with ADA-MCU).
        let embed = out.embedding.select(1, 0).mean(Kind::Float);
        (main + aux * 0.1 + embed).backward();
        for prefix in ["backbone.", "aux.", "main.", "projection."] {
            let grad_norm: f64 = vs
                .variables()
                .iter()
                .filter(|(n, t)| n.starts_with(prefix) && t.requires_grad())
                .map(|(_, t)| t.grad().abs().sum(Kind::Float).double_value(&[]))
                .sum();
            assert!(grad_norm > 0.0, "{arch}: no gradient reaches {prefix}");
        }
        // BatchNorm affine parameters are frozen.
        for (name, t) in vs.variables() {
            if name.ends_with("bn1.weight") || name.ends_with("bn1.bias") {
                assert!(!t.requires_grad(), "{name} must be frozen");
            }
        }
    }
}

/// torchvision's resnet101 state-dict keys, written out from its architecture.
fn torchvision_resnet_keys(blocks: [usize; 4]) -> Vec<String> {
    let bn = |p: &str| {
        ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"].map(|s| format!("{p}.{s}")).to_vec()
    };
    let mut keys = vec!["conv1.weight".to_string()];
    keys.extend(bn("bn1"));
    for (l, &n) in blocks.iter().enumerate() {
        for b in 0..n {
            let p = format!("layer{}.{b}", l + 1);
            for i in 1..=3 {
                keys.push(format!("{p}.conv{i}.weight"));
                keys.extend(bn(&format!("{p}.bn{i}")));
            }
            if b == 0 {
                keys.push(format!("{p}.downsample.0.weight"));
                keys.extend(bn(&format!("{p}.downsample.1")));
            }
        }
    }
    keys.extend(["fc.weight".to_string(), "fc.bias".to_string()]);
    keys
}

#[test]
fn torchvision_weight_names_map_onto_the_backbone_and_load() {
    let (mut vs, _) = model("deeplabv2", "resnet101", 19);
    let variables = vs.variables();
    let keys = torchvision_resnet_keys([3, 4, 23, 3]);
    let mut mapped = 0;
    for key in &keys {
        match Layout::Torchvision.our_name(key) {
            Some(name) => {
                assert!(variables.contains_key(&name), "{key} -> {name} missing");
                mapped += 1;
            }
            None => assert!(key.starts_with("fc.") || key.ends_with("num_batches_tracked"), "{key} dropped"),
        }
    }
    let backbone_vars = variables.keys().filter(|k| k.starts_with("backbone.")).count();
    assert_eq!(mapped, backbone_vars, "every backbone variable has a torchvision key");

    // A state dict with those names (values: a known pattern) loads into the backbone.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet101.safetensors");
    let tensors: Vec<(String, Tensor)> = keys
        .iter()
        .map(|k| {
            let shape = Layout::Torchvision
                .our_name(k)
                .and_then(|n| variables.get(&n).map(|t| t.size()))
                .unwrap_or_else(|| vec![3]);
            (k.clone(), Tensor::full(shape, 0.25, (Kind::Float, Device::Cpu)))
        })
        .collect();
    Tensor::write_safetensors(&tensors, &path).unwrap();
    let n = adamcu::model::weights::import(&mut vs, &path, false).unwrap().tensors;
    assert_eq!(n, mapped);
    let conv = &vs.variables()["backbone.layer3.22.conv2.weight"];
    assert_eq!(conv.mean(Kind::Float).double_value(&[]), 0.25);

    // The wrong depth is refused with the key named.
    let (mut small, _) = model("deeplabv2", "resnet50", 19);
    let e = adamcu::model::weights::import(&mut small, &path, false).unwrap_err();
    assert!(
        e.to_string().contains("no counterpart backbone.layer3.") && e.to_string().contains("another depth"),
        "{e}"
    );
}

/// A job whose every sum over the ranks fails, as when a peer was lost: counts its calls.
struct LostPeer(std::sync::atomic::AtomicUsize);

impl adamcu::model::layers::SumOverRanks for LostPeer {
    fn sum_over_ranks(&self, _: &Tensor) -> anyhow::Result<Tensor> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        anyhow::bail!("rank 0 of 2: differentiable all-reduce failed (a peer stopped?)")
    }
}

#[test]
fn a_synchronised_batch_norm_that_loses_its_peer_keeps_the_error_for_the_step_instead_of_panicking() {
    let (_, net) = model("deeplabv2", "tiny", 5);
    let job = std::sync::Arc::new(LostPeer(Default::default()));
    net.sync_batch_norm(job.clone());
    let input = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    // A layer's forward cannot return an error: the pass finishes, and the error waits.
    let out = net.forward_t(&input, true);
    assert_eq!(out.main.size(), [2, 5, 4, 4]);
    let error = net.take_sync_failure().expect("the failed sum is kept for the trainer");
    assert!(format!("{error:#}").contains("differentiable all-reduce failed"), "{error:#}");
    assert!(net.take_sync_failure().is_none(), "taken once");
    // Once one layer failed, the layers after it do not wait on the lost peer again.
    assert_eq!(job.0.load(std::sync::atomic::Ordering::SeqCst), 1, "one failed sum per pass");
    // Evaluation never sums over the ranks.
    let _ = tch::no_grad(|| net.forward_t(&input, false));
    assert!(net.take_sync_failure().is_none());
}
