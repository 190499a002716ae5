//! Weights people already have, read in the files and layouts they come in: `.safetensors`,
//! or any container `torch.save` has written (`.pth`/`.pt`: the ZIP archive of PyTorch 1.6+ and
//! the legacy pickle stream before it, read by the `pytorch-reader` crate; no Python needed,
//! and unlike `torch.load` nothing in the file is run: its pickle is parsed, not executed).
//!
//! Layouts, told apart by their key names (`Layout::detect`):
//! - torchvision's ResNet (`conv1.weight`, `layer1.0.conv1.weight`, ..., `fc.*`): the ImageNet
//!   backbone. Exported once where there is internet:
//!   ```python
//!   import torch, torchvision
//!   m = torchvision.models.resnet101(weights="IMAGENET1K_V1")
//!   torch.save(m.state_dict(), "resnet101-imagenet.pth")
//!   ```
//! - DeepLab's Caffe-converted ResNet-101 (every key under `Scale.`): the ImageNet start of
//!   ADVENT and AdaptSegNet (e.g. `DeepLab_resnet_pretrained_imagenet.pth`). Its `layer5`
//!   classifier belongs to another label set and is skipped, as those projects do.
//! - A whole DeepLab v2 in ADVENT's naming (backbone, `layer5` = classifier on layer3, `layer6`
//!   = classifier on layer4): a peer's source-only (warm-up) or adapted model. Both classifiers
//!   load into ours (`aux`, `main`); the projection head keeps its initialisation.
//!
//! The Caffe layouts were trained on Caffe's input: BGR bytes minus `CAFFE_MEAN_BGR`, unscaled.
//! Their conv1 is imported with its input channels reversed, so that it reads our RGB input as
//! it read BGR (same numbers out), and the loader's normalisation must be Caffe's
//! (`Layout::normalisation`; the trainer checks it).
//!
//! A wrapper a checkpoint may add (`state_dict.`, `model_state_dict.`, DataParallel's
//! `module.`) is taken off first. Every model variable the layout covers must be found with
//! its shape; a missing, surplus or misshapen tensor is an error naming it.

use crate::config::{Arch, Backbone, Named};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Caffe's ImageNet mean (B, G, R) on 0-255 bytes, which DeepLab's Caffe weights and the models
/// ADVENT and AdaptSegNet train from them subtract from BGR input (their `IMG_MEAN`).
pub const CAFFE_MEAN_BGR: [f32; 3] = [104.006_99, 116.668_77, 122.678_91];
/// torchvision's ImageNet normalisation (RGB, on bytes / 255).
pub use crate::config::{IMAGENET_MEAN, IMAGENET_STD};

/// How a state dict names a ResNet / DeepLab v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Torchvision,
    DeepLabCaffe,
    AdventDeepLabV2,
}

impl Layout {
    /// The layout of a state dict, from its (unwrapped) keys.
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a str> + Clone) -> Option<Layout> {
        let has = |k: &str| keys.clone().into_iter().any(|key| key == k);
        if keys.clone().into_iter().any(|key| key.starts_with("Scale.")) {
            Some(Layout::DeepLabCaffe)
        } else if has("layer6.conv2d_list.0.weight") && has("layer1.0.conv1.weight") {
            Some(Layout::AdventDeepLabV2)
        } else if has("conv1.weight") && has("layer1.0.conv1.weight") {
            Some(Layout::Torchvision)
        } else {
            None
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Layout::Torchvision => "torchvision's ResNet",
            Layout::DeepLabCaffe => "DeepLab's Caffe-converted ResNet (keys under Scale.)",
            Layout::AdventDeepLabV2 => "a DeepLab v2 in ADVENT's naming (backbone, layer5 and layer6 classifiers)",
        }
    }

    /// Whether the weights were trained with the stride on a bottleneck's first 1x1 conv and a
    /// ceil-mode max-pool (`model.caffe_style`): running them in the other layout would give
    /// other features from the same numbers.
    pub fn caffe_style(self) -> bool {
        !matches!(self, Layout::Torchvision)
    }

    /// `augment.mean` and `augment.std` (RGB, on bytes / 255, as adamcu normalises) that give
    /// the input these weights were trained on.
    pub fn normalisation(self) -> ([f32; 3], [f32; 3]) {
        if self.caffe_style() {
            let [b, g, r] = CAFFE_MEAN_BGR;
            ([r / 255.0, g / 255.0, b / 255.0], [1.0 / 255.0; 3])
        } else {
            (IMAGENET_MEAN, IMAGENET_STD)
        }
    }

    /// `normalisation` as the config lines that set it, for error messages.
    pub fn normalisation_toml(self) -> String {
        let (mean, std) = self.normalisation();
        format!("\n  [augment]\n  mean = {mean:?}\n  std = {std:?}")
    }

    /// Whether the file holds the classifiers as well as the backbone.
    pub fn has_classifiers(self) -> bool {
        matches!(self, Layout::AdventDeepLabV2)
    }

    /// Our variable name for a key of this layout, or None when it has no use here.
    pub fn our_name(self, key: &str) -> Option<String> {
        if key.ends_with("num_batches_tracked") || key.starts_with("fc.") {
            return None;
        }
        match self {
            Layout::Torchvision => Some(format!("backbone.{key}")),
            Layout::DeepLabCaffe => {
                let key = key.strip_prefix("Scale.")?;
                (!key.starts_with("layer5.") && !key.starts_with("fc.")).then(|| format!("backbone.{key}"))
            }
            Layout::AdventDeepLabV2 => Some(if let Some(rest) = key.strip_prefix("layer5.") {
                format!("aux.{rest}")
            } else if let Some(rest) = key.strip_prefix("layer6.") {
                format!("main.{rest}")
            } else {
                format!("backbone.{key}")
            }),
        }
    }
}

