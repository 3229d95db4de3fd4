#include <cuda_bf16.h>

#include "attention/cuda/dependent_launch.cuh"
#include "runtime/cuda/model_kernels.cuh"

namespace nosa::runtime::cuda {

namespace {

using attention::cuda::dependent_launch_begin;
using attention::cuda::launch_dependent;
using bf16 = __nv_bfloat16;

// One block per token: the token's cos / sin table first (one sincos per dimension pair, as the
// CPU backend computes it: at long positions the accurate sincos takes its slow path, so once
// per token rather than once per head and pair), then threads walk (head, pair of dimensions) of
// the rotated heads two dimensions at a time, then copy v 16 bytes at a time.
__global__ void rope_kernel(RopeArgs a) {
  extern __shared__ float cs[];  // [half] cos, then [half] sin
  dependent_launch_begin();
  const int t = blockIdx.x, d = a.head_dim, half = d / 2;
  const int width = (a.hq + a.hk + a.hv) * d;
  const bf16* src = static_cast<const bf16*>(a.qkv) + int64_t(t) * width;
  const float pos = float(a.positions[t]);
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    float s, c;
    sincosf(pos * a.inv_freq[j], &s, &c);
    cs[j] = c * a.attention_scaling;
    cs[half + j] = s * a.attention_scaling;
  }
  __syncthreads();
  auto rotate = [&](int j, float x0, float x1, float& y0, float& y1) {
    const float c = cs[j], s = cs[half + j];
    y0 = x0 * c - x1 * s;
    y1 = x1 * c + x0 * s;
  };
  auto dst_of = [&](int head) {
    return head < a.hq ? static_cast<bf16*>(a.q) + (int64_t(t) * a.hq + head) * d
                       : static_cast<bf16*>(a.k) + (int64_t(t) * a.hk + head - a.hq) * d;
  };
  if (half % 2 == 0) {
    const int pairs = half / 2, rotated = (a.hq + a.hk) * pairs;
    for (int i = threadIdx.x; i < rotated; i += blockDim.x) {
      const int head = i / pairs, j = (i % pairs) * 2;
      const float2 x0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src + head * d + j));
      const float2 x1 =
          __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src + head * d + j + half));
      float2 y0, y1;
      rotate(j, x0.x, x1.x, y0.x, y1.x);
      rotate(j + 1, x0.y, x1.y, y0.y, y1.y);
      bf16* dst = dst_of(head);
      *reinterpret_cast<__nv_bfloat162*>(dst + j) = __floats2bfloat162_rn(y0.x, y0.y);
      *reinterpret_cast<__nv_bfloat162*>(dst + j + half) = __floats2bfloat162_rn(y1.x, y1.y);
    }
  } else {
    const int rotated = (a.hq + a.hk) * half;
    for (int i = threadIdx.x; i < rotated; i += blockDim.x) {
      const int head = i / half, j = i % half;
      float y0, y1;
      rotate(j, __bfloat162float(src[head * d + j]), __bfloat162float(src[head * d + j + half]),
             y0, y1);
      bf16* dst = dst_of(head);
      dst[j] = __float2bfloat16(y0);
      dst[j + half] = __float2bfloat16(y1);
    }
  }
  const bf16* vs = src + (a.hq + a.hk) * d;
  bf16* vd = static_cast<bf16*>(a.v) + int64_t(t) * a.hv * d;
  if (d % 8 == 0) {  // rows and the v part start on 16-byte boundaries
    const uint4* vs4 = reinterpret_cast<const uint4*>(vs);
    uint4* vd4 = reinterpret_cast<uint4*>(vd);
    for (int i = threadIdx.x; i < a.hv * d / 8; i += blockDim.x) vd4[i] = vs4[i];
  } else {
    for (int i = threadIdx.x; i < a.hv * d; i += blockDim.x) vd[i] = vs[i];
  }
}

}  // namespace

cudaError_t launch_split_qkv_rope(const RopeArgs& a, cudaStream_t stream) {
  if (a.n_tokens == 0) return cudaSuccess;
  return launch_dependent(rope_kernel, a.n_tokens, 256, sizeof(float) * a.head_dim, stream, a);
}

}  // namespace nosa::runtime::cuda
