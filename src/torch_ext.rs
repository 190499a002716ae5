//! Safe wrappers over `csrc/torch_shim.cpp`: what tch does not expose.

extern "C" {
    fn adamcu_autocast_bf16_enter(cuda: i32, previous_enabled: *mut i32, previous_dtype: *mut i32);
    fn adamcu_autocast_exit(cuda: i32, previous_enabled: i32, previous_dtype: i32);
    fn adamcu_autocast_state(cuda: i32, enabled: *mut i32) -> i32;
    fn adamcu_cuda_peak_bytes(device: i32) -> i64;
    fn adamcu_cuda_reset_peak(device: i32);
    fn adamcu_cuda_set_sync_debug(level: i32) -> i32;
    fn adamcu_sgd_foreach(
        params: *const *mut torch_sys::C_tensor,
        buffers: *const *mut torch_sys::C_tensor,
        n: i32,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> i32;
    fn adamcu_clear_grads(params: *const *mut torch_sys::C_tensor, n: i32);
    fn adamcu_pin_memory(
        tensor: *const torch_sys::C_tensor,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> *mut torch_sys::C_tensor;
    fn adamcu_empty_pinned(
        sizes: *const i64,
        ndim: i32,
        like: *const torch_sys::C_tensor,
        error: *mut std::ffi::c_char,
        error_len: i32,
    ) -> *mut torch_sys::C_tensor;
    fn adamcu_op_count_start();
    fn adamcu_op_count_stop(out: *mut std::ffi::c_char, out_len: i32) -> i64;
}

/// Calls a shim function that may fail, giving it a buffer for libtorch's error message.
fn with_error_buffer<T>(call: impl FnOnce(*mut std::ffi::c_char, i32) -> Option<T>) -> Result<T, String> {
    let mut error = [0 as std::ffi::c_char; 512];
    // The shim writes a NUL-terminated message of at most `error.len()` bytes before failing.
    call(error.as_mut_ptr(), error.len() as i32)
        // SAFETY: the buffer holds a NUL-terminated string (zeroed, or written by the shim).
        .ok_or_else(|| unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) }.to_string_lossy().into_owned())
}

/// A tensor a shim call returns as a new owned handle, or null after writing its message
/// (page-locking, the only such calls, fails without CUDA).
fn shim_tensor(call: impl FnOnce(*mut std::ffi::c_char, i32) -> *mut torch_sys::C_tensor) -> tch::Tensor {
    with_error_buffer(|error, len| {
        let handle = call(error, len);
        // SAFETY: a fresh handle from the shim, owned by the returned tensor.
        (!handle.is_null()).then(|| unsafe { tch::Tensor::from_ptr(handle) })
    })
    .unwrap_or_else(|e| panic!("cannot page-lock a tensor: {e}"))
}

/// A page-locked copy of a CPU tensor (CUDA only), so that copies to the device can be
/// queued without the host waiting. tch's `pin_memory(device)` passes a device argument that
/// libtorch deprecates with a warning on every call: a daemon's log would fill with them.
pub fn pinned(tensor: &tch::Tensor) -> tch::Tensor {
    // SAFETY: the handle points to a live tensor for the duration of the call.
    shim_tensor(|error, len| unsafe { adamcu_pin_memory(tensor.as_ptr(), error, len) })
}

/// A new, uninitialised, page-locked CPU tensor (for asynchronous copies to the accelerator
/// without first copying into it). Panics with libtorch's reason where memory cannot be
/// page-locked (no CUDA).
pub fn empty_pinned(size: &[i64], kind: tch::Kind) -> tch::Tensor {
    // Carries the dtype across (tch does not expose its dtype codes).
    let like = tch::Tensor::empty([0], (kind, tch::Device::Cpu));
    // SAFETY: `size` and `like` outlive the call.
    shim_tensor(|error, len| unsafe {
        adamcu_empty_pinned(size.as_ptr(), size.len() as i32, like.as_ptr(), error, len)
    })
}

fn handles(tensors: &[&tch::Tensor]) -> Vec<*mut torch_sys::C_tensor> {
    tensors.iter().map(|t| t.as_ptr() as *mut _).collect()
}

