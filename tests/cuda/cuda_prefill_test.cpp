// The prefill attention kernels (attention/cuda/sparse_prefill.cu's mma.sync kernel, and
// prefill_wgmma.cu's where the GPU runs it, for head_dim 128 and blocks of multiples of 64 keys)
// against the CPU reference on random inputs: group sizes from 1 to 64 (tiles of 128 rows, up to 64 tokens), head_dim
// 64 and 128, block sizes below, at and above the 64-key stage, prompts that end in partial tiles
// and partial blocks, and every way a tile's tokens can attend: all blocks (dense, with and
// without the bias), the CPU's InfLLM-V2 and NOSA selections, and random selections under which
// the tokens of one tile select different blocks (some none at all). GPU outputs start as NaN, so
// a row the kernel forgets stays NaN. Skipped where no GPU exists.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "attention/cuda/sparse_prefill.cuh"
#include "tests/cuda/cuda_test_util.h"

namespace nosa::test {
namespace {

using runtime::KvLayout;
using runtime::Selection;

constexpr double k_tol = 1e-2;

struct PrefillCase {
  const char* name;
  int d, group, block_size;
  // (n_past, n_new) per sequence: n_new > 1 takes the prefill kernel (any n_new with a group
  // above 16).
  std::vector<std::pair<int64_t, int64_t>> seqs;
};

std::vector<PrefillCase> prefill_cases() {
  return {
      {"g1-d64-bs16", 64, 1, 16, {{0, 150}, {37, 100}}},
      // Groups of 1, 2 and 4 with head_dim 128 and 64-key blocks (the wgmma kernel's shapes):
      // tiles of 64, 64 and 32 tokens (group 1 leaves the second warpgroup without rows; the
      // 64th token takes the masks' top bit).
      {"g1-d128-bs64", 128, 1, 64, {{0, 140}, {300, 70}}},
      {"g2-d128-bs64", 128, 2, 64, {{0, 130}, {200, 64}}},
      {"g4-d128-bs64", 128, 4, 64, {{0, 97}, {260, 40}}},
      {"g2-d128-bs32", 128, 2, 32, {{0, 130}, {200, 67}}},
      {"g4-d64-bs64", 64, 4, 64, {{0, 97}, {300, 33}}},
      {"g6-d128-bs64", 128, 6, 64, {{0, 90}, {129, 40}}},
      {"g8-d128-bs64", 128, 8, 64, {{0, 300}, {500, 45}, {70, 1}}},
      {"g8-d64-bs128", 64, 8, 128, {{0, 200}, {260, 19}}},
      {"g16-d128-bs64", 128, 16, 64, {{0, 150}, {400, 13}}},
      {"g16-d128-bs16", 128, 16, 16, {{0, 70}, {90, 21}}},
      {"g64-d128-bs64", 128, 64, 64, {{0, 9}, {150, 1}, {80, 3}}},
      // One token per warp (32 rows); a block size above 64 that is no power of two, with a
      // tile's last warp empty; groups that divide 128 rows unevenly.
      {"g32-d64-bs32", 64, 32, 32, {{0, 75}, {100, 9}}},
      {"g48-d128-bs192", 128, 48, 192, {{0, 400}, {500, 7}}},
      {"g3-d128-bs128", 128, 3, 128, {{0, 300}, {260, 50}}},
      {"g12-d128-bs256", 128, 12, 256, {{0, 600}, {700, 20}}},
  };
}

int64_t pool_blocks(const PrefillCase& c) {
  int64_t n = 0;
  for (auto [past, fresh] : c.seqs) n += (past + fresh + c.block_size - 1) / c.block_size;
  return n + 3;
}

enum class Attend { dense, dense_bias, infllmv2, nosa, random_subsets, alternating };

const char* attend_name(Attend a) {
  switch (a) {
    case Attend::dense: return "dense";
    case Attend::dense_bias: return "dense+bias";
    case Attend::infllmv2: return "infllmv2";
    case Attend::nosa: return "nosa";
    case Attend::random_subsets: return "random";
    case Attend::alternating: return "alternating";
  }
  return "?";
}

// A selection made here, per (token, KV head): ascending blocks <= the token's block, -1 padded.
// random_subsets: each block with probability 1/2 (so a token may select none, or not its own
// block); alternating: the blocks of the token's parity, so neighbours in a tile never agree.
Tensor made_selection(const runtime::StepBatch& step, int H, int block_size, int k_max,
                      Attend how, uint64_t seed) {
  const int64_t T = step.n_tokens();
  Tensor sel = Tensor::empty_host(DType::i32, {T, H, k_max});
  int32_t* d = sel.data<int32_t>();
  std::fill(d, d + sel.numel(), -1);
  std::mt19937_64 rng(seed);
  for (int64_t t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h) {
      const int qb = step.positions[t] / block_size;
      int n = 0;
      for (int b = 0; b <= qb && n < k_max; ++b) {
        const bool take = how == Attend::alternating ? (b % 2) == (t % 2) : (rng() & 1) != 0;
        if (take) d[(t * H + h) * k_max + n++] = b;
      }
    }
  return sel;
}

// Case c's prefill under `how` on both backends, compared; returns the GPU's output as raw bf16
// bits (the same seed gives the same inputs). label: added to the failure messages.
std::vector<uint16_t> run_prefill(const PrefillCase& c, Attend how, uint64_t seed,
                                  const std::string& label = "") {
  Backends b;
  const int H = 2;
  // Four compressed keys per block (kernel stride block_size / 4), for the CPU's selections.
  KvLayout L{2, H, c.d, c.block_size, 4, DType::f32};
  AttentionRig r(b, L, c.group, c.seqs, pool_blocks(c), seed);
  const StepFixture& f = r.f;
  Twin &q = r.q, &out = r.out;
  TwinCache& cache = r.cache;
  const std::string what = std::string("prefill ") + c.name + " " + attend_name(how) + label;
  if (how == Attend::dense || how == Attend::dense_bias) {
    const bool bias = how == Attend::dense_bias;
    b.cpu->attend(1, q.cpu, 0, nullptr, bias, *cache.cpu, out.cpu);
    b.gpu->attend(1, q.gpu, 0, nullptr, bias, *cache.gpu, out.gpu);
  } else {
    Selection sc;
    if (how == Attend::infllmv2 || how == Attend::nosa) {
      // Small windows and top-k, so that the selections are sparse at these lengths.
      attention::SparseParams p;
      p.block_size = c.block_size;
      p.kernel_stride = c.block_size / 4;
      p.kernel_size = 2 * p.kernel_stride;
      p.init_blocks = 1;
      p.window_size = c.block_size;
      p.select_blocks = 1;
      p.topk = 4;
      p.validate();
      sc = b.cpu->select_blocks(1, how == Attend::nosa ? attention::Mode::nosa
                                                       : attention::Mode::infllmv2,
                                q.cpu, p, *cache.cpu);
    } else {
      int32_t last_pos = 0;
      for (int32_t pos : f.step.positions) last_pos = std::max(last_pos, pos);
      sc.k_max = last_pos / c.block_size + 1;
      sc.blocks = b.cpu->upload(
          made_selection(f.step, H, c.block_size, sc.k_max, how, seed + 3), DType::i32);
    }
    Selection sg = selection_on_gpu(b, sc);
    const bool bias = how != Attend::infllmv2;
    b.cpu->attend(1, q.cpu, 0, &sc, bias, *cache.cpu, out.cpu);
    b.gpu->attend(1, q.gpu, 0, &sg, bias, *cache.gpu, out.gpu);
  }
  expect_close(b, out.cpu, out.gpu, k_tol, what);
  const Tensor h = b.gpu->to_host(out.gpu);
  const uint16_t* bits = h.data<uint16_t>();
  return std::vector<uint16_t>(bits, bits + h.bytes() / sizeof(uint16_t));
}

TEST(CudaPrefill, DenseAttentionMatchesCpuWithAndWithoutTheBias) {
  NOSA_REQUIRE_GPU();
  uint64_t seed = 1000;
  for (const PrefillCase& c : prefill_cases())
    for (Attend how : {Attend::dense, Attend::dense_bias}) run_prefill(c, how, seed += 10);
}

TEST(CudaPrefill, SelectedAttentionMatchesCpuForInfllmv2AndNosa) {
  NOSA_REQUIRE_GPU();
  uint64_t seed = 2000;
  for (const PrefillCase& c : prefill_cases())
    for (Attend how : {Attend::infllmv2, Attend::nosa}) run_prefill(c, how, seed += 10);
}

TEST(CudaPrefill, TokensOfOneTileSelectingDifferentBlocksMatchCpu) {
  NOSA_REQUIRE_GPU();
  uint64_t seed = 3000;
  for (const PrefillCase& c : prefill_cases())
    for (Attend how : {Attend::random_subsets, Attend::alternating})
      run_prefill(c, how, seed += 10);
}

// The mma.sync kernel (the one for head_dim 64, blocks under 64 keys and GPUs before Hopper;
// the others above take the wgmma kernel where it runs): the launcher takes four K/V slots at
// these lengths, three or two only for block lists of hundreds of blocks: each count forced in
// turn, with and without the bias, under every kind of selection.
TEST(CudaPrefill, EveryKvSlotCountMatchesCpu) {
  NOSA_REQUIRE_GPU();
  struct Restore {
    ~Restore() {
      attention::cuda::force_prefill_slots(0);
      attention::cuda::force_prefill_wgmma(-1);
    }
  } restore;
  attention::cuda::force_prefill_wgmma(0);
  uint64_t seed = 900;
  for (int slots : {2, 3, 4}) {
    attention::cuda::force_prefill_slots(slots);
    for (const PrefillCase& c : prefill_cases())
      for (Attend how : {Attend::dense, Attend::dense_bias, Attend::infllmv2, Attend::nosa,
                         Attend::random_subsets})
        run_prefill(c, how, seed++);
  }
}

// A long prompt chunk: hundreds of 64-key stages per tile, most of them seen whole by every row
// (the unmasked path) and the last ones masked by causality.
TEST(CudaPrefill, LongPromptChunkMatchesCpu) {
  NOSA_REQUIRE_GPU();
  const PrefillCase c{"g8-d128-long", 128, 8, 64, {{3000, 64}}};
  run_prefill(c, Attend::dense, 4000);
  run_prefill(c, Attend::random_subsets, 4010);
}

// The wgmma kernel (attention/cuda/prefill_wgmma.cu: sm_90 GPUs, in a build with sm_90a code),
// each of its variants (one or two thread blocks per SM, pipelined), under every kind of
// selection, with and without the bias, and a long prompt chunk; the cases it does not take
// (head_dim 64, blocks under 64 keys, decode tokens) run the mma.sync kernel. Each variant is
// compared with the CPU, must really launch, and must give variant 1's output bit for bit (the
// same products and softmax in the same order: only the waits differ), which a wrong row among
// thousands would not pass.
TEST(CudaPrefill, ThroughTheWgmmaKernelMatchesCpu) {
  NOSA_REQUIRE_GPU();
  if (!attention::cuda::prefill_wgmma_available())
    GTEST_SKIP() << "the wgmma kernel needs an sm_90 GPU and a build with sm_90a code";
  struct Restore {
    ~Restore() { attention::cuda::force_prefill_wgmma(-1); }
  } restore;
  std::vector<PrefillCase> cases = prefill_cases();
  cases.push_back({"g16-d128-long", 128, 16, 64, {{3000, 64}, {0, 700}}});
  uint64_t seed = 5000;
  for (const PrefillCase& c : cases)
    for (Attend how : {Attend::dense, Attend::dense_bias, Attend::infllmv2, Attend::nosa,
                       Attend::random_subsets, Attend::alternating}) {
      std::vector<uint16_t> first;
      for (int variant : {1, 2, 3}) {
        attention::cuda::force_prefill_wgmma(variant);
        const int64_t launches = attention::cuda::prefill_wgmma_launches();
        const std::string label = ", wgmma variant " + std::to_string(variant);
        std::vector<uint16_t> out = run_prefill(c, how, seed, label);
        const bool takes = c.d == 128 && c.block_size % 64 == 0;
        if (takes) {
          EXPECT_GT(attention::cuda::prefill_wgmma_launches(), launches)
              << c.name << " " << attend_name(how) << label;
        }
        if (variant == 1) {
          first = std::move(out);
        } else {
          EXPECT_TRUE(out == first) << c.name << " " << attend_name(how) << label
                                    << ": not variant 1's output bit for bit";
        }
      }
      ++seed;
    }
}

}  // namespace
}  // namespace nosa::test
