//! Data-parallel training on libtorch's c10d (`torch_ext::ProcessGroup`): how a rank learns its
//! place (torchrun's environment variables), `adamcu train --nproc N` starting N local ranks,
//! and what a data-parallel step does beyond one process's: the same weights at the start,
//! gradients averaged over the ranks while the backward pass runs (c10d's Reducer), BatchNorm's
//! batch statistics over the ranks (`train.sync_bn`) and rank 0's running statistics.
//!
//! Each rank trains on its own share of every batch (`data::loader::RankShare`): with N ranks and
//! a batch of B, rank r takes draws r·B/N .. (r+1)·B/N - 1 of the one-process stream, so the N
//! shares together are the batch one process would draw, augmentation included.

use crate::model::layers::SumOverRanks;
use crate::torch_ext::{Backend, GradientReducer, ProcessGroup};
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::process::{Child, Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// A rank's place in the job, as torchrun, Slurm or Kubernetes set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// How long a collective waits for the other ranks before failing: a rank that died or hangs
/// is an error on the others within this, never a hang (`ADAMCU_DIST_TIMEOUT_S` overrides). A
/// rank that died is seen at once (Gloo and NCCL notice the closed connection); the timeout is
/// for one that hangs, and leaves room for rank 0's work alone (the translation, an
/// evaluation) while the others wait at their next collective.
pub fn collective_timeout() -> Duration {
    let seconds = std::env::var("ADAMCU_DIST_TIMEOUT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(1800);
    Duration::from_secs(seconds)
}

impl Launch {
    /// This process's place from the environment; None when `WORLD_SIZE` is unset or 1 (one
    /// process, no group). A variable that is missing or malformed is an error naming it.
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let number = |name: &str, value: Option<String>| -> Result<usize> {
            let value = value.with_context(|| format!("{name} is not set (WORLD_SIZE is {world}: a data-parallel rank needs RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT too)"))?;
            value.trim().parse().with_context(|| format!("{name}={value:?}: expected a whole number"))
        };
        let world_size = number("WORLD_SIZE", Some(world.clone()))?;
        if world_size <= 1 {
            return Ok(None);
        }
        let rank = number("RANK", var("RANK"))?;
        if rank >= world_size {
            bail!("RANK={rank}: expected a rank below WORLD_SIZE={world_size}");
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", Some(v))?,
            None => rank,
        };
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = number("MASTER_PORT", var("MASTER_PORT"))?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|&p| p > 0)
            .with_context(|| format!("MASTER_PORT={port}: expected 1-65535"))?;
        Ok(Some(Launch { rank, world: world_size, local_rank, master_addr, master_port }))
    }
}

/// `config` for this rank: one device per rank, CUDA device `LOCAL_RANK` where `run.device`
/// asks for CUDA without an index ("auto" with a GPU, or "cuda"), as torchrun's users expect.
/// One process, or a device named by index, keeps the config as it is.
pub fn config_for_rank(config: &crate::config::Config) -> Result<crate::config::Config> {
    let Some(launch) = Launch::from_env()? else { return Ok(config.clone()) };
    let mut c = config.clone();
    let wants_cuda = match c.run.device.as_str() {
        "cuda" => true,
        "auto" => tch::Cuda::is_available(),
        _ => false,
    };
    if wants_cuda {
        c.run.device = format!("cuda:{}", launch.local_rank);
    }
    // Every rank serves its metrics (with a `rank` label) on its own port: the configured one
    // plus LOCAL_RANK, so that ranks on one machine do not collide.
    if let Some(address) = c.metrics.listen_address()? {
        let port = address.port().checked_add(launch.local_rank as u16).context("metrics.listen: port out of range")?;
        c.metrics.listen = std::net::SocketAddr::new(address.ip(), port).to_string();
    }
    Ok(c)
}

/// The group a data-parallel trainer steps in.
pub struct DataParallel {
    group: Arc<ProcessGroup>,
    /// This rank's device: NCCL's collectives take tensors there, Gloo's on the CPU.
    device: tch::Device,
}

/// Whether this process writes the run's files: one process, or rank 0 of a job.
pub fn writes_files(parallel: Option<&DataParallel>) -> bool {
    parallel.is_none_or(|p| p.rank() == 0)
}

/// Gradients are all-reduced in buckets of about this many bytes, the first (the last layers',
/// whose gradients are ready first) smaller so that communication starts early: DDP's defaults.
const BUCKET_BYTES: i64 = 25 << 20;
const FIRST_BUCKET_BYTES: i64 = 1 << 20;

impl DataParallel {
    /// Joins the job's group: Gloo on the CPU, NCCL on CUDA.
    pub fn join(launch: &Launch, device: tch::Device) -> Result<DataParallel> {
        let backend = if device.is_cuda() { Backend::Nccl } else { Backend::Gloo };
        let group = ProcessGroup::new(
            &launch.master_addr,
            launch.master_port,
            launch.rank,
            launch.world,
            backend,
            collective_timeout(),
        )?;
        tracing::info!(
            "rank {} of {}: joined the {backend:?} group at {}:{}",
            launch.rank,
            launch.world,
            launch.master_addr,
            launch.master_port
        );
        Ok(DataParallel { group: Arc::new(group), device })
    }

