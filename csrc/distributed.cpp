// libtorch's distributed engine (c10d) for data-parallel training, reached from Rust:
// - rendezvous through c10d's TCPStore (rank 0 hosts it at MASTER_ADDR:MASTER_PORT, as
//   torchrun's default rendezvous does);
// - a ProcessGroupGloo on the CPU, a ProcessGroupNCCL on CUDA (built when the CUDA headers it
//   needs and the wheel's NCCL headers are there: ADAMCU_NCCL, build.rs);
// - the collectives a data-parallel step needs: all-reduce (sum), all-gather, broadcast and a
//   barrier, each waited on with the group's timeout so that a dead peer is an error, not a hang.
//
// The wheel ships c10d's headers but not Gloo's: ProcessGroupGloo.hpp is compiled against
// Debian's libgloo-dev headers (only the headers: the Gloo code that runs is the copy inside
// libtorch_cpu). We call nothing of Gloo itself, only the ProcessGroupGloo constructor, its
// options' factory and Backend's virtual collectives, none of which depend on Gloo's layout.
#include "shim_common.h"
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef ADAMCU_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

struct AdamcuGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  // The backend as a ProcessGroup (what the Reducer drives), for the one device type it serves.
  c10::intrusive_ptr<c10d::ProcessGroup> process_group;
};

// Joins (rank 0: hosts) the rendezvous at addr:port and builds the group's backend: Gloo, or
// NCCL with `nccl` != 0 (then the rank's tensors are on its CUDA device). Returns nullptr with
// `error` filled when the peers do not all arrive within `timeout_ms`, or NCCL is not built in.
extern "C" AdamcuGroup* adamcu_dist_new(const char* addr, int port, int rank, int world, int nccl, int timeout_ms,
                                        char* error, int error_len) {
  try {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(port);
    options.isServer = rank == 0;
    options.numWorkers = world;
    options.waitWorkers = true;
    options.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(addr), options);
    // One prefix per backend, as torch.distributed keys its default group's store.
    auto store = c10::make_intrusive<c10d::PrefixStore>(nccl ? "adamcu/nccl" : "adamcu/gloo", tcp);
    c10::intrusive_ptr<c10d::Backend> backend;
    if (nccl) {
#ifdef ADAMCU_NCCL
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = timeout;
      backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, nccl_options);
#else
      throw std::runtime_error("this adamcu was built without NCCL (no CUDA wheel with NCCL headers at build time)");
#endif
    } else {
      auto gloo_options = c10d::ProcessGroupGloo::Options::create_default(timeout);
      gloo_options->timeout = timeout;
      // One thread: the ranks of the CPU tests run one libtorch thread each.
      gloo_options->threads = 1;
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, gloo_options);
    }
    auto process_group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
    auto [device, type] = nccl ? std::pair{c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL}
                               : std::pair{c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO};
    process_group->setBackend(device, type, backend);
    process_group->setDefaultBackend(type);
    return new AdamcuGroup{tcp, backend, timeout, process_group};
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return nullptr;
  }
}

extern "C" void adamcu_dist_free(AdamcuGroup* group) { delete group; }

namespace {
// Waits for `work` with the group's timeout; a peer that died or hangs throws.
void finish(AdamcuGroup* group, const c10::intrusive_ptr<c10d::Work>& work) {
  if (!work->wait(group->timeout)) throw std::runtime_error("collective aborted");
}

// `collective` on each of the `n` tensors in turn, each as a one-tensor list, waited for.
template <class Collective>
void each(AdamcuGroup* group, at::Tensor* const* tensors, int n, Collective collective) {
  for (int i = 0; i < n; ++i) {
    std::vector<at::Tensor> one{*tensors[i]};
    finish(group, collective(one));
  }
}
}  // namespace

// Sums each of the `n` tensors over the ranks, in place (one collective per tensor: callers
// pass flat buckets). 0 on success.
extern "C" int adamcu_dist_allreduce_sum(AdamcuGroup* group, at::Tensor* const* tensors, int n, char* error,
                                         int error_len) {
  return guarded(error, error_len, [&] {
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = group->timeout;
    each(group, tensors, n, [&](std::vector<at::Tensor>& one) { return group->backend->allreduce(one, options); });
  });
}

// Every rank's `input` into `outputs` (world tensors of input's shape), in rank order.
extern "C" int adamcu_dist_allgather(AdamcuGroup* group, at::Tensor* input, at::Tensor* const* outputs, int world,
                                     char* error, int error_len) {
  return guarded(error, error_len, [&] {
    std::vector<std::vector<at::Tensor>> out{tensors_of(outputs, world)};
    std::vector<at::Tensor> in{*input};
    c10d::AllgatherOptions options;
    options.timeout = group->timeout;
    finish(group, group->backend->allgather(out, in, options));
  });
}

// Rank `root`'s tensors into every rank's, in place.
extern "C" int adamcu_dist_broadcast(AdamcuGroup* group, at::Tensor* const* tensors, int n, int root, char* error,
                                     int error_len) {
  return guarded(error, error_len, [&] {
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.timeout = group->timeout;
    each(group, tensors, n, [&](std::vector<at::Tensor>& one) { return group->backend->broadcast(one, options); });
  });
}

extern "C" int adamcu_dist_barrier(AdamcuGroup* group, char* error, int error_len) {
  return guarded(error, error_len, [&] {
    c10d::BarrierOptions options;
    options.timeout = group->timeout;
    finish(group, group->backend->barrier(options));
  });
}

