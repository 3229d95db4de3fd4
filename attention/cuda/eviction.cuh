// NOSA's query-agnostic eviction score on the GPU (docs/nosa.md, section 1):
// c[t, g] = A[g] * softplus(delta_w[g] . concat(v[t]) + delta_b[g]), in float32.
#pragma once

#include <cuda_runtime.h>

namespace nosa::attention::cuda {

struct EvictionArgs {
  const void* v_all = nullptr;      // [T][n_kv][d] bf16
  const float* a = nullptr;         // [n_kv]
  const float* delta_w = nullptr;   // [n_kv][n_kv * d]
  const float* delta_b = nullptr;   // [n_kv] or null
  float* c = nullptr;               // [T][head_end - head_begin]
  int n_tokens = 0;
  int n_kv = 0;
  int head_dim = 0;
  int head_begin = 0;
  int head_end = 0;
};
cudaError_t launch_eviction_scores(const EvictionArgs& args, cudaStream_t stream);

}  // namespace nosa::attention::cuda
