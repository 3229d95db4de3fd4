// Block selection of prefill steps on the GPU against the CPU reference, block for block: steps
// of more than 1024 tokens, which take the tiled path (attention/cuda/select.cuh), over groups of
// 1 to 32 query heads, head_dim 64 and 128, long prompts (hundreds to thousands of compressed
// keys), tiles that span two sequences and a decode token, the tile sizes whose logits fit in
// shared memory and the one whose logits go to the global scratch, on generic inputs, on inputs
// with exact ties and on inputs with near ties; exact on every tile (the automatic choice) and
// screened. Skipped where no GPU exists.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/model.h"
#include "tests/cuda/cuda_test_util.h"

namespace nosa::test {
namespace {

using runtime::KvLayout;
using runtime::Selection;

struct PrefillCase {
  std::string name;
  int d, group, block_size, kernel_size, kernel_stride, window, topk, select;
  std::vector<std::pair<int64_t, int64_t>> seqs;  // (tokens already cached, prompt tokens)
};

// NOSA's parameters (docs/nosa.md, section 2) and the tiny test model's, scaled by 1/4.
PrefillCase nosa_case(std::string name, int d, int group,
                      std::vector<std::pair<int64_t, int64_t>> seqs) {
  return {std::move(name), d, group, 64, 32, 16, 1024, 64, 16, std::move(seqs)};
}
PrefillCase tiny_case(std::string name, int d, int group,
                      std::vector<std::pair<int64_t, int64_t>> seqs) {
  return {std::move(name), d, group, 16, 8, 4, 64, 16, 4, std::move(seqs)};
}

// extreme: queries about 130 times larger, so that a row's logits spread over more than 708 (the
// exponentials of most keys underflow, exp() takes its slow path, and many probabilities are 0).
enum class Inputs { generic, ties, near_ties, extreme };

const char* inputs_name(Inputs in) {
  return in == Inputs::generic     ? "generic"
         : in == Inputs::ties      ? "ties"
         : in == Inputs::near_ties ? "near-ties"
                                   : "extreme";
}

float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// Replaces the compressed keys and window scores (the same values on both backends).
// ties: every key one of five rows and window scores from {0, 1}, so that many blocks pool the
// same score and the lower block must win. near_ties: keys on a grid of 1/2 with one value in
// eight moved by 2^-8, so that logits, probabilities and pooled scores differ in their last
// bits and any change of arithmetic on either side changes the selection.
void shape_inputs(Backends& b, TwinCache& cache, Inputs in, uint64_t seed) {
  if (in == Inputs::generic || in == Inputs::extreme) return;
  std::mt19937_64 rng(seed);
  Tensor ck = b.cpu->to_host(cache.cpu->ck());
  Tensor cks = b.cpu->to_host(cache.cpu->ck_scores());
  float* k = ck.data<float>();
  float* e = cks.data<float>();
  const int64_t d = ck.dim(2), rows = ck.numel() / d;
  if (in == Inputs::ties) {
    std::vector<float> palette(5 * d);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (float& v : palette) v = bf16_round(u(rng));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pick = (r * 2654435761u >> 7) % 5;
      for (int64_t x = 0; x < d; ++x) k[r * d + x] = palette[pick * d + x];
    }
    for (int64_t i = 0; i < cks.numel(); ++i) e[i] = std::floor(e[i]);
  } else {
    std::uniform_int_distribution<int> nudge(0, 15);
    for (int64_t i = 0; i < ck.numel(); ++i) {
      float v = std::round(k[i] * 2.0f) / 2.0f;
      const int n = nudge(rng);
      if (n == 0) v += 1.0f / 256;
      if (n == 1) v -= 1.0f / 256;
      k[i] = bf16_round(v);
    }
    for (int64_t i = 0; i < cks.numel(); ++i) e[i] = bf16_round(std::round(e[i] * 8.0f) / 8.0f);
  }
  cache.cpu->ck() = b.cpu->upload(ck, DType::f32);
  cache.gpu->ck() = b.gpu->upload(ck, DType::bf16);
  cache.cpu->ck_scores() = b.cpu->upload(cks, DType::f32);
  cache.gpu->ck_scores() = b.gpu->upload(cks, DType::f32);
}

void run_prefill_select(const PrefillCase& c, attention::Mode mode, Inputs in, uint64_t seed) {
  Backends b;
  const attention::SparseParams p = case_params(c);
  const int H = 2;
  KvLayout L{2, H, c.d, c.block_size, c.block_size / c.kernel_stride, DType::f32};
  int64_t n_blocks = 4, T = 0;
  for (auto [past, fresh] : c.seqs) {
    n_blocks += (past + fresh + c.block_size - 1) / c.block_size;
    T += fresh;
  }
  ASSERT_GT(T, 1024) << c.name << ": steps of at most 1024 tokens take the split path";
  TwinCache cache(b, L, n_blocks);
  cache.fill_random(b, seed, 0.0f, 2.0f);
  shape_inputs(b, cache, in, seed + 3);
  StepFixture f(c.seqs, c.block_size, n_blocks, seed + 7);
  const float q_range = in == Inputs::extreme ? 400.0f : 3.0f;
  Twin q = twin(b, host_uniform({T, H * c.group, c.d}, seed + 8, -q_range, q_range));
  b.cpu->begin_step(f.step);
  b.gpu->begin_step(f.step);
  Selection sc = b.cpu->select_blocks(1, mode, q.cpu, p, *cache.cpu);
  // The automatic path (screened where the tile shape allows: the exact kernel redoes the tiles
  // it cannot certify; its top-k in a kernel of its own where the pooled scores fit the
  // scratch), the same with its top-k inside, and both with the exact kernel on every tile.
  for (const char* path : {"", "tiled-inline", "tiled-exact", "tiled-exact-inline"}) {
    runtime::force_cuda_select_path(path);
    runtime::count_cuda_select_screening(true);
    const int64_t screened0 = runtime::cuda_select_screened_tiles();
    const int64_t redone0 = runtime::cuda_select_redone_tiles();
    Selection sg = b.gpu->select_blocks(1, mode, q.gpu, p, *cache.gpu);
    runtime::count_cuda_select_screening(false);
    runtime::force_cuda_select_path("");
    const int64_t screened = runtime::cuda_select_screened_tiles() - screened0;
    const int64_t redone = runtime::cuda_select_redone_tiles() - redone0;
    auto [bad, rows] = selection_mismatches(b, sc, sg);
    std::printf("[ select   ] %-24s %-8s %-9s %-21s %lld of %lld (token, head) selections differ; "
                "%lld of %lld screened tiles redone\n",
                c.name.c_str(), attention::mode_name(mode), inputs_name(in),
                *path ? path : "automatic", (long long)bad, (long long)rows, (long long)redone,
                (long long)screened);
    EXPECT_EQ(bad, 0) << c.name << " " << attention::mode_name(mode) << " " << inputs_name(in)
                      << " " << path;
    EXPECT_LE(redone, screened);
    if (std::string(path).starts_with("tiled-exact")) {
      EXPECT_EQ(screened, 0) << path << " screens nothing";
    }
  }
}

void run_cases(const std::vector<PrefillCase>& cases, std::vector<Inputs> inputs, uint64_t seed) {
  for (const PrefillCase& c : cases)
    for (Inputs in : inputs)
      for (attention::Mode mode : {attention::Mode::nosa, attention::Mode::infllmv2})
        run_prefill_select(c, mode, in, seed++);
}

TEST(CudaSelect, PrefillOfTheModelShapesIsTheCpuSelection) {
  NOSA_REQUIRE_GPU();
  run_cases({nosa_case("nosa-1b-like 3000+3000", 128, 8, {{3000, 3000}}),
             nosa_case("nosa-8b-like 6000+1500", 128, 16, {{6000, 1500}}),
             nosa_case("d128 g1 4000+1200", 128, 1, {{4000, 1200}}),
             nosa_case("d128 g4 two prompts", 128, 4, {{0, 4200}, {5000, 700}, {9000, 1}})},
            {Inputs::generic, Inputs::ties, Inputs::near_ties}, 1000);
}

// Every group size up to 16 (tiles of 32 / group tokens, rows left over where group does not
// divide 32), with prompts of several sequences and a decode token, so that tiles span
// sequences.
TEST(CudaSelect, PrefillOfEveryGroupSizeIsTheCpuSelection) {
  NOSA_REQUIRE_GPU();
  std::vector<PrefillCase> cases;
  for (int g : {1, 2, 3, 5, 6, 7, 8, 9, 12, 16})
    cases.push_back(tiny_case("d64 g" + std::to_string(g), 64, g,
                              {{0, 700}, {900, 411}, {2000, 1}, {30, 3}}));
  run_cases(cases, {Inputs::generic, Inputs::near_ties}, 2000);
}

// Long contexts: tiles of 16 and 8 rows (the logits of 32 rows do not fit in shared memory)
// and, for a group of 32, 32 rows whose logits go to the global scratch.
TEST(CudaSelect, PrefillAtLongContextsIsTheCpuSelection) {
  NOSA_REQUIRE_GPU();
  run_cases({tiny_case("d64 g8 16-row tiles", 64, 8, {{5900, 1100}}),
             tiny_case("d64 g4 8-row tiles", 64, 4, {{12100, 1030}}),
             tiny_case("d64 g32 scratch logits", 64, 32, {{0, 1100}, {6000, 40}})},
            {Inputs::generic, Inputs::ties}, 3000);
}

// The top-k with its keys in registers (up to 256 blocks, all eight lanes' worth) and in shared
// memory past that, with tiles whose tokens straddle the switch; a group of 32 at head_dim 128,
// whose logits go to the global scratch.
TEST(CudaSelect, PrefillAcrossTheTopkPathsIsTheCpuSelection) {
  NOSA_REQUIRE_GPU();
  run_cases({tiny_case("d64 g4 256-block switch", 64, 4, {{3000, 1200}}),
             nosa_case("d128 g8 register lanes", 128, 8, {{14000, 1100}}),
             nosa_case("d128 g32 scratch logits", 128, 32, {{0, 1100}, {24000, 40}})},
            {Inputs::generic, Inputs::ties, Inputs::near_ties}, 4000);
}

// Logits spread past exp()'s fast path (the tiled path's exponentials then come from exp()
// itself) and probabilities that underflow to 0 for most keys (ties at 0, broken by block).
TEST(CudaSelect, PrefillWithLogitsSpreadPast708IsTheCpuSelection) {
  NOSA_REQUIRE_GPU();
  run_cases({nosa_case("nosa-1b-like extreme", 128, 8, {{3000, 1100}}),
             tiny_case("d64 g4 extreme", 64, 4, {{0, 700}, {900, 411}})},
            {Inputs::extreme}, 5000);
}

}  // namespace
}  // namespace nosa::test
