//! Training: the model and its optimizer on one device, the supervised stages (source-only
//! pretraining, Algorithm 1 step 2, and the target-supervised upper bound), checkpoints and
//! evaluation.

pub mod ada;
pub mod checkpoint;
pub mod driver;
pub mod embeddings;
pub mod eval;
pub mod optimizer;

pub mod stage;

/// The target val mIoU after a step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurvePoint {
    pub step: u64,
    pub miou: f64,
}

/// What a supervised stage ran: each step's loss and its val curve.
#[derive(Debug, Clone)]
pub struct StageRecord {
    pub losses: Vec<f64>,
    pub curve: Vec<CurvePoint>,
}

use crate::config::{Config, DatasetConfig, FdaMode, TranslateMethod};
use crate::data::normalise::Normaliser;
use crate::data::source::SampleSource;
use crate::model::deeplab::upsample;
use crate::model::SegNet;
use anyhow::{anyhow, bail, Context, Result};
use eval::{EvalOptions, EvalRow};
use optimizer::{poly_lr, Sgd};
use std::path::Path;
use std::sync::Arc;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// The same tensor with channels-last (NHWC) strides.
pub fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Cross-entropy of logits (upsampled to the labels' size) against training ids, averaged over
/// the labelled pixels (255 = ignore); 0 when a batch has none, where a plain mean would be NaN.
pub fn segmentation_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let size = labels.size();
    let per_pixel =
        upsample(logits, size[1], size[2]).cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::None, 255, 0.0);
    per_pixel.sum(tch::Kind::Float) / labels.ne(255).sum(tch::Kind::Float).clamp_min(1.0)
}

/// Which labelled data a supervised stage trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisedStage {
    /// Source-only pretraining on the (translated) source set.
    Source,
    /// The upper bound: every target training label.
    TargetSupervised,
}

impl SupervisedStage {
    pub fn name(self) -> &'static str {
        match self {
            SupervisedStage::Source => "source",
            SupervisedStage::TargetSupervised => "target-supervised",
        }
    }
}

pub struct Trainer {
    pub config: Config,
    pub device: Device,
    pub vs: VarStore,
    pub model: SegNet,
    pub normaliser: Normaliser,
    /// Steps between the target val evaluations of a stage's curve (`train_supervised`,
    /// `train_ada`); 0 = none. The demo sets it from `demo.eval_every`; the daemon evaluates
    /// on its own terms (`train.eval_every`).
    pub curve_every: usize,
    /// The data-parallel group this trainer steps in (None: one process); set by `join`.
    pub(crate) parallel: Option<Arc<crate::distributed::DataParallel>>,
    /// Data-parallel: the trainable variables in the optimizer's order, and c10d's Reducer over
    /// those the current stage's loss reaches (`backward`).
    trainable: Vec<Tensor>,
    reducer: std::sync::Mutex<Option<StageReducer>>,
}

/// A Reducer and which of `Trainer::trainable` it reduces.
struct StageReducer {
    reached: Vec<bool>,
    reducer: crate::torch_ext::GradientReducer,
}

pub fn open_set(set: &Option<DatasetConfig>, key: &str, classes: usize) -> Result<Arc<SampleSource>> {
    let set = set.as_ref().ok_or_else(|| anyhow!("[{key}] is not configured"))?;
    Ok(Arc::new(SampleSource::open(set, classes).map_err(|e| anyhow!("[{key}]: {e}"))?))
}