/// One SGD step (PyTorch's semantics: `buf = momentum * buf + grad + weight_decay * p`,
/// `p -= lr * buf`) for parameters that all have a gradient, with their momentum buffers
/// (zero before the first step), as libtorch's multi-tensor kernels.
pub fn sgd_foreach(
    params: &[&tch::Tensor],
    buffers: &[&tch::Tensor],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Result<(), String> {
    assert_eq!(params.len(), buffers.len(), "one momentum buffer per parameter");
    let (p, b) = (handles(params), handles(buffers));
    with_error_buffer(|error, len| {
        // SAFETY: the handles point to live tensors for the duration of the call; the shim
        // copies them into at::Tensor values and writes its message on failure.
        let failed = unsafe {
            adamcu_sgd_foreach(p.as_ptr(), b.as_ptr(), p.len() as i32, lr, momentum, weight_decay, error, len)
        };
        (failed == 0).then_some(())
    })
}

/// Sets the gradients of `params` to none (as `zero_grad(set_to_none=True)`).
pub fn clear_grads(params: &[&tch::Tensor]) {
    let p = handles(params);
    // SAFETY: the handles point to live tensors for the duration of the call.
    unsafe { adamcu_clear_grads(p.as_ptr(), p.len() as i32) }
}

/// What `cpu_data` and `cpu_data_mut` rely on to view a tensor's storage as a `[T]`.
fn check_cpu_elements<T: tch::kind::Element>(tensor: &tch::Tensor) {
    assert!(
        tensor.device() == tch::Device::Cpu && tensor.is_contiguous() && tensor.kind() == T::KIND,
        "expected a contiguous CPU tensor of {:?}, got {:?} on {:?}",
        T::KIND,
        tensor.kind(),
        tensor.device()
    );
}

/// The elements of a contiguous CPU tensor of kind `T`, to fill it in place.
///
/// # Safety
/// Nothing else may read or write the tensor's storage (a shallow clone, a view) while the
/// slice lives: for a tensor the caller has just created.
pub unsafe fn cpu_data_mut<T: tch::kind::Element>(tensor: &mut tch::Tensor) -> &mut [T] {
    check_cpu_elements::<T>(tensor);
    // SAFETY: checked above: `numel` elements of `T` at `data_ptr`; exclusive by the contract.
    unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut T, tensor.numel()) }
}

/// The elements of a contiguous CPU tensor of kind `T`.
pub fn cpu_data<T: tch::kind::Element>(tensor: &tch::Tensor) -> &[T] {
    check_cpu_elements::<T>(tensor);
    // SAFETY: checked above: `numel` elements of `T` at `data_ptr`, alive while `tensor` is.
    unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const T, tensor.numel()) }
}

/// Copies a host tensor to `device` without making the host wait: from page-locked memory
/// (the loaders pin their batches) the copy is queued on the stream like a kernel, where
/// tch's `to_device` would synchronise the whole device at every step. From pageable memory
/// CUDA copies synchronously anyway, so this is always safe.
pub fn to_device_async(tensor: &tch::Tensor, device: tch::Device) -> tch::Tensor {
    tensor.to_device_(device, tensor.kind(), device.is_cuda(), false)
}

/// A contiguous host copy that owns its storage, detached from autograd: training may change
/// the original in place while the copy is written elsewhere (`to_device(Cpu)` on a CPU tensor
/// returns the tensor itself; from CUDA it copies after the queued work, synchronously), and
/// safetensors stores only contiguous tensors (channels-last weights are not).
pub fn owned_host_copy(tensor: &tch::Tensor) -> tch::Tensor {
    let tensor = tensor.detach();
    let copy = if tensor.device() == tch::Device::Cpu { tensor.copy() } else { tensor.to_device(tch::Device::Cpu) };
    copy.contiguous()
}

/// A small tensor built on the host (indices, bitsets) on `device` without a stream
/// synchronisation: it is page-locked first, so the copy is queued like a kernel (a copy
/// from pageable memory may make the host wait for the device).
pub fn upload(tensor: &tch::Tensor, device: tch::Device) -> tch::Tensor {
    if device.is_cuda() {
        to_device_async(&pinned(tensor), device)
    } else {
        tensor.shallow_clone()
    }
}

