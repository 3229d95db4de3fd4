// The all-reduce of decoding steps among the GPUs of one host (see cuda/peer_all_reduce.cuh):
// staging buffers shared over CUDA IPC, one kernel per call. NCCL stays in charge of large
// tensors (prefill), which its ring moves at full bandwidth.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>

#include "parallel/mpi.h"
#include "runtime/core/tensor.h"

namespace nosa::parallel {

class PeerAllReduce {
 public:
  // Collective over the replica's ranks; every rank gets the same answer. Null when the ranks are
  // not all on one host, a GPU cannot reach another's memory, there are more than 8 ranks, or
  // NOSA_PEER_ALL_REDUCE=0 is set.
  static std::unique_ptr<PeerAllReduce> create(const Replica& replica, int device,
                                               std::chrono::milliseconds timeout,
                                               size_t max_bytes = size_t(8) << 20);
  ~PeerAllReduce();
  PeerAllReduce(const PeerAllReduce&) = delete;
  PeerAllReduce& operator=(const PeerAllReduce&) = delete;

  // Whether this path takes `t` (bf16 or float32, at most max_bytes, a multiple of 16 bytes).
  // Every rank decides alike, since tensor-parallel ranks reduce tensors of the same shape.
  bool accepts(const Tensor& t) const;
  // In-place sum over the ranks, queued on `cuda_stream`.
  void all_reduce_sum(Tensor& t, void* cuda_stream);

 private:
  struct State;
  explicit PeerAllReduce(std::unique_ptr<State> state);
  std::unique_ptr<State> s_;
};

}  // namespace nosa::parallel
