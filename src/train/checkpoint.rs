//! Checkpoints: one safetensors file with the model (`model.*`), the optimizer state
//! (`optim.*`) and a JSON metadata blob (`meta`), written to a temporary file, fsynced and
//! renamed, so a crash leaves either the old checkpoint or the new one, never a torn one.

use super::optimizer::Sgd;
use crate::config::{Config, ConfigChange};
use crate::files::write_atomically;
use crate::torch_ext::owned_host_copy;
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// The tensor that holds a checkpoint's JSON metadata (what tells an adamcu checkpoint apart).
pub const META_KEY: &str = "meta";

/// A checkpoint file that cannot be used as it is on disk: it does not parse (truncated by a
/// copy, a full disk, a torn transfer), lacks its metadata, or its contents fail the checksum
/// recorded when it was written (a flipped byte, which safetensors' own checks do not see).
/// The daemon sets such a file aside and resumes from the checkpoint before it.
#[derive(Debug, thiserror::Error)]
#[error("{}: damaged checkpoint: {reason}", path.display())]
pub struct DamagedCheckpoint {
    pub path: std::path::PathBuf,
    pub reason: String,
}

/// CRC-32 of a checkpoint's tensors (all but the metadata) in name order, each name then its
/// bytes: recorded in the metadata as `checksum` when written, checked when read.
fn contents_checksum(tensors: &[(String, Tensor)]) -> String {
    let mut named: Vec<&(String, Tensor)> = tensors.iter().filter(|(n, _)| n != META_KEY).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = crc32fast::Hasher::new();
    for (name, t) in named {
        hasher.update(name.as_bytes());
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        // SAFETY: a contiguous host tensor holds `bytes` bytes from its data pointer, alive
        // while `t` is.
        hasher.update(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, bytes) });
    }
    format!("crc32:{:08x}", hasher.finalize())
}

/// A captured checkpoint that a writer thread (`pipeline::writer`) puts on disk while training
/// goes on.
pub trait Checkpoint: Send + 'static {
    /// The step it was captured at (named in a failed write's error).
    fn step(&self) -> u64;
    /// Writes it into `rotation`; returns the checkpoint file's path.
    fn write(&self, rotation: &Rotation) -> Result<std::path::PathBuf>;
}

/// A checkpoint's tensors and metadata copied off the live model at one step: the variables
/// and momentum buffers change in place as training goes on, so a checkpoint that is written
/// while it does (the daemon's writer thread) must own its copies.
pub struct Captured {
    tensors: Vec<(String, Tensor)>,
}

/// Captures the model, the optimizer state, `extra` tensors (stage state such as the DCCM, as
/// `state.<name>`) and `meta`.
pub fn capture(
    vs: &VarStore,
    optimizer: Option<&Sgd>,
    extra: &[(String, Tensor)],
    meta: &serde_json::Value,
) -> Captured {
    let copy = |name: String, t: &Tensor| (name, owned_host_copy(t));
    let mut tensors: Vec<(String, Tensor)> =
        vs.variables().iter().map(|(n, t)| copy(format!("model.{n}"), t)).collect();
    if let Some(opt) = optimizer {
        tensors.extend(opt.state().iter().map(|(n, t)| copy(format!("optim.{n}"), t)));
    }
    tensors.extend(extra.iter().map(|(n, t)| copy(format!("state.{n}"), t)));
    let mut meta = meta.clone();
    if let Some(fields) = meta.as_object_mut() {
        fields.insert("checksum".into(), contents_checksum(&tensors).into());
    }
    let meta_bytes = serde_json::to_vec(&meta).expect("JSON values serialise");
    tensors.push((META_KEY.into(), Tensor::from_slice(&meta_bytes)));
    Captured { tensors }
}

impl Captured {
    /// Writes the checkpoint to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomically(path, |temp| {
            Tensor::write_safetensors(&self.tensors, temp).with_context(|| format!("writing {}", temp.display()))
        })
    }
}

pub struct Loaded {
    pub meta: serde_json::Value,
    pub optimizer: Vec<(String, Tensor)>,
    pub extra: Vec<(String, Tensor)>,
}

impl Loaded {
    /// What differs between the config this checkpoint (at `path`) recorded and `config`;
    /// nothing, with a warning, for a checkpoint that records none.
    pub fn config_changes(&self, config: &Config, path: &Path) -> Vec<ConfigChange> {
        match self.meta.get("config") {
            Some(recorded) => config.changes_since(recorded),
            None => {
                tracing::warn!(
                    "{}: records no config (written by an older adamcu); it is used unchecked",
                    path.display()
                );
                Vec::new()
            }
        }
    }
}

/// Loads a checkpoint into `vs` (every model variable must be present with its shape).
pub fn load(path: &Path, vs: &mut VarStore) -> Result<Loaded> {
    let tensors = Tensor::read_safetensors(path)
        .map_err(|e| DamagedCheckpoint { path: path.to_path_buf(), reason: format!("cannot read it: {e}") })?;
    load_tensors(path, tensors, vs)
}

