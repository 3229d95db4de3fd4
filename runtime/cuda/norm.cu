#include <cuda_bf16.h>

#include "attention/cuda/dependent_launch.cuh"
#include "runtime/cuda/model_kernels.cuh"

namespace nosa::runtime::cuda {

namespace {

using attention::cuda::dependent_launch_begin;
using attention::cuda::launch_dependent;
using bf16 = __nv_bfloat16;

// Eight bf16 values as float32 and back (16-byte loads and stores).
struct Pack8 {
  float v[8];
  __device__ void load(const bf16* p) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
  __device__ void store(bf16* p) const {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) partial[0] = s;
  }
  __syncthreads();
  return partial[0];
}

// One block per row. With ADD, x += residual first (rounded to bf16, as the add kernel does) and
// the sum is both stored and normalized: the residual add and the next RMSNorm of a layer in one
// pass. VEC: 8 elements per access (n % 8 == 0 and 16-byte aligned rows).
template <bool ADD, bool VEC>
__global__ void rmsnorm_kernel(RmsNormArgs a) {
  dependent_launch_begin();
  const int64_t row = int64_t(blockIdx.x) * a.n;
  bf16* x = static_cast<bf16*>(const_cast<void*>(a.x)) + row;
  const bf16* r = ADD ? static_cast<const bf16*>(a.residual) + row : nullptr;
  const bf16* w = static_cast<const bf16*>(a.w);
  bf16* y = static_cast<bf16*>(a.out) + row;
  float ss = 0.0f;
  if constexpr (VEC) {
    for (int i = threadIdx.x * 8; i < a.n; i += blockDim.x * 8) {
      Pack8 v;
      v.load(x + i);
      if constexpr (ADD) {
        Pack8 d;
        d.load(r + i);
        // The rounded sum is what is stored and what the norm sees.
#pragma unroll
        for (int k = 0; k < 8; ++k) v.v[k] = __bfloat162float(__float2bfloat16(v.v[k] + d.v[k]));
        v.store(x + i);
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) ss = fmaf(v.v[k], v.v[k], ss);
    }
  } else {
    for (int i = threadIdx.x; i < a.n; i += blockDim.x) {
      float v = __bfloat162float(x[i]);
      if constexpr (ADD) {
        const bf16 s = __float2bfloat16(v + __bfloat162float(r[i]));
        x[i] = s;
        v = __bfloat162float(s);
      }
      ss = fmaf(v, v, ss);
    }
  }
  const float inv = rsqrtf(block_sum(ss) / float(a.n) + a.eps);
  // Each thread reads back only what it wrote itself (same index ranges as above).
  if constexpr (VEC) {
    for (int i = threadIdx.x * 8; i < a.n; i += blockDim.x * 8) {
      Pack8 v, g;
      v.load(x + i);
      g.load(w + i);
#pragma unroll
      for (int k = 0; k < 8; ++k)
        v.v[k] = g.v[k] * __bfloat162float(__float2bfloat16(v.v[k] * inv));
      v.store(y + i);
    }
  } else {
    for (int i = threadIdx.x; i < a.n; i += blockDim.x) {
      const float normed = __bfloat162float(__float2bfloat16(__bfloat162float(x[i]) * inv));
      y[i] = __float2bfloat16(__bfloat162float(w[i]) * normed);
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

cudaError_t launch_rmsnorm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const bool add = a.residual != nullptr;
  const bool vec = a.n % 8 == 0 && aligned16(a.x) && aligned16(a.w) && aligned16(a.out) &&
                   (!add || aligned16(a.residual));
  // Vectorized: one 8-element access per thread for rows up to 4096 wide.
  const int lanes = vec ? (a.n / 8 + 31) / 32 * 32 : (a.n >= 1024 ? 512 : 128);
  const int threads = lanes < 64 ? 64 : (lanes > 512 ? 512 : lanes);
  void (*kernel)(RmsNormArgs) = add ? (vec ? rmsnorm_kernel<true, true> : rmsnorm_kernel<true, false>)
                                     : (vec ? rmsnorm_kernel<false, true> : rmsnorm_kernel<false, false>);
  return launch_dependent(kernel, a.rows, threads, 0, stream, a);
}

}  // namespace nosa::runtime::cuda
