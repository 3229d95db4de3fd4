#include "attention/reference/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace nosa::attention::reference {

float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

void eviction_scores(const float* v, int n_kv, int d, const float* a, const float* delta_w,
                     const float* delta_b, int head_begin, int head_end, float* c) {
  const int64_t width = int64_t(n_kv) * d;
  for (int g = head_begin; g < head_end; ++g) {
    const float* w = delta_w + g * width;
    float z = delta_b ? delta_b[g] : 0.0f;
    for (int64_t x = 0; x < width; ++x) z += w[x] * v[x];
    c[g - head_begin] = a[g] * softplus(z);
  }
}

void attend(const float* q, int d, const BlockView* blocks, const int32_t* block_ids, int n_blocks,
            int block_size, int64_t t, bool use_bias, float* out) {
  const float scale = 1.0f / std::sqrt(float(d));
  // Online softmax over the blocks, in the order given.
  float max_logit = -std::numeric_limits<float>::infinity();
  double denom = 0.0;
  std::vector<double> acc(d, 0.0);
  for (int i = 0; i < n_blocks; ++i) {
    const int64_t first = int64_t(block_ids[i]) * block_size;
    const int n_tokens = int(std::min<int64_t>(block_size, t - first + 1));
    for (int r = 0; r < n_tokens; ++r) {
      const float* k = blocks[i].k + int64_t(r) * d;
      float dot = 0.0f;
      for (int x = 0; x < d; ++x) dot += q[x] * k[x];
      float logit = dot * scale + (use_bias ? blocks[i].c[r] : 0.0f);
      if (logit > max_logit) {
        double rescale = std::exp(double(max_logit) - double(logit));
        denom *= rescale;
        for (int x = 0; x < d; ++x) acc[x] *= rescale;
        max_logit = logit;
      }
      double w = std::exp(double(logit) - double(max_logit));
      denom += w;
      const float* v = blocks[i].v + int64_t(r) * d;
      for (int x = 0; x < d; ++x) acc[x] += w * v[x];
    }
  }
  for (int x = 0; x < d; ++x) out[x] = denom > 0 ? float(acc[x] / denom) : 0.0f;
}

}  // namespace nosa::attention::reference
