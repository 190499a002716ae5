//! Where tensors live: page-locked host memory, asynchronous copies, owned host copies, the
//! CUDA allocator's peak and its caching.

use super::shim::*;

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

/// Training ids ([B, H, W] u8 from the loaders: 8x fewer bytes to copy) as the i64 labels
/// the losses take, on `device`.
pub fn labels_on(labels: &tch::Tensor, device: tch::Device) -> tch::Tensor {
    to_device_async(labels, device).to_kind(tch::Kind::Int64)
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

/// Many small device values read back to the host in one copy (one wait for the device): each
/// `scalar` or `values` call returns where its values will be in `read`'s result.
pub struct HostReadback {
    device: tch::Device,
    parts: Vec<tch::Tensor>,
    len: usize,
}

impl HostReadback {
    pub fn new(device: tch::Device) -> HostReadback {
        HostReadback { device, parts: Vec::new(), len: 0 }
    }

    /// A scalar tensor's value, or `none` where there is no tensor; its index in `read`.
    pub fn scalar(&mut self, t: Option<&tch::Tensor>, none: f64) -> usize {
        let part = match t {
            Some(t) => t.detach().to_kind(tch::Kind::Float).reshape([1]),
            None => tch::Tensor::full([1], none, (tch::Kind::Float, self.device)),
        };
        self.push(part).start
    }

    /// Every element of `t`, flattened; their indices in `read`.
    pub fn values(&mut self, t: &tch::Tensor) -> std::ops::Range<usize> {
        self.push(t.detach().to_kind(tch::Kind::Float).flatten(0, -1))
    }

    fn push(&mut self, part: tch::Tensor) -> std::ops::Range<usize> {
        let start = self.len;
        self.len += part.numel();
        self.parts.push(part);
        start..self.len
    }

    /// The values, as f32, in the order they were added.
    pub fn read(self) -> Vec<f32> {
        if self.parts.is_empty() {
            return Vec::new();
        }
        Vec::<f32>::try_from(tch::Tensor::cat(&self.parts, 0).to_device(tch::Device::Cpu)).expect("f32 values")
    }
}
