// NOSA-aware KV residency across three tiers, for one rank:
//   device  a block cache of chunk slots (one block of one layer and KV head per slot), LRU over
//           the least recently selected, with the blocks being written pinned;
//   host    the full KV: every block that has been filled, in arenas (pinned on GPUs);
//   disk    when the host budget is exceeded, the coldest host blocks (least recently selected)
//           move to files and come back when selected again.
// Each step a layer asks for the chunks its queries selected: what stays selected is a hit and
// costs nothing; only what is new is loaded. Pure bookkeeping plus host/disk I/O: the copies
// between host and device are returned to the caller (the backend), which performs them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "memory/block_cache.h"
#include "memory/disk_store.h"
#include "memory/host_store.h"

namespace nosa::memory {

enum class Offload { none, host, host_disk };
const char* offload_name(Offload offload);
// "none", "host" or "host+disk"; throws invalid_argument otherwise.
Offload parse_offload(const std::string& name);

struct TierShape {
  int n_layers = 0;
  int n_kv_heads = 0;        // local to the rank
  size_t kv_chunk_bytes = 0;    // keys and values of one chunk
  size_t bias_chunk_bytes = 0;  // eviction scores of one chunk
  int64_t n_blocks = 0;      // logical blocks: what the host and disk tiers hold together
  int64_t chunks_per_block() const { return int64_t(n_layers) * n_kv_heads; }
  size_t chunk_bytes() const { return kv_chunk_bytes + bias_chunk_bytes; }
  ChunkId chunk(int64_t block, int layer, int head) const {
    return (block * n_layers + layer) * n_kv_heads + head;
  }

};

struct TierBudget {
  int64_t device_slots = 0;  // chunks in the GPU block cache
  int64_t host_blocks = 0;   // blocks in host memory
  std::filesystem::path disk_dir;  // empty: no disk tier (then n_blocks <= host_blocks)
  int disk_threads = 8;  // disk I/O in flight at once (NVMe wants several)
};

struct TierStats {
  int64_t hits = 0, misses = 0, evictions = 0;  // the device block cache
  int64_t selected = 0;  // chunks selected (summed over steps and layers)
  int64_t overlap = 0;   // of those, chunks its (sequence, layer, head) also selected last step
  // Device-side residency's prefetch: chunks copied from a guess at a layer's selection before
  // its own round, and how many of them that round then selected (counted in hits, not misses).
  int64_t prefetched = 0, prefetch_hits = 0;
  int64_t bytes_host_to_device = 0, bytes_device_to_host = 0;
  int64_t bytes_disk_read = 0, bytes_disk_written = 0;
  int64_t device_slots_used = 0, device_slots = 0;
  int64_t host_blocks_used = 0, host_blocks = 0, disk_blocks_used = 0, disk_blocks = 0;
};

// A copy between a chunk's host copy and its device slot.
struct ChunkCopy {
  ChunkId chunk = -1;
  int32_t slot = -1;
  ChunkId evicted = -1;  // the chunk that held the slot before (its slot-table entry is cleared)
  char* host = nullptr;  // device-visible host address: keys/values, then the eviction scores;
                         // null when there is nothing to copy (a chunk never written)
};

class KvTiers {
 public:
  KvTiers(const TierShape& shape, const TierBudget& budget, HostAllocator& allocator);
  ~KvTiers();
  KvTiers(const KvTiers&) = delete;
  KvTiers& operator=(const KvTiers&) = delete;

  const TierShape& shape() const { return shape_; }

