//! The loader stages: data set readers (real layouts and the synthetic benchmark), label
//! maps, decode/resize/augment, memory-mapped shards, online FDA, and the threaded loader itself.

pub mod augment;
pub mod check;
pub mod datasets;
pub mod error;
pub mod fda;
pub mod labels;
pub mod loader;
pub mod normalise;
pub mod pack;
pub mod shard;
pub mod source;
pub mod synth;
