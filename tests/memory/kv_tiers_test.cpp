// KV residency across the device, host and disk tiers, checked after every step of a simulated
// decoding run: the selection is resident and holds the right bytes, only chunks that were not
// resident were loaded, budgets hold, and data survives host <-> disk moves exactly. A disk error
// fails only the blocks it touched.
#include "memory/kv_tiers.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <set>

#include "runtime/core/error.h"
#include "tests/common/test_util.h"

namespace nosa::memory {
namespace {

// A fake device: slot memory plus the slot table, performing the copies KvTiers hands out.
struct Device {
  TierShape shape;
  std::vector<char> slots;
  std::vector<int32_t> table;  // chunk -> slot
  int64_t loads = 0, fresh = 0;

  Device(const TierShape& s, int64_t n_slots)
      : shape(s),
        slots(size_t(n_slots) * s.chunk_bytes()),
        table(s.n_blocks * s.chunks_per_block(), -1) {}
  char* slot(int32_t s) { return slots.data() + size_t(s) * shape.chunk_bytes(); }
  void load(const std::vector<ChunkCopy>& copies) {
    for (auto& c : copies) {
      if (c.evicted >= 0) table[c.evicted] = -1;
      table[c.chunk] = c.slot;
      if (c.host) {
        std::memcpy(slot(c.slot), c.host, shape.chunk_bytes());
        ++loads;
      } else {
        ++fresh;
      }
    }
  }
  void store(const std::vector<ChunkCopy>& copies) {
    for (auto& c : copies) std::memcpy(c.host, slot(c.slot), shape.chunk_bytes());
  }
};

// The byte pattern of a chunk's row: depends on the chunk and the row.
char pattern(ChunkId c, int row) { return char((c * 131 + row * 7) & 0x7f); }

struct Sim {
  TierShape shape;
  std::unique_ptr<HostAllocator> alloc = make_plain_host_allocator();
  std::unique_ptr<KvTiers> tiers;
  std::unique_ptr<Device> dev;
  int rows = 8;  // tokens per block; a chunk row is chunk_bytes / rows bytes

  Sim(int64_t n_blocks, int64_t device_slots, int64_t host_blocks, const std::string& disk,
      std::unique_ptr<HostAllocator> host_alloc = nullptr) {
    if (host_alloc) alloc = std::move(host_alloc);
    shape.n_layers = 2;
    shape.n_kv_heads = 2;
    shape.kv_chunk_bytes = 512;
    shape.bias_chunk_bytes = 64;  // 576 bytes: 8 rows of 72
    shape.n_blocks = n_blocks;
    TierBudget b;
    b.device_slots = device_slots;
    b.host_blocks = host_blocks;
    b.disk_dir = disk;
    tiers = std::make_unique<KvTiers>(shape, b, *alloc);
    dev = std::make_unique<Device>(shape, device_slots);
  }
  // Writes token row r of every chunk of block b into its (pinned) device slot.
  void write_row(int32_t b, int r) {
    const size_t row_bytes = shape.chunk_bytes() / rows;
    for (int64_t i = 0; i < shape.chunks_per_block(); ++i) {
      ChunkId c = b * shape.chunks_per_block() + i;
      ASSERT_GE(dev->table[c], 0) << "writing a chunk that is not resident";
      std::memset(dev->slot(dev->table[c]) + r * row_bytes, pattern(c, r), row_bytes);
    }
  }
  // One step that fills block b whole (every row written), as a prompt's block would be.
  void write_block(int32_t b) {
    std::vector<ChunkCopy> copies;
    tiers->begin_step({b}, {}, copies);
    dev->load(copies);
    for (int r = 0; r < rows; ++r) write_row(b, r);
    copies.clear();
    tiers->end_step({b}, copies);
    dev->store(copies);
  }

  // One round selecting `chunks`: the loads performed, then every chunk holds its whole bytes.
  void select_and_check(const std::vector<ChunkId>& chunks) {
    std::vector<ChunkCopy> copies;
    tiers->select(chunks.data(), int64_t(chunks.size()), copies);
    dev->load(copies);
    for (ChunkId c : chunks) check_chunk(c, rows);
  }

