// The GPU block cache's residency rules: hits cost nothing, misses load, the least recently
// selected unpinned chunk goes first, pinned chunks stay, and one round never evicts itself.
#include <gtest/gtest.h>

#include <random>
#include <set>

#include "memory/block_cache.h"
#include "memory/fast_div.h"
#include "runtime/core/error.h"

namespace nosa::memory {
namespace {

std::vector<int32_t> acquire_all(BlockCache& c, const std::vector<ChunkId>& chunks,
                                 std::vector<BlockCache::Load>& loads) {
  std::vector<int32_t> slots(chunks.size());
  c.acquire(chunks.data(), int64_t(chunks.size()), slots.data(), loads);
  return slots;
}

TEST(FastDiv, MatchesHardwareDivision) {
  std::mt19937 rng(5);
  for (uint32_t d : {1u, 2u, 3u, 7u, 56u, 64u, 100u, 257u, 65536u, 4294967295u}) {
    FastDiv f(d);
    for (uint32_t a : {0u, 1u, d - 1, d, d + 1, 4294967295u, 4294967294u}) {
      EXPECT_EQ(f.div(a), a / d) << a << " / " << d;
      EXPECT_EQ(f.mod(a), a % d) << a << " % " << d;
    }
    for (int i = 0; i < 100000; ++i) {
      const uint32_t a = uint32_t(rng());
      ASSERT_EQ(f.div(a), a / d) << a << " / " << d;
      ASSERT_EQ(f.mod(a), a % d) << a << " % " << d;
    }
  }
}

// The chunk map laid out layer-major behaves as the plain one.
TEST(BlockCache, LayerMajorLayoutKeepsEveryChunkApart) {
  const int64_t per = 6, heads = 2, blocks = 50;
  BlockCache c(per * blocks, per * blocks, per, heads);
  std::vector<ChunkId> all;
  for (ChunkId i = 0; i < per * blocks; ++i) all.push_back(i);
  std::vector<BlockCache::Load> loads;
  auto slots = acquire_all(c, all, loads);
  EXPECT_EQ(loads.size(), all.size());
  for (ChunkId i = 0; i < per * blocks; ++i) EXPECT_EQ(c.slot_of(i), slots[size_t(i)]);
  loads.clear();
  acquire_all(c, all, loads);
  EXPECT_TRUE(loads.empty());
}

TEST(BlockCache, HitsCostNothingAndMissesLoadIntoFreeSlots) {
  BlockCache c(4, 100);
  std::vector<BlockCache::Load> loads;
  auto s1 = acquire_all(c, {10, 11, 12}, loads);
  EXPECT_EQ(loads.size(), 3u);
  loads.clear();
  auto s2 = acquire_all(c, {10, 11, 12}, loads);
  EXPECT_TRUE(loads.empty());
  EXPECT_EQ(s1, s2);
  EXPECT_EQ(c.stats().hits, 3);
  EXPECT_EQ(c.stats().misses, 3);
  EXPECT_EQ(std::set<int32_t>(s1.begin(), s1.end()).size(), 3u);
}

// Slots handed back (device-side residency's partitions) are free slots: a round too large for
// the old capacity fits, nothing resident moves, and the LRU order goes on.
TEST(BlockCache, GrownSlotsAreFreeAndTheResidentStay) {
  BlockCache c(3, 100);
  std::vector<BlockCache::Load> loads;
  const auto before = acquire_all(c, {1, 2, 3}, loads);
  EXPECT_THROW(acquire_all(c, {4, 5, 6, 7}, loads), Error);
  BlockCache g(3, 100);
  acquire_all(g, {1, 2, 3}, loads);
  g.grow(6);
  EXPECT_EQ(g.capacity(), 6);
  loads.clear();
  const auto slots = acquire_all(g, {1, 4, 5, 6}, loads);
  EXPECT_EQ(slots[0], before[0]);  // a hit where it was
  ASSERT_EQ(loads.size(), 3u);
  for (const auto& l : loads) {
    EXPECT_GE(l.slot, 3);  // the new slots, no eviction
    EXPECT_EQ(l.evicted, -1);
  }
  EXPECT_TRUE(g.resident(2) && g.resident(3));
  loads.clear();
  acquire_all(g, {7}, loads);  // full: the least recently used (2) goes
  ASSERT_EQ(loads.size(), 1u);
  EXPECT_EQ(loads[0].evicted, 2);
  EXPECT_THROW(g.grow(5), Error);
}

TEST(BlockCache, EvictsTheLeastRecentlySelected) {
  BlockCache c(3, 100);
  std::vector<BlockCache::Load> loads;
  acquire_all(c, {1, 2, 3}, loads);
  acquire_all(c, {1}, loads);  // 2 is now the least recent
  loads.clear();
  acquire_all(c, {4}, loads);
  ASSERT_EQ(loads.size(), 1u);
  EXPECT_FALSE(c.resident(2));
  EXPECT_TRUE(c.resident(1) && c.resident(3) && c.resident(4));
  EXPECT_EQ(c.stats().evictions, 1);
  // LRU order now: 3, 1, 4.
  auto order = c.lru_order();
  ASSERT_EQ(order.size(), 3u);
  EXPECT_EQ(order[0], c.slot_of(3));
  EXPECT_EQ(order[1], c.slot_of(1));
  EXPECT_EQ(order[2], c.slot_of(4));
}

TEST(BlockCache, MarkedHitsAreSafeFromTheRoundsLoads) {
  BlockCache c(3, 100);
  std::vector<BlockCache::Load> loads;
  acquire_all(c, {1, 2, 3}, loads);  // LRU order 1, 2, 3
  loads.clear();
  c.begin_round();
  const int32_t s1 = c.mark(1);  // a hit that keeps its place (the head) until settled
  EXPECT_GE(s1, 0);
  EXPECT_EQ(c.mark(4), -1);
  c.load(4, loads);
  ASSERT_EQ(loads.size(), 1u);
  EXPECT_EQ(loads[0].evicted, 2);  // not the marked head
  c.settle(&s1, 1);
  auto order = c.lru_order();
  ASSERT_EQ(order.size(), 3u);
  EXPECT_EQ(order[0], c.slot_of(3));
  EXPECT_EQ(order[1], c.slot_of(4));
  EXPECT_EQ(order[2], c.slot_of(1));
  EXPECT_EQ(c.stats().hits, 1);
  EXPECT_EQ(c.stats().misses, 4);
}

// With two protected rounds (two micro-batches in flight) the previous round's chunks are safe
// from this round's loads too, even as the least recently used; a third round may take them.
TEST(BlockCache, TwoProtectedRoundsKeepThePreviousRound) {
  BlockCache c(4, 100);
  c.set_protected_rounds(2);
  std::vector<BlockCache::Load> loads;
  acquire_all(c, {1, 2}, loads);  // round A
  acquire_all(c, {3, 4}, loads);  // round B: 1 and 2 are the least recent
  loads.clear();
  acquire_all(c, {5}, loads);  // round C: round B is protected, round A is not
  ASSERT_EQ(loads.size(), 1u);
  EXPECT_EQ(loads[0].evicted, 1);
  loads.clear();
  acquire_all(c, {6, 7}, loads);  // round D: C (5) protected; 2 goes, then 3 (round B)
  ASSERT_EQ(loads.size(), 2u);
  EXPECT_EQ(loads[0].evicted, 2);
  EXPECT_EQ(loads[1].evicted, 3);
  // Round E needs three slots beside round D's two in a cache of four: a clear error.
  loads.clear();
  EXPECT_THROW(acquire_all(c, {8, 9, 10}, loads), Error);
  // With one (the default), only the round itself is safe.
  BlockCache d(2, 100);
  loads.clear();
  acquire_all(d, {1, 2}, loads);
  acquire_all(d, {3}, loads);  // evicts 1 (the previous round's)
  EXPECT_FALSE(d.resident(1));
}

TEST(BlockCache, PinnedChunksAreNeverEvicted) {
  BlockCache c(2, 100);
  std::vector<BlockCache::Load> loads;
  acquire_all(c, {1, 2}, loads);
  c.pin(1);
  acquire_all(c, {3}, loads);
  acquire_all(c, {4}, loads);
  EXPECT_TRUE(c.resident(1));
  EXPECT_TRUE(c.pinned(1));
  c.unpin(1);
  acquire_all(c, {5}, loads);
  acquire_all(c, {6}, loads);
  EXPECT_FALSE(c.resident(1));
}

TEST(BlockCache, ARoundLargerThanTheCacheIsAClearError) {
  BlockCache c(2, 100);
  std::vector<BlockCache::Load> loads;
  try {
    acquire_all(c, {1, 2, 3}, loads);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::resource_exhausted);
  }
}

TEST(BlockCache, DropFreesTheSlot) {
  BlockCache c(2, 100);
  std::vector<BlockCache::Load> loads;
  acquire_all(c, {1, 2}, loads);
  c.pin(2);
  c.drop(2);
  EXPECT_FALSE(c.resident(2));
  EXPECT_EQ(c.used(), 1);
  loads.clear();
  acquire_all(c, {3}, loads);
  EXPECT_EQ(c.stats().evictions, 0);  // took the freed slot
}

// Random rounds: after each, every requested chunk is resident in a distinct slot, the loads are
// exactly the chunks that were not resident before, and occupancy never exceeds capacity.
TEST(BlockCache, InvariantsHoldOverRandomRounds) {
  const int64_t capacity = 64, universe = 500;
  BlockCache c(capacity, universe);
  std::mt19937 rng(3);
  std::set<ChunkId> pinned;
  for (int round = 0; round < 2000; ++round) {
    std::set<ChunkId> want;
    while (int64_t(want.size()) < 20) want.insert(rng() % universe);
    std::set<ChunkId> before;
    for (ChunkId ch : want)
      if (c.resident(ch)) before.insert(ch);
    std::vector<BlockCache::Load> loads;
    auto got = acquire_all(c, std::vector<ChunkId>(want.begin(), want.end()), loads);
    std::set<int32_t> slots(got.begin(), got.end());
    EXPECT_EQ(slots.size(), want.size());
    for (ChunkId ch : want) EXPECT_TRUE(c.resident(ch));
    for (ChunkId ch : pinned) EXPECT_TRUE(c.resident(ch));
    EXPECT_EQ(loads.size(), want.size() - before.size());
    for (auto& l : loads) EXPECT_EQ(before.count(l.chunk), 0u);
    EXPECT_LE(c.used(), capacity);
    if (round % 50 == 0 && pinned.size() < 10) {
      ChunkId ch = *want.begin();
      if (!pinned.count(ch)) {
        c.pin(ch);
        pinned.insert(ch);
      }
    }
  }
}

}  // namespace
}  // namespace nosa::memory