/// The source training set as the loaders read it: `data.source`, or with
/// `translate.fda_mode = "online"` the original set restyled by FDA on every load toward the
/// target train images (nothing was written, so `data.source.root` is not read).
pub fn open_source(config: &Config) -> Result<Arc<SampleSource>> {
    let t = &config.translate;
    if !(t.method == TranslateMethod::Fda && t.fda_mode == FdaMode::Online) {
        return open_set(&config.data.source, "data.source", config.data.classes);
    }
    let original = config
        .data
        .original_source()
        .ok_or_else(|| anyhow!("online FDA needs data.source.labels_kind and labels_root (the original set)"))?;
    let raw = open_set(&Some(original), "data.source (its original set)", config.data.classes)?;
    let target = open_set(&config.data.target, "data.target", config.data.classes)?;
    let targets = match target.as_ref() {
        SampleSource::Files { listing, .. } => listing.samples.iter().map(|s| s.image.clone()).collect(),
        _ => bail!("online FDA reads the target train images as files; data.target is a shard"),
    };
    let restyle = Arc::new(crate::data::fda::OnlineFda::new(targets, t));
    Ok(Arc::new(SampleSource::Restyled { raw, restyle }))
}

/// Copies weights from elsewhere (`model.pretrained`, a peer's model) into `vs`. Their layout
/// must fit `model.caffe_style` (checked by the import) and the loader's normalisation: they see
/// the input they were trained on only if the loader normalises as their layout expects
/// (Caffe's BGR mean on bytes, or torchvision's ImageNet mean and std).
fn import_weights(
    vs: &mut VarStore,
    config: &Config,
    path: &Path,
    tensors: Vec<(String, Tensor)>,
) -> Result<crate::model::weights::Imported> {
    let imported = crate::model::weights::import_tensors(vs, path, tensors, config.model.caffe_style)?;
    let (mean, std) = imported.layout.normalisation();
    let close = |a: &[f32; 3], b: &[f32; 3]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-3 * y.abs());
    if !close(&config.augment.mean, &mean) || !close(&config.augment.std, &std) {
        bail!(
            "{}: {} was trained on other input than augment.mean = {:?}, augment.std = {:?} give; set{}",
            path.display(),
            imported.layout.describe(),
            config.augment.mean,
            config.augment.std,
            imported.layout.normalisation_toml()
        );
    }
    Ok(imported)
}

impl Trainer {
    pub fn new(config: &Config) -> Result<Trainer> {
        let device = config.device()?;
        if config.run.threads > 0 {
            tch::set_num_threads(config.run.threads as i32);
        }
        tch::manual_seed(config.run.seed as i64);
        let mut vs = VarStore::new(device);
        let model = SegNet::new(&vs.root(), &config.model, config.data.classes)?;
        if let Some(path) = &config.model.pretrained {
            let tensors = crate::model::weights::read_state_dict(path);
            let imported = tensors.and_then(|t| import_weights(&mut vs, config, path, t)).with_context(|| {
                format!(
                    "model.pretrained = {:?}: the weights to start from (ImageNet's, or a whole DeepLab v2; \
                src/model/weights.rs lists the files and layouts adamcu reads)",
                    path.display().to_string()
                )
            })?;
            tracing::info!(
                "loaded {} tensors of {} from {}",
                imported.tensors,
                imported.layout.describe(),
                path.display()
            );
        }
        let normaliser = Normaliser::new(&config.augment, device);
        let trainer = Trainer {
            config: config.clone(),
            device,
            vs,
            model,
            normaliser,
            curve_every: 0,
            parallel: None,
            trainable: Vec::new(),
            reducer: Default::default(),
        };
        if config.train.channels_last {
            trainer.to_channels_last();
        }
        if device.is_cuda() {
            // Crops have fixed sizes: let cuDNN time its algorithms once per shape and keep
            // the fastest (torch.backends.cudnn.benchmark, as the reference sets it).
            tch::Cuda::cudnn_set_benchmark(true);
        }
        Ok(trainer)
    }

    /// Re-lays every 4-D variable out channels-last (NHWC strides, same shape).
    fn to_channels_last(&self) {
        tch::no_grad(|| {
            for (_, mut var) in self.vs.variables() {
                if var.dim() == 4 {
                    let nhwc = channels_last(&var);
                    var.set_data(&nhwc);
                }
            }
        });
    }