  void check_chunk(ChunkId c, int valid_rows) {
    const size_t row_bytes = shape.chunk_bytes() / rows;
    ASSERT_GE(dev->table[c], 0);
    const char* p = dev->slot(dev->table[c]);
    for (int r = 0; r < valid_rows; ++r)
      for (size_t x = 0; x < row_bytes; ++x)
        ASSERT_EQ(p[r * row_bytes + x], pattern(c, r)) << "chunk " << c << " row " << r;
  }
};

struct Seq {
  std::vector<int32_t> blocks;
  int64_t tokens = 0;
};

// Decoding of several sequences, one token per step, with random selections over their
// finished blocks plus the current one, per layer and head. With pieces > 1 each layer's
// selection is given in that many pieces of one round (select_misses(..., more)), each piece's
// loads performed before the next piece is asked for, as KvCache does.
void run(Sim& sim, int n_seqs, int steps, int select_per_head, uint64_t seed, int pieces = 1) {
  std::mt19937 rng(seed);
  std::vector<Seq> seqs(n_seqs);
  int32_t next_block = 0;
  const int per = int(sim.shape.chunks_per_block());
  for (int step = 0; step < steps; ++step) {
    std::vector<int32_t> writes, reads, full;
    for (auto& s : seqs) {
      if (s.tokens % sim.rows == 0) s.blocks.push_back(next_block++);
      writes.push_back(s.blocks.back());
    }
    std::vector<ChunkCopy> loads;
    sim.tiers->begin_step(writes, reads, loads);
    sim.dev->load(loads);
    for (auto& s : seqs) sim.write_row(s.blocks.back(), int(s.tokens % sim.rows));
    for (int layer = 0; layer < sim.shape.n_layers; ++layer) {
      std::vector<ChunkId> chunks;
      for (auto& s : seqs)
        for (int h = 0; h < sim.shape.n_kv_heads; ++h) {
          std::set<int32_t> chosen = {s.blocks.back()};
          while (int(chosen.size()) < std::min<int>(select_per_head, int(s.blocks.size())))
            chosen.insert(s.blocks[rng() % s.blocks.size()]);
          for (int32_t b : chosen) chunks.push_back(sim.shape.chunk(b, layer, h));
        }
      std::set<ChunkId> resident_before;
      for (ChunkId c : chunks)
        if (sim.dev->table[c] >= 0) resident_before.insert(c);
      // Only chunks that were not resident were loaded (in pieces: or that an earlier piece's
      // miss evicted before their piece asked for them), each once.
      std::set<ChunkId> loaded, evicted;
      const int64_t n = int64_t(chunks.size());
      for (int i = 0; i < pieces; ++i) {
        const int64_t begin = n * i / pieces, end = n * (i + 1) / pieces;
        loads.clear();
        sim.tiers->select_misses(chunks.data() + begin, end - begin, loads, i > 0);
        for (auto& l : loads) {
          EXPECT_TRUE(resident_before.count(l.chunk) == 0 || evicted.count(l.chunk) == 1)
              << "chunk " << l.chunk << " was resident";
          EXPECT_TRUE(loaded.insert(l.chunk).second) << "chunk " << l.chunk << " loaded twice";
        }
        for (auto& l : loads)
          if (l.evicted >= 0) evicted.insert(l.evicted);
        sim.dev->load(loads);
      }
      sim.tiers->finish_select();
      size_t reloaded = 0;
      for (ChunkId c : loaded) reloaded += resident_before.count(c);
      EXPECT_EQ(loaded.size(), std::set<ChunkId>(chunks.begin(), chunks.end()).size() -
                                   resident_before.size() + reloaded);
      if (pieces == 1) {
        EXPECT_EQ(reloaded, 0u);
      }
      // The selection is resident and holds the right bytes.
      for (ChunkId c : chunks) {
        const int32_t b = int32_t(c / per);
        bool tail = false;
        for (auto& s : seqs) tail |= s.blocks.back() == b;
        int valid = sim.rows;
        if (tail)
          for (auto& s : seqs)
            if (s.blocks.back() == b) valid = int(s.tokens % sim.rows) + 1;
        sim.check_chunk(c, valid);
      }
    }
    for (auto& s : seqs) {
      ++s.tokens;
      if (s.tokens % sim.rows == 0) full.push_back(s.blocks.back());
    }
    std::vector<ChunkCopy> stores;
    sim.tiers->end_step(full, stores);
    sim.dev->store(stores);
    TierStats st = sim.tiers->stats();
    EXPECT_LE(st.device_slots_used, st.device_slots);
    EXPECT_LE(st.host_blocks_used, st.host_blocks);
    // What the kernels see, the slot table built from the copies handed out, agrees with the
    // tiers' count: every slot holds at most one chunk, and every slot in use holds one.
    std::set<int32_t> in_use;
    for (int32_t slot : sim.dev->table) {
      if (slot < 0) continue;
      EXPECT_TRUE(in_use.insert(slot).second) << "slot " << slot << " holds two chunks";
    }
    EXPECT_EQ(int64_t(in_use.size()), st.device_slots_used);
  }
}

TEST(KvTiers, HostOffloadKeepsTheSelectionResidentAndLoadsOnlyNewChunks) {
  // 4 sequences x 12 blocks; the device holds 120 of the 192 chunks.
  Sim sim(64, 120, 64, "");
  run(sim, 4, 96, 3, 1);
  TierStats st = sim.tiers->stats();
  EXPECT_GT(st.hits, 0);
  EXPECT_GT(st.misses, 0);
  EXPECT_GT(st.evictions, 0);
  EXPECT_EQ(st.disk_blocks, 0);
  EXPECT_GT(st.bytes_host_to_device, 0);
}

// The same run with each layer's selection in 3 pieces of one round, under eviction pressure:
// every chunk a piece asks for stays resident through the later pieces (the invariants above),
// and the device's slot table agrees with the tiers after every step.
TEST(KvTiers, ASelectionInPiecesOfOneRoundKeepsEveryPieceResident) {
  Sim sim(64, 120, 64, "");
  run(sim, 4, 96, 3, 1, 3);
  TierStats st = sim.tiers->stats();
  EXPECT_GT(st.hits, 0);
  EXPECT_GT(st.evictions, 0);
}

// The same with a disk tier: pieces whose reads back make room in a full host tier.
TEST(KvTiers, ASelectionInPiecesReadsBackFromDiskExactly) {
  test::TempDir dir;
  Sim sim(64, 120, 24, (dir / "kv").string());
  run(sim, 4, 96, 4, 3, 2);
  EXPECT_TRUE(sim.tiers->take_failed_blocks().empty());
  EXPECT_GT(sim.tiers->stats().bytes_disk_read, 0);
}

// Four sequences whose blocks outgrow a host tier of host_blocks onto disk; no block fails.
TierStats run_with_disk(int64_t n_blocks, int64_t host_blocks, uint64_t seed) {
  test::TempDir dir;
  Sim sim(n_blocks, 120, host_blocks, (dir / "kv").string());
  run(sim, 4, 96, 4, seed);
  EXPECT_TRUE(sim.tiers->take_failed_blocks().empty());
  return sim.tiers->stats();
}

TEST(KvTiers, DiskTierRoundTripsBlocksExactly) {
  // 48 blocks are written but the host holds 20 (one layer's selection touches up to 16): most
  // blocks live on disk and come back.
  const TierStats st = run_with_disk(64, 20, 2);
  EXPECT_GT(st.bytes_disk_written, 0);
  EXPECT_GT(st.bytes_disk_read, 0);
  EXPECT_GT(st.disk_blocks_used, 0);
}

TEST(KvTiers, DiskTierRoundTripsBlocksExactlyWhenBothTiersFillUp) {
  // Every one of the 48 blocks is written: host (16) and disk (32) end up full, with blocks
  // going back and forth (clean ones without being written again).
  const TierStats st = run_with_disk(48, 16, 3);
  EXPECT_GT(st.bytes_disk_read, 0);
  EXPECT_EQ(st.host_blocks_used, 16);
}

// A round larger than the block cache fails with resource_exhausted after some of its misses
// took slots: those are forgotten (their loads were never handed out), so the next round loads
// them instead of taking them for hits; in pieces too.
TEST(KvTiers, ARoundTooLargeForTheCacheLeavesNoUnloadedChunkResident) {
  for (const bool pieces : {false, true}) {
    Sim sim(16, 6, 16, "");
    for (int32_t b = 0; b < 3; ++b) sim.write_block(b);
    std::vector<ChunkId> chunks;  // 8 chunks for a cache of 6 slots
    for (int32_t b = 0; b < 3; ++b)
      for (int h = 0; h < 2; ++h) chunks.push_back(sim.shape.chunk(b, 0, h));
    chunks.push_back(sim.shape.chunk(0, 1, 0));
    chunks.push_back(sim.shape.chunk(0, 1, 1));
    std::vector<ChunkCopy> copies;
    try {
      if (pieces) {
        sim.tiers->select_misses(chunks.data(), 4, copies);
        sim.dev->load(copies);  // the first piece's loads are performed
        copies.clear();
        sim.tiers->select_misses(chunks.data() + 4, 4, copies, true);
      } else {
        sim.tiers->select(chunks.data(), int64_t(chunks.size()), copies);
      }
      FAIL() << "a round of 8 chunks fit a cache of 6";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::resource_exhausted) << e.message();
    }
    // A round that fits now loads every chunk it needs and reads the right bytes (a chunk left
    // resident without its load would be a hit on another chunk's slot).
    sim.tiers->finish_select();
    const std::vector<ChunkId> fits(chunks.begin() + 2, chunks.end());
    sim.select_and_check(fits);
  }
}

TEST(KvTiers, ReleaseFreesEveryTier) {
  test::TempDir dir;
  Sim sim(16, 64, 4, (dir / "kv").string());
  std::vector<ChunkCopy> copies;
  std::vector<int32_t> blocks = {0, 1, 2, 3, 4, 5};
  for (int32_t b : blocks) sim.write_block(b);
  EXPECT_EQ(sim.tiers->stats().host_blocks_used, 4);
  EXPECT_EQ(sim.tiers->stats().disk_blocks_used, 2);
  sim.tiers->release(blocks);
  TierStats st = sim.tiers->stats();
  EXPECT_EQ(st.host_blocks_used, 0);
  EXPECT_EQ(st.disk_blocks_used, 0);
  EXPECT_EQ(st.device_slots_used, 0);
}

TEST(KvTiers, ADiskReadErrorFailsOnlyTheBlockItTouched) {
  test::TempDir dir;
  Sim sim(16, 8, 2, (dir / "kv").string());
  std::vector<ChunkCopy> copies;
  for (int32_t b = 0; b < 6; ++b) sim.write_block(b);  // blocks 0..3 end up on disk
  sim.tiers->disk()->inject_faults([](bool write, int64_t) { return !write; });
  std::vector<ChunkId> chunk = {sim.shape.chunk(0, 0, 0)};
  copies.clear();
  try {
    sim.tiers->select(chunk.data(), 1, copies);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io);
    EXPECT_NE(e.message().find("KV block 0"), std::string::npos) << e.message();
  }
  EXPECT_EQ(sim.tiers->take_failed_blocks(), std::vector<int32_t>{0});
  // The engine goes on: other blocks still come back once the disk works again.
  sim.tiers->disk()->inject_faults({});
  sim.tiers->release({0});
  sim.select_and_check({sim.shape.chunk(1, 1, 1)});
}

