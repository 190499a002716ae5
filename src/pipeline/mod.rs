//! The long-running training daemon: the ADA-MCU pipeline run with a control plane (signals,
//! the metrics endpoint), periodic atomic checkpoints written on their own thread, crash-safe
//! resume, a run-directory lock and a status file. The stages themselves live in `data`
//! (loaders), `active`, `contrast` and `train`; docs/architecture.md draws how they connect.

pub mod control;
pub mod daemon;
pub mod lock;
pub mod status;
pub mod writer;
