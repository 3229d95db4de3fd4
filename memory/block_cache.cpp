#include "memory/block_cache.h"

#include "runtime/core/error.h"

namespace nosa::memory {

BlockCache::BlockCache(int64_t capacity, int64_t n_chunks)
    : slot_of_chunk_(n_chunks, -1),
      chunk_of_slot_(capacity, -1),
      pins_(capacity, 0),
      round_of_slot_(capacity, 0),
      prev_(capacity, -1),
      next_(capacity, -1) {
  NOSA_CHECK(capacity > 0 && capacity < (int64_t(1) << 31), "bad block cache capacity {}",
             capacity);
  free_.reserve(capacity);
  for (int64_t s = capacity - 1; s >= 0; --s) free_.push_back(int32_t(s));
}

void BlockCache::unlink(int32_t s) {
  if (prev_[s] >= 0) next_[prev_[s]] = next_[s]; else head_ = next_[s];
  if (next_[s] >= 0) prev_[next_[s]] = prev_[s]; else tail_ = prev_[s];
  prev_[s] = next_[s] = -1;
}

void BlockCache::push_back(int32_t s) {
  prev_[s] = tail_;
  next_[s] = -1;
  if (tail_ >= 0) next_[tail_] = s; else head_ = s;
  tail_ = s;
}

void BlockCache::acquire(const ChunkId* chunks, int64_t n, int32_t* slots,
                         std::vector<Load>& loads) {
  ++round_;
  // Hits first, so that no miss of this round evicts a chunk the round wants.
  for (int64_t i = 0; i < n; ++i) slots[i] = touch(chunks[i]);
  for (int64_t i = 0; i < n; ++i)
    if (slots[i] < 0) slots[i] = slot_of_chunk_[chunks[i]] >= 0 ? touch(chunks[i]) : fill(chunks[i], loads);
}

int32_t BlockCache::touch(ChunkId chunk) {
  int32_t s = slot_of_chunk_[chunk];
  if (s < 0) return -1;
  if (round_of_slot_[s] != round_) ++stats_.hits;
  if (pins_[s] == 0) {  // pinned slots are off the LRU list
    unlink(s);
    push_back(s);
  }
  round_of_slot_[s] = round_;
  return s;
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
    // The least recently used unpinned slot (pinned ones are off the list). Slots used in this
    // round sit at the recent end, so if the oldest was used in this round, all were.
    s = head_;
    NOSA_CHECK_CODE(s >= 0 && round_of_slot_[s] != round_, ErrorCode::resource_exhausted,
                    "the GPU block cache ({} slots) cannot hold the blocks one step selects; "
                    "raise --gpu-kv-gib or lower the batch",
                    capacity());
    unlink(s);
    evicted = chunk_of_slot_[s];
    slot_of_chunk_[evicted] = -1;
    ++stats_.evictions;
  }
  chunk_of_slot_[s] = chunk;
  slot_of_chunk_[chunk] = s;
  round_of_slot_[s] = round_;
  push_back(s);
  loads.push_back({chunk, s, evicted});
  return s;
}

void BlockCache::pin(ChunkId chunk) {
  int32_t s = slot_of_chunk_[chunk];
  NOSA_ASSERT(s >= 0, "pinning chunk {} that is not resident", chunk);
  if (pins_[s]++ == 0) unlink(s);
}

void BlockCache::unpin(ChunkId chunk) {
  int32_t s = slot_of_chunk_[chunk];
  NOSA_ASSERT(s >= 0 && pins_[s] > 0, "unpinning chunk {} that is not pinned", chunk);
  if (--pins_[s] == 0) push_back(s);
}

bool BlockCache::pinned(ChunkId chunk) const {
  int32_t s = slot_of_chunk_[chunk];
  return s >= 0 && pins_[s] > 0;
}

void BlockCache::drop(ChunkId chunk) {
  int32_t s = slot_of_chunk_[chunk];
  if (s < 0) return;
  if (pins_[s] == 0) unlink(s);
  pins_[s] = 0;
  chunk_of_slot_[s] = -1;
  slot_of_chunk_[chunk] = -1;
  free_.push_back(s);
  --used_;
}

std::vector<int32_t> BlockCache::lru_order() const {
  std::vector<int32_t> out;
  for (int32_t s = head_; s >= 0; s = next_[s]) out.push_back(s);
  return out;
}

}  // namespace nosa::memory