// A round whose read-back fails for one block loses the loads of its other misses too (the
// caller gets an error, not the copies): those chunks must not count as resident afterwards.
TEST(KvTiers, AFailedRoundLeavesNoUnloadedChunkResident) {
  test::TempDir dir;
  Sim sim(16, 8, 2, (dir / "kv").string());
  std::vector<ChunkCopy> copies;
  for (int32_t b = 0; b < 6; ++b) sim.write_block(b);  // blocks 0..3 end up on disk
  // Only the first read fails: block 0's; block 1's succeeds.
  int reads = 0;
  sim.tiers->disk()->inject_faults([&reads](bool write, int64_t) { return !write && reads++ == 0; });
  std::vector<ChunkId> both = {sim.shape.chunk(0, 0, 0), sim.shape.chunk(1, 0, 0)};
  copies.clear();
  EXPECT_THROW(sim.tiers->select(both.data(), 2, copies), Error);
  EXPECT_EQ(sim.tiers->take_failed_blocks(), std::vector<int32_t>{0});
  // The round's chunks come back as slot-table entries to clear (slot -1, nothing to copy): the
  // device-side residency trusts the table.
  std::vector<ChunkCopy> stale = sim.tiers->take_stale_entries();
  std::vector<ChunkId> cleared;
  for (const ChunkCopy& c : stale) {
    EXPECT_EQ(c.slot, -1);
    EXPECT_EQ(c.host, nullptr);
    EXPECT_EQ(c.evicted, -1);
    cleared.push_back(c.chunk);
  }
  for (ChunkId c : both) EXPECT_NE(std::find(cleared.begin(), cleared.end(), c), cleared.end());
  EXPECT_TRUE(sim.tiers->take_stale_entries().empty());
  sim.tiers->disk()->inject_faults({});
  sim.tiers->release({0});
  // Block 1 is asked for again: it must arrive, not be taken for a chunk already on the device.
  sim.select_and_check({both[1]});
}

