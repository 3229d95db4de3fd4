// The device tier's bookkeeping: which KV chunks (one block of one layer and KV head) occupy the
// GPU block cache's slots. Each step asks for the chunks it selected: chunks still resident are
// hits and cost nothing; misses get a slot, taking the least recently selected unpinned chunk's
// (LRU), so spare capacity keeps recently dropped blocks and a block that comes back is a hit.
// Pinned chunks (the blocks being written) are never evicted. Pure host logic: the transfers it
// asks for are done by the caller.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "memory/fast_div.h"
#include "memory/index_list.h"

namespace nosa::memory {

using ChunkId = int64_t;

struct CacheStats {
  int64_t hits = 0, misses = 0, evictions = 0;
};

class BlockCache {
 public:
  // capacity: slots on the device; n_chunks: the largest chunk id + 1. With `per_block` (chunks
  // of one block: layers x heads) and `heads`, the chunk -> slot map is laid out layer-major, so
  // that one layer's lookups (one round) stay within a small part of it.
  BlockCache(int64_t capacity, int64_t n_chunks, int64_t per_block = 0, int64_t heads = 0);

  struct Load {
    ChunkId chunk;
    int32_t slot;
    ChunkId evicted;  // the chunk the slot held before, or -1
  };

  // Makes the n chunks resident (one round: they never evict each other, and the ones already
  // resident are hits) and writes their slots; each miss appends the load to perform. Throws
  // resource_exhausted when they do not fit beside the pinned chunks.
  void acquire(const ChunkId* chunks, int64_t n, int32_t* slots, std::vector<Load>& loads);
  // The same in parts, so that loads can start before the hits' bookkeeping (the caller removes
  // duplicates): begin_round(); mark() every chunk (a resident one is a hit: used in this round,
  // so no eviction of the round takes it, but it keeps its place in the LRU list for now);
  // load() every chunk mark() did not find; settle() the hits' slots (to the recent end, in
  // order). Same slots, loads and statistics as acquire(); only the order within the round's
  // end of the LRU list differs (the misses come before the hits).
  void begin_round() { ++round_; }
  int32_t mark(ChunkId chunk) { return mark_index(index(chunk)); }
  int32_t load(ChunkId chunk, std::vector<Load>& loads) { return fill(chunk, loads); }
  void settle(const int32_t* slots, int64_t n);
  // mark() by the chunk's index (see index_of), for callers that already know it; they fetch
  // its map entry and its slot's state ahead with the prefetch calls.
  int32_t mark_index(int64_t i) {
    const int32_t s = slot_of_chunk_[i];
    if (s < 0) return -1;
    if (state_[s].round != round_) ++stats_.hits;
    state_[s].round = round_;
    return s;
  }
  void prefetch_index(int64_t i) const { __builtin_prefetch(&slot_of_chunk_[i]); }
  void prefetch_state(int64_t i) const {
    const int32_t s = slot_of_chunk_[i];
    if (s >= 0) __builtin_prefetch(&state_[s]);
  }
  // The index of a chunk in the per-chunk map: layer-major when the cache was given per_block
  // and heads (one layer's chunks together).
  int64_t index_of(ChunkId chunk) const { return index(chunk); }
  // A resident chunk's slot, or -1.
  int32_t slot_of(ChunkId chunk) const { return slot_of_chunk_[index(chunk)]; }
  bool resident(ChunkId chunk) const { return slot_of_chunk_[index(chunk)] >= 0; }

  // How many rounds, this one included, keep the chunks they used from eviction (default 1).
  // 2 while the device may still be reading the previous round's chunks when this round's
  // loads land (two micro-batches, their rounds interleaved).
  void set_protected_rounds(int n) { protected_rounds_ = uint64_t(std::max(n, 1)); }

  // Pinned chunks stay resident (counted: pin twice, unpin twice).
  void pin(ChunkId chunk);
  void unpin(ChunkId chunk);
  bool pinned(ChunkId chunk) const;
  // Forgets a chunk (its sequence ended): the slot becomes free.
  void drop(ChunkId chunk);

  int64_t capacity() const { return int64_t(chunk_of_slot_.size()); }
  // More slots (capacity..new_capacity-1, free): partitions of device-side residency handed
  // back to the cache.
  void grow(int64_t new_capacity);
  int64_t used() const { return used_; }
  const CacheStats& stats() const { return stats_; }
  // Unpinned slots from least to most recently used (for tests and diagnostics).
  std::vector<int32_t> lru_order() const;

 private:
  int32_t touch(ChunkId chunk);  // a hit: marks the slot used in this round
  int32_t fill(ChunkId chunk, std::vector<Load>& loads);  // a miss
  bool protected_slot(int32_t s) const { return state_[s].round + protected_rounds_ > round_; }
  void unlink(int32_t slot);
  void push_back(int32_t slot);  // most recently used end

  int64_t index(ChunkId chunk) const {
    if (per_block_ == 0) return chunk;
    const uint32_t c = uint32_t(chunk), b = per_div_.div(c), r = c - b * uint32_t(per_block_);
    const uint32_t layer = heads_div_.div(r), head = r - layer * uint32_t(heads_);
    return (int64_t(layer) * n_blocks_ + b) * heads_ + head;
  }
  int64_t per_block_ = 0, heads_ = 1, n_blocks_ = 0;
  FastDiv per_div_, heads_div_;
  std::vector<int32_t> slot_of_chunk_;  // by index(chunk)
  std::vector<ChunkId> chunk_of_slot_;  // -1 when free
  // Per slot, together (one cache line per touch): last round used, pins, LRU neighbours.
  struct SlotState {
    uint64_t round = 0;
    int32_t pins = 0;
    int32_t prev = -1, next = -1;  // LRU list over used unpinned slots (lru_)
  };
  std::vector<SlotState> state_;
  IndexList<int32_t> lru_;  // head: least recently used
  std::vector<int32_t> free_;
  int64_t used_ = 0;
  uint64_t round_ = 1;
  uint64_t protected_rounds_ = 1;
  CacheStats stats_;
};

}  // namespace nosa::memory
