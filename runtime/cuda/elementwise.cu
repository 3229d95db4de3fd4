#include <cuda_bf16.h>

#include "attention/cuda/dependent_launch.cuh"
#include "runtime/cuda/model_kernels.cuh"

namespace nosa::runtime::cuda {

namespace {

using attention::cuda::dependent_launch_begin;
using attention::cuda::launch_dependent;
using bf16 = __nv_bfloat16;

__global__ void copy_rows_kernel(const bf16* src, const int32_t* rows, int n, bf16* out) {
  const bf16* s = src + int64_t(rows[blockIdx.x]) * n;
  bf16* d = out + int64_t(blockIdx.x) * n;
  if (n % 8 == 0) {
    const uint4* s4 = reinterpret_cast<const uint4*>(s);
    uint4* d4 = reinterpret_cast<uint4*>(d);
    for (int i = threadIdx.x; i < n / 8; i += blockDim.x) d4[i] = s4[i];
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
  }
}

__global__ void add_kernel(bf16* x, const bf16* y, int64_t n) {
  dependent_launch_begin();
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 2;
  if (i + 1 < n) {
    __nv_bfloat162 a = *reinterpret_cast<__nv_bfloat162*>(x + i);
    const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(y + i);
    const float2 fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
    *reinterpret_cast<__nv_bfloat162*>(x + i) = __floats2bfloat162_rn(fa.x + fb.x, fa.y + fb.y);
  } else if (i < n) {
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(y[i]));
  }
}

__device__ __forceinline__ float silu_mul_one(float g, float u) {
  const float s = __bfloat162float(__float2bfloat16(g / (1.0f + __expf(-g))));
  return s * u;
}

// Flat grid: blocks_per_row blocks for each row, V elements per thread (V = 8: 16-byte loads and
// stores, where f is a multiple of 8; else 1).
template <int V>
__global__ void silu_mul_kernel(const bf16* gate_up, bf16* out, int f, int blocks_per_row) {
  dependent_launch_begin();
  const int64_t row = blockIdx.x / blocks_per_row;
  const bf16* g = gate_up + row * 2 * f;
  const bf16* u = g + f;
  bf16* o = out + row * f;
  const int i = ((blockIdx.x % blocks_per_row) * blockDim.x + threadIdx.x) * V;
  if (i >= f) return;
  if constexpr (V == 8) {
    const uint4 gr = *reinterpret_cast<const uint4*>(g + i);
    const uint4 ur = *reinterpret_cast<const uint4*>(u + i);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gr);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&ur);
    uint4 res;
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&res);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 gf = __bfloat1622float2(g2[k]), uf = __bfloat1622float2(u2[k]);
      o2[k] = __floats2bfloat162_rn(silu_mul_one(gf.x, uf.x), silu_mul_one(gf.y, uf.y));
    }
    *reinterpret_cast<uint4*>(o + i) = res;
  } else {
    o[i] = __float2bfloat16(silu_mul_one(__bfloat162float(g[i]), __bfloat162float(u[i])));
  }
}

__global__ void bias_add_kernel(void* out, bool out_f32, const bf16* bias, int n) {
  const int64_t row = blockIdx.x;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const float b = __bfloat162float(bias[j]);
    if (out_f32) {
      static_cast<float*>(out)[row * n + j] += b;
    } else {
      bf16* o = static_cast<bf16*>(out) + row * n + j;
      *o = __float2bfloat16(__bfloat162float(*o) + b);
    }
  }
}

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__global__ void fill_kernel(void* data, bool is_bf16, int64_t n, uint64_t seed, float lo,
                            float hi) {
  const uint64_t key = mix64(seed);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float u = float(mix64(key ^ uint64_t(i)) >> 40) * (1.0f / 16777216.0f);
    const float v = lo + (hi - lo) * u;
    if (is_bf16)
      static_cast<bf16*>(data)[i] = __float2bfloat16(v);
    else
      static_cast<float*>(data)[i] = v;
  }
}

int blocks_for(int64_t n, int threads, int cap = 65535) {
  int64_t b = (n + threads - 1) / threads;
  return int(b < 1 ? 1 : (b > cap ? cap : b));
}

}  // namespace

cudaError_t launch_embedding(const void* table, const int32_t* tokens, int n_tokens, int n,
                             void* out, cudaStream_t stream) {
  if (n_tokens == 0) return cudaSuccess;
  copy_rows_kernel<<<n_tokens, 256, 0, stream>>>(static_cast<const bf16*>(table), tokens, n,
                                                  static_cast<bf16*>(out));
  return cudaGetLastError();
}

cudaError_t launch_gather_rows(const void* x, const int32_t* rows, int n_rows, int n, void* out,
                               cudaStream_t stream) {
  return launch_embedding(x, rows, n_rows, n, out, stream);
}

cudaError_t launch_add(void* x, const void* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t pairs = (n + 1) / 2;
  return launch_dependent(add_kernel, unsigned((pairs + 255) / 256), 256, 0, stream,
                          static_cast<bf16*>(x), static_cast<const bf16*>(y), n);
}

cudaError_t launch_silu_mul(const void* gate_up, void* out, int rows, int f, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const auto* gu = static_cast<const bf16*>(gate_up);
  auto* o = static_cast<bf16*>(out);
  if (f % 8 == 0) {  // every row of gate_up, up and out then starts on a 16-byte boundary
    const int per_row = (f / 8 + 255) / 256;
    return launch_dependent(silu_mul_kernel<8>, unsigned(int64_t(rows) * per_row), 256, 0, stream,
                            gu, o, f, per_row);
  }
  const int per_row = (f + 255) / 256;
  return launch_dependent(silu_mul_kernel<1>, unsigned(int64_t(rows) * per_row), 256, 0, stream, gu,
                          o, f, per_row);
}

cudaError_t launch_bias_add(void* out, bool out_f32, const void* bias, int rows, int n,
                            cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  bias_add_kernel<<<rows, 256, 0, stream>>>(out, out_f32, static_cast<const bf16*>(bias), n);
  return cudaGetLastError();
}

cudaError_t launch_fill_uniform(void* data, bool is_bf16, int64_t n, uint64_t seed, float lo,
                                float hi, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  fill_kernel<<<blocks_for(n, 256, 132 * 16), 256, 0, stream>>>(data, is_bf16, n, seed, lo, hi);
  return cudaGetLastError();
}

}  // namespace nosa::runtime::cuda
