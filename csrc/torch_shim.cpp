// What tch does not expose, built against the same libtorch headers as tch itself:
// - autocast in bf16: tch's autocast is fp16 on CUDA and CUDA-only; ADA-MCU trains in bf16;
// - the CUDA caching allocator's peak, for the step benchmark's memory figure;
// - libtorch's synchronisation check (torch.cuda.set_sync_debug_mode), for the same benchmark;
// - its profiler hooks (RecordFunction callbacks), to count the operators a step dispatches;
// - page-locking without tch's device argument, which libtorch deprecates with a warning on
//   every call, and page-locked allocation (tch has no pinned_memory option);
// - the SGD step as multi-tensor (foreach) kernels and gradients cleared to none, as
//   torch.optim.SGD does on CUDA: a few launches per step instead of several per parameter.
#include "shim_common.h"
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>
#ifdef ADAMCU_CUDA_STATS
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

static c10::DeviceType autocast_device(int cuda) { return cuda ? at::kCUDA : at::kCPU; }

// Opens a bf16 autocast region for CUDA (cuda != 0) or the CPU through the current API (tch's
// autocast goes through at::autocast's deprecated is_enabled/set_enabled, which warn on every
// call, and is fp16 on CUDA). Writes the state to restore to `previous_enabled` and
// `previous_dtype` (a c10::ScalarType).
extern "C" void adamcu_autocast_bf16_enter(int cuda, int* previous_enabled, int* previous_dtype) {
  auto device = autocast_device(cuda);
  *previous_enabled = at::autocast::is_autocast_enabled(device);
  *previous_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
  at::autocast::set_autocast_dtype(device, at::kBFloat16);
  at::autocast::set_autocast_enabled(device, true);
  at::autocast::increment_nesting();
}

extern "C" void adamcu_autocast_exit(int cuda, int previous_enabled, int previous_dtype) {
  auto device = autocast_device(cuda);
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device, previous_enabled != 0);
  at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(previous_dtype));
}

