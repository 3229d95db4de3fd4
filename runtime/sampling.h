// Token sampling on the host: greedy, temperature, top-k, top-p, with a counter-based random
// stream (seed, step) so that a seed gives the same tokens on every backend and batch shape.
#pragma once

#include <cstdint>

#include "runtime/backend.h"

namespace nosa::runtime {

// A uniform number in [0, 1) that depends only on (seed, step).
double sampling_uniform(uint64_t seed, int64_t step);

// Samples one token from logits[0..vocab). Logprobs are those of the model's distribution
// (log-softmax of the raw logits, before temperature and filtering), natural log.
SampledToken sample_row(const float* logits, int64_t vocab, const SamplingParams& params);

}  // namespace nosa::runtime
