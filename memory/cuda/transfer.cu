#include "memory/cuda/transfer.cuh"

#include "memory/cuda/chunk_copy.cuh"

namespace nosa::memory::cuda {

namespace {

__global__ void chunk_transfer_kernel(TransferArgs a) {
  const ChunkTransfer it = a.items[blockIdx.x];
  if (a.to_device && threadIdx.x == 0) {
    // Evictions are applied before the loads of the same batch (one grid-wide order is not
    // needed: an evicted chunk is never also loaded in the same batch).
    if (it.evicted >= 0) a.slot_table[it.evicted] = -1;
    a.slot_table[it.chunk] = it.slot;
  }
  if (!it.host) return;
  copy_chunk_block(it.host, a.kv + it.slot * a.kv_bytes, a.bias + it.slot * a.bias_bytes,
                   a.kv_bytes, a.bias_bytes, a.to_device);
}

}  // namespace

cudaError_t launch_chunk_transfer(const TransferArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  if (args.kv_bytes % 16 || args.bias_bytes % 16) return cudaErrorInvalidValue;
  chunk_transfer_kernel<<<args.n, 256, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace nosa::memory::cuda