  // Step start. `writes`: blocks the step writes; they become resident and stay pinned until
  // they are full. `reads`: blocks the step reads outside the selection (the previous block of a
  // compressed window); pinned for this step. Appends the loads to perform.
  void begin_step(const std::vector<int32_t>& writes, const std::vector<int32_t>& reads,
                  std::vector<ChunkCopy>& loads);
  // One layer's selected chunks become resident together; appends loads for the misses.
  // Duplicates are counted once (a stamp per chunk, no sorting); the order of first appearance
  // is the order of the cache's touches. Blocks that must come back from disk are read in
  // parallel. Throws resource_exhausted if they do not fit, io if a block could not be read from disk
  // (take_failed_blocks() names it).
  void select(const ChunkId* chunks, int64_t n, std::vector<ChunkCopy>& loads);
  // select() in two parts, so that the caller can start the loads before the hits' LRU
  // bookkeeping is done: select_misses() appends the loads (the hits are safe from its
  // evictions), finish_select() then moves the hits to the recent end of the LRU list.
  // With `more`, the chunks continue the previous select_misses() call's round: one layer's
  // selection given in pieces, so that the caller can start a piece's loads while the next piece
  // is looked up. Within a round no chunk is counted twice and no miss evicts a chunk an earlier
  // piece asked for; a chunk of a later piece, not yet asked for, is not protected (if the
  // least recently used, a miss may take its slot, and it is then loaded again as a miss).
  void select_misses(const ChunkId* chunks, int64_t n, std::vector<ChunkCopy>& loads,
                     bool more = false);
  void finish_select();
  // Slots added to the device tier after construction (BlockCache::grow).
  void add_device_slots(int64_t n) { cache_.grow(cache_.capacity() + n); }
  // See BlockCache::set_protected_rounds (each select or select_misses without `more`, and
  // begin_step, is a round).
  void set_protected_rounds(int n) { cache_.set_protected_rounds(n); }
  // Step end: `full` blocks were completed in this step and are written back to the host
  // (appends the stores: device slot -> host, to be performed before the next step). Releases
  // the step's pins.
  void end_step(const std::vector<int32_t>& full, std::vector<ChunkCopy>& stores);
  // Benchmarks: the blocks exist in the host (then disk) tier with whatever bytes their memory
  // holds, as if they had been written and flushed, the later ones hotter. Those the host budget
  // cannot keep go straight to disk (written from a zeroed buffer, in parallel with the pinning
  // of the host arenas); progress lines every few seconds.
  void populate(const std::vector<int32_t>& blocks);
  // A step that failed midway: releases its read pins (the blocks being written stay pinned).
  void abort_step();
  // A finished or preempted sequence's blocks: forgotten in every tier.
  void release(const std::vector<int32_t>& blocks);
  // Blocks whose disk I/O failed since the last call: their sequences must end with an error.
  std::vector<int32_t> take_failed_blocks();
  // After a failed round: loads (slot -1, nothing to copy) that clear the slot-table entries the
  // round left naming slots that no longer hold their chunk. The host path never trusts such an
  // entry; device-side residency would, so the caller performs these.
  std::vector<ChunkCopy> take_stale_entries() { return std::exchange(stale_, {}); }
  // Tests: make disk operations fail.
  DiskStore* disk() { return disk_.get(); }
  // Called before a host slot that may be the source or target of copies already handed out is
  // reused (a block moves to disk): the caller must finish its pending copies (the CUDA backend
  // synchronises its stream).
  void set_before_host_reuse(std::function<void()> fn) { before_host_reuse_ = std::move(fn); }
  // When one round reads more blocks back from disk than the host tier holds, the loads handed
  // out so far are passed here to be performed (and finished) early, so that their host memory
  // can be reused. Without it such a round is a resource_exhausted error.
  void set_flush_loads(std::function<void(std::vector<ChunkCopy>&)> fn) {
    flush_loads_ = std::move(fn);
  }

  // The device-visible address of a block's host memory (every layer and head of it, chunk
  // after chunk as chunk_host lays them out), or null when the block is not in host memory.
  char* block_host_address(int32_t block) const {
    const int64_t slot = host_slot_of_block_[size_t(block)];
    return slot >= 0 ? host_->device_slot(slot) : nullptr;
  }

  TierStats stats() const;
  // See HostStore::numa_pages.
  std::map<int, int64_t> host_numa_pages() const { return host_->numa_pages(); }

