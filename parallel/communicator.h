// Collectives among the tensor-parallel ranks of one replica. NCCL on GPUs, MPI on the CPU
// backend (so that CI tests tensor parallelism), and a single-rank no-op.
#pragma once

#include <memory>

#include "runtime/core/tensor.h"

namespace nosa::parallel {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // In-place sum over ranks of a float tensor on the backend's device.
  virtual void all_reduce_sum(Tensor& t) = 0;
  // out [size * n, ...] = the ranks' `in` [n, ...] concatenated in rank order along dim 0.
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // Whether the collectives only queue work on the backend's CUDA stream (no host waits), so that
  // a CUDA graph may record them: then every rank replays its own graph of the same step.
  virtual bool graph_capturable() const { return false; }
};

// The communicator of a replica of one rank: collectives are identities.
std::unique_ptr<Communicator> make_single_rank_communicator();

}  // namespace nosa::parallel
