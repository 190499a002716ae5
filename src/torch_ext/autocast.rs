//! bf16 autocast around a closure (CUDA or the CPU), and what autocast is set to.

use super::shim::*;

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