/// `load` for the tensors of a checkpoint already read from `path` (named in errors).
pub fn load_tensors(path: &Path, tensors: Vec<(String, Tensor)>, vs: &mut VarStore) -> Result<Loaded> {
    let damaged = |reason: String| DamagedCheckpoint { path: path.to_path_buf(), reason };
    let Some((_, meta_tensor)) = tensors.iter().find(|(n, _)| n == META_KEY) else {
        return Err(damaged("it lacks its metadata".into()).into());
    };
    let mut meta_bytes = vec![0u8; meta_tensor.numel()];
    meta_tensor.to_kind(Kind::Uint8).copy_data(&mut meta_bytes, meta_tensor.numel());
    let recorded: serde_json::Value =
        serde_json::from_slice(&meta_bytes).map_err(|e| damaged(format!("its metadata is not JSON: {e}")))?;
    // Checkpoints written before the checksum existed have none: used unchecked.
    if let Some(expected) = recorded.get("checksum").and_then(|c| c.as_str()) {
        let found = contents_checksum(&tensors);
        if found != expected {
            return Err(
                damaged(format!("its contents give checksum {found}, {expected} was recorded when written")).into()
            );
        }
    }
    let variables = vs.variables();
    let mut meta = None;
    let mut optimizer = Vec::new();
    let mut extra = Vec::new();
    let mut loaded = std::collections::HashSet::new();
    tch::no_grad(|| -> Result<()> {
        for (key, t) in tensors {
            if key == META_KEY {
                let mut bytes = vec![0u8; t.numel()];
                t.to_kind(Kind::Uint8).copy_data(&mut bytes, t.numel());
                meta = Some(serde_json::from_slice(&bytes).context("checkpoint metadata is not JSON")?);
            } else if let Some(name) = key.strip_prefix("optim.") {
                optimizer.push((name.to_string(), t));
            } else if let Some(name) = key.strip_prefix("state.") {
                extra.push((name.to_string(), t));
            } else if let Some(name) = key.strip_prefix("model.") {
                let Some(var) = variables.get(name) else {
                    bail!(
                        "{}: checkpoint variable {name} is not in this model (another architecture?)",
                        path.display()
                    );
                };
                if var.size() != t.size() {
                    bail!(
                        "{}: {name} has shape {:?} in the checkpoint, {:?} in the model",
                        path.display(),
                        t.size(),
                        var.size()
                    );
                }
                var.shallow_clone().copy_(&t);
                loaded.insert(name.to_string());
            }
        }
        Ok(())
    })?;
    if let Some(missing) = variables.keys().find(|k| !loaded.contains(*k)) {
        bail!("{}: checkpoint lacks model variable {missing}", path.display());
    }
    Ok(Loaded { meta: meta.context("checkpoint lacks its metadata")?, optimizer, extra })
}

/// Bytes this process may still write on the file system that holds `path` (what `df` shows
/// as available: blocks reserved for root do not count).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Periodic checkpoints of a run: `step-NNNNNNNN.safetensors` (with any companion files that
/// share the stem, e.g. the ledger snapshot `.ledger`) in one folder; the last `keep` stay.
#[derive(Clone)]
pub struct Rotation {
    pub dir: std::path::PathBuf,
    pub keep: usize,
}

impl Rotation {
    pub fn path_for(&self, step: u64, extension: &str) -> std::path::PathBuf {
        self.dir.join(format!("step-{step:08}.{extension}"))
    }

    /// Steps that have a complete checkpoint, oldest first.
    pub fn steps(&self) -> Vec<u64> {
        let mut steps: Vec<u64> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok())
            .collect();
        steps.sort();
        steps
    }

    pub fn latest(&self) -> Option<u64> {
        self.steps().last().copied()
    }

    /// Removes the temporary files of writes a kill or a crash cut short (up to a whole
    /// ledger snapshot each). Only for the run's one daemon, at its start: it holds the lock.
    pub fn remove_unfinished(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // `write_atomically`'s temporary name for a `step-N.*` file.
            if name.starts_with(".step-") && name.ends_with(".tmp") {
                std::fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
                tracing::info!("removed {}, left by an interrupted checkpoint", entry.path().display());
            }
        }
        Ok(())
    }

    /// The files of checkpoint `step`: `step-N.safetensors` and its companions.
    pub fn files_of(&self, step: u64) -> Result<Vec<std::path::PathBuf>> {
        let stem = format!("step-{step:08}.");
        Ok(std::fs::read_dir(&self.dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&stem))
            .map(|e| e.path())
            .collect())
    }

    /// Removes all but the newest `keep` checkpoints (and their companion files). The
    /// `.safetensors` file goes first: a checkpoint a kill leaves half-removed is one that
    /// `steps` no longer lists, never one that lacks its ledger snapshot.
    pub fn prune(&self) -> Result<()> {
        let steps = self.steps();
        for &step in steps.iter().take(steps.len().saturating_sub(self.keep)) {
            std::fs::remove_file(self.path_for(step, "safetensors"))?;
            for file in self.files_of(step)? {
                std::fs::remove_file(file)?;
            }
        }
        Ok(())
    }
}
