// Device-side residency's kernel (memory/cuda/partitions.cu) against the reference
// (memory/partitions.cpp) on random reachable states: the same slot table, partition chunks and
// stamps, counters, slot bytes and rows split into hits and misses, byte for byte, and the step
// stamp (a round of layer 0 advances it, on the device).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "memory/cuda/partitions.cuh"
#include "runtime/backend.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/memory/partition_case.h"

namespace nosa::memory {
namespace {

using ::nosa::test::DeviceArray;

TEST(CudaPartitions, TheKernelMakesTheReferencesDecisionsAndCopies) {
  NOSA_REQUIRE_GPU();
  for (uint32_t seed = 1; seed <= 60; ++seed) {
    // Up to 64 tokens and selections of up to 256 blocks (partitions of up to 768 slots).
    test::PartitionCase c =
        test::random_partition_case(seed, seed % 3 ? 24 : 64, seed % 4 ? 48 : 256);
    test::PartitionCase ref = c;
    std::vector<char*> host_ptrs(size_t(c.n_blocks));
    for (int64_t b = 0; b < c.n_blocks; ++b)
      host_ptrs[size_t(b)] = ref.host.data() + b * c.block_bytes();
    resident_partitions_reference(ref.args(host_ptrs.data()));

    // The device run reads the blocks' bytes from pinned, mapped host memory, as in the engine.
    char* pinned = nullptr;
    ASSERT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&pinned), c.host.size(), cudaHostAllocMapped),
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
    PartitionArgs a = c.args(block_host.p);
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
    a.hit_rows = hit_rows.p;
    a.miss_rows = miss_rows.p;
    DeviceArray<uint32_t> step_stamp(std::vector<uint32_t>{c.stamp});
    a.step_stamp = step_stamp.p;  // advanced on the device where the layer is 0
    ASSERT_EQ(cuda::launch_resident_partitions(a, copies.p, counts.p, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cudaFreeHost(pinned);
    EXPECT_EQ(slot_table.get(), ref.slot_table) << "seed " << seed;
    EXPECT_EQ(part_chunk.get(), ref.part_chunk) << "seed " << seed;
    EXPECT_EQ(part_stamp.get(), ref.part_stamp) << "seed " << seed;
    EXPECT_EQ(counters.get(), ref.counters) << "seed " << seed;
    EXPECT_EQ(step_stamp.get()[0], ref.stamp) << "seed " << seed;
    EXPECT_EQ(hit_rows.get(), ref.hit_rows) << "seed " << seed;
    EXPECT_EQ(miss_rows.get(), ref.miss_rows) << "seed " << seed;
    EXPECT_TRUE(kv.get() == ref.kv) << "seed " << seed;
    EXPECT_TRUE(bias.get() == ref.bias) << "seed " << seed;
    // Each row's copies are its misses (the reference's split rows say which), and together
    // every miss.
    const std::vector<int> got = counts.get();
    int64_t total = 0;
    for (int r = 0; r < rows; ++r) {
      int misses = 0;
      while (misses < c.k && ref.miss_rows[size_t(r) * c.k + misses] >= 0) ++misses;
      EXPECT_EQ(got[size_t(r)], misses) << "seed " << seed << " row " << r;
      total += got[size_t(r)];
    }
    EXPECT_EQ(total, ref.counters[part_misses]) << "seed " << seed;
    if (seed == 60)
      std::printf(
          "[ partition] 60 random states: kernel = reference (last: %d tokens, %d heads, "
          "width %d, %d slots, %lld misses)\n",
          c.T, c.H, c.k, c.R, (long long)ref.counters[part_misses]);
  }
}

}  // namespace
}  // namespace nosa::memory
