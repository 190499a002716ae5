// libtorch's distributed engine (c10d) for data-parallel training, reached from Rust:
// - rendezvous through c10d's TCPStore (rank 0 hosts it at MASTER_ADDR:MASTER_PORT, as
//   torchrun's default rendezvous does);
// - a ProcessGroupGloo on the CPU, a ProcessGroupNCCL on CUDA (built when the CUDA wheel's
//   NCCL headers are there: ADAMCU_NCCL);
// - the collectives a data-parallel step needs: all-reduce (sum), all-gather, broadcast and a
//   barrier, each waited on with the group's timeout so that a dead peer is an error, not a hang.
//
// The wheel ships c10d's headers but not Gloo's: ProcessGroupGloo.hpp is compiled against
// Debian's libgloo-dev headers (only the headers: the Gloo code that runs is the copy inside
// libtorch_cpu). We call nothing of Gloo itself, only the ProcessGroupGloo constructor, its
// options' factory and Backend's virtual collectives, none of which depend on Gloo's layout.
#include "shim_common.h"
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef ADAMCU_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

struct AdamcuGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
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
    return new AdamcuGroup{tcp, backend, timeout};
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
