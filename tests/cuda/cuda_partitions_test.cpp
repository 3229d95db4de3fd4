// Device-side residency's kernel (memory/cuda/partitions.cu) against the reference
// (memory/partitions.cpp) on random reachable states: the same slot table, partition chunks and
// stamps, counters, slot bytes and rows split into hits and misses, byte for byte, and the step
// stamp (a round of layer 0 advances it, on the device).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "memory/cuda/partitions.cuh"
#include "runtime/backend.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/memory/partition_case.h"

namespace nosa::memory {
namespace {

using ::nosa::test::DeviceArray;

// The state a round left on the device, and its rows' copy counts.
struct DeviceRound {
  test::PartitionCase state;
  std::vector<int> counts;
};

// Runs one round of `c` through the kernels, reading the blocks' bytes from pinned, mapped host
// memory as in the engine; max_row_blocks > 0: the copies with at most that many thread blocks
// of rows (launch_partition_copies).
DeviceRound run_on_device(const test::PartitionCase& c, int max_row_blocks = 0) {
  DeviceRound out{c, {}};
  test::PartitionCase& d = out.state;
  char* pinned = nullptr;
  EXPECT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&pinned), c.host.size(), cudaHostAllocMapped),
            cudaSuccess);
  std::copy(c.host.begin(), c.host.end(), pinned);
  std::vector<char*> dev_ptrs(size_t(c.n_blocks));
  for (int64_t b = 0; b < c.n_blocks; ++b) dev_ptrs[size_t(b)] = pinned + b * c.block_bytes();
  DeviceArray<int32_t> selection(c.selection), token_seq(c.token_seq), block_table(c.block_table),
      seq_partition(c.seq_partition), slot_table(c.slot_table);
  DeviceArray<int64_t> part_chunk(c.part_chunk), counters(c.counters);
  DeviceArray<uint32_t> part_stamp(c.part_stamp);
  DeviceArray<char> kv(c.kv), bias(c.bias);
  DeviceArray<char*> block_host(dev_ptrs);
  DeviceArray<cuda::PartitionCopy> copies(
      std::vector<cuda::PartitionCopy>(size_t(c.T) * c.H * c.k));
  const int rows = c.T * c.H;
  DeviceArray<int> counts(std::vector<int>(size_t(rows), -1));
  const std::vector<int32_t> unwritten(c.selection.size(), test::PartitionCase::k_unwritten);
  DeviceArray<int32_t> hit_rows(unwritten), miss_rows(unwritten);
  PartitionArgs a = d.args(block_host.p);
  a.selection = selection.p;
  a.token_seq = token_seq.p;
  a.block_table = block_table.p;
  a.seq_partition = seq_partition.p;
  a.slot_table = slot_table.p;
  a.part_chunk = part_chunk.p;
  a.part_stamp = part_stamp.p;
  a.kv = kv.p;
  a.bias = bias.p;
  a.counters = counters.p;
  if (!c.speculative) {  // a prefetch splits no rows
    a.hit_rows = hit_rows.p;
    a.miss_rows = miss_rows.p;
  }
  DeviceArray<uint32_t> step_stamp(std::vector<uint32_t>{c.stamp});
  a.step_stamp = step_stamp.p;  // advanced on the device where the layer is 0
  if (max_row_blocks > 0) {
    EXPECT_EQ(cuda::launch_partition_decisions(a, copies.p, counts.p, nullptr), cudaSuccess);
    EXPECT_EQ(cuda::launch_partition_copies(a, copies.p, counts.p, nullptr, max_row_blocks),
              cudaSuccess);
  } else {
    EXPECT_EQ(cuda::launch_resident_partitions(a, copies.p, counts.p, nullptr), cudaSuccess);
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaFreeHost(pinned);
  d.slot_table = slot_table.get();
  d.part_chunk = part_chunk.get();
  d.part_stamp = part_stamp.get();
  d.counters = counters.get();
  d.stamp = step_stamp.get()[0];
  d.hit_rows = hit_rows.get();
  d.miss_rows = miss_rows.get();
  d.kv = kv.get();
  d.bias = bias.get();
  out.counts = counts.get();
  return out;
}

