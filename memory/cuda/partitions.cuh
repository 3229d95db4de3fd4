// Device-side residency (memory/partitions.h) as two kernels: one thread block per (token, KV
// head) finds the hits, ranks the partition's free slots by (stamp, slot), updates the slot
// table and the partition's state, and writes its copies; then one thread block per copy moves
// the chunk from mapped host memory (the gather's 51 GB/s pattern).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "memory/partitions.h"

namespace nosa::memory::cuda {

// One copy of device-side residency: the chunk's host bytes (null: nothing to copy) and its slot.
struct PartitionCopy {
  const char* host = nullptr;
  int64_t slot = -1;
};

// `copies`: device memory for n_tokens * n_heads * k entries. Every pointer of `a` is one the
// device reads (block_host: mapped host memory).
cudaError_t launch_resident_partitions(const PartitionArgs& a, PartitionCopy* copies,
                                       cudaStream_t stream);

}  // namespace nosa::memory::cuda
