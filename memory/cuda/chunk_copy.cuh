// One KV chunk's bytes between host memory and a device slot, by one thread block: keys and
// values, then the eviction scores, in 16-byte words (both sizes are multiples of 16).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nosa::memory::cuda {

// Each thread moves up to this many 16-byte words at once: all of its loads are issued before
// any store, so that a 32 KiB chunk read over PCIe (256 threads x 8 words) costs one round trip
// of the bus's latency instead of eight (the copy loop's store could alias the next load, so the
// loads did not overlap).
constexpr int k_words_in_flight = 8;

// Copies n 16-byte words from src to dst, k_words_in_flight per thread at a time.
__device__ inline void copy_words(int4* dst, const int4* src, int64_t n) {
  for (int64_t i0 = threadIdx.x; i0 < n; i0 += int64_t(k_words_in_flight) * blockDim.x) {
    int4 w[k_words_in_flight];
#pragma unroll
    for (int u = 0; u < k_words_in_flight; ++u) {
      const int64_t i = i0 + int64_t(u) * blockDim.x;
      if (i < n) w[u] = src[i];
    }
#pragma unroll
    for (int u = 0; u < k_words_in_flight; ++u) {
      const int64_t i = i0 + int64_t(u) * blockDim.x;
      if (i < n) dst[i] = w[u];
    }
  }
}

// Copies a chunk's keys and values (n_kv words) and its scores (n_bias words): a thread's first
// score word is loaded before the keys and values, so that the scores ride the same round trip.
__device__ inline void copy_chunk_words(int4* dst_kv, const int4* src_kv, int64_t n_kv,
                                        int4* dst_bias, const int4* src_bias, int64_t n_bias) {
  const bool first = threadIdx.x < n_bias;
  int4 score = make_int4(0, 0, 0, 0);
  if (first) score = src_bias[threadIdx.x];
  copy_words(dst_kv, src_kv, n_kv);
  if (first) dst_bias[threadIdx.x] = score;
  if (n_bias > blockDim.x)
    copy_words(dst_bias + blockDim.x, src_bias + blockDim.x, n_bias - blockDim.x);
}

// `host`: the chunk's host bytes (keys and values, then scores), as the device addresses them;
// `kv` and `bias`: the slot's. to_device: host -> slot, else slot -> host.
__device__ inline void copy_chunk_block(const char* host, char* kv, char* bias, int64_t kv_bytes,
                                        int64_t bias_bytes, bool to_device) {
  int4* host_kv = reinterpret_cast<int4*>(const_cast<char*>(host));
  int4* host_bias = reinterpret_cast<int4*>(const_cast<char*>(host) + kv_bytes);
  int4* dev_kv = reinterpret_cast<int4*>(kv);
  int4* dev_bias = reinterpret_cast<int4*>(bias);
  const int64_t n_kv = kv_bytes / 16, n_bias = bias_bytes / 16;
  if (to_device)
    copy_chunk_words(dev_kv, host_kv, n_kv, dev_bias, host_bias, n_bias);
  else
    copy_chunk_words(host_kv, dev_kv, n_kv, host_bias, dev_bias, n_bias);
}

}  // namespace nosa::memory::cuda