// The reference's round of `c` against the kernels': the same state, byte for byte, and each
// row's copies are its misses (the reference's split rows say which), together every miss.
void expect_kernel_matches_reference(const test::PartitionCase& c, const std::string& what,
                                     int max_row_blocks = 0) {
  test::PartitionCase ref = c;
  std::vector<char*> host_ptrs(size_t(c.n_blocks));
  for (int64_t b = 0; b < c.n_blocks; ++b)
    host_ptrs[size_t(b)] = ref.host.data() + b * c.block_bytes();
  resident_partitions_reference(ref.args(host_ptrs.data()));
  const DeviceRound got = run_on_device(c, max_row_blocks);
  const test::PartitionCase& d = got.state;
  EXPECT_EQ(d.slot_table, ref.slot_table) << what;
  EXPECT_EQ(d.part_chunk, ref.part_chunk) << what;
  EXPECT_EQ(d.part_stamp, ref.part_stamp) << what;
  EXPECT_EQ(d.counters, ref.counters) << what;
  EXPECT_EQ(d.stamp, ref.stamp) << what;
  EXPECT_EQ(d.hit_rows, ref.hit_rows) << what;
  EXPECT_EQ(d.miss_rows, ref.miss_rows) << what;
  EXPECT_TRUE(d.kv == ref.kv) << what;
  EXPECT_TRUE(d.bias == ref.bias) << what;
  int64_t total = 0;
  for (int r = 0; r < c.T * c.H; ++r) {
    int misses = 0;
    while (misses < c.k && ref.miss_rows[size_t(r) * c.k + misses] >= 0) ++misses;
    if (!c.speculative) {
      EXPECT_EQ(got.counts[size_t(r)], misses) << what << " row " << r;
    }
    total += got.counts[size_t(r)];
  }
  const PartitionCounter copied = c.speculative ? part_prefetched : part_misses;
  EXPECT_EQ(total, ref.counters[copied] - c.counters[copied]) << what;
}

// A case built by hand: one KV head and layer, T sequences of n_blocks blocks each with a
// partition of R slots, no chunk resident anywhere (every selected block misses), row t selecting
// its first widths[t] blocks, slots stamped at random, chunks of kv_bytes + bias_bytes.
test::PartitionCase all_misses_case(const std::vector<int>& widths, int k, int R, int n_blocks,
                                    int64_t kv_bytes, int64_t bias_bytes, uint32_t seed) {
  std::mt19937 rng(seed);
  test::PartitionCase c;
  c.T = int(widths.size());
  c.H = 1;
  c.L = 1;
  c.layer = 0;  // the round starts a step
  c.k = k;
  c.R = R;
  c.n_parts = c.T;
  c.bt_stride = n_blocks;
  c.kv_bytes = kv_bytes;
  c.bias_bytes = bias_bytes;
  c.stamp = 50;
  c.n_blocks = int64_t(c.T) * n_blocks;
  for (int t = 0; t < c.T; ++t) {
    c.token_seq.push_back(t);
    c.seq_partition.push_back(c.T - 1 - t);
    for (int b = 0; b < n_blocks; ++b) c.block_table.push_back(t * n_blocks + b);
  }
  c.selection.assign(size_t(c.T) * k, -1);
  for (int t = 0; t < c.T; ++t)
    for (int i = 0; i < widths[size_t(t)]; ++i) c.selection[size_t(t) * k + i] = i;
  c.part_base = 8;
  const int64_t part_total = int64_t(c.n_parts) * R;
  c.slot_table.assign(size_t(c.n_blocks), -1);
  c.part_chunk.assign(size_t(part_total), -1);
  c.part_stamp.resize(size_t(part_total));
  for (auto& s : c.part_stamp) s = rng() % 40;  // older than the step, ties included
  c.kv.resize(size_t((c.part_base + part_total) * kv_bytes));
  c.bias.resize(size_t((c.part_base + part_total) * bias_bytes));
  c.host.resize(size_t(c.n_blocks * c.block_bytes()));
  for (auto& x : c.kv) x = char(rng());
  for (auto& x : c.bias) x = char(rng());
  for (auto& x : c.host) x = char(rng());
  return c;
}

TEST(CudaPartitions, TheKernelMakesTheReferencesDecisionsAndCopies) {
  NOSA_REQUIRE_GPU();
  for (uint32_t seed = 1; seed <= 60; ++seed) {
    // Up to 64 tokens and selections of up to 256 blocks (partitions of up to 768 slots).
    const test::PartitionCase c =
        test::random_partition_case(seed, seed % 3 ? 24 : 64, seed % 4 ? 48 : 256);
    expect_kernel_matches_reference(c, "seed " + std::to_string(seed));
    if (seed == 60)
      std::printf(
          "[ partition] 60 random states: kernel = reference (last: %d tokens, %d heads, "
          "width %d, %d slots)\n",
          c.T, c.H, c.k, c.R);
  }
}