    /// From the environment (`Launch::from_env`); None for one process.
    pub fn from_env(device: tch::Device) -> Result<Option<DataParallel>> {
        Launch::from_env()?.map(|l| Self::join(&l, device)).transpose()
    }

    pub fn rank(&self) -> usize {
        self.group.rank
    }

    pub fn world(&self) -> usize {
        self.group.world
    }

    /// Rank 0's values of `tensors` in every rank (weights at the start, BatchNorm statistics).
    pub fn broadcast_from_first(&self, tensors: &[Tensor]) -> Result<()> {
        tch::no_grad(|| {
            let refs: Vec<&Tensor> = tensors.iter().collect();
            self.group.broadcast(&refs, 0)
        })
    }

    /// c10d's Reducer over `params` (the same list in the same order on every rank, each
    /// reached by every step's loss): each backward pass that `GradientReducer::prepare` armed
    /// all-reduces the gradients in buckets while it runs, and leaves their mean over the ranks
    /// in `.grad`.
    pub fn gradient_reducer(&self, params: &[&Tensor]) -> Result<GradientReducer> {
        GradientReducer::new(&self.group, params, BUCKET_BYTES, FIRST_BUCKET_BYTES)
    }

    /// An error naming `what` unless `flags` are the same on every rank.
    pub fn require_same_on_every_rank(&self, flags: &[bool], what: &str) -> Result<()> {
        let local = Tensor::from_slice(&flags.iter().map(|&f| f as i64 as f32).collect::<Vec<_>>());
        let total = local.to_device(self.device);
        self.group.all_reduce_sum(&[&total])?;
        let total = Vec::<f32>::try_from(&total.to_device(tch::Device::Cpu))?;
        let world = self.world() as f32;
        if let Some(i) = total.iter().zip(flags).position(|(&t, &f)| t != if f { world } else { 0.0 }) {
            bail!(
                "rank {} of {}: {what} differ between the ranks (entry {i}: {} of {} ranks); every rank must \
                 run the same step",
                self.rank(),
                self.world(),
                total[i],
                self.world()
            );
        }
        Ok(())
    }

    /// The sum of `value` (a one-element tensor on the device) over the ranks, in place.
    pub fn sum(&self, value: &Tensor) -> Result<()> {
        self.group.all_reduce_sum(&[value])
    }

    /// Every rank's `input` (of one shape on every rank), in rank order.
    pub fn all_gather(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        self.group.all_gather(input)
    }

    pub fn barrier(&self) -> Result<()> {
        self.group.barrier()
    }

    /// Whether `flag` holds on any rank (a stop asked of one rank stops all at the same step).
    pub fn any(&self, flag: bool) -> Result<bool> {
        let t = Tensor::from_slice(&[flag as i64 as f32]).to_device(self.device);
        self.group.all_reduce_sum(&[&t])?;
        Ok(t.double_value(&[0]) > 0.0)
    }
}

/// SyncBatchNorm's statistics (`train.sync_bn`).
impl SumOverRanks for DataParallel {
    fn sum_over_ranks(&self, t: &Tensor) -> Result<Tensor> {
        self.group.sum_differentiable(t)
    }
}

/// The scale of a rank's pixel-mean loss that makes the ranks' averaged gradient the gradient
/// of the mean over every rank's labelled pixels, as one process computes it on the combined
/// batch: world × (this rank's labelled pixels) / (all ranks' labelled pixels). Without it the
/// average of per-rank means weighs a crop with few labelled pixels as much as a full one.
pub fn pixel_share(parallel: &DataParallel, labels: &Tensor) -> Result<Tensor> {
    let local = labels.ne(255).sum(Kind::Float).reshape([1]);
    let total = local.copy();
    parallel.sum(&total)?;
    Ok((local * parallel.world() as f64 / total.clamp_min(1.0)).reshape([]))
}

/// `adamcu train ... --nproc N`: runs this command N times as ranks 0..N-1 of one job on this
/// machine (torchrun's environment, a free port on 127.0.0.1) and waits for all. When one rank
/// fails, the others are stopped (their collectives would fail on their own within the
/// timeout) and the exit code is that rank's.
/// `env`: more variables for every rank.
pub fn launch_local(nproc: usize, args: Vec<OsString>, env: &[(&str, &std::ffi::OsStr)]) -> Result<ExitCode> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for rank in 0..nproc {
        let child = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .envs(env.iter().copied())
            .spawn()
            .with_context(|| format!("starting rank {rank} of {nproc}"))?;
        children.push((rank, child));
    }
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    let mut stop_at: Option<Instant> = None;
    while !children.is_empty() {
        let mut still = Vec::new();
        for (rank, mut child) in children {
            match child.try_wait()? {
                Some(status) => {
                    if !status.success() && failed.is_none() {
                        tracing::error!("rank {rank} of {nproc} failed ({status}); stopping the others");
                        failed = Some((rank, status));
                        stop_at = Some(Instant::now() + Duration::from_secs(10));
                    }
                }
                None => still.push((rank, child)),
            }
        }
        children = still;
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            for (_, child) in &mut children {
                let _ = child.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(match failed {
        None => ExitCode::SUCCESS,
        Some((rank, status)) => {
            eprintln!("adamcu: rank {rank} of {nproc} failed: {status}");
            ExitCode::from(status.code().map_or(1, |c| c.clamp(1, 255) as u8))
        }
    })
}
