// What tch does not expose, built against the same libtorch headers as tch itself:
// - the autocast dtype: tch's autocast is fp16 on CUDA; ADA-MCU trains in bf16;
// - the CUDA caching allocator's peak, for the step benchmark's memory figure.
#include <ATen/autocast_mode.h>
#ifdef ADAMCU_CUDA_STATS
#include <c10/cuda/CUDACachingAllocator.h>
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