/// Every tensor of a `.safetensors` file or a `torch.save` container, by name (sorted, so that
/// the first problem reported is always the same), with a checkpoint's wrapper (`state_dict.`,
/// `model_state_dict.`, `module.`) taken off.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let mut tensors = if is_safetensors {
        Tensor::read_safetensors(path).with_context(|| format!("{}: cannot read safetensors", path.display()))?
    } else {
        read_torch_save(path)?
    };
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(unwrap_state_dict(tensors))
}

fn read_torch_save(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let reader = pytorch_reader::PytorchReader::new(path).with_context(|| {
        format!("{}: cannot read it as a torch.save file (nor is it named .safetensors)", path.display())
    })?;
    let mut tensors = Vec::with_capacity(reader.len());
    for (name, tensor) in reader.into_tensors() {
        let kind = match tensor.dtype() {
            pytorch_reader::DType::F64 => Kind::Double,
            pytorch_reader::DType::F32 => Kind::Float,
            pytorch_reader::DType::F16 => Kind::Half,
            pytorch_reader::DType::BF16 => Kind::BFloat16,
            pytorch_reader::DType::I64 => Kind::Int64,
            pytorch_reader::DType::I32 => Kind::Int,
            pytorch_reader::DType::I16 => Kind::Int16,
            pytorch_reader::DType::I8 => Kind::Int8,
            pytorch_reader::DType::U8 => Kind::Uint8,
            pytorch_reader::DType::Bool => Kind::Bool,
            other => bail!("{}: tensor {name} has element type {other:?}, which adamcu does not read", path.display()),
        };
        let bytes = tensor.read().with_context(|| format!("{}: tensor {name}", path.display()))?;
        let shape: Vec<i64> = tensor.shape().iter().map(|&d| d as i64).collect();
        tensors.push((name, Tensor::from_data_size(&bytes, &shape, kind)));
    }
    Ok(tensors)
}

fn unwrap_state_dict(tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    let mut tensors = tensors;
    for wrapper in ["state_dict.", "model_state_dict."] {
        if tensors.iter().any(|(k, _)| k.starts_with(wrapper)) {
            tensors =
                tensors.into_iter().filter_map(|(k, t)| k.strip_prefix(wrapper).map(|k| (k.to_string(), t))).collect();
            break;
        }
    }
    if !tensors.is_empty() && tensors.iter().all(|(k, _)| k.starts_with("module.")) {
        tensors = tensors.into_iter().map(|(k, t)| (k["module.".len()..].to_string(), t)).collect();
    }
    tensors
}

/// What `import` loaded.
#[derive(Debug)]
pub struct Imported {
    pub layout: Layout,
    pub tensors: usize,
}

/// Copies the weights of a state dict into the model. `caffe_style` is the model's bottleneck
/// layout (`model.caffe_style`); it must be the one the weights were trained in.
pub fn import(vs: &mut VarStore, path: &Path, caffe_style: bool) -> Result<Imported> {
    import_tensors(vs, path, read_state_dict(path)?, caffe_style)
}

