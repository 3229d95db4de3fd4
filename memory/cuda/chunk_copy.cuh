// One KV chunk's bytes between host memory and a device slot, by one thread block: keys and
// values, then the eviction scores, in 16-byte words (both sizes are multiples of 16).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nosa::memory::cuda {

// `host`: the chunk's host bytes (keys and values, then scores), as the device addresses them;
// `kv` and `bias`: the slot's. to_device: host -> slot, else slot -> host.
__device__ inline void copy_chunk_block(const char* host, char* kv, char* bias, int64_t kv_bytes,
                                        int64_t bias_bytes, bool to_device) {
  int4* host_kv = reinterpret_cast<int4*>(const_cast<char*>(host));
  int4* host_bias = reinterpret_cast<int4*>(const_cast<char*>(host) + kv_bytes);
  int4* dev_kv = reinterpret_cast<int4*>(kv);
  int4* dev_bias = reinterpret_cast<int4*>(bias);
  const int64_t n_kv = kv_bytes / 16, n_bias = bias_bytes / 16;
  if (to_device) {
    for (int64_t i = threadIdx.x; i < n_kv; i += blockDim.x) dev_kv[i] = host_kv[i];
    for (int64_t i = threadIdx.x; i < n_bias; i += blockDim.x) dev_bias[i] = host_bias[i];
  } else {
    for (int64_t i = threadIdx.x; i < n_kv; i += blockDim.x) host_kv[i] = dev_kv[i];
    for (int64_t i = threadIdx.x; i < n_bias; i += blockDim.x) host_bias[i] = dev_bias[i];
  }
}

}  // namespace nosa::memory::cuda