/// A uniform random subset of each row's `mask`ed entries ([B, N] bool), drawn on the device
/// with random keys and top-k: at most `k` positions per row, `count` ([B] i64) per row when
/// given, fewer where a row has fewer. Returns the positions [B, k] and which are real [B, k].
pub fn random_subset(mask: &tch::Tensor, k: i64, count: Option<&tch::Tensor>) -> (tch::Tensor, tch::Tensor) {
    use tch::{Kind, Tensor};
    let k = k.min(mask.size()[1]);
    let keys = Tensor::rand(mask.size(), (Kind::Float, mask.device())).where_scalarother(mask, -1.0);
    // Sorted: the first `count` of the k largest keys are themselves a uniform subset.
    let (values, positions) = keys.topk(k, 1, true, count.is_some());
    let mut valid = values.ge(0.0);
    if let Some(count) = count {
        let rank = Tensor::arange(k, (Kind::Int64, mask.device())).unsqueeze(0);
        valid = valid.logical_and(&rank.lt_tensor(&count.unsqueeze(1)));
    }
    (positions, valid)
}

/// `t` divided by its L2 norm along `dim` (an all-zero vector stays zero rather than NaN).
pub fn l2_normalised(t: &tch::Tensor, dim: i64) -> tch::Tensor {
    t / t.norm_scalaropt_dim(2.0, [dim].as_slice(), true).clamp_min(1e-12)
}

/// Training ids ([B, H, W] u8 from the loaders: 8x fewer bytes to copy) as the i64 labels
/// the losses take, on `device`.
pub fn labels_on(labels: &tch::Tensor, device: tch::Device) -> tch::Tensor {
    to_device_async(labels, device).to_kind(tch::Kind::Int64)
}

/// Runs `f` under autocast in bf16 on `device`'s type (CUDA, else the CPU): convolutions and
/// matrix products in bf16, what autocast keeps in fp32 in fp32. tch's `autocast` is CUDA-only,
/// fp16, and goes through libtorch's deprecated calls, which log a warning each time. The
/// previous state (on or off, dtype) is restored on return, also when `f` panics.
pub fn autocast_bf16<T>(device: tch::Device, f: impl FnOnce() -> T) -> T {
    let cuda = device.is_cuda() as i32;
    let (mut enabled, mut dtype) = (0, 0);
    // SAFETY: sets process-global libtorch settings; the pointers are to live locals.
    unsafe { adamcu_autocast_bf16_enter(cuda, &mut enabled, &mut dtype) };
    struct Restore(i32, i32, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: as above; runs even if `f` panics.
            unsafe { adamcu_autocast_exit(self.0, self.1, self.2) }
        }
    }
    let _restore = Restore(cuda, enabled, dtype);
    f()
}

/// Autocast's state on `device`'s type for the calling thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutocastState {
    pub enabled: bool,
    /// Whether it casts to bf16 (libtorch's default: fp16 on CUDA, bf16 on the CPU).
    pub bf16: bool,
}

pub fn autocast_state(device: tch::Device) -> AutocastState {
    let mut enabled = 0;
    // SAFETY: reads libtorch settings into a live local.
    let bf16 = unsafe { adamcu_autocast_state(device.is_cuda() as i32, &mut enabled) };
    AutocastState { enabled: enabled != 0, bf16: bf16 != 0 }
}

/// Peak bytes allocated on a CUDA device since the last reset; None without CUDA.
pub fn cuda_peak_bytes(device: usize) -> Option<u64> {
    if !tch::Cuda::is_available() {
        return None;
    }
    // SAFETY: only called with CUDA present; the device index is checked by the allocator.
    let bytes = unsafe { adamcu_cuda_peak_bytes(device as i32) };
    (bytes >= 0).then_some(bytes as u64)
}

pub fn cuda_reset_peak(device: usize) {
    if tch::Cuda::is_available() {
        // SAFETY: as above.
        unsafe { adamcu_cuda_reset_peak(device as i32) }
    }
}