// The host blocks whose reads back failed keep their place: the coldest is still the first to
// move to disk. Here blocks 3 and 4, the two coldest (both dirty), are taken for blocks 0 and 1,
// whose reads fail; a later read of block 2 must then take block 3, not block 4.
TEST(KvTiers, AFailedReadBackLeavesTheHostOrderAsItWas) {
  test::TempDir dir;
  Sim sim(16, 8, 4, (dir / "kv").string());
  // Host: blocks 3 4 5 6 (coldest first), disk: 0 1 2.
  for (int32_t b = 0; b < 7; ++b) sim.write_block(b);
  sim.tiers->disk()->inject_faults([](bool write, int64_t) { return !write; });
  std::vector<ChunkId> lost = {sim.shape.chunk(0, 0, 0), sim.shape.chunk(1, 0, 0)};
  std::vector<ChunkCopy> copies;
  EXPECT_THROW(sim.tiers->select(lost.data(), 2, copies), Error);
  EXPECT_EQ(sim.tiers->take_failed_blocks(), (std::vector<int32_t>{0, 1}));
  sim.tiers->disk()->inject_faults({});
  sim.tiers->release({0, 1});
  const int64_t block_bytes = int64_t(sim.tiers->disk()->slot_bytes());  // one block's I/O
  auto reads_for = [&](int32_t b) {  // selects a chunk of block b; the blocks read from disk
    const int64_t before = sim.tiers->stats().bytes_disk_read;
    sim.select_and_check({sim.shape.chunk(b, 1, 1)});
    return (sim.tiers->stats().bytes_disk_read - before) / block_bytes;
  };
  EXPECT_EQ(reads_for(2), 1);  // block 2 comes back in the coldest host block's place
  EXPECT_EQ(reads_for(4), 0) << "block 4 went to disk before the colder block 3";
  EXPECT_EQ(reads_for(3), 1);
  EXPECT_TRUE(sim.tiers->take_failed_blocks().empty());
}

