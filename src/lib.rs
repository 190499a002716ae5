//! adamcu: active domain adaptation for semantic segmentation (ADA-MCU) as a streaming pipeline.
//!
//! The modules follow the pipeline: `data` (loaders), `model`, `train` (losses, optimizer,
//! evaluation), with `config` shared by all and `doctor` for checking an installation.

// `a = a * b` on tch tensors makes a new tensor; `a *= b` is an in-place op, which autograd
// rejects on tensors it still needs for the backward pass. The long form is deliberate.
#![allow(clippy::assign_op_pattern)]

pub mod ablation;
pub mod active;
pub mod bench;
pub mod config;
pub mod confusion;
pub mod contrast;
pub mod data;
pub mod demo;
pub mod distributed;
pub mod doctor;
pub mod figures;
pub mod files;
pub mod model;
pub mod pipeline;
pub mod predict;
pub mod progress;
pub mod telemetry;
pub mod torch_ext;
pub mod train;
pub mod translate;
