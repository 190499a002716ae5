//! What a step costs the device: operators dispatched, those that wait on CUDA, and libtorch's
//! CUDA synchronisation check.

use super::shim::*;

/// libtorch's CUDA synchronisation check: while on, any operation that makes the host wait
/// for the device (a blocking copy, `.item()`, `nonzero`, a pageable transfer) raises an error
/// instead of running. Returns whether it was available (CUDA builds only). For the step
/// benchmark's check that a training step queues its work without waiting.
pub fn set_cuda_sync_check(on: bool) -> bool {
    // SAFETY: sets a process-global libtorch setting (0 = off, 2 = error).
    unsafe { adamcu_cuda_set_sync_debug(if on { 2 } else { 0 }) != 0 }
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