// A round's misses read their host blocks: those must not be the ones the round's reads back
// from disk push out. Host: blocks 2 3 4 (coldest first), disk: 0 1. The round selects a chunk
// of block 2 that is not on the device, one of block 3 that is (a hit: its host copy is not
// needed) and chunks of blocks 0 and 1. Blocks 4 and 3 must make room, not block 2, which would
// only be read back again.
TEST(KvTiers, ARoundDoesNotMoveToDiskTheHostBlocksItLoads) {
  test::TempDir dir;
  Sim sim(16, 8, 3, (dir / "kv").string());
  for (int32_t b = 0; b < 5; ++b) sim.write_block(b);  // the device holds blocks 3 and 4
  std::vector<ChunkId> chunks = {sim.shape.chunk(2, 0, 0), sim.shape.chunk(3, 0, 0),
                                 sim.shape.chunk(0, 0, 0), sim.shape.chunk(1, 0, 0)};
  ASSERT_LT(sim.dev->table[chunks[0]], 0);
  ASSERT_GE(sim.dev->table[chunks[1]], 0);
  sim.select_and_check(chunks);
  const int64_t block_bytes = int64_t(sim.tiers->disk()->slot_bytes());  // one block's I/O
  const TierStats st = sim.tiers->stats();
  EXPECT_EQ(st.bytes_disk_read, 2 * block_bytes) << "blocks 0 and 1 only";
  EXPECT_EQ(st.bytes_disk_written, 4 * block_bytes) << "blocks 0 and 1 first, then 4 and 3";
  EXPECT_TRUE(sim.tiers->take_failed_blocks().empty());
}