 private:
  void unpin_step_reads();
  int64_t host_slot_for(int32_t block);  // makes the block's data present on the host
  int64_t free_host_slot();              // evicts the coldest host block to disk if needed
  void touch_host(int64_t slot);
  char* chunk_host(int64_t host_slot, ChunkId chunk) const;
  // The chunk's place in per-chunk arrays laid out layer-major: one layer's selection (what one
  // round touches) then falls within n_blocks * n_kv_heads entries instead of all of them. The
  // marks use the block cache's layout, so that one index serves both.
  int64_t layer_major(ChunkId c) const { return cache_.index_of(c); }
  int32_t block_of(ChunkId c) const { return int32_t(per_div_.div(uint32_t(c))); }
  void acquire(const ChunkId* chunks, int64_t n, std::vector<ChunkCopy>& loads);
  void add_loads(std::vector<ChunkCopy>& loads);  // misses_ -> loads (host addresses, disk)
  // A round that fails: the chunks given slots for its misses (misses_) are forgotten, so that a
  // later round loads them instead of taking them for hits.
  void forget_misses();
  // Brings the disk-only blocks of these misses to the host, several reads in flight; the host
  // blocks of the other misses are not among the blocks that make room.
  void read_back(const std::vector<BlockCache::Load>& misses);
  struct ReadBack {
    int32_t block;
    int64_t host_slot;
    int32_t victim;  // the block whose host slot this is (it moves to the freed disk slot), or -1
  };
  void read_back_group(std::vector<ReadBack>& group);
  // The host tier's recency list (least recently touched first), over occupied host slots.
  void host_unlink(int64_t slot);
  void host_push_back(int64_t slot);
  void host_push_front(int64_t slot);

  TierShape shape_;
  TierBudget budget_;
  size_t block_bytes_;
  FastDiv per_div_;  // chunks per block
  BlockCache cache_;
  std::unique_ptr<HostStore> host_;
  std::unique_ptr<DiskStore> disk_;
  std::vector<int64_t> host_slot_of_block_, disk_slot_of_block_;
  std::vector<int32_t> block_of_host_slot_;
  std::vector<uint64_t> host_slot_touched_;  // for choosing the coldest host block
  struct HostLinks {
    int64_t prev = -1, next = -1;
  };
  std::vector<HostLinks> host_links_;  // by host slot
  IndexList<int64_t> host_lru_;        // host blocks by recency; head = coldest
  std::vector<int64_t> free_host_, free_disk_;
  std::vector<uint8_t> writing_;       // per block: pinned as a block being written
  std::vector<int32_t> step_reads_;
  // Per chunk (layer-major): the select() call that last saw it (duplicates) and the last step
  // that selected it (overlap), side by side so that one cache line serves both.
  struct ChunkMark {
    uint32_t seen = 0;
    uint32_t step = 0;
  };
  std::vector<ChunkMark> marks_;
  uint32_t seen_stamp_ = 0;
  std::vector<uint32_t> block_seen_;      // per block: the read_back() call that last saw it
  uint32_t block_stamp_ = 0;
  // Buffers reused by every call (no allocation per layer).
  std::vector<int32_t> slots_, hit_slots_;
  std::vector<ChunkId> missing_;
  std::vector<ChunkId> step_chunks_;  // begin_step's chunks, kept for its capacity
  std::vector<BlockCache::Load> misses_;
  std::vector<int32_t> back_;
  std::vector<ReadBack> group_;
  char* bounce_ = nullptr;  // disk reads land here before their host slot's block moves out
  size_t bounce_slots_ = 0;
  std::vector<int32_t> failed_;
  std::vector<ChunkCopy> stale_;
  uint32_t step_ = 1;
  uint64_t tick_ = 1;
  uint64_t round_tick_ = 0;  // host blocks touched since this tick serve pending loads
  TierStats stats_;
  std::function<void()> before_host_reuse_;
  std::function<void(std::vector<ChunkCopy>&)> flush_loads_;
  std::vector<ChunkCopy>* pending_ = nullptr;  // the loads of the round in progress
};

}  // namespace nosa::memory
