//! The declarations of `csrc/torch_shim.cpp` and the two helpers its callers share: what tch
//! does not expose, reached through a small C++ shim. Only the modules beside this one call it.

extern "C" {
    pub(super) fn adamcu_autocast_bf16_enter(cuda: i32, previous_enabled: *mut i32, previous_dtype: *mut i32);
    pub(super) fn adamcu_autocast_exit(cuda: i32, previous_enabled: i32, previous_dtype: i32);
    pub(super) fn adamcu_autocast_state(cuda: i32, enabled: *mut i32) -> i32;
    pub(super) fn adamcu_cuda_peak_bytes(device: i32) -> i64;
    pub(super) fn adamcu_cuda_reset_peak(device: i32);
    pub(super) fn adamcu_cuda_set_sync_debug(level: i32) -> i32;
    pub(super) fn adamcu_sgd_foreach(
        params: *const *mut torch_sys::C_tensor,
        buffers: *const *mut torch_sys::C_tensor,
        n: i32,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> i32;
    pub(super) fn adamcu_clear_grads(params: *const *mut torch_sys::C_tensor, n: i32);
    pub(super) fn adamcu_pin_memory(
        tensor: *const torch_sys::C_tensor,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> *mut torch_sys::C_tensor;
    pub(super) fn adamcu_empty_pinned(
        sizes: *const i64,
        ndim: i32,
        like: *const torch_sys::C_tensor,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> *mut torch_sys::C_tensor;
    pub(super) fn adamcu_dist_new(
        addr: *const std::ffi::c_char,
        port: i32,
        rank: i32,
        world: i32,
        nccl: i32,
        timeout_ms: i32,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> *mut std::ffi::c_void;
    pub(super) fn adamcu_dist_free(group: *mut std::ffi::c_void);
    pub(super) fn adamcu_dist_allreduce_sum(
        group: *mut std::ffi::c_void,
        tensors: *const *mut torch_sys::C_tensor,
        n: i32,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> i32;
    pub(super) fn adamcu_dist_allgather(
        group: *mut std::ffi::c_void,
        input: *const torch_sys::C_tensor,
        outputs: *const *mut torch_sys::C_tensor,
        world: i32,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> i32;
    pub(super) fn adamcu_dist_broadcast(
        group: *mut std::ffi::c_void,
        tensors: *const *mut torch_sys::C_tensor,
        n: i32,
        root: i32,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> i32;
    pub(super) fn adamcu_dist_barrier(
        group: *mut std::ffi::c_void,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> i32;
    pub(super) fn adamcu_dist_sum_differentiable(
        group: *mut std::ffi::c_void,
        input: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> i32;
    pub(super) fn adamcu_reducer_new(
        group: *mut std::ffi::c_void,
        params: *const *mut torch_sys::C_tensor,
        n: i32,
        bucket_bytes: i64,
        first_bucket_bytes: i64,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> *mut std::ffi::c_void;
    pub(super) fn adamcu_reached(
        loss: *const torch_sys::C_tensor,
        params: *const *mut torch_sys::C_tensor,
        n: i32,
        reached: *mut u8,
    );
    pub(super) fn adamcu_reducer_free(reducer: *mut std::ffi::c_void);
    pub(super) fn adamcu_reducer_prepare(
        reducer: *mut std::ffi::c_void,
        outputs: *const *mut torch_sys::C_tensor,
        n: i32,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> i32;
    pub(super) fn adamcu_op_count_start();
    pub(super) fn adamcu_op_count_stop(out: *mut std::ffi::c_char, out_len: i32) -> i64;
}

/// Calls a shim function that may fail, giving it a buffer for libtorch's error message.
pub(super) fn with_error_buffer<T>(call: impl FnOnce(*mut std::ffi::c_char, i32) -> Option<T>) -> Result<T, String> {
    let mut error = [0 as std::ffi::c_char; 512];
    // The shim writes a NUL-terminated message of at most `error.len()` bytes before failing.
    call(error.as_mut_ptr(), error.len() as i32)
        // SAFETY: the buffer holds a NUL-terminated string (zeroed, or written by the shim).
        .ok_or_else(|| unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) }.to_string_lossy().into_owned())
}

/// A tensor a shim call returns as a new owned handle, or null after writing its message
/// (page-locking, the only such calls, fails without CUDA).
pub(super) fn shim_tensor(call: impl FnOnce(*mut std::ffi::c_char, i32) -> *mut torch_sys::C_tensor) -> tch::Tensor {
    with_error_buffer(|error, len| {
        let handle = call(error, len);
        // SAFETY: a fresh handle from the shim, owned by the returned tensor.
        (!handle.is_null()).then(|| unsafe { tch::Tensor::from_ptr(handle) })
    })
    .unwrap_or_else(|e| panic!("cannot page-lock a tensor: {e}"))
}

pub(super) fn handles(tensors: &[&tch::Tensor]) -> Vec<*mut torch_sys::C_tensor> {
    tensors.iter().map(|t| t.as_ptr() as *mut _).collect()
}
