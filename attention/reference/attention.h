// Eviction scores and (sparse) attention of docs/nosa.md, sections 1 and 3.7, for one token:
// the CPU reference.
#pragma once

#include <cstdint>

namespace nosa::attention::reference {

// softplus as PyTorch computes it (linear above 20).
float softplus(float x);

// NOSA's query-agnostic eviction score of one token for KV heads [head_begin, head_end):
// c[g - head_begin] = A[g] * softplus(delta_w[g] . v + delta_b[g]), with v the token's values of
// all n_kv heads concatenated ([n_kv * d]), delta_w [n_kv][n_kv * d], delta_b [n_kv] or null.
void eviction_scores(const float* v, int n_kv, int d, const float* a, const float* delta_w,
                     const float* delta_b, int head_begin, int head_end, float* c);

// One resident KV block of one (layer, KV head): keys and values [block_size][d] and, in NOSA
// mode, the tokens' eviction scores [block_size].
struct BlockView {
  const float* k = nullptr;
  const float* v = nullptr;
  const float* c = nullptr;
};

// out[d] = softmax(q . k / sqrt(d) + bias) v over the tokens p <= t of the given blocks, where
// block i holds positions [block_ids[i] * block_size, ...). bias is c[p] when use_bias, else 0.
void attend(const float* q, int d, const BlockView* blocks, const int32_t* block_ids, int n_blocks,
            int block_size, int64_t t, bool use_bias, float* out);

}  // namespace nosa::attention::reference
