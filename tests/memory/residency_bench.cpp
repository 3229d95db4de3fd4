// The host bookkeeping of one layer's residency (KvTiers::select) at decode shapes: B sequences
// of 257 blocks, 2 KV heads, 64 blocks selected per (sequence, layer, head), a seventh of each
// selection replaced per step (about NOSA's measured overlap). Not a test: run with
//   memory_residency_bench --gtest_also_run_disabled_tests
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <set>

#include "memory/kv_tiers.h"

namespace nosa::memory {
namespace {

double select_us(int B, int layers) {
  const int H = 2, topk = 64, blocks_per_seq = 257;
  TierShape s;
  s.n_layers = layers;
  s.n_kv_heads = H;
  s.kv_chunk_bytes = 4096;
  s.n_blocks = int64_t(B) * blocks_per_seq;
  TierBudget b;
  b.device_slots = int64_t(B) * layers * H * (topk + 2) * 2;
  b.host_blocks = s.n_blocks;
  auto alloc = make_plain_host_allocator();
  KvTiers tiers(s, b, *alloc);
  std::vector<int32_t> all(size_t(s.n_blocks));
  for (int32_t i = 0; i < int32_t(s.n_blocks); ++i) all[size_t(i)] = i;
  tiers.populate(all);
  std::mt19937 rng(1);
  std::vector<std::vector<int32_t>> sel(size_t(B) * layers * H);
  for (auto& v : sel) {
    std::set<int32_t> x;
    while (int(x.size()) < topk) x.insert(int32_t(rng() % blocks_per_seq));
    v.assign(x.begin(), x.end());
  }
  std::vector<ChunkId> wanted;
  std::vector<ChunkCopy> loads;
  double total = 0;
  int calls = 0;
  for (int step = 0; step < 8; ++step) {
    std::vector<ChunkCopy> none;
    tiers.begin_step({}, {}, none);
    for (int layer = 0; layer < layers; ++layer) {
      wanted.clear();
      for (int q = 0; q < B; ++q)
        for (int h = 0; h < H; ++h) {
          auto& v = sel[(size_t(q) * layers + layer) * H + h];
          for (auto& x : v)
            if (rng() % 7 == 0) x = int32_t(rng() % blocks_per_seq);
          for (int32_t x : v) wanted.push_back(s.chunk(int64_t(q) * blocks_per_seq + x, layer, h));
        }
      const auto t0 = std::chrono::steady_clock::now();
      loads.clear();
      tiers.select(wanted.data(), int64_t(wanted.size()), loads);
      const auto t1 = std::chrono::steady_clock::now();
      if (step >= 2) {
        total += std::chrono::duration<double, std::micro>(t1 - t0).count();
        ++calls;
      }
    }
    tiers.end_step({}, none);
  }
  const TierStats st = tiers.stats();
  std::printf("B=%d, %d layers: %.1f us per layer (%zu selected chunks, miss rate %.3f)\n", B,
              layers, total / calls, wanted.size(), double(st.misses) / double(st.selected));
  return total / calls;
}

TEST(ResidencyBench, DISABLED_SelectHostTime) {
  EXPECT_GT(select_us(16, 28), 0);  // nosa-1b-like, B=16
  EXPECT_GT(select_us(64, 32), 0);  // nosa-8b-like, B=64
}

}  // namespace
}  // namespace nosa::memory