// The same for the blocks a step reads outside the selection: block 2, the coldest host block,
// is read while block 0 comes back from disk; block 3 makes room.
TEST(KvTiers, AStepDoesNotMoveToDiskTheHostBlocksItReads) {
  test::TempDir dir;
  Sim sim(16, 8, 3, (dir / "kv").string());
  for (int32_t b = 0; b < 5; ++b) sim.write_block(b);  // host: 2 3 4, disk: 0 1
  std::vector<ChunkCopy> copies;
  sim.tiers->begin_step({}, {2, 0}, copies);
  sim.dev->load(copies);
  for (int32_t b : {2, 0})
    for (int i = 0; i < int(sim.shape.chunks_per_block()); ++i)
      sim.check_chunk(ChunkId(b) * sim.shape.chunks_per_block() + i, sim.rows);
  copies.clear();
  sim.tiers->end_step({}, copies);
  const int64_t block_bytes = int64_t(sim.tiers->disk()->slot_bytes());  // one block's I/O
  EXPECT_EQ(sim.tiers->stats().bytes_disk_read, block_bytes) << "block 0 only";
  EXPECT_TRUE(sim.tiers->take_failed_blocks().empty());
}

// A read back that fails before its reads are sent (here the caller's pending copies fail)
// gives the host slots it took back: afterwards both host blocks can still make room.
TEST(KvTiers, AReadBackFailingBeforeItsReadsGivesItsHostSlotsBack) {
  test::TempDir dir;
  Sim sim(16, 8, 2, (dir / "kv").string());
  for (int32_t b = 0; b < 4; ++b) sim.write_block(b);  // host: 2 3, disk: 0 1
  int calls = 0;
  sim.tiers->set_before_host_reuse([&calls] {
    if (calls++ == 0) throw Error(ErrorCode::unavailable, "the device failed");
  });
  std::vector<ChunkId> first = {sim.shape.chunk(0, 0, 0)};
  std::vector<ChunkCopy> copies;
  EXPECT_THROW(sim.tiers->select(first.data(), 1, copies), Error);
  EXPECT_TRUE(sim.tiers->take_failed_blocks().empty());  // no block lost its data
  std::vector<ChunkId> both = {sim.shape.chunk(0, 0, 0), sim.shape.chunk(1, 1, 0)};
  sim.select_and_check(both);  // blocks 2 and 3 make room
  EXPECT_EQ(sim.tiers->stats().bytes_disk_read, 2 * int64_t(sim.tiers->disk()->slot_bytes()));
}

// Host memory that cannot be had once: the first allocation fails.
struct FailingOnceAllocator : HostAllocator {
  std::unique_ptr<HostAllocator> plain = make_plain_host_allocator();
  int calls = 0;
  void* allocate(size_t bytes) override {
    if (calls++ == 0) throw Error(ErrorCode::resource_exhausted, "no host memory");
    return plain->allocate(bytes);
  }
  void release(void* p, size_t bytes) override { plain->release(p, bytes); }
};

// A host slot whose memory could not be allocated stays free: the block's flush fails, and
// once memory is there again the same flush takes that slot (the host tier's only one).
TEST(KvTiers, AHostAllocationThatFailsLosesNoHostSlot) {
  Sim sim(1, 8, 1, "", std::make_unique<FailingOnceAllocator>());
  std::vector<ChunkCopy> copies;
  sim.tiers->begin_step({0}, {}, copies);
  sim.dev->load(copies);
  for (int r = 0; r < sim.rows; ++r) sim.write_row(0, r);
  copies.clear();
  try {
    sim.tiers->end_step({0}, copies);
    ADD_FAILURE() << "the flush did not report the failed allocation";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::resource_exhausted) << e.what();
  }
  copies.clear();
  sim.tiers->end_step({0}, copies);
  ASSERT_EQ(copies.size(), size_t(sim.shape.chunks_per_block()));
  sim.dev->store(copies);
  for (const ChunkCopy& c : copies)
    for (int r = 0; r < sim.rows; ++r)
      EXPECT_EQ(c.host[r * (sim.shape.chunk_bytes() / sim.rows)], pattern(c.chunk, r));
}

