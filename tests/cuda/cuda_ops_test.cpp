// Every op of the CUDA backend against the CPU reference backend on random inputs: the same
// selected blocks, relative error under 1e-2 for bf16 results, every output written (GPU
// outputs start as NaN), no NaN. Skipped where no GPU exists.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>

#include "attention/reference/selection.h"
#include "memory/host_store.h"
#include "runtime/core/error.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"
#include "runtime/sampling.h"
#include "tests/cuda/cuda_test_util.h"

namespace nosa::test {
namespace {

using runtime::KvLayout;
using runtime::Selection;

constexpr double k_tol = 1e-2;

// ---- dense ops ---------------------------------------------------------------------------------

TEST(CudaOps, EmbeddingMatchesCpu) {
  NOSA_REQUIRE_GPU();
  Backends b;
  StepFixture f({{0, 37}, {5, 1}}, 16, 16, 1, 300);
  Twin table = twin(b, host_uniform({300, 256}, 2, -1, 1));
  Twin out = outputs(b, {f.step.n_tokens(), 256});
  b.cpu->begin_step(f.step);
  b.gpu->begin_step(f.step);
  b.cpu->embedding(table.cpu, out.cpu);
  b.gpu->embedding(table.gpu, out.gpu);
  Comparison c = compare(b, out.cpu, out.gpu);
  EXPECT_EQ(c.non_finite, 0);
  EXPECT_EQ(c.rel_error, 0.0);
}

TEST(CudaOps, RmsNormMatchesCpu) {
  NOSA_REQUIRE_GPU();
  Backends b;
  for (int n : {256, 300, 2048, 4096, 8192}) {  // 300: the path without 16-byte accesses
    Twin x = twin(b, host_uniform({19, n}, 3, -3, 3));
    Twin w = twin(b, host_uniform({n}, 4, 0.5, 1.5));
    Twin out = outputs(b, {19, n});
    b.cpu->rmsnorm(x.cpu, w.cpu, 1e-5f, out.cpu);
    b.gpu->rmsnorm(x.gpu, w.gpu, 1e-5f, out.gpu);
    expect_close(b, out.cpu, out.gpu, k_tol, "rmsnorm n=" + std::to_string(n));
  }
}

TEST(CudaOps, AddRmsNormMatchesCpuAndStoresTheSum) {
  NOSA_REQUIRE_GPU();
  Backends b;
  for (int n : {256, 300, 4096}) {
    Twin x = twin(b, host_uniform({23, n}, 11, -3, 3));
    Twin y = twin(b, host_uniform({23, n}, 12, -3, 3));
    Twin w = twin(b, host_uniform({n}, 13, 0.5, 1.5));
    Twin out = outputs(b, {23, n});
    b.cpu->add_rmsnorm(x.cpu, y.cpu, w.cpu, 1e-5f, out.cpu);
    b.gpu->add_rmsnorm(x.gpu, y.gpu, w.gpu, 1e-5f, out.gpu);
    expect_close(b, x.cpu, x.gpu, k_tol, "add_rmsnorm sum n=" + std::to_string(n));
    expect_close(b, out.cpu, out.gpu, k_tol, "add_rmsnorm out n=" + std::to_string(n));
  }
}

TEST(CudaOps, LinearMatchesCpuWithBf16AndF32Outputs) {
  NOSA_REQUIRE_GPU();
  Backends b;
  for (int rows : {1, 37, 300}) {
    Twin x = twin(b, host_uniform({rows, 320}, 5, -1, 1));
    Twin w = twin(b, host_uniform({200, 320}, 6, -0.1f, 0.1f));
    Twin bias = twin(b, host_uniform({200}, 7, -1, 1));
    Twin out = outputs(b, {rows, 200});
    b.cpu->linear(x.cpu, w.cpu, &bias.cpu, out.cpu);
    b.gpu->linear(x.gpu, w.gpu, &bias.gpu, out.gpu);
    expect_close(b, out.cpu, out.gpu, k_tol, "linear+bias bf16 rows=" + std::to_string(rows));
    Twin out32 = outputs(b, {rows, 200}, DType::f32);
    b.cpu->linear(x.cpu, w.cpu, nullptr, out32.cpu);
    b.gpu->linear(x.gpu, w.gpu, nullptr, out32.gpu);
    expect_close(b, out32.cpu, out32.gpu, 1e-3, "linear f32 rows=" + std::to_string(rows));
  }
}

TEST(CudaOps, AddAndSiluMulMatchCpu) {
  NOSA_REQUIRE_GPU();
  Backends b;
  Twin x = twin(b, host_uniform({33, 301}, 8, -2, 2));
  Twin y = twin(b, host_uniform({33, 301}, 9, -2, 2));
  b.cpu->add(x.cpu, y.cpu);
  b.gpu->add(x.gpu, y.gpu);
  expect_close(b, x.cpu, x.gpu, k_tol, "add");
  Twin gu = twin(b, host_uniform({33, 2 * 384}, 10, -4, 4));
  Twin out = outputs(b, {33, 384});
  b.cpu->silu_mul(gu.cpu, out.cpu);
  b.gpu->silu_mul(gu.gpu, out.gpu);
  expect_close(b, out.cpu, out.gpu, k_tol, "silu_mul");
}

TEST(CudaOps, SplitQkvRopeMatchesCpuAtLongPositions) {
  NOSA_REQUIRE_GPU();
  Backends b;
  const int d = 128, hq = 16, hk = 2, hv = 2;
  StepFixture f({{16000, 3}, {0, 20}, {70000, 1}}, 64, 2000, 11);
  const int64_t T = f.step.n_tokens();
  runtime::RopeTable rope;
  for (int i = 0; i < d / 2; ++i) rope.inv_freq.push_back(float(1.0 / std::pow(10000.0, 2.0 * i / d)));
  b.gpu->prepare_rope(rope);
  Twin qkv = twin(b, host_uniform({T, (hq + hk + hv) * d}, 12, -1, 1));
  Twin q = outputs(b, {T, hq, d}), k = outputs(b, {T, hk, d}), v = outputs(b, {T, hv, d});
  b.cpu->begin_step(f.step);
  b.gpu->begin_step(f.step);
  b.cpu->split_qkv_rope(qkv.cpu, rope, q.cpu, k.cpu, v.cpu);
  b.gpu->split_qkv_rope(qkv.gpu, rope, q.gpu, k.gpu, v.gpu);
  expect_close(b, q.cpu, q.gpu, k_tol, "rope q");
  expect_close(b, k.cpu, k.gpu, k_tol, "rope k");
  expect_close(b, v.cpu, v.gpu, 1e-6, "split v");
}

TEST(CudaOps, GatherLogitRowsMatchesCpu) {
  NOSA_REQUIRE_GPU();
  Backends b;
  StepFixture f({{0, 10}, {3, 1}, {0, 7}}, 16, 16, 13);
  const int64_t T = f.step.n_tokens(), n = int64_t(f.step.logit_rows.size());
  Twin x = twin(b, host_uniform({T, 64}, 14, -1, 1));
  Twin out = outputs(b, {n, 64});
  b.cpu->begin_step(f.step);
  b.gpu->begin_step(f.step);
  b.cpu->gather_logit_rows(x.cpu, out.cpu);
  b.gpu->gather_logit_rows(x.gpu, out.gpu);
  EXPECT_EQ(compare(b, out.cpu, out.gpu).rel_error, 0.0);
}

TEST(CudaOps, FillUniformAgreesWithTheCpuDefault) {
  NOSA_REQUIRE_GPU();
  Backends b;
  Tensor c = b.cpu->alloc(DType::f32, {1000});
  Tensor g = b.gpu->alloc(DType::f32, {1000});
  b.cpu->fill_uniform(c, 42, -2.0f, 3.0f);
  b.gpu->fill_uniform(g, 42, -2.0f, 3.0f);
  expect_close(b, c, g, 1e-6, "fill_uniform");
}

// ---- NOSA: eviction scores, KV writes, compressed keys ------------------------------------------

TEST(CudaOps, EvictionScoresMatchCpu) {
  NOSA_REQUIRE_GPU();
  Backends b;
  const int n_kv = 2, d = 128, T = 50;
  Twin v = twin(b, host_uniform({T, n_kv, d}, 15, -1, 1));
  Twin a = twin(b, host_uniform({n_kv}, 16, 0.5, 2), DType::f32);
  Twin w = twin(b, host_uniform({n_kv, n_kv * d}, 17, -0.2f, 0.2f), DType::f32);
  Twin bias = twin(b, host_uniform({n_kv}, 18, -1, 1), DType::f32);
  for (auto [h0, h1] : {std::pair{0, 2}, std::pair{1, 2}}) {
    Twin c = outputs(b, {T, h1 - h0}, DType::f32);
    b.cpu->eviction_scores(v.cpu, a.cpu, w.cpu, &bias.cpu, h0, h1, c.cpu);
    b.gpu->eviction_scores(v.gpu, a.gpu, w.gpu, &bias.gpu, h0, h1, c.gpu);
    expect_close(b, c.cpu, c.gpu, 1e-5, "eviction scores heads " + std::to_string(h0));
  }
}

struct Shape4 {
  int d, block_size, kernel_size, kernel_stride;
};

TEST(CudaOps, AppendKvAndCompressedKeysMatchCpu) {
  NOSA_REQUIRE_GPU();
  Backends b;
  for (Shape4 s : {Shape4{128, 64, 32, 16}, Shape4{64, 16, 8, 4}}) {
    attention::SparseParams p;
    p.block_size = s.block_size;
    p.kernel_size = s.kernel_size;
    p.kernel_stride = s.kernel_stride;
    KvLayout L{2, 2, s.d, s.block_size, s.block_size / s.kernel_stride, DType::f32};
    const int64_t n_blocks = 80;
    TwinCache cache(b, L, n_blocks);
    // A fresh prompt, a chunk in the middle of a prompt and two decode tokens, one of them
    // completing a window.
    StepFixture f({{0, 150}, {100, 77}, {47, 1}, {s.kernel_size + s.kernel_stride - 1, 1}},
                  s.block_size, n_blocks, 19);
    const int64_t T = f.step.n_tokens();
    const int H = 2, hv = 3;
    Twin k = twin(b, host_uniform({T, H, s.d}, 20, -1, 1));
    Twin v = twin(b, host_uniform({T, hv, s.d}, 21, -1, 1));
    Twin c = twin(b, host_uniform({T, H}, 22, 0, 2), DType::f32);
    b.cpu->begin_step(f.step);
    b.gpu->begin_step(f.step);
    for (int layer = 0; layer < 2; ++layer) {
      b.cpu->append_kv(layer, k.cpu, v.cpu, 1, &c.cpu, *cache.cpu);
      b.gpu->append_kv(layer, k.gpu, v.gpu, 1, &c.gpu, *cache.gpu);
      b.cpu->update_compressed(layer, layer == 1, p, *cache.cpu);
      b.gpu->update_compressed(layer, layer == 1, p, *cache.gpu);
    }
    const std::string tag = " (d=" + std::to_string(s.d) + ")";
    EXPECT_EQ(compare(b, cache.cpu->kv(), cache.gpu->kv()).rel_error, 0.0) << "kv" << tag;
    EXPECT_EQ(compare(b, cache.cpu->bias(), cache.gpu->bias()).rel_error, 0.0) << "bias" << tag;
    expect_close(b, cache.cpu->ck(), cache.gpu->ck(), k_tol, "compressed keys" + tag);
    expect_close(b, cache.cpu->ck_scores(), cache.gpu->ck_scores(), 1e-6, "window scores" + tag);
  }
}

// ---- selection --------------------------------------------------------------------------------

struct SelectCase {
  const char* name;
  int d, group, block_size, kernel_size, kernel_stride, window, topk, select;
  std::vector<std::pair<int64_t, int64_t>> seqs;
};

std::vector<SelectCase> select_cases() {
  return {
      {"nosa-1b-like", 128, 8, 64, 32, 16, 1024, 64, 16,
       {{5000, 1}, {9000, 1}, {16000, 1}, {4100, 1}, {6000, 48}, {4000, 200}}},
      {"nosa-8b-like", 128, 16, 64, 32, 16, 1024, 64, 16, {{12000, 1}, {7000, 1}, {4500, 70}}},
      {"tiny", 64, 2, 16, 8, 4, 64, 16, 4, {{300, 1}, {1000, 1}, {200, 150}, {0, 400}}},
  };
}

// The selection cases, and decode at long contexts: more than 512 blocks (several per thread of
// the split path's top-k), many key chunks, a token that selects every block.
std::vector<SelectCase> selection_only_cases() {
  std::vector<SelectCase> cases = select_cases();
  cases.push_back({"8b-long-decode", 128, 16, 64, 32, 16, 1024, 64, 16,
                   {{40000, 1}, {30, 1}, {5000, 1}, {12345, 1}}});
  // Small decode batches (fewer (token, KV head) pairs than split_finish needs at these
  // lengths): the split path's four kernels.
  cases.push_back({"8b-decode-batch", 128, 16, 64, 32, 16, 1024, 64, 16,
                   {{16000, 1}, {9000, 1}, {3000, 1}, {12000, 1}}});
  cases.push_back({"1b-decode-batch", 128, 8, 64, 32, 16, 1024, 64, 16,
                   {{30000, 1}, {16000, 1}, {5000, 1}}});
  // Enough (token, KV head) pairs for the one-kernel finish (split_finish) at long contexts, with
  // tokens of different lengths in one launch.
  cases.push_back({"8b-decode-wide", 128, 16, 64, 32, 16, 1024, 64, 16,
                   {{12000, 1}, {9000, 1}, {6000, 40}}});
  // Groups that split_logits' four head lanes do not divide (12: three heads a thread; 3 at
  // head_dim 64: one lane without heads).
  cases.push_back({"g12-decode", 128, 12, 64, 32, 16, 1024, 64, 16,
                   {{9000, 1}, {5000, 1}, {3000, 20}}});
  cases.push_back({"g3-d64-decode", 64, 3, 64, 32, 16, 1024, 64, 16, {{6000, 1}, {2000, 1}}});
  // Groups above 16 through split_finish (64 x n_max logits within its one-block limit; 84
  // (token, KV head) pairs, enough for it), and through the four kernels (6 pairs).
  cases.push_back({"g64-finish", 128, 64, 64, 32, 16, 1024, 64, 16,
                   {{4000, 1}, {3000, 1}, {2500, 40}}});
  cases.push_back({"g64-few-pairs", 128, 64, 64, 32, 16, 1024, 64, 16,
                   {{4000, 1}, {3000, 1}, {2500, 1}}});
  return cases;
}

int64_t pool_blocks(const SelectCase& c) {
  int64_t n = 0;
  for (auto [past, fresh] : c.seqs) n += (past + fresh + c.block_size - 1) / c.block_size;
  return n + 4;
}

void run_select(const SelectCase& c, attention::Mode mode, bool ties, uint64_t seed) {
  Backends b;
  const attention::SparseParams p = case_params(c);
  const int H = 2;
  KvLayout L{2, H, c.d, c.block_size, c.block_size / c.kernel_stride, DType::f32};
  const int64_t n_blocks = pool_blocks(c);
  TwinCache cache(b, L, n_blocks);
  cache.fill_random(b, seed, 0.0f, 2.0f);
  if (ties) {
    // Compressed keys from {-1, 0, 1} and window scores from {0, 1}: many exact ties, which
    // must break toward the lower block on both backends.
    Tensor ck = b.cpu->to_host(cache.cpu->ck());
    for (int64_t i = 0; i < ck.numel(); ++i) ck.data<float>()[i] = std::round(ck.data<float>()[i]);
    Tensor cks = b.cpu->to_host(cache.cpu->ck_scores());
    for (int64_t i = 0; i < cks.numel(); ++i)
      cks.data<float>()[i] = std::floor(cks.data<float>()[i]);
    cache.cpu->ck() = b.cpu->upload(ck, DType::f32);
    cache.gpu->ck() = b.gpu->upload(ck, DType::bf16);
    cache.cpu->ck_scores() = b.cpu->upload(cks, DType::f32);
    cache.gpu->ck_scores() = b.gpu->upload(cks, DType::f32);
  }
  StepFixture f(c.seqs, c.block_size, n_blocks, seed + 7);
  const int64_t T = f.step.n_tokens();
  Twin q = twin(b, host_uniform({T, H * c.group, c.d}, seed + 8, -3, 3));
  b.cpu->begin_step(f.step);
  b.gpu->begin_step(f.step);
  Selection sc = b.cpu->select_blocks(1, mode, q.cpu, p, *cache.cpu);
  // Every GPU path (attention/cuda/select.cuh): the per-token kernel, the split kernels and the
  // tiled one: screened (the default) and exact, each with its top-k apart (the default) and
  // inside (prefill's, here on decode steps; a group it does not take falls back).
  for (const char* path :
       {"per-token", "split", "tiled", "tiled-inline", "tiled-exact", "tiled-exact-inline"}) {
    runtime::force_cuda_select_path(path);
    Selection sg = b.gpu->select_blocks(1, mode, q.gpu, p, *cache.gpu);
    runtime::force_cuda_select_path("");
    const auto [bad, rows] = selection_mismatches(b, sc, sg);
    std::printf("[ select   ] %-14s %-8s %-7s %-21s %lld of %lld (token, head) selections "
                "differ\n",
                c.name, attention::mode_name(mode), ties ? "ties" : "generic", path,
                (long long)bad, (long long)rows);
    EXPECT_EQ(bad, 0) << c.name << " " << attention::mode_name(mode) << " " << path;
  }
}

TEST(CudaOps, SelectionIsTheCpuSelectionBlockForBlock) {
  NOSA_REQUIRE_GPU();
  uint64_t seed = 100;
  for (const SelectCase& c : selection_only_cases())
    for (attention::Mode mode : {attention::Mode::infllmv2, attention::Mode::nosa})
      run_select(c, mode, false, seed++);
}

TEST(CudaOps, SelectionBreaksExactTiesTowardTheLowerBlock) {
  NOSA_REQUIRE_GPU();
  uint64_t seed = 200;
  for (const SelectCase& c : selection_only_cases())
    for (attention::Mode mode : {attention::Mode::infllmv2, attention::Mode::nosa})
      run_select(c, mode, true, seed++);
}

// ---- attention --------------------------------------------------------------------------------

void run_attend(const SelectCase& c, attention::Mode mode, uint64_t seed) {
  Backends b;
  const attention::SparseParams p = case_params(c);
  KvLayout L{2, 2, c.d, c.block_size, c.block_size / c.kernel_stride, DType::f32};
  AttentionRig r(b, L, c.group, c.seqs, pool_blocks(c), seed);
  const bool nosa = mode == attention::Mode::nosa;
  if (mode == attention::Mode::dense) {
    b.cpu->attend(1, r.q.cpu, 0, nullptr, false, *r.cache.cpu, r.out.cpu);
    b.gpu->attend(1, r.q.gpu, 0, nullptr, false, *r.cache.gpu, r.out.gpu);
  } else {
    // The CPU's selection on both, so that the attention itself is compared.
    Selection sc = b.cpu->select_blocks(1, mode, r.q.cpu, p, *r.cache.cpu);
    Selection sg = selection_on_gpu(b, sc);
    b.cpu->attend(1, r.q.cpu, 0, &sc, nosa, *r.cache.cpu, r.out.cpu);
    b.gpu->attend(1, r.q.gpu, 0, &sg, nosa, *r.cache.gpu, r.out.gpu);
  }
  expect_close(b, r.out.cpu, r.out.gpu, k_tol,
               std::string("attend ") + c.name + " " + attention::mode_name(mode));
}

TEST(CudaOps, AttentionMatchesCpuForEveryModeDecodeAndPrefill) {
  NOSA_REQUIRE_GPU();
  uint64_t seed = 300;
  for (const SelectCase& c : select_cases())
    for (attention::Mode mode :
         {attention::Mode::dense, attention::Mode::infllmv2, attention::Mode::nosa})
      run_attend(c, mode, seed += 10);
}

TEST(CudaOps, AttentionOfASliceOfTheGroupsHeads) {
  NOSA_REQUIRE_GPU();
  Backends b;
  const int H = 2, group = 8, d = 128, hq = H * group;
  KvLayout L{1, H, d, 64, 4, DType::f32};
  TwinCache cache(b, L, 40);
  cache.fill_random(b, 400);
  StepFixture f({{700, 1}, {100, 33}}, 64, 40, 401);
  const int64_t T = f.step.n_tokens();
  Twin q = twin(b, host_uniform({T, hq, d}, 402, -2, 2));
  b.cpu->begin_step(f.step);
  b.gpu->begin_step(f.step);
  Twin out = outputs(b, {T, 5, d});
  b.cpu->attend(0, q.cpu, 6, nullptr, false, *cache.cpu, out.cpu);
  b.gpu->attend(0, q.gpu, 6, nullptr, false, *cache.gpu, out.gpu);
  expect_close(b, out.cpu, out.gpu, k_tol, "attend heads 6..10");
}

// ---- sampling ---------------------------------------------------------------------------------

// The zero-copy transfer kernel of offloaded caches: host -> slot copies the keys, values and
// eviction scores byte for byte and updates the slot table (the new chunk in, the evicted one
// out; a chunk never written changes only the table); slot -> host copies them back. Chunks of
// 4 KiB (one 16-byte word per copying thread) and of 32 KiB (eight: all a thread has in flight).
class ChunkTransfer : public ::testing::TestWithParam<KvLayout> {};

TEST_P(ChunkTransfer, MovesBytesBothWaysAndKeepsTheSlotTable) {
  NOSA_REQUIRE_GPU();
  Backends b;
  const KvLayout L = GetParam();
  runtime::KvCacheOptions o;
  o.offload = memory::Offload::host;
  o.device_slots = 12;
  runtime::KvCache cache(L, 8, *b.gpu, o);
  const int64_t n_chunks = 8 * L.chunks_per_block();
  const size_t kv_bytes = L.kv_chunk_bytes(), bias_bytes = L.bias_chunk_bytes();
  const size_t chunk_bytes = kv_bytes + bias_bytes;
  auto pinned = b.gpu->host_allocator();
  char* src = static_cast<char*>(pinned->allocate(size_t(n_chunks) * chunk_bytes));
  char* back = static_cast<char*>(pinned->allocate(size_t(n_chunks) * chunk_bytes));
  // Finite bf16 keys and values, finite float scores: every chunk distinct.
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  for (int64_t c = 0; c < n_chunks; ++c) {
    uint16_t* kv = reinterpret_cast<uint16_t*>(src + c * chunk_bytes);
    for (size_t i = 0; i < kv_bytes / 2; ++i) kv[i] = f32_to_bf16(u(rng));
    float* sc = reinterpret_cast<float*>(src + c * chunk_bytes + kv_bytes);
    for (size_t i = 0; i < bias_bytes / 4; ++i) sc[i] = u(rng);
  }
  std::memset(back, 0, size_t(n_chunks) * chunk_bytes);
  auto host_of = [&](char* base, int64_t c) {
    return static_cast<char*>(pinned->device_address(base + c * chunk_bytes));
  };
  // Round 1: five chunks in, one of them never written (null host). Round 2: chunk 7 takes the
  // slot of chunk 3 (evicted), chunk 30 a fresh slot.
  std::vector<memory::ChunkCopy> r1 = {{3, 0, -1, host_of(src, 3)},
                                       {12, 9, -1, host_of(src, 12)},
                                       {20, 11, -1, host_of(src, 20)},
                                       {31, 2, -1, host_of(src, 31)},
                                       {25, 6, -1, nullptr}};
  std::vector<memory::ChunkCopy> r2 = {{7, 0, 3, host_of(src, 7)}, {30, 4, -1, host_of(src, 30)}};
  b.gpu->copy_chunks(r1, true, cache);
  b.gpu->copy_chunks(r2, true, cache);
  b.gpu->synchronize();
  std::map<int64_t, int32_t> want_slot = {{12, 9}, {20, 11}, {31, 2}, {25, 6}, {7, 0}, {30, 4}};
  Tensor table = b.gpu->to_host(cache.slot_table());
  for (int64_t c = 0; c < n_chunks; ++c) {
    const auto it = want_slot.find(c);
    EXPECT_EQ(table.data<int32_t>()[c], it == want_slot.end() ? -1 : it->second) << "chunk " << c;
  }
  Tensor kv = b.gpu->to_host(cache.kv());      // float32 copies of the bf16 slots
  Tensor bias = b.gpu->to_host(cache.bias());
  const int64_t kv_elems = int64_t(kv_bytes / 2), bias_elems = int64_t(bias_bytes / 4);
  for (const auto& [c, slot] : want_slot) {
    if (c == 25) continue;  // never written: its slot's bytes are whatever they were
    const uint16_t* want = reinterpret_cast<const uint16_t*>(src + c * chunk_bytes);
    const float* got = kv.data<float>() + slot * kv_elems;
    int bad = 0;
    for (int64_t i = 0; i < kv_elems; ++i) bad += bf16_to_f32(want[i]) != got[i];
    const float* want_sc = reinterpret_cast<const float*>(src + c * chunk_bytes + kv_bytes);
    for (int64_t i = 0; i < bias_elems; ++i) bad += want_sc[i] != bias.data<float>()[slot * bias_elems + i];
    EXPECT_EQ(bad, 0) << "chunk " << c << " in slot " << slot;
  }
  // Slot -> host: every resident chunk into the second buffer, byte for byte.
  std::vector<memory::ChunkCopy> out;
  for (const auto& [c, slot] : want_slot)
    if (c != 25) out.push_back({c, slot, -1, host_of(back, c)});
  b.gpu->copy_chunks(out, false, cache);
  b.gpu->synchronize();
  for (const auto& cp : out)
    EXPECT_EQ(std::memcmp(back + cp.chunk * chunk_bytes, src + cp.chunk * chunk_bytes, chunk_bytes), 0)
        << "chunk " << cp.chunk << " back to the host";
  pinned->release(src, size_t(n_chunks) * chunk_bytes);
  pinned->release(back, size_t(n_chunks) * chunk_bytes);
}

// layers, KV heads, head_dim, block, keys per block
INSTANTIATE_TEST_SUITE_P(CudaOps, ChunkTransfer,
                         ::testing::Values(KvLayout{2, 2, 64, 16, 1, DType::bf16},
                                           KvLayout{2, 2, 128, 64, 4, DType::bf16}),
                         [](const ::testing::TestParamInfo<KvLayout>& info) {
                           return "chunk_" + std::to_string(info.param.kv_chunk_bytes());
                         });

TEST(CudaOps, SamplingPicksTheCpuTokens) {
  NOSA_REQUIRE_GPU();
  Backends b;
  const int rows = 16;
  for (int vocab : {100, 5000, 73448}) {
    Tensor host = host_uniform({rows, vocab}, 500 + vocab, -4, 4);
    // Make two rows' maxima ties: greedy must pick the lower id.
    host.data<float>()[3] = 9.0f;
    host.data<float>()[7] = 9.0f;
    Tensor lc = b.cpu->upload(host, DType::f32), lg = b.gpu->upload(host, DType::f32);
    struct Cfg {
      float t, top_p;
      int top_k, logprobs;
    };
    int mismatches = 0, total = 0;
    for (Cfg cfg : {Cfg{0, 1, 0, 5}, Cfg{0.8f, 1, 0, 0}, Cfg{1.0f, 1, 50, 3}, Cfg{1.2f, 0.9f, 0, 0},
                    Cfg{0.7f, 0.5f, 200, 20}, Cfg{2.0f, 0.95f, 1, 1}}) {
      std::vector<runtime::SamplingParams> params(rows);
      for (int r = 0; r < rows; ++r) {
        params[r].temperature = cfg.t;
        params[r].top_p = cfg.top_p;
        params[r].top_k = cfg.top_k;
        params[r].logprobs = cfg.logprobs;
        params[r].seed = 1234 + r;
        params[r].step = r * 3;
      }
      auto sc = b.cpu->sample(lc, params);
      auto sg = b.gpu->sample(lg, params);
      ASSERT_EQ(sc.size(), sg.size());
      for (int r = 0; r < rows; ++r) {
        ++total;
        if (cfg.t == 0) {
          EXPECT_EQ(sc[r].token, sg[r].token) << "greedy row " << r;
        }
        if (sc[r].token != sg[r].token) {
          ++mismatches;
          continue;
        }
        EXPECT_NEAR(sc[r].logprob, sg[r].logprob, 1e-4);
        ASSERT_EQ(sc[r].top.size(), sg[r].top.size());
        for (size_t i = 0; i < sc[r].top.size(); ++i) {
          EXPECT_EQ(sc[r].top[i].first, sg[r].top[i].first);
          EXPECT_NEAR(sc[r].top[i].second, sg[r].top[i].second, 1e-4);
        }
      }
    }
    std::printf("[ sample   ] vocab %6d: %d of %d sampled tokens differ from the CPU's\n", vocab,
                mismatches, total);
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(CudaOps, SamplingRejectsNaNLogits) {
  NOSA_REQUIRE_GPU();
  Backends b;
  Tensor host = host_uniform({2, 300}, 600, -1, 1);
  host.data<float>()[300 + 17] = NAN;
  Tensor lg = b.gpu->upload(host, DType::f32);
  std::vector<runtime::SamplingParams> params(2);
  EXPECT_THROW(b.gpu->sample(lg, params), Error);
}

}  // namespace
}  // namespace nosa::test
