#include "memory/block_cache.h"

#include <algorithm>

#include "runtime/core/error.h"

namespace nosa::memory {

BlockCache::BlockCache(int64_t capacity, int64_t n_chunks, int64_t per_block, int64_t heads)
    : per_block_(per_block),
      heads_(heads > 0 ? heads : 1),
      n_blocks_(per_block > 0 ? n_chunks / per_block : 0),
      per_div_(uint32_t(per_block > 0 ? per_block : 1)),
      heads_div_(uint32_t(heads > 0 ? heads : 1)),
      slot_of_chunk_(n_chunks, -1),
      chunk_of_slot_(capacity, -1),
      state_(capacity) {
  NOSA_CHECK(capacity > 0 && capacity < (int64_t(1) << 31), "bad block cache capacity {}",
             capacity);
  NOSA_CHECK(per_block == 0 || (n_chunks % per_block == 0 && per_block % heads_ == 0 &&
                                 n_chunks < (int64_t(1) << 32)),
             "bad block cache layout");
  free_.reserve(capacity);
  for (int64_t s = capacity - 1; s >= 0; --s) free_.push_back(int32_t(s));
}

void BlockCache::grow(int64_t new_capacity) {
  const int64_t old = capacity();
  NOSA_CHECK(new_capacity >= old && new_capacity < (int64_t(1) << 31),
             "bad block cache capacity {} (was {})", new_capacity, old);
  chunk_of_slot_.resize(size_t(new_capacity), -1);
  state_.resize(size_t(new_capacity));
  for (int64_t s = new_capacity - 1; s >= old; --s) free_.push_back(int32_t(s));
}

void BlockCache::unlink(int32_t s) {
  lru_.unlink(s, [this](int32_t i) -> SlotState& { return state_[i]; });
}

void BlockCache::push_back(int32_t s) {
  lru_.push_back(s, [this](int32_t i) -> SlotState& { return state_[i]; });
}

void BlockCache::acquire(const ChunkId* chunks, int64_t n, int32_t* slots,
                         std::vector<Load>& loads) {
  ++round_;
  // Hits first, so that no miss of this round evicts a chunk the round wants. The map and the
  // slots' state are scattered: each is fetched a few entries ahead.
  constexpr int64_t k_ahead = 16;
  for (int64_t i = 0; i < std::min(n, k_ahead); ++i) prefetch_index(index(chunks[i]));
  for (int64_t i = 0; i < n; ++i) {
    if (i + k_ahead < n) prefetch_index(index(chunks[i + k_ahead]));
    if (i + k_ahead / 2 < n) prefetch_state(index(chunks[i + k_ahead / 2]));
    slots[i] = touch(chunks[i]);
  }
  for (int64_t i = 0; i < n; ++i)
    if (slots[i] < 0) slots[i] = resident(chunks[i]) ? touch(chunks[i]) : fill(chunks[i], loads);
}

int32_t BlockCache::touch(ChunkId chunk) {
  int32_t s = slot_of_chunk_[index(chunk)];
  if (s < 0) return -1;
  SlotState& x = state_[s];
  if (x.round != round_) ++stats_.hits;
  if (x.pins == 0 && lru_.tail != s) {  // pinned slots are off the LRU list
    unlink(s);
    push_back(s);
  }
  x.round = round_;
  return s;
}


void BlockCache::settle(const int32_t* slots, int64_t n) {
  constexpr int64_t k_ahead = 8;
  for (int64_t i = 0; i < n; ++i) {
    if (i + k_ahead < n) __builtin_prefetch(&state_[slots[i + k_ahead]]);
    const int32_t s = slots[i];
    if (state_[s].pins == 0 && lru_.tail != s) {
      unlink(s);
      push_back(s);
    }
  }
}

int32_t BlockCache::fill(ChunkId chunk, std::vector<Load>& loads) {
  int32_t s = -1;
  ChunkId evicted = -1;
  ++stats_.misses;
  if (!free_.empty()) {
    s = free_.back();
    free_.pop_back();
    ++used_;
  } else {
    // The least recently used unpinned slot (pinned ones are off the list). Slots used in the
    // protected rounds sit at the recent end, so if the oldest was used in them, all were.
    s = lru_.head;
    // Hits marked in this round but not settled yet still sit where they were: they go to the
    // recent end as they are met (in acquire() they are all there already).
    for (int64_t moved = 0; s >= 0 && protected_slot(s) && moved < capacity(); ++moved) {
      unlink(s);
      push_back(s);
      s = lru_.head;
    }
    NOSA_CHECK_CODE(s >= 0 && !protected_slot(s), ErrorCode::resource_exhausted,
                    "the GPU block cache ({} slots) cannot hold the blocks one step selects; "
                    "raise --gpu-kv-gib or lower the batch",
                    capacity());
    unlink(s);
    evicted = chunk_of_slot_[s];
    slot_of_chunk_[index(evicted)] = -1;
    ++stats_.evictions;
  }
  chunk_of_slot_[s] = chunk;
  slot_of_chunk_[index(chunk)] = s;
  state_[s].round = round_;
  push_back(s);
  loads.push_back({chunk, s, evicted});
  return s;
}

void BlockCache::pin(ChunkId chunk) {
  int32_t s = slot_of_chunk_[index(chunk)];
  NOSA_ASSERT(s >= 0, "pinning chunk {} that is not resident", chunk);
  if (state_[s].pins++ == 0) unlink(s);
}

void BlockCache::unpin(ChunkId chunk) {
  int32_t s = slot_of_chunk_[index(chunk)];
  NOSA_ASSERT(s >= 0 && state_[s].pins > 0, "unpinning chunk {} that is not pinned", chunk);
  if (--state_[s].pins == 0) push_back(s);
}

bool BlockCache::pinned(ChunkId chunk) const {
  int32_t s = slot_of_chunk_[index(chunk)];
  return s >= 0 && state_[s].pins > 0;
}

void BlockCache::drop(ChunkId chunk) {
  const int64_t i = index(chunk);
  int32_t s = slot_of_chunk_[i];
  if (s < 0) return;
  if (state_[s].pins == 0) unlink(s);
  state_[s].pins = 0;
  chunk_of_slot_[s] = -1;
  slot_of_chunk_[i] = -1;
  free_.push_back(s);
  --used_;
}

std::vector<int32_t> BlockCache::lru_order() const {
  std::vector<int32_t> out;
  for (int32_t s = lru_.head; s >= 0; s = state_[s].next) out.push_back(s);
  return out;
}

}  // namespace nosa::memory
