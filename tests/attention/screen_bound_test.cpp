// The screened selection's error bounds (attention/cuda/screen_bounds.h) against the CPU
// reference's own scores (attention/reference/selection.cpp), on the CPU: the screened kernel's
// arithmetic replayed in the same order and precision, with the tensor cores' sums replaced by
// models of their undocumented rounding (every addend truncated to the largest one's exponent at
// each step of 16 products, or of 4, the result truncated) and ex2.approx by exp2 moved by up to
// 2^-22. On random, cancelling, near-tied and widely spread
// inputs, every key's score must lie within its bound of the reference's, and every logit within
// Delta of the reference's logit: a bound the kernel relies on that does not hold fails here.
// (The test prints how close the scores come to their bounds: on these inputs a few thousandths
// of them, the price of bounds that hold for every input.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "attention/cuda/screen_bounds.h"
#include "attention/reference/selection.h"
#include "runtime/core/dtype.h"

namespace nosa::attention {
namespace {

using cuda::k_screen_u;

float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// Truncates toward zero to a float.
float to_float_rz(double s) {
  float f = float(s);
  if (std::fabs(double(f)) > std::fabs(s)) f = std::nextafter(f, 0.0f);
  return f;
}

enum class SumModel { step, quarter_step };

struct ModelDot {
  float dot;  // the sum
  float b;    // B of screen_bounds.h: the |products| summed, plus |partial sum| after each step
};

// q . c over d products (exact in float: bf16 inputs) as the tensor cores might sum them, in
// steps of 16 products: each step's addends (the sum so far and its products; with
// quarter_step, four rounds of the sum so far and 4 products) aligned to the largest one's
// exponent with 24 bits, truncated, summed and the sum truncated to float.
ModelDot model_dot(const float* q, const float* c, int d, SumModel model) {
  const int per = model == SumModel::step ? 16 : 4;
  float acc = 0.0f, b = 0.0f;
  for (int k0 = 0; k0 < d; k0 += per) {
    double t[17];
    int nt = 0;
    t[nt++] = acc;
    for (int x = k0; x < k0 + per; ++x) {
      t[nt++] = double(q[x] * c[x]);
      b += std::fabs(q[x] * c[x]);
    }
    double big = 0.0;
    for (int i = 0; i < nt; ++i) big = std::max(big, std::fabs(t[i]));
    if (big > 0.0) {
      int e;
      std::frexp(big, &e);  // big in [2^(e-1), 2^e)
      const double quantum = std::ldexp(1.0, e - 24);
      double sum = 0.0;
      for (int i = 0; i < nt; ++i) sum += std::trunc(t[i] / quantum) * quantum;
      acc = to_float_rz(sum);
    }
    if ((k0 + per) % 16 == 0) b += std::fabs(acc);  // the kernel adds |acc| after every step
  }
  return {acc, b};
}

// ex2.approx: exp2 moved by up to 2^-22 (relative), flushed to zero below 2^-126.
float model_exp2(float x, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> wobble(-0x1p-22, 0x1p-22);
  const double v = std::exp2(double(x)) * (1.0 + wobble(rng));
  const float f = float(v);
  return std::fabs(f) < 0x1p-126f ? 0.0f : f;
}

// A warp's sum: lane l adds keys l, l + 32, ... in order, then a butterfly over the lanes.
float warp_order_sum(const std::vector<float>& v) {
  float lanes[32] = {};
  for (size_t j = 0; j < v.size(); ++j) lanes[j % 32] += v[j];
  for (int o = 16; o > 0; o >>= 1) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ o];
    std::copy(next, next + 32, lanes);
  }
  return lanes[0];
}

struct Outcome {
  int64_t keys = 0, outside = 0, rows = 0, rows_in_range = 0, logits_outside = 0;
  double worst_ratio = 0.0;  // largest |S' - S| / bound over the keys
};

