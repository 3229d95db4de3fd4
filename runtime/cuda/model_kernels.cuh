// The dense ops of the Llama forward pass on the GPU (bf16 activations, float32 arithmetic):
// plain argument structs and host launchers; the kernels are in norm.cu, rope.cu and
// elementwise.cu. Each op has a CPU twin in runtime/cpu/cpu_backend.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nosa::runtime::cuda {

// out[r] = w * (x[r] / rms(x[r])), rounded to bf16 in the order Hugging Face's LlamaRMSNorm uses.
// With a residual, x[r] += residual[r] first (stored in x, rounded to bf16) and normalized.
struct RmsNormArgs {
  const void* x = nullptr;         // [rows][n] bf16 (written when residual is set)
  const void* residual = nullptr;  // [rows][n] bf16 or null
  const void* w = nullptr;  // [n] bf16
  void* out = nullptr;      // [rows][n] bf16
  int rows = 0;
  int n = 0;
  float eps = 1e-5f;
};
cudaError_t launch_rmsnorm(const RmsNormArgs& args, cudaStream_t stream);

// Splits qkv [T][(hq + hk + hv) * d] into q and k rotated at the step's positions, and v_all.
struct RopeArgs {
  const void* qkv = nullptr;
  void* q = nullptr;      // [T][hq][d]
  void* k = nullptr;      // [T][hk][d]
  void* v = nullptr;      // [T][hv][d]
  const int32_t* positions = nullptr;  // [T] (device)
  const float* inv_freq = nullptr;     // [d / 2] (device)
  float attention_scaling = 1.0f;
  int n_tokens = 0, hq = 0, hk = 0, hv = 0, head_dim = 0;
};
cudaError_t launch_split_qkv_rope(const RopeArgs& args, cudaStream_t stream);

// out[t] = table[tokens[t]] (bf16 rows of width n).
cudaError_t launch_embedding(const void* table, const int32_t* tokens, int n_tokens, int n,
                             void* out, cudaStream_t stream);
// out[i] = x[rows[i]], bf16 rows of width n.
cudaError_t launch_gather_rows(const void* x, const int32_t* rows, int n_rows, int n, void* out,
                               cudaStream_t stream);
// x += y, bf16, n elements.
cudaError_t launch_add(void* x, const void* y, int64_t n, cudaStream_t stream);
// out[r] = silu(gate_up[r][:f]) * gate_up[r][f:], bf16.
cudaError_t launch_silu_mul(const void* gate_up, void* out, int rows, int f, cudaStream_t stream);
// out[r][j] += bias[j]; out is bf16 (out_f32 false) or float32, bias bf16.
cudaError_t launch_bias_add(void* out, bool out_f32, const void* bias, int rows, int n,
                            cudaStream_t stream);
// Fills n elements (bf16 when bf16, else float32) with uniform values in [lo, hi) from a
// counter-based hash of (seed, index).
cudaError_t launch_fill_uniform(void* data, bool bf16, int64_t n, uint64_t seed, float lo, float hi,
                                cudaStream_t stream);

}  // namespace nosa::runtime::cuda
