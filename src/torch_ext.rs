//! Safe wrappers over `csrc/torch_shim.cpp`: what tch does not expose.

extern "C" {
    fn adamcu_set_cuda_autocast_bf16(enable: i32);
    fn adamcu_cuda_autocast_is_bf16() -> i32;
    fn adamcu_cuda_peak_bytes(device: i32) -> i64;
    fn adamcu_cuda_reset_peak(device: i32);
}

/// Makes CUDA autocast use bf16 (true) or libtorch's default fp16 (false).
pub fn set_cuda_autocast_bf16(enable: bool) {
    // SAFETY: sets a process-global libtorch setting; no pointers cross the boundary.
    unsafe { adamcu_set_cuda_autocast_bf16(enable as i32) }
}

pub fn cuda_autocast_is_bf16() -> bool {
    // SAFETY: reads a process-global libtorch setting.
    unsafe { adamcu_cuda_autocast_is_bf16() != 0 }
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

