// The transfer engine's kernels: moving KV chunks between mapped pinned host memory and the
// device block cache. One thread block per chunk reads (or writes) the host bytes directly over
// PCIe (zero-copy through the unified address space), which reaches about 51 GB/s for scattered
// 16-64 KiB blocks where one cudaMemcpyAsync per block reaches only 5-15 GB/s. Loads also update
// the slot table (chunk -> slot) so that attention finds the new residents.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nosa::memory::cuda {

// One chunk copy: host_kv = the device-visible address of the chunk's host bytes (keys and
// values, then eviction scores); null for a chunk never written (loads: only the table changes).
struct ChunkTransfer {
  const char* host = nullptr;
  int64_t chunk = -1;
  int64_t evicted = -1;
  int32_t slot = -1;
};

struct TransferArgs {
  const ChunkTransfer* items = nullptr;  // device array
  int n = 0;
  char* kv = nullptr;       // device slots: [slots][kv_bytes]
  char* bias = nullptr;     // device slots: [slots][bias_bytes]
  int32_t* slot_table = nullptr;
  int64_t kv_bytes = 0;     // multiple of 16
  int64_t bias_bytes = 0;   // multiple of 16
  bool to_device = true;
};

cudaError_t launch_chunk_transfer(const TransferArgs& args, cudaStream_t stream);

}  // namespace nosa::memory::cuda
