//! A c10d process group (`csrc/distributed.cpp`): TCPStore rendezvous and a Gloo (CPU) or NCCL
//! (CUDA) backend, with the collectives data-parallel training uses. Every call waits for its
//! collective with the group's timeout, so a rank that died makes the others fail with an
//! error instead of hanging.

use super::shim::{self, with_error_buffer};
use anyhow::{anyhow, Result};
use std::ffi::CString;
use std::time::Duration;

/// Which c10d backend a group runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

pub struct ProcessGroup {
    handle: *mut std::ffi::c_void,
    pub rank: usize,
    pub world: usize,
}

// SAFETY: the group is used from one thread at a time (the trainer's); c10d's backends are
// safe to call from any thread.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the rendezvous at `addr:port` (rank 0 hosts the store) and builds the backend.
    pub fn new(addr: &str, port: u16, rank: usize, world: usize, backend: Backend, timeout: Duration) -> Result<Self> {
        let addr_c = CString::new(addr).map_err(|_| anyhow!("MASTER_ADDR {addr:?} holds a NUL byte"))?;
        let handle = with_error_buffer(|error, len| {
            // SAFETY: valid NUL-terminated strings and an error buffer of `len` bytes.
            let h = unsafe {
                shim::adamcu_dist_new(
                    addr_c.as_ptr(),
                    port as i32,
                    rank as i32,
                    world as i32,
                    (backend == Backend::Nccl) as i32,
                    timeout.as_millis().min(i32::MAX as u128) as i32,
                    error,
                    len,
                )
            };
            (!h.is_null()).then_some(h)
        })
        .map_err(|e| {
            anyhow!("rank {rank} of {world}: cannot join the process group at {addr}:{port} ({backend:?}): {e}")
        })?;
        Ok(ProcessGroup { handle, rank, world })
    }

    fn call(&self, what: &str, f: impl FnOnce(*mut std::ffi::c_char, i32) -> i32) -> Result<()> {
        with_error_buffer(|error, len| (f(error, len) == 0).then_some(()))
            .map_err(|e| anyhow!("rank {} of {}: {what} failed (a peer stopped?): {e}", self.rank, self.world))
    }

    /// Sums each tensor over the ranks, in place.
    pub fn all_reduce_sum(&self, tensors: &[&tch::Tensor]) -> Result<()> {
        let handles = shim::handles(tensors);
        // SAFETY: live tensor handles for the duration of the call.
        self.call("all-reduce", |e, l| unsafe {
            shim::adamcu_dist_allreduce_sum(self.handle, handles.as_ptr(), handles.len() as i32, e, l)
        })
    }

    /// Every rank's `input`, in rank order (each of `input`'s shape).
    pub fn all_gather(&self, input: &tch::Tensor) -> Result<Vec<tch::Tensor>> {
        let outputs: Vec<tch::Tensor> = (0..self.world).map(|_| input.empty_like()).collect();
        let handles = shim::handles(&outputs.iter().collect::<Vec<_>>());
        // SAFETY: live tensor handles for the duration of the call.
        self.call("all-gather", |e, l| unsafe {
            shim::adamcu_dist_allgather(self.handle, input.as_ptr(), handles.as_ptr(), self.world as i32, e, l)
        })?;
        Ok(outputs)
    }

    /// Rank `root`'s tensors into every rank's, in place.
    pub fn broadcast(&self, tensors: &[&tch::Tensor], root: usize) -> Result<()> {
        let handles = shim::handles(tensors);
        // SAFETY: live tensor handles for the duration of the call.
        self.call("broadcast", |e, l| unsafe {
            shim::adamcu_dist_broadcast(self.handle, handles.as_ptr(), handles.len() as i32, root as i32, e, l)
        })
    }

    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        self.call("barrier", |e, l| unsafe { shim::adamcu_dist_barrier(self.handle, e, l) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from adamcu_dist_new and is freed once.
        unsafe { shim::adamcu_dist_free(self.handle) }
    }
}

/// Sets `param`'s gradient (tch has no setter for it).
pub fn set_grad(param: &tch::Tensor, grad: &tch::Tensor) {
    // SAFETY: two live tensor handles; libtorch copies the reference.
    unsafe { shim::adamcu_set_grad(param.as_ptr() as *mut _, grad.as_ptr() as *mut _) }
}
