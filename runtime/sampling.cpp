#include "runtime/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "runtime/core/error.h"

namespace nosa::runtime {

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

double sampling_uniform(uint64_t seed, int64_t step) {
  uint64_t bits = splitmix64(splitmix64(seed) ^ uint64_t(step));
  return double(bits >> 11) * (1.0 / 9007199254740992.0);
}

SampledToken sample_row(const float* logits, int64_t vocab, const SamplingParams& params) {
  NOSA_ASSERT(vocab > 0, "empty logits");
  // Log-softmax of the raw logits, for reported logprobs.
  float max_logit = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) {
    NOSA_CHECK_CODE(!std::isnan(logits[i]), ErrorCode::internal, "NaN in logits at {}", i);
    max_logit = std::max(max_logit, logits[i]);
  }
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i] - max_logit));
  const double log_z = double(max_logit) + std::log(sum);
  auto logprob = [&](int64_t i) { return float(double(logits[i]) - log_z); };

  SampledToken out;
  if (params.temperature <= 0.0f) {
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;  // ties: the lower id
    out.token = int32_t(best);
  } else {
    // Candidates by descending logit (ties: lower id), cut by top-k, then by top-p on the
    // temperature-scaled distribution.
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    int64_t keep = params.top_k > 0 ? std::min<int64_t>(params.top_k, vocab) : vocab;
    auto by_logit = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    if (keep < vocab) {
      std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_logit);
      order.resize(keep);
    } else {
      std::sort(order.begin(), order.end(), by_logit);
    }
    std::vector<double> p(order.size());
    const double inv_t = 1.0 / double(params.temperature);
    double total = 0.0;
    for (size_t i = 0; i < order.size(); ++i) {
      p[i] = std::exp((double(logits[order[i]]) - double(max_logit)) * inv_t);
      total += p[i];
    }
    size_t n = order.size();
    if (params.top_p < 1.0f) {
      double cum = 0.0;
      for (size_t i = 0; i < order.size(); ++i) {
        cum += p[i] / total;
        if (cum >= double(params.top_p)) {
          n = i + 1;
          break;
        }
      }
      total = std::accumulate(p.begin(), p.begin() + n, 0.0);
    }
    double u = sampling_uniform(params.seed, params.step) * total;
    size_t pick = n - 1;
    double cum = 0.0;
    for (size_t i = 0; i < n; ++i) {
      cum += p[i];
      if (u < cum) {
        pick = i;
        break;
      }
    }
    out.token = order[pick];
  }
  out.logprob = logprob(out.token);
  if (params.logprobs > 0) {
    int64_t k = std::min<int64_t>(params.logprobs, vocab);
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int64_t i = 0; i < k; ++i) out.top.emplace_back(order[i], logprob(order[i]));
  }
  return out;
}

}  // namespace nosa::runtime
