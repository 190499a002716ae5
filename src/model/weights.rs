//! ImageNet weights from torchvision, exported once to safetensors where there is internet:
//!
//! ```python
//! import torch, torchvision
//! from safetensors.torch import save_file
//! m = torchvision.models.resnet101(weights="IMAGENET1K_V1")
//! save_file({k: v.contiguous() for k, v in m.state_dict().items()}, "resnet101-imagenet.safetensors")
//! ```
//! torchvision's names (`layer1.0.conv1.weight`, `bn1.running_mean`, ...) map to ours by the
//! `backbone.` prefix; `fc.*` and `num_batches_tracked` have no counterpart and are skipped.

use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::nn::VarStore;

/// Our variable name for a torchvision ResNet state-dict key, or None when it has no use here.
pub fn backbone_name(torchvision_key: &str) -> Option<String> {
    if torchvision_key.starts_with("fc.") || torchvision_key.ends_with("num_batches_tracked") {
        return None;
    }
    Some(format!("backbone.{torchvision_key}"))
}

/// Copies torchvision ResNet weights into the backbone; every backbone variable must be found
/// with the right shape. Returns how many tensors were loaded.
pub fn load_torchvision_backbone(vs: &mut VarStore, path: &Path) -> Result<usize> {
    let tensors = tch::Tensor::read_safetensors(path)
        .with_context(|| format!("{}: cannot read safetensors", path.display()))?;
    let variables = vs.variables();
    let mut loaded = 0;
    let mut seen = std::collections::HashSet::new();
    tch::no_grad(|| -> Result<()> {
        for (key, tensor) in &tensors {
            let Some(name) = backbone_name(key) else { continue };
            let Some(var) = variables.get(&name) else {
                bail!("{}: tensor {key} has no counterpart {name} in this model (wrong depth?)", path.display());
            };
            if var.size() != tensor.size() {
                bail!("{}: {key} has shape {:?}, the model's {name} has {:?}", path.display(), tensor.size(), var.size());
            }
            var.shallow_clone().copy_(tensor);
            seen.insert(name);
            loaded += 1;
        }
        Ok(())
    })?;
    let missing: Vec<_> = variables.keys().filter(|k| k.starts_with("backbone.") && !seen.contains(*k)).collect();
    if !missing.is_empty() {
        bail!("{}: no weights for {} backbone variable(s), e.g. {}", path.display(), missing.len(), missing[0]);
    }
    Ok(loaded)
}
