#include "memory/cuda/transfer.cuh"

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
  const int4* host_kv = reinterpret_cast<const int4*>(it.host);
  const int4* host_bias = reinterpret_cast<const int4*>(it.host + a.kv_bytes);
  int4* dev_kv = reinterpret_cast<int4*>(a.kv + it.slot * a.kv_bytes);
  int4* dev_bias = reinterpret_cast<int4*>(a.bias + it.slot * a.bias_bytes);
  const int64_t n_kv = a.kv_bytes / 16, n_bias = a.bias_bytes / 16;
  if (a.to_device) {
    for (int64_t i = threadIdx.x; i < n_kv; i += blockDim.x) dev_kv[i] = host_kv[i];
    for (int64_t i = threadIdx.x; i < n_bias; i += blockDim.x) dev_bias[i] = host_bias[i];
  } else {
    int4* out_kv = const_cast<int4*>(host_kv);
    int4* out_bias = const_cast<int4*>(host_bias);
    for (int64_t i = threadIdx.x; i < n_kv; i += blockDim.x) out_kv[i] = dev_kv[i];
    for (int64_t i = threadIdx.x; i < n_bias; i += blockDim.x) out_bias[i] = dev_bias[i];
  }
}

}  // namespace

cudaError_t launch_chunk_transfer(const TransferArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  if (args.kv_bytes % 16 || args.bias_bytes % 16) return cudaErrorInvalidValue;
  chunk_transfer_kernel<<<args.n, 256, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace nosa::memory::cuda
