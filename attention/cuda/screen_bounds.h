// The screened tiled selection's error bounds (attention/cuda/select.cu, "Screening"): how far a
// score computed by the tensor cores and float32 exponentials may be from the CPU reference's
// (attention/reference/selection.cpp). Host and device code, so that
// tests/attention/screen_bound_test.cpp checks them on the CPU against the reference itself.
//
// The bounds, u = 2^-24 (float32's unit roundoff), for a row (query head) and its keys j: the
// kernel sums each dot product in steps of 16 products (the tensor cores' k16), a_i the sum
// after step i, alpha_i the step's sum of |q[x] ck_j[x]|, A = sum_i alpha_i; habs is the row's
// largest B = A + sum_i |a_i| (from a product of absolute values and the partial sums).
//  - logits: the reference adds the products one by one, each addition within u of its partial
//    sum, and a partial sum inside step i is at most |a_(i-1)| + alpha_i (to first order): its
//    error is at most 16 u B. The tensor cores' rounding is not documented; a model that aligns
//    a step's 17 addends to the largest one's exponent (at most |a_(i-1)| + alpha_i), truncates
//    them (each within 2 u of it) and truncates the sum loses at most 36 u (|a_(i-1)| + alpha_i)
//    a step; one that does so in quarter steps of 5 addends, 48 u; so at most 48 u B in all
//    (tests/attention/screen_bound_test.cpp replays both). With a margin of 2 and one rounding
//    each of the scaling: |l' - l| <= Delta = 132 u scale B. (Before B the kernel took
//    Delta = (8 D + 16) u scale A, which typical inputs make about five times larger.)
//  - probabilities: softmax moves by at most a factor e^(+-2 Delta) when every logit moves by
//    Delta; ex2.approx is within 2^-22 of 2^x (2^-20 taken), its argument x2 = (l - max) log2 e
//    within 3 u |x2| (4.4 u |x2| taken, per key, which also covers the reference's own rounding
//    of l - max, 0.7 u |x2|), the sum z of n terms within (n / 32 + 8) u plus its terms' errors
//    (sum of 2^x2 (2^-20 + 4 u |x2|) / z), the reciprocal and product 2 u; the reference's
//    double-precision value rounds once to float (u). Together, for Delta < 0.01,
//    |p' - p| <= p' (eta + 4.4 u |x2|) with eta = 2.2 Delta + 1.1 (2^-20 + e_z + 4 u).
//  - S: the G probabilities of a key, summed in float32 on both sides (2.1 G u S), plus 1e-35
//    for exponentials flushed to zero. Pooling takes the largest bound of the keys pooled.
// A row past the bounds' range (Delta >= 0.01, a non-finite logit) gets an infinite bound.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define NOSA_SCREEN_FN __host__ __device__ __forceinline__
#else
#define NOSA_SCREEN_FN inline
#endif

namespace nosa::attention::cuda {

constexpr float k_screen_u = 0x1p-24f;
constexpr float k_screen_ex2 = 0x1p-20f;               // ex2.approx's relative error, taken
constexpr float k_screen_exp_arg = 4.4f * k_screen_u;  // per |x2| of a key

// Delta: the bound on |l' - l| of a row of head_dim d whose largest B is habs, plus d products
// below float's normal range (inexact in the reference, flushed by the tensor cores).
NOSA_SCREEN_FN float screen_logit_delta(float habs, float scale, int d) {
  return 132.0f * k_screen_u * scale * habs + float(d) * 0x1p-126f * scale;
}

// eta of a row: n keys, its largest logit mx, z = sum of 2^x2 and zw = sum of 2^x2 |x2| over its
// keys (x2 = (l - mx) log2 e); infinite where the row is past the bounds' range.
NOSA_SCREEN_FN float screen_eta(float habs, float scale, int d, int n, float mx, float z,
                                float zw) {
  const float u = k_screen_u;
  const float delta = screen_logit_delta(habs, scale, d);
  const float ez = float(n / 32 + 8) * u + k_screen_ex2 + 4.0f * u * (zw / z);
  const bool ok = delta < 0.01f && std::fabs(mx) < INFINITY && z >= 1.0f && z < INFINITY &&
                  zw >= 0.0f && zw < INFINITY;
  return ok ? 2.2f * delta + 1.1f * (k_screen_ex2 + ez + 4.0f * u) : INFINITY;
}

// The bound of a key's score s (the sum of its group heads' probabilities) from err, the sum of
// each probability times (its row's eta + k_screen_exp_arg |x2|).
NOSA_SCREEN_FN float screen_score_error(float err, float s, int group) {
  return 1.01f * err + 2.1f * float(group) * k_screen_u * s + 1e-35f;
}

}  // namespace nosa::attention::cuda

#undef NOSA_SCREEN_FN
