// Device-side residency's rules (memory/partitions.h), on the reference: hits anywhere in the
// slot table cost nothing, misses take their partition's least recently used free slots in
// order and get the host bytes, a slot evicts its old chunk only if the table still points at
// it, and a partition too small for its misses is an error.
#include "memory/partitions.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "runtime/core/error.h"
#include "tests/memory/partition_case.h"

namespace nosa::memory {
namespace {

using test::PartitionCase;

std::vector<char*> host_table(PartitionCase& c) {
  std::vector<char*> t(size_t(c.n_blocks));
  for (int64_t b = 0; b < c.n_blocks; ++b) t[size_t(b)] = c.host.data() + b * c.block_bytes();
  return t;
}

// Whether `slot` holds the chunk (block, layer, head)'s host bytes.
bool holds(const PartitionCase& c, int64_t slot, int64_t block, int layer, int head) {
  const char* src = c.host.data() + block * c.block_bytes() +
                    (int64_t(layer) * c.H + head) * (c.kv_bytes + c.bias_bytes);
  return std::memcmp(c.kv.data() + slot * c.kv_bytes, src, size_t(c.kv_bytes)) == 0 &&
         std::memcmp(c.bias.data() + slot * c.bias_bytes, src + c.kv_bytes, size_t(c.bias_bytes)) ==
             0;
}

// One token, two heads, layer 1 of 2, partitions of 6 slots from slot 10 on.
PartitionCase small_case() {
  PartitionCase c;
  c.T = 1;
  c.H = 2;
  c.k = 4;
  c.L = 2;
  c.layer = 1;
  c.R = 6;
  c.n_parts = 2;
  c.part_base = 10;
  c.n_blocks = 8;
  c.kv_bytes = 16;
  c.bias_bytes = 16;
  c.stamp = 8;
  c.token_seq = {0};
  c.block_table = {5, 6, 7, 4};  // logical -> physical
  c.bt_stride = 4;
  c.seq_partition = {1};
  c.selection = {0, 1, 2,  -1,   // head 0: blocks 5, 6, 7
                 1, 3, -1, -1};  // head 1: blocks 6, 4
  const int64_t n = int64_t(c.n_parts) * c.L * c.H * c.R;
  c.part_chunk.assign(size_t(n), -1);
  c.part_stamp.assign(size_t(n), 0);
  c.slot_table.assign(size_t(c.n_blocks * c.L * c.H), -1);
  c.kv.assign(size_t((c.part_base + n) * c.kv_bytes), 0);
  c.bias.assign(size_t((c.part_base + n) * c.bias_bytes), 0);
  c.host.resize(size_t(c.n_blocks * c.block_bytes()));
  for (size_t i = 0; i < c.host.size(); ++i) c.host[i] = char(i * 7 + 3);
  return c;
}

TEST(Partitions, MissesTakeTheLeastRecentlyUsedFreeSlotsInOrder) {
  PartitionCase c = small_case();
  const int64_t h0 = ((1 * c.L + 1) * c.H + 0) * c.R, h1 = h0 + c.R;  // partition 1, layer 1
  const int64_t base0 = c.part_base + h0, base1 = c.part_base + h1;
  // Head 0: block 7 is kept by the host path (slot 3); the free slots by stamp: 3 (0), 5 (1),
  // 1 and 2 (2), 0 (5), 4 (7). Slot 3 holds chunk X, which the table maps there (evicted);
  // slot 5 holds chunk Y, which the host path has since loaded elsewhere (stale: left alone).
  c.slot_table[c.chunk(7, 1, 0)] = 3;
  const uint32_t stamps0[] = {5, 2, 2, 0, 7, 1};
  for (int j = 0; j < 6; ++j) c.part_stamp[h0 + j] = stamps0[j];
  const int64_t X = c.chunk(2, 1, 0), Y = c.chunk(3, 1, 0);
  c.part_chunk[h0 + 3] = X;
  c.slot_table[X] = int32_t(base0 + 3);
  c.part_chunk[h0 + 5] = Y;
  c.slot_table[Y] = 7;
  // Head 1: block 4 is resident in the partition's slot 0, used the step before (overlap).
  c.slot_table[c.chunk(4, 1, 1)] = int32_t(base1 + 0);
  c.part_chunk[h1 + 0] = c.chunk(4, 1, 1);
  c.part_stamp[h1 + 0] = 7;
  const std::vector<int64_t> chunk_before = c.part_chunk;
  std::vector<char*> table = host_table(c);
  resident_partitions_reference(c.args(table.data()));

  EXPECT_EQ(c.slot_table[c.chunk(5, 1, 0)], base0 + 3);
  EXPECT_EQ(c.slot_table[c.chunk(6, 1, 0)], base0 + 5);
  EXPECT_EQ(c.slot_table[c.chunk(7, 1, 0)], 3);  // a hit: unchanged
  EXPECT_EQ(c.slot_table[X], -1);                // evicted
  EXPECT_EQ(c.slot_table[Y], 7);                 // stale slot: the table is not touched
  EXPECT_EQ(c.part_chunk[h0 + 3], c.chunk(5, 1, 0));
  EXPECT_EQ(c.part_chunk[h0 + 5], c.chunk(6, 1, 0));
  EXPECT_TRUE(holds(c, base0 + 3, 5, 1, 0));
  EXPECT_TRUE(holds(c, base0 + 5, 6, 1, 0));
  const uint32_t after0[] = {5, 2, 2, 8, 7, 8};
  for (int j = 0; j < 6; ++j) EXPECT_EQ(c.part_stamp[h0 + j], after0[j]) << j;
  // Head 1: the hit keeps its slot and is stamped; the miss takes the lowest of the slots
  // never used.
  EXPECT_EQ(c.slot_table[c.chunk(6, 1, 1)], base1 + 1);
  EXPECT_TRUE(holds(c, base1 + 1, 6, 1, 1));
  EXPECT_EQ(c.part_stamp[h1 + 0], 8u);
  EXPECT_EQ(c.part_stamp[h1 + 1], 8u);
  EXPECT_EQ(c.part_stamp[h1 + 2], 0u);
  // Nothing else moved: other partitions and layers keep their chunks.
  for (size_t i = 0; i < chunk_before.size(); ++i) {
    if (int64_t(i) != h0 + 3 && int64_t(i) != h0 + 5 && int64_t(i) != h1 + 1) {
      EXPECT_EQ(c.part_chunk[i], chunk_before[i]) << i;
    }
  }
  EXPECT_EQ(c.counters[part_hits], 2);
  EXPECT_EQ(c.counters[part_misses], 3);
  EXPECT_EQ(c.counters[part_overlap], 2);  // the host path's block and the one used at stamp 7
  EXPECT_EQ(c.counters[part_evictions], 1);
  EXPECT_EQ(c.counters[part_errors], 0);
}

TEST(Partitions, APartitionTooSmallForItsMissesIsAnError) {
  PartitionCase c = small_case();
  c.R = 2;  // head 0 misses three blocks
  const int64_t n = int64_t(c.n_parts) * c.L * c.H * c.R;
  c.part_chunk.assign(size_t(n), -1);
  c.part_stamp.assign(size_t(n), 0);
  std::vector<char*> table = host_table(c);
  EXPECT_THROW(resident_partitions_reference(c.args(table.data())), Error);
}

// A prefetch (a speculative round) before the layer's own round: it copies its guess's misses
// into the partitions, stamped with the step's stamp but without advancing it, and counts them
// apart; the layer's own round then finds the guessed blocks as hits (prefetch hits, not
// overlap), misses the others, and takes the slot of a wrong guess last.
TEST(Partitions, APrefetchFillsSlotsTheLayersOwnRoundFindsAsHits) {
  PartitionCase c = small_case();  // layer 1, stamp 8: head 0 selects 5, 6, 7; head 1 6, 4
  const int64_t h0 = ((1 * c.L + 1) * c.H + 0) * c.R, h1 = h0 + c.R;
  const int64_t base0 = c.part_base + h0, base1 = c.part_base + h1;
  // Head 1's block 4 is resident in its partition's slot 5, selected the step before.
  c.slot_table[c.chunk(4, 1, 1)] = int32_t(base1 + 5);
  c.part_chunk[h1 + 5] = c.chunk(4, 1, 1);
  c.part_stamp[h1 + 5] = 7;
  PartitionCase g = c;
  g.speculative = true;
  g.selection = {0, 1, -1, -1,  // head 0 guesses blocks 5 and 6 (right)
                 2, 3, -1, -1};  // head 1 guesses block 7 (wrong) and 4 (resident: a hit)
  std::vector<char*> table = host_table(g);
  resident_partitions_reference(g.args(table.data()));
  EXPECT_EQ(g.stamp, 8u);  // not advanced
  EXPECT_EQ(g.slot_table[g.chunk(5, 1, 0)], base0 + 0);
  EXPECT_EQ(g.slot_table[g.chunk(6, 1, 0)], base0 + 1);
  EXPECT_EQ(g.slot_table[g.chunk(7, 1, 1)], base1 + 0);
  EXPECT_TRUE(holds(g, base0 + 0, 5, 1, 0));
  EXPECT_TRUE(holds(g, base1 + 0, 7, 1, 1));
  EXPECT_EQ(g.part_stamp[h0 + 0], 8u);
  EXPECT_EQ(g.part_stamp[h1 + 0], 8u);
  EXPECT_EQ(g.part_stamp[h1 + 5], 7u);  // the guess's hit keeps its stamp
  EXPECT_EQ(g.counters[part_prefetched], 3);
  for (const PartitionCounter n : {part_hits, part_misses, part_overlap, part_prefetch_hits})
    EXPECT_EQ(g.counters[n], 0) << n;

  PartitionCase r = g;
  r.speculative = false;
  r.selection = c.selection;
  resident_partitions_reference(r.args(table.data()));
  EXPECT_EQ(r.counters[part_hits], 3);
  EXPECT_EQ(r.counters[part_prefetch_hits], 2);  // head 0's blocks 5 and 6
  EXPECT_EQ(r.counters[part_overlap], 1);        // head 1's block 4, selected the step before
  EXPECT_EQ(r.counters[part_misses], 2);         // head 0's block 7, head 1's block 6
  EXPECT_EQ(r.counters[part_prefetched], 3);
  EXPECT_EQ(r.slot_table[r.chunk(5, 1, 0)], base0 + 0);  // hits stay
  EXPECT_EQ(r.slot_table[r.chunk(7, 1, 0)], base0 + 2);
  EXPECT_EQ(r.slot_table[r.chunk(4, 1, 1)], base1 + 5);
  EXPECT_EQ(r.part_stamp[h1 + 5], 8u);
  // Head 1's miss takes a never used slot before the wrong guess's slot 0, which becomes as old
  // as the step before's selection.
  EXPECT_EQ(r.slot_table[r.chunk(6, 1, 1)], base1 + 1);
  EXPECT_EQ(r.slot_table[r.chunk(7, 1, 1)], base1 + 0);
  EXPECT_TRUE(holds(r, base1 + 1, 6, 1, 1));
  EXPECT_EQ(r.part_stamp[h1 + 0], 7u);
  // The next step selecting the wrong guess finds it resident, but not selected the step before;
  // the blocks this step selected are.
  PartitionCase next = r;
  next.stamp = 9;
  next.counters.assign(next.counters.size(), 0);
  next.selection = {0, 1, 2, -1,  // head 0: blocks 5, 6, 7 again
                    2, -1, -1, -1};  // head 1: block 7, the wrong guess
  resident_partitions_reference(next.args(table.data()));
  EXPECT_EQ(next.counters[part_hits], 4);
  EXPECT_EQ(next.counters[part_misses], 0);
  EXPECT_EQ(next.counters[part_overlap], 3);

  PartitionCase layer0 = small_case();  // a prefetch never starts a step
  layer0.layer = 0;
  layer0.speculative = true;
  EXPECT_THROW(resident_partitions_reference(layer0.args(table.data())), Error);
}

// Random reachable states, a prefetch of a guess and then the layer's own round: the prefetch
// hits are exactly the selected chunks that were not resident before and were guessed, the
// misses those still not resident, and every selected chunk is resident afterwards (the new
// ones holding their host bytes).
TEST(Partitions, APrefetchsHitsAreTheGuessedNewBlocks) {
  int cases = 0;
  for (uint32_t seed = 1; seed <= 80; ++seed) {
    PartitionCase c = test::random_partition_case(seed);
    if (c.layer == 0) continue;
    ++cases;
    PartitionCase g = test::guessed_round(c);
    std::vector<char*> table = host_table(g);
    resident_partitions_reference(g.args(table.data()));
    int64_t guessed_new = 0, still_missing = 0;
    for (int t = 0; t < c.T; ++t)
      for (int h = 0; h < c.H; ++h) {
        const int64_t row = (int64_t(t) * c.H + h) * c.k;
        for (int i = 0; i < c.k && c.selection[row + i] >= 0; ++i) {
          const int64_t ch =
              c.chunk(c.block_table[int64_t(t) * c.bt_stride + c.selection[row + i]], c.layer, h);
          // The prefetch's copies can also evict chunks the round then misses.
          still_missing += g.slot_table[ch] < 0;
          if (c.slot_table[ch] >= 0) continue;
          const int32_t* guess = g.selection.data() + row;
          guessed_new += std::find(guess, guess + c.k, c.selection[row + i]) != guess + c.k;
        }
      }
    PartitionCase r = g;
    r.speculative = false;
    r.selection = c.selection;
    resident_partitions_reference(r.args(table.data()));
    EXPECT_EQ(r.stamp, c.stamp) << "seed " << seed;
    EXPECT_EQ(r.counters[part_prefetch_hits], guessed_new) << "seed " << seed;
    EXPECT_EQ(r.counters[part_misses], still_missing) << "seed " << seed;
    EXPECT_GE(r.counters[part_prefetched], guessed_new) << "seed " << seed;
    for (int t = 0; t < c.T; ++t)
      for (int h = 0; h < c.H; ++h)
        for (int i = 0; i < c.k && c.selection[(int64_t(t) * c.H + h) * c.k + i] >= 0; ++i) {
          const int64_t b =
              c.block_table[int64_t(t) * c.bt_stride + c.selection[(int64_t(t) * c.H + h) * c.k + i]];
          const int32_t slot = r.slot_table[c.chunk(b, c.layer, h)];
          ASSERT_GE(slot, 0) << "seed " << seed;
          // Copied by one of the rounds (the states' resident slots hold random bytes).
          if (c.slot_table[c.chunk(b, c.layer, h)] < 0) {
            EXPECT_TRUE(holds(r, slot, b, c.layer, h)) << "seed " << seed;
          }
        }
  }
  EXPECT_GT(cases, 30);
}

// Random reachable states: afterwards every selected chunk is mapped to a slot holding its host
// bytes, only misses were copied, each partition's slots used this step carry its stamp, and the
// rows are split into the hits and the misses.
TEST(Partitions, EverySelectedChunkIsResidentAfterARound) {
  for (uint32_t seed = 1; seed <= 40; ++seed) {
    PartitionCase c = test::random_partition_case(seed);
    const std::vector<int32_t> before = c.slot_table;
    std::vector<char*> table = host_table(c);
    resident_partitions_reference(c.args(table.data()));
    int64_t selected = 0, missed = 0;
    for (int t = 0; t < c.T; ++t)
      for (int h = 0; h < c.H; ++h) {
        const int64_t local = ((int64_t(c.seq_partition[t]) * c.L + c.layer) * c.H + h) * c.R;
        const int64_t row = (int64_t(t) * c.H + h) * c.k;
        std::vector<int32_t> hits, misses;  // the row's blocks, as the split must give them
        for (int i = 0; i < c.k; ++i) {
          const int32_t b = c.selection[row + i];
          if (b < 0) break;
          (before[c.chunk(c.block_table[int64_t(t) * c.bt_stride + b], c.layer, h)] < 0 ? misses
                                                                                       : hits)
              .push_back(b);
        }
        hits.resize(size_t(c.k), -1);
        misses.resize(size_t(c.k), -1);
        EXPECT_EQ(std::vector<int32_t>(c.hit_rows.begin() + row, c.hit_rows.begin() + row + c.k),
                  hits)
            << "seed " << seed;
        EXPECT_EQ(
            std::vector<int32_t>(c.miss_rows.begin() + row, c.miss_rows.begin() + row + c.k),
            misses)
            << "seed " << seed;
        for (int i = 0; i < c.k; ++i) {
          const int32_t b = c.selection[row + i];
          if (b < 0) break;
          const int64_t block = c.block_table[int64_t(t) * c.bt_stride + b];
          const int64_t ch = c.chunk(block, c.layer, h);
          const int32_t s = c.slot_table[ch];
          ++selected;
          ASSERT_GE(s, 0) << "seed " << seed;
          if (before[ch] < 0) {
            ++missed;
            EXPECT_TRUE(holds(c, s, block, c.layer, h)) << "seed " << seed;
            EXPECT_EQ(c.part_chunk[local + (s - c.part_base - local)], ch);
          } else {
            EXPECT_EQ(s, before[ch]);  // hits stay where they are
          }
          if (s >= c.part_base + local && s < c.part_base + local + c.R) {
            EXPECT_EQ(c.part_stamp[s - c.part_base], c.stamp) << "seed " << seed;
          }
        }
      }
    EXPECT_EQ(c.counters[part_hits] + c.counters[part_misses], selected) << "seed " << seed;
    EXPECT_EQ(c.counters[part_misses], missed) << "seed " << seed;
    EXPECT_EQ(c.counters[part_errors], 0);
  }
}

}  // namespace
}  // namespace nosa::memory
