// Decode attention over a selection given in two parts (launch_sparse_decode_part twice, then
// launch_sparse_decode_merge), as device-side residency runs it: the resident blocks while the
// missing ones are copied, then those. On random inputs it gives what one pass over the whole
// selection gives (launch_sparse_decode, itself tested against the CPU reference), whichever way
// each row is split: one part empty, or both holding blocks in any order.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "attention/cuda/sparse_decode.cuh"
#include "tests/cuda/cuda_test_util.h"

namespace nosa::attention::cuda {
namespace {

using ::nosa::test::DeviceArray;

std::vector<float> to_float(const std::vector<__nv_bfloat16>& b) {
  std::vector<float> f(b.size());
  for (size_t i = 0; i < b.size(); ++i) f[i] = __bfloat162float(b[i]);
  return f;
}

struct Case {
  int T = 0, H = 0, G = 0, D = 0, bs = 64, k = 0;
};

// One random case: each token its own sequence of up to `max_blocks` blocks; selections of up to
// k blocks (the newest always), split into two parts per `mode` (0: random, 1: all in the first,
// 2: all in the second).
double run_case(const Case& c, uint32_t seed, int mode, bool use_bias) {
  std::mt19937 rng(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const int max_blocks = 3 * c.k / 2;
  std::vector<int32_t> positions(c.T), token_seq(c.T), table(size_t(c.T) * max_blocks, 0);
  std::vector<int32_t> whole(size_t(c.T) * c.H * c.k, -1), first = whole, second = whole;
  int n_phys = 0;
  for (int t = 0; t < c.T; ++t) {
    const int nb = pick(1, max_blocks);
    token_seq[t] = t;
    positions[t] = (nb - 1) * c.bs + pick(0, c.bs - 1);
    for (int b = 0; b < nb; ++b) table[size_t(t) * max_blocks + b] = n_phys++;
    for (int h = 0; h < c.H; ++h) {
      std::vector<int32_t> blocks(size_t(nb - 1));
      std::iota(blocks.begin(), blocks.end(), 0);
      std::shuffle(blocks.begin(), blocks.end(), rng);
      blocks.resize(size_t(std::min(nb - 1, pick(0, c.k - 1))));
      blocks.push_back(nb - 1);
      std::sort(blocks.begin(), blocks.end());
      const int64_t row = (int64_t(t) * c.H + h) * c.k;
      int n1 = 0, n2 = 0;
      for (size_t i = 0; i < blocks.size(); ++i) {
        whole[row + int64_t(i)] = blocks[i];
        const bool to_first = mode == 1 || (mode == 0 && pick(0, 9) < 7);
        (to_first ? first[row + n1++] : second[row + n2++]) = blocks[i];
      }
    }
  }
  const int64_t chunks = int64_t(n_phys) * c.H;  // one layer
  std::vector<__nv_bfloat16> kv(size_t(chunks) * 2 * c.bs * c.D);
  for (auto& x : kv) x = __float2bfloat16(uni(rng));
  std::vector<float> bias(size_t(chunks) * c.bs);
  for (auto& x : bias) x = uni(rng);
  std::vector<__nv_bfloat16> q(size_t(c.T) * c.H * c.G * c.D);
  for (auto& x : q) x = __float2bfloat16(uni(rng));
  std::vector<int32_t> list(c.T);
  std::iota(list.begin(), list.end(), 0);

  DeviceArray<__nv_bfloat16> kv_dev(kv), q_dev(q);
  DeviceArray<float> bias_dev(bias);
  DeviceArray<int32_t> positions_dev(positions), token_seq_dev(token_seq), table_dev(table),
      list_dev(list), sel_whole(whole), sel_first(first), sel_second(second);
  DecodeArgs a;
  a.kv.kv = kv_dev.p;
  a.kv.bias = bias_dev.p;
  a.kv.n_layers = 1;
  a.kv.n_kv_heads = c.H;
  a.kv.head_dim = c.D;
  a.kv.block_size = c.bs;
  a.step.positions = positions_dev.p;
  a.step.token_seq = token_seq_dev.p;
  a.step.block_table = table_dev.p;
  a.step.bt_stride = max_blocks;
  a.step.n_tokens = c.T;
  a.step.n_seqs = c.T;
  a.q = q_dev.p;
  a.group = c.G;
  a.scale = 1.0f / std::sqrt(float(c.D));
  a.use_bias = use_bias;
  a.k_max = c.k;
  a.max_blocks = c.k;
  a.token_list = list_dev.p;
  a.n_list = c.T;
  int sms = 0;
  EXPECT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  a.splits = decode_splits(c.T, c.H, c.k, c.bs, sms);
  const int second_splits = decode_min_splits(c.k, c.bs);
  DeviceArray<float> partial(
      std::vector<float>(decode_partial_floats(c.T, c.H, a.splits + second_splits, c.D)));
  a.partial = partial.p;
  const std::vector<__nv_bfloat16> nan(q.size(), __float2bfloat16(NAN));
  DeviceArray<__nv_bfloat16> out_whole(nan), out_parts(nan);

  DecodeArgs w = a;
  w.selection = sel_whole.p;
  w.out = out_whole.p;
  EXPECT_EQ(launch_sparse_decode(w, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  DecodeArgs p = a;
  p.out = out_parts.p;
  p.split_total = a.splits + second_splits;
  p.selection = sel_first.p;
  EXPECT_EQ(launch_sparse_decode_part(p, nullptr), cudaSuccess);
  p.selection = sel_second.p;
  p.split_begin = a.splits;
  p.splits = second_splits;
  EXPECT_EQ(launch_sparse_decode_part(p, nullptr), cudaSuccess);
  EXPECT_EQ(launch_sparse_decode_merge(p, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  const std::vector<float> ref = to_float(out_whole.get()), got = to_float(out_parts.get());
  double num = 0, den = 0;
  int64_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) ++bad;
    num += (got[i] - ref[i]) * double(got[i] - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  EXPECT_EQ(bad, 0) << "seed " << seed;
  return den > 0 ? std::sqrt(num / den) : 0.0;
}

TEST(CudaDecodeParts, TwoPartsGiveTheAttentionOfTheWholeSelection) {
  NOSA_REQUIRE_GPU();
  double worst = 0;
  uint32_t seed = 1;
  for (const Case c : {Case{3, 2, 4, 128, 64, 24}, Case{17, 4, 8, 64, 64, 48},
                       Case{2, 8, 16, 128, 32, 96}, Case{40, 2, 1, 128, 64, 16}})
    for (int mode = 0; mode < 3; ++mode)
      for (bool bias : {false, true}) {
        const double e = run_case(c, seed++, mode, bias);
        EXPECT_LT(e, 1e-2) << "case T=" << c.T << " H=" << c.H << " G=" << c.G << " D=" << c.D
                           << " k=" << c.k << " mode " << mode << " bias " << bias;
        worst = std::max(worst, e);
      }
  std::printf("[ decode   ] two parts against one pass, 24 random cases: worst rel error %.3e\n",
              worst);
}

}  // namespace
}  // namespace nosa::attention::cuda
