#include "attention/reference/selection.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace nosa::attention::reference {

namespace {
constexpr float k_inf = std::numeric_limits<float>::infinity();
}

int64_t compressed_count(int64_t t, const SparseParams& p) {
  if (t + 1 < p.kernel_size) return 0;
  return (t + 1 - p.kernel_size) / p.kernel_stride + 1;
}

void compressed_key(const float* keys, int64_t j, int d, const SparseParams& p, float* out) {
  std::fill(out, out + d, 0.0f);
  const float* first = keys + j * p.kernel_stride * int64_t(d);
  for (int i = 0; i < p.kernel_size; ++i)
    for (int x = 0; x < d; ++x) out[x] += first[int64_t(i) * d + x];
  for (int x = 0; x < d; ++x) out[x] /= float(p.kernel_size);
}

std::vector<float> query_scores(const float* q, int group, int d, const float* ck, int64_t n) {
  std::vector<float> total(n, 0.0f), logits(n);
  const float scale = 1.0f / std::sqrt(float(d));
  for (int h = 0; h < group; ++h) {
    const float* qh = q + int64_t(h) * d;
    float max_logit = -k_inf;
    for (int64_t j = 0; j < n; ++j) {
      float dot = 0.0f;
      for (int x = 0; x < d; ++x) dot += qh[x] * ck[j * d + x];
      logits[j] = dot * scale;
      max_logit = std::max(max_logit, logits[j]);
    }
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += std::exp(double(logits[j] - max_logit));
    for (int64_t j = 0; j < n; ++j)
      total[j] += float(std::exp(double(logits[j] - max_logit)) / sum);
  }
  return total;
}

std::vector<float> pool_blocks(const float* scores, int64_t n, int64_t qb, const SparseParams& p) {
  const int64_t m = p.keys_per_block();
  std::vector<float> out(qb + 1, -k_inf);
  for (int64_t b = 0; b <= qb; ++b) {
    if (b < p.init_blocks || b >= qb - p.local_blocks()) {
      out[b] = k_inf;
      continue;
    }
    for (int64_t j = std::max<int64_t>(0, m * b - 1); j <= m * b + m - 1 && j < n; ++j)
      out[b] = std::max(out[b], scores[j]);
  }
  return out;
}

std::vector<int32_t> top_blocks(const std::vector<float>& scores, int64_t k) {
  std::vector<int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  k = std::min<int64_t>(k, int64_t(order.size()));
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

bool selects_all(Mode mode, int64_t t, const SparseParams& p) {
  if (mode == Mode::dense) return true;
  if (t + 1 < p.dense_len) return true;
  return t / p.block_size + 1 <= p.topk;
}

int64_t selected_count(Mode mode, int64_t t, const SparseParams& p) {
  const int64_t blocks = t / p.block_size + 1;
  return selects_all(mode, t, p) ? blocks : std::min<int64_t>(p.topk, blocks);
}

std::vector<int32_t> select_blocks(Mode mode, const float* q, int group, int d, const float* ck,
                                   const float* e, int64_t t, const SparseParams& p) {
  const int64_t qb = t / p.block_size;
  if (selects_all(mode, t, p)) {
    std::vector<int32_t> all(qb + 1);
    std::iota(all.begin(), all.end(), 0);
    return all;
  }
  const int64_t n = compressed_count(t, p);
  std::vector<float> s = query_scores(q, group, d, ck, n);
  std::vector<float> sb = pool_blocks(s.data(), n, qb, p);
  if (mode == Mode::infllmv2) return top_blocks(sb, std::min<int64_t>(p.topk, qb + 1));

  std::vector<int32_t> chosen = top_blocks(sb, std::min<int64_t>(p.q_select(), qb + 1));
  std::vector<float> eb = pool_blocks(e, n, qb, p);
  for (int32_t b : chosen) eb[b] = k_inf;
  return top_blocks(eb, std::min<int64_t>(p.topk, qb + 1));
}

}  // namespace nosa::attention::reference