// ---- Gradient reduction that overlaps the backward pass: c10d's own Reducer ----
//
// The Reducer (what torch's DistributedDataParallel drives) hooks every parameter's gradient
// accumulator: as the backward pass produces a bucket's gradients it launches that bucket's
// asynchronous all-reduce, so communication runs while the earlier layers' gradients are still
// being computed, and at the end of the backward pass it waits for every bucket and writes the
// mean over the ranks into each parameter's .grad.
//
// It is built over the parameters a step's loss reaches (`adamcu_reached`), with
// find_unused_parameters off: DDP's search for unused parameters copies a usage map from the
// device and reads it on the host at every step, a wait this project keeps out of its steps.
// A step that reaches another set (a new stage: the source stage never reaches the projection
// head) gets a new Reducer. Buckets stay in the order they are built (no rebuild after the first
// step, which costs a host wait too): the parameters in name order, reversed.
struct AdamcuReducer {
  std::unique_ptr<c10d::Reducer> reducer;
};

// Buckets of about `bucket_bytes` (the first of `first_bucket_bytes`, DDP's 1 MiB) over
// `params` (the same list in the same order on every rank), reversed: the last parameters'
// gradients come first in the backward pass.
extern "C" AdamcuReducer* adamcu_reducer_new(AdamcuGroup* group, at::Tensor* const* params, int n,
                                             int64_t bucket_bytes, int64_t first_bucket_bytes, char* error,
                                             int error_len) {
  try {
    std::vector<at::Tensor> list = tensors_of(params, n);
    std::vector<bool> sparse(n, false);
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(
        list, {static_cast<size_t>(first_bucket_bytes), static_cast<size_t>(bucket_bytes)}, sparse);
    std::reverse(buckets.begin(), buckets.end());
    std::vector<int64_t> caps(limits.rbegin(), limits.rend());
    auto reducer = std::make_unique<c10d::Reducer>(list, buckets, group->process_group, sparse, bucket_bytes,
                                                   /*find_unused_parameters=*/false,
                                                   /*gradient_as_bucket_view=*/false,
                                                   std::unordered_map<size_t, std::string>{}, first_bucket_bytes,
                                                   /*skip_all_reduce_unused_params=*/false,
                                                   /*use_python_reducer=*/false, caps);
    return new AdamcuReducer{std::move(reducer)};
  } catch (const std::exception& e) {
    report(e, error, error_len);
    return nullptr;
  }
}

extern "C" void adamcu_reducer_free(AdamcuReducer* reducer) { delete reducer; }

// Before a backward pass from `outputs` (the loss): arms the hooks.
extern "C" int adamcu_reducer_prepare(AdamcuReducer* reducer, at::Tensor* const* outputs, int n, char* error,
                                      int error_len) {
  return guarded(error, error_len, [&] { reducer->reducer->prepare_for_backward(tensors_of(outputs, n)); });
}

// reached[i] = 1 where the autograd graph of `loss` reaches params[i]'s gradient accumulator,
// else 0: a walk over the graph's nodes on the host, nothing computed.
extern "C" void adamcu_reached(at::Tensor* loss, at::Tensor* const* params, int n, std::uint8_t* reached) {
  std::unordered_map<const torch::autograd::Node*, int> accumulators;
  for (int i = 0; i < n; ++i) {
    reached[i] = 0;
    if (auto accumulator = torch::autograd::impl::try_get_grad_accumulator(*params[i])) {
      accumulators[accumulator.get()] = i;
    }
  }
  std::vector<const torch::autograd::Node*> stack;
  if (loss->grad_fn()) stack.push_back(loss->grad_fn().get());
  std::unordered_set<const torch::autograd::Node*> seen;
  while (!stack.empty()) {
    const auto* node = stack.back();
    stack.pop_back();
    if (!seen.insert(node).second) continue;
    if (auto found = accumulators.find(node); found != accumulators.end()) reached[found->second] = 1;
    for (const auto& edge : node->next_edges()) {
      if (edge.function) stack.push_back(edge.function.get());
    }
  }
}

// ---- A differentiable sum over the ranks (SyncBatchNorm's statistics) ----
//
// Forward: the sum over the ranks of `input`. Backward: the sum over the ranks of the
// gradient, since every rank's loss depends on the summed value. This is what
// torch.distributed.nn.functional.all_reduce does, and what SyncBatchNorm's backward
// all-reduces. Every rank must call it in the same order: the same layers, forward and backward.
namespace {
void sum_over_ranks(AdamcuGroup* group, at::Tensor& tensor) {
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  options.timeout = group->timeout;
  std::vector<at::Tensor> one{tensor};
  finish(group, group->backend->allreduce(one, options));
}

struct SumOverRanks : public torch::autograd::Function<SumOverRanks> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, int64_t group) {
    ctx->saved_data["group"] = group;
    at::Tensor sum = input.clone(at::MemoryFormat::Contiguous);
    sum_over_ranks(reinterpret_cast<AdamcuGroup*>(group), sum);
    return sum;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto group = reinterpret_cast<AdamcuGroup*>(ctx->saved_data["group"].toInt());
    at::Tensor grad = grads[0].clone(at::MemoryFormat::Contiguous);
    sum_over_ranks(group, grad);
    return {grad, at::Tensor()};
  }
};
}  // namespace

// `*out` = the sum over the ranks of `input`, on the autograd graph. 0 on success.
extern "C" int adamcu_dist_sum_differentiable(AdamcuGroup* group, at::Tensor* input, at::Tensor** out, char* error,
                                              int error_len) {
  return guarded(error, error_len, [&] {
    *out = new at::Tensor(SumOverRanks::apply(*input, reinterpret_cast<int64_t>(group)));
  });
}