TEST(KvTiers, DuplicatesInOneSelectionAreAskedForOnce) {
  Sim sim(8, 16, 8, "");
  std::vector<int32_t> blocks = {0, 1};
  sim.tiers->populate(blocks);
  const ChunkId a = sim.shape.chunk(0, 1, 0), b = sim.shape.chunk(1, 0, 1);
  std::vector<ChunkId> chunks = {a, b, a, a, b};
  std::vector<ChunkCopy> copies;
  sim.tiers->select(chunks.data(), int64_t(chunks.size()), copies);
  ASSERT_EQ(copies.size(), 2u);
  EXPECT_EQ(copies[0].chunk, a);
  EXPECT_EQ(copies[1].chunk, b);
  EXPECT_EQ(sim.tiers->stats().selected, 2);
  copies.clear();
  sim.tiers->select(chunks.data(), int64_t(chunks.size()), copies);  // all hits now
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(sim.tiers->stats().hits, 2);
}

// A round in pieces counts each chunk once, also when a later piece repeats an earlier one's.
TEST(KvTiers, DuplicatesAcrossThePiecesOfARoundAreAskedForOnce) {
  Sim sim(8, 16, 8, "");
  std::vector<int32_t> blocks = {0, 1, 2};
  sim.tiers->populate(blocks);
  const ChunkId a = sim.shape.chunk(0, 1, 0), b = sim.shape.chunk(1, 0, 1),
                c = sim.shape.chunk(2, 1, 1);
  const std::vector<ChunkId> first = {a, b}, second = {b, c, a};
  std::vector<ChunkCopy> copies;
  sim.tiers->select_misses(first.data(), 2, copies);
  sim.tiers->select_misses(second.data(), 3, copies, true);
  sim.tiers->finish_select();
  ASSERT_EQ(copies.size(), 3u);
  EXPECT_EQ(copies[0].chunk, a);
  EXPECT_EQ(copies[1].chunk, b);
  EXPECT_EQ(copies[2].chunk, c);
  EXPECT_EQ(sim.tiers->stats().selected, 3);
  EXPECT_EQ(sim.tiers->stats().misses, 3);
  // A new round (more = false) counts them again: all hits.
  copies.clear();
  sim.tiers->select_misses(second.data(), 3, copies);
  sim.tiers->finish_select();
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(sim.tiers->stats().hits, 3);
}

// Populating more blocks than the host holds puts the oldest straight on disk. With both tiers
// full, blocks still come back from disk (a dirty host block takes the disk slot just read; a
// clean one, whose disk copy is current, just gives up its host slot) and their bytes survive
// every round trip.
TEST(KvTiers, BlocksComeBackFromAFullDiskTierExactly) {
  test::TempDir dir;
  Sim sim(24, 16, 8, (dir / "kv").string());
  std::vector<int32_t> all(24);
  for (int32_t b = 0; b < 24; ++b) all[b] = b;
  sim.tiers->populate(all);
  TierStats st = sim.tiers->stats();
  EXPECT_EQ(st.host_blocks_used, 8);
  EXPECT_EQ(st.disk_blocks_used, 16);
  EXPECT_EQ(st.disk_blocks, 16);
  const std::vector<int32_t> order = {3, 17, 0,  22, 9, 5,  12, 20, 1,  15, 7,  23,
                                      2, 11, 19, 4,  8, 13, 6,  21, 10, 14, 16, 18};
  // Every block is rewritten once (as a block being filled would be), then read in rounds.
  for (int32_t b : order) sim.write_block(b);
  const int per = int(sim.shape.chunks_per_block());
  for (int pass = 0; pass < 3; ++pass)
    for (int32_t b : order) {
      std::vector<ChunkId> chunks;
      for (int i = 0; i < per; ++i) chunks.push_back(ChunkId(b) * per + i);
      sim.select_and_check(chunks);
      st = sim.tiers->stats();
      ASSERT_LE(st.host_blocks_used, 8);
      ASSERT_LE(st.disk_blocks_used, 16);
    }
  st = sim.tiers->stats();
  EXPECT_GT(st.bytes_disk_read, 0);
  EXPECT_EQ(st.host_blocks_used, 8);
  EXPECT_TRUE(sim.tiers->take_failed_blocks().empty());
}

}  // namespace
}  // namespace nosa::memory
