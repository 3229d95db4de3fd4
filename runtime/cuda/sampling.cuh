// Token sampling on the GPU: greedy (ties: the lower id), temperature, top-k and top-p, with the
// logprobs of the raw logits; one thread block per row. It follows runtime/sampling.cpp's rule
// (candidates by descending logit then ascending id, cut by top-k, then top-p, then the first
// candidate whose cumulative weight exceeds u * total with u = sampling_uniform(seed, step)), so
// that a seed picks the same token as on the CPU except where two cumulative sums differ only in
// their last bits. Only these results cross to the host.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nosa::runtime::cuda {

constexpr int k_max_top_logprobs = 20;

struct SampleRowParams {
  float temperature = 0.0f;
  float top_p = 1.0f;
  int top_k = 0;
  int n_top = 0;   // alternatives to report (<= k_max_top_logprobs)
  double u = 0.0;  // sampling_uniform(seed, step), computed on the host
};

struct SampleRowResult {
  int32_t token = 0;
  float logprob = 0.0f;
  int32_t nan = 0;  // the row had a NaN logit
  int32_t n_top = 0;
  int32_t top_ids[k_max_top_logprobs];
  float top_logprobs[k_max_top_logprobs];
};

struct SampleArgs {
  const void* logits = nullptr;  // [rows][vocab], float32 or bf16
  bool logits_f32 = true;
  int rows = 0;
  int vocab = 0;
  const SampleRowParams* params = nullptr;  // [rows] (device)
  SampleRowResult* out = nullptr;           // [rows] (device)
};
cudaError_t launch_sample(const SampleArgs& args, cudaStream_t stream);

}  // namespace nosa::runtime::cuda
