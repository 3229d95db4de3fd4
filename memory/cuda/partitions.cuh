// Device-side residency (memory/partitions.h) as two kernels: one thread block per (token, KV
// head) finds the hits, ranks the partition's free slots by (stamp, slot), updates the slot
// table and the partition's state, and appends its copies to a list; then a fixed grid of
// thread blocks moves the listed chunks from mapped host memory, one chunk per block at a time.
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

// `copies`: device memory for n_tokens * n_heads * k entries, filled as a compact list whose
// length goes to `n_copies` (device memory, one int). Every pointer of `a` is one the device
// reads (block_host: mapped host memory).
// `multiprocessors`: the device's count, for the copies' grid.
cudaError_t launch_resident_partitions(const PartitionArgs& a, PartitionCopy* copies,
                                       int* n_copies, int multiprocessors, cudaStream_t stream);

// The same in two launches, for queueing the copies on another stream than the decisions (after
// an event): the decisions update the slot table and fill the list (and a.hit_rows and
// a.miss_rows, when given); the copies then move the listed chunks.
cudaError_t launch_partition_decisions(const PartitionArgs& a, PartitionCopy* copies,
                                       int* n_copies, cudaStream_t stream);
cudaError_t launch_partition_copies(const PartitionArgs& a, const PartitionCopy* copies,
                                    const int* n_copies, int multiprocessors,
                                    cudaStream_t stream);

}  // namespace nosa::memory::cuda
