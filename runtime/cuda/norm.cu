#include <cuda_bf16.h>

#include "runtime/cuda/model_kernels.cuh"

namespace nosa::runtime::cuda {

namespace {

using bf16 = __nv_bfloat16;

// One block per row.
__global__ void rmsnorm_kernel(RmsNormArgs a) {
  const bf16* x = static_cast<const bf16*>(a.x) + int64_t(blockIdx.x) * a.n;
  const bf16* w = static_cast<const bf16*>(a.w);
  bf16* y = static_cast<bf16*>(a.out) + int64_t(blockIdx.x) * a.n;
  __shared__ float partial[32];
  float ss = 0.0f;
  for (int i = threadIdx.x; i < a.n; i += blockDim.x) {
    const float v = __bfloat162float(x[i]);
    ss = fmaf(v, v, ss);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) partial[0] = v;
  }
  __syncthreads();
  const float inv = rsqrtf(partial[0] / float(a.n) + a.eps);
  for (int i = threadIdx.x; i < a.n; i += blockDim.x) {
    const float normed = __bfloat162float(__float2bfloat16(__bfloat162float(x[i]) * inv));
    y[i] = __float2bfloat16(__bfloat162float(w[i]) * normed);
  }
}

}  // namespace

cudaError_t launch_rmsnorm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const int threads = a.n >= 1024 ? 512 : 128;
  rmsnorm_kernel<<<a.rows, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace nosa::runtime::cuda
