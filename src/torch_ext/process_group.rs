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

// SAFETY: c10d's backends are safe to call from any thread (Gloo and NCCL queue each
// collective under their own lock); the trainer calls them from one thread at a time, and
// every rank in the same order.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

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

    /// The sum over the ranks of `input`, on the autograd graph: its backward pass sums the
    /// gradient over the ranks too (SyncBatchNorm's statistics). Every rank must call it for the
    /// same tensors in the same order, and run the backward pass through it.
    pub fn sum_differentiable(&self, input: &tch::Tensor) -> Result<tch::Tensor> {
        let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
        // SAFETY: a live input handle; on success `out` is a fresh handle that we own.
        self.call("differentiable all-reduce", |e, l| unsafe {
            shim::adamcu_dist_sum_differentiable(self.handle, input.as_ptr(), &mut out, e, l)
        })?;
        // SAFETY: set by the successful call above.
        Ok(unsafe { tch::Tensor::from_ptr(out) })
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

/// c10d's Reducer over a model's parameters (`csrc/distributed.cpp`): their gradients are
/// all-reduced in buckets while the backward pass runs, and each parameter's `.grad` holds the
/// mean over the ranks when it returns. It holds the group (it may not outlive it).
pub struct GradientReducer {
    handle: *mut std::ffi::c_void,
    _group: std::sync::Arc<ProcessGroup>,
}

// SAFETY: driven from the trainer's thread only; the Reducer's own hooks run on autograd's.
unsafe impl Send for GradientReducer {}
unsafe impl Sync for GradientReducer {}

impl GradientReducer {
    /// Over `params`, which must be the same list in the same order on every rank. Buckets of
    /// about `bucket_bytes`, the first (the last layers' gradients, ready first) of
    /// `first_bucket_bytes`.
    pub fn new(
        group: &std::sync::Arc<ProcessGroup>,
        params: &[&tch::Tensor],
        bucket_bytes: i64,
        first_bucket_bytes: i64,
    ) -> Result<Self> {
        let handles = shim::handles(params);
        let handle = with_error_buffer(|error, len| {
            // SAFETY: live group and parameter handles; the Reducer keeps its own references.
            let h = unsafe {
                shim::adamcu_reducer_new(
                    group.handle,
                    handles.as_ptr(),
                    handles.len() as i32,
                    bucket_bytes,
                    first_bucket_bytes,
                    error,
                    len,
                )
            };
            (!h.is_null()).then_some(h)
        })
        .map_err(|e| anyhow!("rank {} of {}: cannot build the gradient reducer: {e}", group.rank, group.world))?;
        Ok(GradientReducer { handle, _group: group.clone() })
    }

    /// Arms the hooks for the next backward pass, from `loss`: call it after the forward pass,
    /// before `backward`. The loss must reach every parameter the Reducer was built over.
    pub fn prepare(&self, loss: &tch::Tensor) -> Result<()> {
        let handles = shim::handles(&[loss]);
        with_error_buffer(|error, len| {
            // SAFETY: live handles for the duration of the call.
            let rc = unsafe { shim::adamcu_reducer_prepare(self.handle, handles.as_ptr(), 1, error, len) };
            (rc == 0).then_some(())
        })
        .map_err(|e| anyhow!("preparing the gradient all-reduce failed (a peer stopped?): {e}"))
    }
}

/// Which of `params` the autograd graph of `loss` reaches (a walk over the graph on the host).
pub fn reached_by(loss: &tch::Tensor, params: &[&tch::Tensor]) -> Vec<bool> {
    let handles = shim::handles(params);
    let mut reached = vec![0u8; params.len()];
    // SAFETY: live handles and a buffer of one byte per parameter.
    unsafe { shim::adamcu_reached(loss.as_ptr(), handles.as_ptr(), handles.len() as i32, reached.as_mut_ptr()) };
    reached.into_iter().map(|r| r != 0).collect()
}

impl Drop for GradientReducer {
    fn drop(&mut self) {
        // SAFETY: the handle came from adamcu_reducer_new and is freed once, before the group.
        unsafe { shim::adamcu_reducer_free(self.handle) }
    }
}