// One (token, KV head): the screened scores of `group` heads over n keys against the reference.
void check_scores(const std::vector<float>& q, const std::vector<float>& ck, int group, int d,
                  int64_t n, SumModel model, std::mt19937_64& rng, Outcome& out) {
  const float scale = 1.0f / std::sqrt(float(d));
  const std::vector<float> ref = reference::query_scores(q.data(), group, d, ck.data(), n);
  std::vector<float> v(n, 0.0f), err(n, 0.0f);
  for (int h = 0; h < group; ++h) {
    const float* qh = q.data() + int64_t(h) * d;
    std::vector<float> l(n), x2(n), e(n), ew(n);
    float habs = 0.0f, mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const ModelDot md = model_dot(qh, ck.data() + j * d, d, model);
      l[j] = md.dot * scale;
      habs = std::max(habs, md.b);
      mx = std::max(mx, l[j]);
      // The reference's logit, to check Delta itself.
      float dot = 0.0f;
      for (int x = 0; x < d; ++x) dot += qh[x] * ck[j * d + x];
      const float lr = dot * scale;
      if (std::fabs(l[j] - lr) > cuda::screen_logit_delta(habs, scale, d) &&
          cuda::screen_logit_delta(habs, scale, d) < 0.01f)
        ++out.logits_outside;
    }
    for (int64_t j = 0; j < n; ++j) {
      x2[j] = (l[j] - mx) * 1.4426950408889634f;
      e[j] = model_exp2(x2[j], rng);
      ew[j] = e[j] * -x2[j];
    }
    const float z = warp_order_sum(e), zw = warp_order_sum(ew);
    const float rz = 1.0f / z;
    const float eta = cuda::screen_eta(habs, scale, d, int(n), mx, z, zw);
    ++out.rows;
    out.rows_in_range += eta < INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const float pr = e[j] * rz;
      v[j] += pr;
      err[j] = std::fma(pr, std::fma(-cuda::k_screen_exp_arg, x2[j], eta), err[j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const float bound = cuda::screen_score_error(err[j], v[j], group);
    if (!(bound < INFINITY)) continue;
    ++out.keys;
    const double miss = std::fabs(double(v[j]) - double(ref[j]));
    out.worst_ratio = std::max(out.worst_ratio, miss / double(bound));
    out.outside += miss > double(bound);
  }
}

enum class Inputs { normal, cancelling, near_ties, spread };

const char* name_of(Inputs in) {
  return in == Inputs::normal       ? "normal"
         : in == Inputs::cancelling ? "cancelling"
         : in == Inputs::near_ties  ? "near-ties"
                                    : "spread";
}

// normal: N(0, 1) queries and keys. cancelling: eight products of about +-32 in every dot
// product (big partial sums that cancel, whose rounding the reference keeps). near_ties: keys from
// a few rows, each moved in one value by one bf16 step. spread: queries 30 times larger (softmax of
// widely spread logits, most exponentials tiny or flushed).
void make_inputs(Inputs in, int group, int d, int64_t n, std::mt19937_64& rng,
                 std::vector<float>& q, std::vector<float>& ck) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  q.assign(size_t(group) * d, 0.0f);
  ck.assign(size_t(n) * d, 0.0f);
  const float qs = in == Inputs::spread ? 30.0f : 1.0f;
  for (float& x : q) x = bf16_round(qs * g(rng));
  for (float& x : ck) x = bf16_round(g(rng));
  if (in == Inputs::cancelling) {
    for (int64_t j = 0; j < n; ++j)
      for (int x = 0; x < 8; ++x)
        ck[j * d + (x * 13) % d] = bf16_round((x % 2 ? -8.0f : 8.0f) * (1.0f + 0.01f * g(rng)));
    for (int h = 0; h < group; ++h)
      for (int x = 0; x < 8; ++x) q[size_t(h) * d + (x * 13) % d] = 4.0f;
  } else if (in == Inputs::near_ties) {
    std::vector<float> rows(size_t(4) * d);
    for (float& x : rows) x = bf16_round(g(rng));
    std::uniform_int_distribution<int> pick(0, 3), at(0, d - 1);
    for (int64_t j = 0; j < n; ++j) {
      std::copy_n(rows.begin() + pick(rng) * d, d, ck.begin() + j * d);
      float& x = ck[j * d + at(rng)];
      x = bf16_round(x * (1.0f + 0x1p-7f));  // one bf16 step
    }
  }
}

TEST(ScreenBounds, EveryScoreLiesWithinItsBoundOfTheReference) {
  std::mt19937_64 rng(20261129);
  for (Inputs in : {Inputs::normal, Inputs::cancelling, Inputs::near_ties, Inputs::spread})
    for (SumModel model : {SumModel::step, SumModel::quarter_step}) {
      Outcome o;
      for (int trial = 0; trial < 12; ++trial) {
        const int d = trial % 2 ? 64 : 128, group = 2 + trial % 3 * 3;
        const int64_t n = 200 + 97 * trial;
        std::vector<float> q, ck;
        make_inputs(in, group, d, n, rng, q, ck);
        check_scores(q, ck, group, d, n, model, rng, o);
      }
      std::printf(
          "[ screen   ] %-10s %-10s %lld of %lld rows in range, %lld of %lld keys outside "
          "their bound (worst |S' - S| / bound %.3f), %lld logits outside Delta\n",
          name_of(in), model == SumModel::step ? "step" : "quarter", (long long)o.rows_in_range,
          (long long)o.rows, (long long)o.outside, (long long)o.keys, o.worst_ratio,
          (long long)o.logits_outside);
      EXPECT_EQ(o.outside, 0) << name_of(in);
      EXPECT_EQ(o.logits_outside, 0) << name_of(in);
      // The bounds are for use: ordinary inputs stay in their range.
      if (in == Inputs::normal) {
        EXPECT_EQ(o.rows_in_range, o.rows);
      }
    }
}

// Rows past the bounds' range get an infinite bound, never a finite one that could certify.
TEST(ScreenBounds, RowsPastTheRangeGetAnInfiniteBound) {
  const float scale = 1.0f / std::sqrt(128.0f);
  EXPECT_EQ(cuda::screen_eta(1e6f, scale, 128, 1000, 3.0f, 10.0f, 5.0f), INFINITY);
  EXPECT_EQ(cuda::screen_eta(100.0f, scale, 128, 1000, NAN, 10.0f, 5.0f), INFINITY);
  EXPECT_EQ(cuda::screen_eta(100.0f, scale, 128, 1000, INFINITY, 10.0f, 5.0f), INFINITY);
  EXPECT_EQ(cuda::screen_eta(100.0f, scale, 128, 1000, 3.0f, 0.5f, 5.0f), INFINITY);
  // In range: twice Delta (and a little), the rest a few units of float's roundoff.
  const float eta = cuda::screen_eta(100.0f, scale, 128, 1000, 3.0f, 10.0f, 5.0f);
  const float delta = cuda::screen_logit_delta(100.0f, scale, 128);
  EXPECT_GT(eta, 2.2f * delta);
  EXPECT_LT(eta, 2.2f * delta + 1e-5f);
  EXPECT_EQ(cuda::screen_score_error(INFINITY, 0.5f, 8), INFINITY);
}

}  // namespace
}  // namespace nosa::attention
