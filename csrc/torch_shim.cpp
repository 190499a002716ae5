// What tch does not expose, built against the same libtorch headers as tch itself:
// - the autocast dtype: tch's autocast is fp16 on CUDA; ADA-MCU trains in bf16;
// - the CUDA caching allocator's peak, for the step benchmark's memory figure;
// - libtorch's synchronisation check (torch.cuda.set_sync_debug_mode), for the same benchmark.
#include <ATen/autocast_mode.h>
#ifdef ADAMCU_CUDA_STATS
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

extern "C" void adamcu_set_cuda_autocast_bf16(int enable) {
  at::autocast::set_autocast_dtype(at::kCUDA, enable ? at::kBFloat16 : at::kHalf);
}

extern "C" int adamcu_cuda_autocast_is_bf16() {
  return at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16;
}

// Peak bytes allocated on `device` since the last reset, or -1 without CUDA support.
extern "C" long long adamcu_cuda_peak_bytes(int device) {
#ifdef ADAMCU_CUDA_STATS
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
#else
  (void)device;
  return -1;
#endif
}

extern "C" void adamcu_cuda_reset_peak(int device) {
#ifdef ADAMCU_CUDA_STATS
  c10::cuda::CUDACachingAllocator::resetPeakStats(device);
#else
  (void)device;
#endif
}

// 0: off, 1: warn, 2: error on any operation that synchronises the host with the device.
// Returns 0 without CUDA support.
extern "C" int adamcu_cuda_set_sync_debug(int level) {
#ifdef ADAMCU_CUDA_STATS
  c10::cuda::warning_state().set_sync_debug_mode(static_cast<c10::cuda::SyncDebugMode>(level));
  return 1;
#else
  (void)level;
  return 0;
#endif
}
