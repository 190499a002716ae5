//! `adamcu doctor`: what this binary links against, which device it will use, and a real
//! smoke check on that device (a few SGD steps of a small conv net must lower the loss).

use crate::config::DeviceChoice;
use anyhow::{bail, Result};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// The libtorch version this binary was linked against (read at build time).
pub const LIBTORCH_VERSION: &str = match option_env!("ADAMCU_LIBTORCH_VERSION") {
    Some(v) => v,
    None => "unknown",
};

pub struct SmokeResult {
    pub first_loss: f64,
    pub last_loss: f64,
    pub steps: usize,
}

/// Trains a two-layer conv net for `steps` SGD steps on one fixed random batch (labels are a
/// fixed function of the input) and returns the first and last loss.
pub fn smoke_check(device: Device, steps: usize) -> Result<SmokeResult> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let conv_cfg = nn::ConvConfig { padding: 1, ..Default::default() };
    let net = nn::seq().add(nn::conv2d(&root / "c1", 3, 16, 3, conv_cfg)).add_fn(|x| x.relu()).add(nn::conv2d(
        &root / "c2",
        16,
        4,
        3,
        conv_cfg,
    ));
    let input = Tensor::randn([4, 3, 32, 32], (Kind::Float, device));
    // A learnable target: the class is the argmax over a fixed random projection of the colours.
    let targets = input.permute([0, 2, 3, 1]).matmul(&Tensor::randn([3, 4], (Kind::Float, device))).argmax(-1, false);
    let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05)?;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let loss = net.forward(&input).cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Mean, -100, 0.0);
        opt.backward_step(&loss);
        losses.push(loss.double_value(&[]));
    }
    let (first_loss, last_loss) = (losses[0], *losses.last().unwrap());
    if !last_loss.is_finite() || last_loss >= first_loss * 0.9 {
        bail!(
            "smoke check failed on {device:?}: loss went from {first_loss:.4} to {last_loss:.4} \
               in {steps} SGD steps (expected a drop of at least 10%)"
        );
    }
    Ok(SmokeResult { first_loss, last_loss, steps })
}

pub fn run(choice: DeviceChoice) -> Result<()> {
    println!("adamcu      {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch    {LIBTORCH_VERSION}");
    let cuda_devices = tch::Cuda::device_count();
    println!("cuda        {} ({} device(s))", tch::Cuda::is_available(), cuda_devices);
    if tch::Cuda::is_available() {
        println!("cudnn       {} (version {})", tch::Cuda::cudnn_is_available(), tch::utils::version_cudnn());
    }
    println!("threads     {} intra-op, {} inter-op", tch::get_num_threads(), tch::get_num_interop_threads());
    // Data-parallel backends built in (build.rs): Gloo always, NCCL where its headers were found.
    let nccl = if cfg!(adamcu_nccl) { ", nccl" } else { " (nccl not built in: DEVELOPERS.md)" };
    println!("c10d        gloo{nccl}");
    let device = choice.resolve()?;
    println!("device      {device:?}");
    let started = std::time::Instant::now();
    let r = smoke_check(device, 30)?;
    println!(
        "smoke check ok: loss {:.4} -> {:.4} in {} SGD steps ({:.2} s)",
        r.first_loss,
        r.last_loss,
        r.steps,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