// Whether autocast is on for the device (to `enabled`), and whether it casts to bf16 there.
extern "C" int adamcu_autocast_state(int cuda, int* enabled) {
  auto device = autocast_device(cuda);
  *enabled = at::autocast::is_autocast_enabled(device);
  return at::autocast::get_autocast_dtype(device) == at::kBFloat16;
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


// p -= lr * buf, buf = momentum * buf + (grad + weight_decay * p), for every parameter (all
// with a gradient; buffers as large as their parameter, zero before the first step, which
// equals PyTorch's first-step copy of the gradient). Returns 0, or 1 with `error` filled.
extern "C" int adamcu_sgd_foreach(at::Tensor** params, at::Tensor** buffers, int n, double lr, double momentum,
                                  double weight_decay, char* error, int error_len) {
  return guarded(error, error_len, [&] {
    at::NoGradGuard no_grad;
    auto p = tensors_of(params, n);
    auto b = tensors_of(buffers, n);
    std::vector<at::Tensor> g;
    g.reserve(n);
    for (auto& t : p) g.push_back(t.grad());
    auto d = weight_decay != 0 ? at::_foreach_add(g, p, weight_decay) : g;
    if (momentum != 0) {
      at::_foreach_mul_(b, momentum);
      at::_foreach_add_(b, d);
      at::_foreach_add_(p, b, -lr);
    } else {
      at::_foreach_add_(p, d, -lr);
    }
  });
}

// Drops the gradients (set to none): the next backward writes fresh ones instead of adding
// into zero-filled tensors, one memset kernel per parameter fewer.
extern "C" void adamcu_clear_grads(at::Tensor** params, int n) {
  for (int i = 0; i < n; ++i) params[i]->mutable_grad().reset();
}

// A new, uninitialised, page-locked CPU tensor of `sizes` with the dtype of `like`, or nullptr
// with `error` filled: the loader collates a batch straight into it.
extern "C" at::Tensor* adamcu_empty_pinned(const int64_t* sizes, int ndim, at::Tensor* like, char* error,
                                           int error_len) {
  try {
    auto options = at::TensorOptions().dtype(like->scalar_type()).pinned_memory(true);
    return new at::Tensor(at::empty(at::IntArrayRef(sizes, ndim), options));
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return nullptr;
  }
}

// A page-locked copy of a CPU tensor for fast, asynchronous copies to the accelerator, or
// nullptr with `error` filled.
extern "C" at::Tensor* adamcu_pin_memory(at::Tensor* tensor, char* error, int error_len) {
  try {
    return new at::Tensor(tensor->pin_memory());
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return nullptr;
  }
}

// Counts the operators a stretch of code dispatches (libtorch's RecordFunction callbacks, as
// torch.profiler uses them): on a GPU each is one kernel launch or more, so the count bounds a
// step's launch overhead on any device. Only outermost calls count (an op's inner ops are its
// own business), forward ops and autograd's backward nodes alike, with their wall time. The
// callback is the calling thread's (autograd carries it to its device threads, as it does
// the profiler's): other threads' work is not counted. One count at a time per process.
namespace {
struct OpTally { long long calls = 0; double micros = 0; };
std::mutex op_mutex;
std::map<std::string, OpTally> op_tallies;        // outermost calls
std::map<std::string, long long> op_all_depths;  // every call, inner ones too
at::CallbackHandle op_handle = 0;
thread_local int op_depth = 0;
struct OpStart : at::ObserverContext { std::chrono::steady_clock::time_point at; };

std::unique_ptr<at::ObserverContext> op_enter(const at::RecordFunction& fn) {
  {
    std::lock_guard<std::mutex> lock(op_mutex);
    op_all_depths[fn.name()] += 1;
  }
  if (op_depth++ > 0) return nullptr;
  auto start = std::make_unique<OpStart>();
  start->at = std::chrono::steady_clock::now();
  return start;
}

void op_exit(const at::RecordFunction& fn, at::ObserverContext* context) {
  --op_depth;
  if (context == nullptr) return;
  auto micros = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now()
                                                          - static_cast<OpStart*>(context)->at).count();
  std::lock_guard<std::mutex> lock(op_mutex);
  auto& tally = op_tallies[fn.name()];
  tally.calls += 1;
  tally.micros += micros;
}
}  // namespace

extern "C" void adamcu_op_count_start() {
  std::lock_guard<std::mutex> lock(op_mutex);
  op_tallies.clear();
  op_all_depths.clear();
  if (op_handle == 0) {
    op_handle = at::addThreadLocalCallback(at::RecordFunctionCallback(op_enter, op_exit)
        .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
  }
}

// Stops counting; writes "outer<TAB>calls<TAB>microseconds<TAB>name" lines for the outermost
// calls, most first, then "any<TAB>calls<TAB>0<TAB>name" for the calls at any depth, into `out`
// (NUL-terminated, truncated to fit), and returns the outermost calls counted in all.
extern "C" long long adamcu_op_count_stop(char* out, int out_len) {
  if (op_handle != 0) {
    at::removeCallback(op_handle);
    op_handle = 0;
  }
  std::lock_guard<std::mutex> lock(op_mutex);
  std::vector<std::pair<std::string, OpTally>> rows(op_tallies.begin(), op_tallies.end());
  std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.calls > b.second.calls; });
  std::ostringstream text;
  long long total = 0;
  for (auto& [name, tally] : rows) {
    total += tally.calls;
    text << "outer\t" << tally.calls << '\t' << static_cast<long long>(tally.micros) << '\t' << name << '\n';
  }
  for (auto& [name, calls] : op_all_depths) text << "any\t" << calls << "\t0\t" << name << '\n';
  auto s = text.str();
  std::strncpy(out, s.c_str(), out_len - 1);
  out[out_len - 1] = 0;
  return total;
}