    /// The model's forward pass with the configured precision and memory layout; outputs are
    /// fp32 so that softmax statistics, uncertainty and losses are computed in fp32.
    pub fn forward(&self, images: &Tensor, train: bool) -> crate::model::SegOutput {
        let images = if self.config.train.channels_last { channels_last(images) } else { images.shallow_clone() };
        if self.config.train.precision != crate::config::Precision::Bf16 {
            return self.model.forward_t(&images, train);
        }
        let out = crate::torch_ext::autocast_bf16(self.device, || self.model.forward_t(&images, train));
        let f = |t: Tensor| t.to_kind(tch::Kind::Float);
        // The features stay as computed: the losses are reached through them, not a cast copy.
        crate::model::SegOutput {
            main: f(out.main),
            aux: f(out.aux),
            embedding: f(out.embedding),
            features: out.features,
        }
    }

    /// Why a loss may have diverged, when the config makes it likely: BatchNorm on stored
    /// statistics ("frozen", right for ImageNet weights) without pretrained weights keeps those
    /// of an untrained network (mean 0, variance 1), and a deep ResNet's activations then grow
    /// block after block until the loss overflows (seen: ResNet-101, NaN by the second step).
    pub fn divergence_hint(&self) -> &'static str {
        let m = &self.config.model;
        if m.bn_stats == crate::config::BnStats::Frozen && m.pretrained.is_none() {
            " (model.bn_stats = \"frozen\" without model.pretrained keeps an untrained network's BatchNorm \
            statistics, on which deep backbones diverge: set model.pretrained, or model.bn_stats = \"batch\" \
            to train from scratch)"
        } else {
            ""
        }
    }

    pub fn optimizer(&self) -> Sgd {
        let t = &self.config.train;
        Sgd::new(&self.vs, t.momentum, t.weight_decay, t.head_lr_mult)
    }

    /// The target val mIoU after `step` when `curve_every` says so (every multiple before the
    /// last step): the points of a stage's val curve. The point at the end is the evaluation
    /// the caller makes of the finished stage (`curve_end`), not a second one.
    pub fn curve_point(&self, step: usize, iterations: usize, labeled_fraction: f64) -> Result<Option<CurvePoint>> {
        let every = self.curve_every;
        if every == 0 || !step.is_multiple_of(every) || step >= iterations {
            return Ok(None);
        }
        let row = self.evaluate(&format!("step {step}"), labeled_fraction)?;
        tracing::info!("step {step}/{iterations}: target val mIoU {:.1}", row.miou);
        Ok(Some(CurvePoint { step: step as u64, miou: row.miou }))
    }

    /// `curve` with its last point, `row`: the finished stage's own evaluation after
    /// `iterations` steps (when curves are asked for).
    pub fn curve_end(&self, mut curve: Vec<CurvePoint>, iterations: usize, row: &EvalRow) -> Vec<CurvePoint> {
        if self.curve_every > 0 {
            curve.push(CurvePoint { step: iterations as u64, miou: row.miou });
        }
        curve
    }

    /// Runs a supervised stage for `iterations` steps; returns the loss of every step and the
    /// val curve (`curve_every`).
    pub fn train_supervised(&mut self, stage: SupervisedStage, iterations: usize) -> Result<StageRecord> {
        let mut run = driver::SupervisedRun::start(self, stage, iterations)?;
        let mut progress = driver::ProgressLine::new(stage.name(), iterations as u64, self);
        let mut curve = driver::ValCurve::default();
        driver::drive(self, &mut run, &mut [&mut progress, &mut curve], &|| false)?;
        Ok(StageRecord { losses: run.finish(), curve: curve.0 })
    }

    /// L_seg of one batch: the main head's cross-entropy plus `train.aux_weight` times the
    /// auxiliary head's (logits upsampled to the labels' size; 255 ignored).
    pub fn main_and_aux_loss(&self, main: &Tensor, aux: &Tensor, labels: &Tensor) -> Tensor {
        segmentation_loss(main, labels) + segmentation_loss(aux, labels) * self.config.train.aux_weight
    }

    /// One SGD step of a supervised stage on a batch (normalised images, training ids on the
    /// device): main + aux_weight x auxiliary cross-entropy, the poly learning rate at `step` of
    /// `iterations`. Returns the loss and the base learning rate.
    ///
    /// Data-parallel (`parallel`), each rank's batch is its share of the job's: its loss is
    /// scaled by its share of the labelled pixels (`distributed::pixel_share`), so that the
    /// averaged gradient is that of the pixel mean over the whole batch, and the loss returned
    /// is that mean, the same on every rank.
    pub fn supervised_step(
        &self,
        optimizer: &mut Sgd,
        images: &Tensor,
        labels: &Tensor,
        step: usize,
        iterations: usize,
    ) -> Result<(f64, f64)> {
        let t = &self.config.train;
        let out = self.forward(images, true);
        let mut loss = self.main_and_aux_loss(&out.main, &out.aux, labels);
        if let Some(parallel) = &self.parallel {
            loss = loss * crate::distributed::pixel_share(parallel, labels)?;
        }
        optimizer.zero_grad();
        self.backward(&loss)?;
        let lr = poly_lr(t.lr, step as u64, iterations as u64, t.poly_power);
        optimizer.update(lr);
        let mut value = loss.detach().reshape([1]);
        if let Some(parallel) = &self.parallel {
            parallel.sum(&value)?;
            value = value / parallel.world() as f64;
        }
        Ok((value.double_value(&[0]), lr))
    }

    /// Steps from now on in `parallel`'s job (None: one process): gradients are all-reduced
    /// by c10d's Reducer (`backward`), and with `train.sync_bn` BatchNorm takes its batch
    /// statistics over the ranks. Call it once, after the network is built, before the first step.
    pub fn join(&mut self, parallel: Option<Arc<crate::distributed::DataParallel>>) {
        if let Some(p) = &parallel {
            self.trainable = optimizer::trainable_by_name(&self.vs).into_values().collect();
            if self.config.train.sync_bn {
                self.model.sync_batch_norm(p.clone());
            }
        }
        self.parallel = parallel;
    }

    /// The backward pass from `loss`. Data-parallel, it also averages the gradients over the
    /// ranks while it runs (c10d's Reducer, armed here from `loss`), and then takes rank 0's
    /// BatchNorm running statistics (what torch's DistributedDataParallel keeps in step:
    /// gradients and buffers). A peer that stopped is an error here, not a hang.
    ///
    /// The Reducer reduces the variables `loss` reaches (a walk over its graph on the host),
    /// built anew when a step reaches another set (a new stage) after checking that every rank
    /// reaches the same: a variable no rank's loss reaches keeps no gradient and is not updated,
    /// as in one process.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        if let Some(failure) = self.model.take_sync_failure() {
            return Err(failure.context("SyncBatchNorm's statistics over the ranks (train.sync_bn)"));
        }
        if let Some(parallel) = &self.parallel {
            let params: Vec<&Tensor> = self.trainable.iter().collect();
            let reached = crate::torch_ext::reached_by(loss, &params);
            let mut current = self.reducer.lock().expect("the trainer's reducer lock");
            if current.as_ref().is_none_or(|c| c.reached != reached) {
                // The old Reducer's hooks go before the new one's are set.
                *current = None;
                parallel.require_same_on_every_rank(&reached, "the variables the step's loss reaches")?;
                let over: Vec<&Tensor> = params.iter().zip(&reached).filter(|(_, &r)| r).map(|(p, _)| *p).collect();
                *current = Some(StageReducer { reducer: parallel.gradient_reducer(&over)?, reached });
            }
            current.as_ref().expect("built above").reducer.prepare(loss)?;
        }
        loss.f_backward().map_err(|e| anyhow!("the backward pass failed (a data-parallel peer stopped?): {e}"))?;
        let Some(parallel) = &self.parallel else { return Ok(()) };
        let buffers: Vec<Tensor> =
            self.variables_by_name().into_iter().filter(|t| !t.requires_grad() && t.is_floating_point()).collect();
        parallel.broadcast_from_first(&buffers)
    }

    /// Every variable in name order: the same order on every rank.
    fn variables_by_name(&self) -> Vec<Tensor> {
        let mut variables: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        variables.into_iter().map(|(_, t)| t).collect()
    }

    /// Data-parallel: rank 0's weights and BatchNorm statistics in every rank, before the
    /// first step (after any `--init`). Nothing for one process.
    pub fn share_first_ranks_weights(&self) -> Result<()> {
        let Some(parallel) = &self.parallel else { return Ok(()) };
        parallel.broadcast_from_first(&self.variables_by_name())
    }

    /// Whether this process writes the run's files: one process, or rank 0 of a job.
    pub fn writes_files(&self) -> bool {
        crate::distributed::writes_files(self.parallel.as_deref())
    }

    /// Evaluates on the target val set; `labeled_fraction` is reported with the row.
    pub fn evaluate(&self, name: &str, labeled_fraction: f64) -> Result<EvalRow> {
        let val = open_set(&self.config.data.target_val, "data.target_val", self.config.data.classes)?;
        let options = EvalOptions { flip: self.config.eval.flip, input_size: self.config.eval.input_size };
        let confusion = eval::evaluate(&self.model, &self.normaliser, &val, self.config.data.classes, &options)?;
        Ok(EvalRow::from_confusion(name, &confusion, labeled_fraction))
    }

    /// The model, `optimizer`'s state, `extra` tensors and `meta` (a JSON object) copied for a
    /// checkpoint, with the resolved config recorded under `meta.config`.
    pub fn capture(
        &self,
        optimizer: Option<&Sgd>,
        extra: &[(String, Tensor)],
        mut meta: serde_json::Value,
    ) -> checkpoint::Captured {
        meta["config"] = self.config.recorded();
        checkpoint::capture(&self.vs, optimizer, extra, &meta)
    }

    /// Saves the model with `meta` and the config (`capture`, then write).
    pub fn save(&self, path: &Path, optimizer: Option<&Sgd>, meta: serde_json::Value) -> Result<()> {
        self.capture(optimizer, &[], meta).write(path)
    }

    pub fn load(&mut self, path: &Path) -> Result<checkpoint::Loaded> {
        checkpoint::load(path, &mut self.vs)
    }

    /// A trainer whose every weight comes from `path` (`load_network`; `eval` and `predict`):
    /// `model.pretrained` is neither read nor needed.
    pub fn with_network(config: &Config, path: &Path) -> Result<Trainer> {
        let mut config = config.clone();
        config.model.pretrained = None;
        let mut trainer = Trainer::new(&config)?;
        trainer.load_network(path)?;
        Ok(trainer)
    }

    /// The weights of a whole network (`--init`, `--checkpoint`): an adamcu checkpoint, or a
    /// peer's DeepLab v2 (e.g. an ADVENT source-only model, `.pth` or `.safetensors`), whose
    /// projection head is not there and keeps its initialisation.
    pub fn load_network(&mut self, path: &Path) -> Result<()> {
        let tensors = crate::model::weights::read_state_dict(path)?;
        if tensors.iter().any(|(name, _)| name == checkpoint::META_KEY) {
            checkpoint::load_tensors(path, tensors, &mut self.vs)?;
            return Ok(());
        }
        let imported = import_weights(&mut self.vs, &self.config, path, tensors)
            .with_context(|| format!("{}: not an adamcu checkpoint, read as a peer's model", path.display()))?;
        if !imported.layout.has_classifiers() {
            bail!(
                "{}: holds {} without classifiers; give it as model.pretrained",
                path.display(),
                imported.layout.describe()
            );
        }
        tracing::info!(
            "loaded {} tensors of {} from {}; the projection head keeps its initialisation",
            imported.tensors,
            imported.layout.describe(),
            path.display()
        );
        Ok(())
    }
}
