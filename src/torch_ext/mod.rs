//! Safe wrappers over `csrc/torch_shim.cpp` and helpers over tch, by concern: where tensors
//! live (`memory`), operations tch lacks (`ops`), bf16 autocast (`autocast`), what a step costs
//! the device (`profile`), c10d's collectives (`process_group`). The FFI declarations are in
//! `shim`.

mod autocast;
mod memory;
mod ops;
mod process_group;
mod profile;
mod shim;

pub use autocast::*;
pub use memory::*;
pub use ops::*;
pub use process_group::*;
pub use profile::*;
