#include "attention/cuda/dependent_launch.cuh"
#include "attention/cuda/device_common.cuh"
#include "attention/cuda/eviction.cuh"

namespace nosa::attention::cuda {

namespace {

__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// grid (T), one warp per output head.
__global__ void eviction_kernel(EvictionArgs a) {
  dependent_launch_begin();
  const int t = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = a.head_begin + warp;
  if (g >= a.head_end) return;
  const int width = a.n_kv * a.head_dim;
  const bf16* v = static_cast<const bf16*>(a.v_all) + int64_t(t) * width;
  const float* w = a.delta_w + int64_t(g) * width;
  float acc = 0.0f;
  for (int x = lane; x < width; x += 32) acc = fmaf(w[x], __bfloat162float(v[x]), acc);
  acc = warp_sum(acc);
  if (lane == 0) {
    const float z = acc + (a.delta_b ? a.delta_b[g] : 0.0f);
    a.c[int64_t(t) * (a.head_end - a.head_begin) + warp] = a.a[g] * softplus(z);
  }
}

}  // namespace

cudaError_t launch_eviction_scores(const EvictionArgs& a, cudaStream_t stream) {
  if (a.n_tokens == 0 || a.head_end <= a.head_begin) return cudaSuccess;
  return launch_dependent(eviction_kernel, a.n_tokens, 32 * (a.head_end - a.head_begin), 0, stream,
                          a);
}

}  // namespace nosa::attention::cuda