/// libtorch's CUDA synchronisation check: while on, any operation that makes the host wait
/// for the device (a blocking copy, `.item()`, `nonzero`, a pageable transfer) raises an error
/// instead of running. Returns whether it was available (CUDA builds only). For the step
/// benchmark's check that a training step queues its work without waiting.
pub fn set_cuda_sync_check(on: bool) -> bool {
    // SAFETY: sets a process-global libtorch setting (0 = off, 2 = error).
    unsafe { adamcu_cuda_set_sync_debug(if on { 2 } else { 0 }) != 0 }
}

/// Keeps freed heap memory in the process instead of handing it back to the kernel.
///
/// Every CPU step (and every loader sample) allocates and frees the same multi-megabyte
/// buffers: batch, input and activation tensors, crops. Above glibc's mmap threshold each one
/// is a fresh mapping, page-faulted and zeroed again page by page. Raising the mmap and trim
/// thresholds lets glibc reuse them (measured on the loader benchmark: 1.88 -> 1.75 ms per
/// image on the shard path with CPU normalisation). Call before other threads start.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called at start-up, before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// The operators a stretch of code dispatched, as libtorch's profiler hooks see them: the
/// outermost calls (forward ops and autograd's backward nodes) with their wall time, and every
/// call at any depth.
#[derive(Debug, Clone, Default)]
pub struct OpCount {
    /// Outermost calls.
    pub total: u64,
    /// (calls, wall microseconds, operator name) of the outermost calls, most calls first.
    pub by_name: Vec<(u64, u64, String)>,
    /// (calls, operator name) at any depth: the operators the outermost ones called too.
    pub all_depths: Vec<(u64, String)>,
}

/// Operators that make the host wait for a CUDA device: a value read back (`item` and the
/// `_local_scalar_dense` under it, `is_nonzero`, `equal`), or an output whose size depends on
/// the data (`nonzero`, under boolean indexing too, `masked_select`, `unique`, `bincount`,
/// `repeat_interleave` without its output size).
const WAITS_ON_CUDA: [&str; 12] = [
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::repeat_interleave",
];

impl OpCount {
    /// The operators called (at any depth) that would make the host wait on a CUDA device,
    /// whatever device they ran on: libtorch's sync check, which sees every wait, needs CUDA.
    pub fn waits_on_cuda(&self) -> Vec<&'static str> {
        WAITS_ON_CUDA.into_iter().filter(|op| self.all_depths.iter().any(|(_, name)| name == op)).collect()
    }
}

/// Runs `f` and counts the libtorch operators it dispatches (from this thread, its backward
/// passes included; other threads' are not counted). On a GPU each is at least one kernel
/// launch: the count bounds a step's launch overhead on every device. One count at a time
/// per process.
pub fn count_ops<R>(f: impl FnOnce() -> R) -> (R, OpCount) {
    // Takes the hook off when `f` panics.
    struct Hook;
    impl Drop for Hook {
        fn drop(&mut self) {
            stop_counting_ops();
        }
    }
    // SAFETY: a plain call into the shim.
    unsafe { adamcu_op_count_start() };
    let hook = Hook;
    let result = f();
    std::mem::forget(hook);
    (result, stop_counting_ops())
}

fn stop_counting_ops() -> OpCount {
    // A few hundred operator names: far below this.
    let mut buffer = vec![0 as std::ffi::c_char; 1 << 20];
    // SAFETY: the shim writes a NUL-terminated text of at most `buffer.len()` bytes.
    let total = unsafe { adamcu_op_count_stop(buffer.as_mut_ptr(), buffer.len() as i32) };
    // SAFETY: NUL-terminated by the shim.
    let text = unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned();
    assert!(text.len() + 1 < buffer.len(), "operator count: the list of operators was cut short");
    let mut count = OpCount { total: total as u64, ..OpCount::default() };
    for line in text.lines() {
        let parts: Vec<&str> = line.splitn(4, '\t').collect();
        let [depth, calls, micros, name] = parts[..] else { continue };
        let (Ok(calls), Ok(micros)) = (calls.parse(), micros.parse()) else { continue };
        match depth {
            "outer" => count.by_name.push((calls, micros, name.to_string())),
            _ => count.all_depths.push((calls, name.to_string())),
        }
    }
    count
}
