// Device-side residency (memory/partitions.h) as two kernels: one thread block per (token, KV
// head) finds the hits, ranks the partition's free slots by (stamp, slot), updates the slot
// table and the partition's state, and lists its copies; then short-lived thread blocks, two per
// row, move the listed chunks from mapped host memory.
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

// `copies`: device memory for n_tokens * n_heads * k entries, row (token, head) r's copies from
// entry r * k on; `counts`: device memory for n_tokens * n_heads ints, each row's number of
// copies. Every pointer of `a` is one the device reads (block_host: mapped
// host memory).
cudaError_t launch_resident_partitions(const PartitionArgs& a, PartitionCopy* copies, int* counts,
                                       cudaStream_t stream);

// The same in two launches, for queueing the copies on another stream than the decisions (after
// an event): the decisions update the slot table and fill the lists (and a.hit_rows and
// a.miss_rows, when given); the copies then move the listed chunks.
cudaError_t launch_partition_decisions(const PartitionArgs& a, PartitionCopy* copies, int* counts,
                                       cudaStream_t stream);
// max_row_blocks > 0: at most that many rows' copies in flight at once (each thread block
// copies rows in turn), so that copies running beside other kernels hold few multiprocessors.
cudaError_t launch_partition_copies(const PartitionArgs& a, const PartitionCopy* copies,
                                    const int* counts, cudaStream_t stream,
                                    int max_row_blocks = 0);

}  // namespace nosa::memory::cuda