// A prefetch (a speculative round of a guess at the selection), then the layer's own round on
// the state it left: each as the reference makes it (the prefetch stamps only its copies and
// counts them apart; the round counts its prefetch hits).
TEST(CudaPartitions, APrefetchAndTheLayersOwnRoundMatchTheReference) {
  NOSA_REQUIRE_GPU();
  int cases = 0;
  for (uint32_t seed = 1; seed <= 80; ++seed) {
    const test::PartitionCase c = test::random_partition_case(seed, 24, seed % 4 ? 48 : 128);
    if (c.layer == 0) continue;  // a prefetch never starts a step
    ++cases;
    const test::PartitionCase g = test::guessed_round(c);
    expect_kernel_matches_reference(g, "prefetch, seed " + std::to_string(seed));
    test::PartitionCase after = g;  // the reference's state after the prefetch
    std::vector<char*> host_ptrs(size_t(c.n_blocks));
    for (int64_t b = 0; b < c.n_blocks; ++b)
      host_ptrs[size_t(b)] = after.host.data() + b * c.block_bytes();
    resident_partitions_reference(after.args(host_ptrs.data()));
    after.speculative = false;
    after.selection = c.selection;
    expect_kernel_matches_reference(after, "round after a prefetch, seed " + std::to_string(seed));
  }
  EXPECT_GT(cases, 30);
}

// The copies with fewer thread blocks than rows (each block copying rows in turn, as the
// prefetch's copies run): the same slots' bytes and state as one block per row, and as the
// reference.
TEST(CudaPartitions, CopiesInTurnMatchCopiesPerRow) {
  NOSA_REQUIRE_GPU();
  int cases = 0;  // with more rows than thread blocks, and copies
  for (uint32_t seed = 1; seed <= 20; ++seed) {
    const test::PartitionCase c = test::random_partition_case(seed, 24, 48);
    const DeviceRound whole = run_on_device(c), in_turn = run_on_device(c, 3);
    int copied = 0;
    for (const int n : whole.counts) copied += n;
    cases += c.T * c.H > 3 && copied > 0;
    EXPECT_TRUE(in_turn.state.kv == whole.state.kv) << "seed " << seed;
    EXPECT_TRUE(in_turn.state.bias == whole.state.bias) << "seed " << seed;
    EXPECT_EQ(in_turn.state.slot_table, whole.state.slot_table) << "seed " << seed;
    EXPECT_EQ(in_turn.counts, whole.counts) << "seed " << seed;
    expect_kernel_matches_reference(c, "copies in turn, seed " + std::to_string(seed), 3);
  }
  EXPECT_GT(cases, 10);
}

// Rows missing 0, 1, 32 and 33 blocks (no slot ranking; the slots taken one warp-wide minimum at
// a time, up to the last count that way; every free slot ranked), widths over one warp's 32, and
// chunks of 36 KiB + 16 bytes of keys and values and 4 KiB + 16 of scores, so that a copying
// thread moves more words than it has in flight and the scores more than one per thread.
TEST(CudaPartitions, EveryMissCountAndChunkSizeMatchesTheReference) {
  NOSA_REQUIRE_GPU();
  const test::PartitionCase c = all_misses_case({0, 1, 32, 33, 40, 2}, 40, 48, 44,
                                                36 * 1024 + 16, 4 * 1024 + 16, 7);
  expect_kernel_matches_reference(c, "all misses");
}

// A row missing more blocks than its partition has free slots: the reference refuses the round;
// the kernel places what fits, least recently used first, and reports the rest as errors with
// empty copies (KvCache::sync_stats turns them into an error), leaving the other rows exact.
TEST(CudaPartitions, MissesBeyondAPartitionAreReportedAsErrors) {
  NOSA_REQUIRE_GPU();
  test::PartitionCase c = all_misses_case({3, 30}, 32, 24, 32, 64, 16, 9);
  const DeviceRound got = run_on_device(c);
  EXPECT_EQ(got.state.counters[part_errors], 30 - 24);
  EXPECT_EQ(got.state.counters[part_misses], 3 + 24);
  EXPECT_EQ(got.counts, (std::vector<int>{3, 30}));
  // Every slot of row 1's partition was taken, and its chunks are the row's first 24 misses.
  const int64_t local = int64_t(c.seq_partition[1]) * c.R;
  std::vector<int64_t> held(got.state.part_chunk.begin() + local,
                            got.state.part_chunk.begin() + local + c.R);
  std::sort(held.begin(), held.end());
  std::vector<int64_t> first(size_t(c.R));
  std::iota(first.begin(), first.end(), int64_t(32));  // sequence 1's blocks 32, 33, ...
  EXPECT_EQ(held, first);
}

}  // namespace
}  // namespace nosa::memory
