//! `run.device`: "auto", "cpu", "cuda" or "cuda:N", and what libtorch has of it.

use super::Config;

impl Config {
    /// The device `run.device` names, or an error naming the key where it is not there.
    pub fn device(&self) -> anyhow::Result<tch::Device> {
        use anyhow::Context;
        let choice = parse_device(&self.run.device).expect("validated");
        choice.resolve().with_context(|| format!("run.device = {:?}", self.run.device))
    }
}

/// Parses `run.device`; `None` when malformed.
pub fn parse_device(spec: &str) -> Option<DeviceChoice> {
    match spec {
        "auto" => Some(DeviceChoice::Auto),
        "cpu" => Some(DeviceChoice::Cpu),
        "cuda" => Some(DeviceChoice::Cuda(0)),
        _ => spec.strip_prefix("cuda:")?.parse().ok().map(DeviceChoice::Cuda),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// The device, or an error naming what libtorch sees when a CUDA device is asked for that
    /// is not there (libtorch itself would fail deep inside the first allocation).
    pub fn resolve(self) -> anyhow::Result<tch::Device> {
        match self {
            DeviceChoice::Auto => Ok(tch::Device::cuda_if_available()),
            DeviceChoice::Cpu => Ok(tch::Device::Cpu),
            DeviceChoice::Cuda(i) => {
                let count = tch::Cuda::device_count();
                anyhow::ensure!(
                    (i as i64) < count,
                    "CUDA device {i} asked for, but libtorch sees {count} CUDA device(s) \
                    (no NVIDIA driver, or a CPU-only libtorch?): expected \"auto\" or \"cpu\" here, or a GPU machine"
                );
                Ok(tch::Device::Cuda(i))
            }
        }
    }
}
