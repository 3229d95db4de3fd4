#include <cuda_bf16.h>

#include "runtime/cuda/model_kernels.cuh"

namespace nosa::runtime::cuda {

namespace {

using bf16 = __nv_bfloat16;

// One block per token; threads walk (head, i) pairs of the rotated heads, then copy v.
__global__ void rope_kernel(RopeArgs a) {
  const int t = blockIdx.x, d = a.head_dim, half = d / 2;
  const int width = (a.hq + a.hk + a.hv) * d;
  const bf16* src = static_cast<const bf16*>(a.qkv) + int64_t(t) * width;
  const float pos = float(a.positions[t]);
  const int rotated = (a.hq + a.hk) * half;
  for (int i = threadIdx.x; i < rotated; i += blockDim.x) {
    const int head = i / half, j = i % half;
    const float angle = pos * a.inv_freq[j];
    const float c = cosf(angle) * a.attention_scaling, s = sinf(angle) * a.attention_scaling;
    const float x0 = __bfloat162float(src[head * d + j]);
    const float x1 = __bfloat162float(src[head * d + j + half]);
    bf16* dst = head < a.hq
                    ? static_cast<bf16*>(a.q) + (int64_t(t) * a.hq + head) * d
                    : static_cast<bf16*>(a.k) + (int64_t(t) * a.hk + head - a.hq) * d;
    dst[j] = __float2bfloat16(x0 * c - x1 * s);
    dst[j + half] = __float2bfloat16(x1 * c + x0 * s);
  }
  const bf16* vs = src + (a.hq + a.hk) * d;
  bf16* vd = static_cast<bf16*>(a.v) + int64_t(t) * a.hv * d;
  for (int i = threadIdx.x; i < a.hv * d; i += blockDim.x) vd[i] = vs[i];
}

}  // namespace

cudaError_t launch_split_qkv_rope(const RopeArgs& a, cudaStream_t stream) {
  if (a.n_tokens == 0) return cudaSuccess;
  rope_kernel<<<a.n_tokens, 256, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace nosa::runtime::cuda