/// `import` for tensors already read from `path` (named in errors).
pub fn import_tensors(
    vs: &mut VarStore,
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    caffe_style: bool,
) -> Result<Imported> {
    let shown = path.display();
    let layout = detect_layout(path, &tensors)?;
    if layout.caffe_style() != caffe_style {
        bail!(
            "{shown}: {} was trained with {}, and the model is set up with {}: set model.caffe_style = {}, \
               and for the input it was trained on{}",
            layout.describe(),
            stride_layout(layout.caffe_style()),
            stride_layout(caffe_style),
            layout.caffe_style(),
            layout.normalisation_toml()
        );
    }
    let variables = vs.variables();
    let mut loaded = HashSet::new();
    tch::no_grad(|| -> Result<()> {
        for (key, tensor) in &tensors {
            let Some(name) = layout.our_name(key) else { continue };
            let Some(var) = variables.get(&name) else {
                bail!("{shown}: tensor {key} has no counterpart {name} in this model (another depth or architecture?)");
            };
            if var.size() != tensor.size() {
                let hint = if name.starts_with("aux.") || name.starts_with("main.") {
                    " (a model for another number of classes than data.classes?)"
                } else {
                    ""
                };
                bail!("{shown}: {key} has shape {:?}, the model's {name} has {:?}{hint}", tensor.size(), var.size());
            }
            if layout.caffe_style() && name == "backbone.conv1.weight" {
                // Caffe's conv1 reads B, G, R: with its input channels reversed it reads R, G, B.
                var.shallow_clone().copy_(&tensor.flip([1]));
            } else {
                var.shallow_clone().copy_(tensor);
            }
            loaded.insert(name);
        }
        Ok(())
    })?;
    let covered = |name: &str| {
        name.starts_with("backbone.")
            || (layout.has_classifiers() && (name.starts_with("aux.") || name.starts_with("main.")))
    };
    let mut missing: Vec<&String> = variables.keys().filter(|k| covered(k) && !loaded.contains(*k)).collect();
    if !missing.is_empty() {
        missing.sort();
        bail!(
            "{shown}: no weights for {} variable(s) of the model, e.g. {} ({})",
            missing.len(),
            missing[0],
            layout.describe()
        );
    }
    Ok(Imported { layout, tensors: loaded.len() })
}

/// The layout of a file's tensors, or an error that shows its first keys.
fn detect_layout(path: &Path, tensors: &[(String, Tensor)]) -> Result<Layout> {
    let keys = tensors.iter().map(|(k, _)| k.as_str());
    Layout::detect(keys.clone()).with_context(|| {
        format!(
            "{}: not a state dict adamcu knows (torchvision's ResNet, DeepLab's Caffe-converted ResNet with keys \
         under Scale., or ADVENT's DeepLab v2); its first keys: {}",
            path.display(),
            keys.take(5).collect::<Vec<_>>().join(", ")
        )
    })
}

fn stride_layout(caffe_style: bool) -> &'static str {
    if caffe_style {
        "the stride on a bottleneck's first 1x1 conv (Caffe)"
    } else {
        "the stride on the 3x3 conv (torchvision)"
    }
}

/// What a weights file holds and the config that uses it (`adamcu weights FILE`).
#[derive(Debug)]
pub struct Summary {
    pub layout: Layout,
    pub tensors: usize,
    /// Bottleneck blocks per stage, and the `model.backbone` they make (None if no ResNet we build).
    pub blocks: [usize; 4],
    pub backbone: Option<Backbone>,
    /// The classifiers' number of classes (a whole DeepLab v2 only).
    pub classes: Option<i64>,
}

pub fn summarise(path: &Path) -> Result<Summary> {
    let tensors = read_state_dict(path)?;
    let layout = detect_layout(path, &tensors)?;
    let names: Vec<String> = tensors.iter().filter_map(|(k, _)| layout.our_name(k)).collect();
    let blocks = std::array::from_fn(|stage| {
        let prefix = format!("backbone.layer{}.", stage + 1);
        let indices: HashSet<&str> = names.iter().filter_map(|n| n.strip_prefix(&prefix)?.split('.').next()).collect();
        indices.len()
    });
    let backbone = <Backbone as strum::VariantArray>::VARIANTS
        .iter()
        .copied()
        .find(|&b| b != Backbone::Tiny && super::resnet::Depth::of(b, 0).blocks() == blocks);
    let classes = tensors.iter().find(|(k, _)| k == "layer6.conv2d_list.0.weight").map(|(_, t)| t.size()[0]);
    Ok(Summary { layout, tensors: tensors.len(), blocks, backbone, classes })
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}, {} tensors", self.layout.describe(), self.tensors)?;
        let [a, b, c, d] = self.blocks;
        writeln!(
            f,
            "blocks per stage: {a}, {b}, {c}, {d} ({})",
            self.backbone.map_or("not a ResNet adamcu builds", |b| b.name())
        )?;
        match self.classes {
            Some(classes) => writeln!(f, "classifiers: {classes} classes; give it as --init or model.pretrained")?,
            None => writeln!(f, "classifiers: none used; give it as model.pretrained")?,
        }
        writeln!(f, "config that uses it:")?;
        if let Some(classes) = self.classes {
            writeln!(f, "  [data]\n  classes = {classes}")?;
        }
        writeln!(f, "  [model]")?;
        if let Some(backbone) = self.backbone {
            writeln!(f, "  backbone = \"{backbone}\"")?;
        }
        if self.classes.is_some() {
            writeln!(f, "  arch = \"{}\"", Arch::Deeplabv2)?;
        }
        write!(f, "  caffe_style = {}{}", self.layout.caffe_style(), self.layout.normalisation_toml())
    }
}
