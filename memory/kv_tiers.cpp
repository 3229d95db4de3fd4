#include "memory/kv_tiers.h"

#include <algorithm>

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::memory {

const char* offload_name(Offload offload) {
  switch (offload) {
    case Offload::none: return "none";
    case Offload::host: return "host";
    case Offload::host_disk: return "host+disk";
  }
  return "?";
}

Offload parse_offload(const std::string& name) {
  if (name == "none") return Offload::none;
  if (name == "host") return Offload::host;
  if (name == "host+disk" || name == "host_disk") return Offload::host_disk;
  NOSA_FAIL(ErrorCode::invalid_argument, "unknown --offload '{}' (use none, host or host+disk)",
            name);
}

KvTiers::KvTiers(const TierShape& shape, const TierBudget& budget, HostAllocator& allocator)
    : shape_(shape),
      budget_(budget),
      block_bytes_(size_t(shape.chunks_per_block()) * shape.chunk_bytes()),
      cache_(budget.device_slots, shape.n_blocks * shape.chunks_per_block()) {
  NOSA_CHECK(shape.n_blocks > 0 && budget.host_blocks > 0, "empty KV tiers");
  const int64_t host_blocks = std::min(budget.host_blocks, shape.n_blocks);
  host_ = std::make_unique<HostStore>(block_bytes_, host_blocks, allocator);
  const int64_t disk_blocks = shape.n_blocks - host_blocks;
  if (disk_blocks > 0) {
    NOSA_CHECK(!budget.disk_dir.empty(),
               "{} KV blocks do not fit the host budget of {} blocks and there is no disk tier",
               shape.n_blocks, host_blocks);
    disk_ = std::make_unique<DiskStore>(budget.disk_dir, host_->slot_bytes(), disk_blocks,
                                        budget.disk_threads);
    for (int64_t s = disk_blocks - 1; s >= 0; --s) free_disk_.push_back(s);
  }
  host_slot_of_block_.assign(shape.n_blocks, -1);
  disk_slot_of_block_.assign(shape.n_blocks, -1);
  block_of_host_slot_.assign(host_blocks, -1);
  host_slot_touched_.assign(host_blocks, 0);
  for (int64_t s = host_blocks - 1; s >= 0; --s) free_host_.push_back(s);
  writing_.assign(shape.n_blocks, 0);
  selected_step_.assign(shape.n_blocks * shape.chunks_per_block(), 0);
}

KvTiers::~KvTiers() = default;

char* KvTiers::chunk_host(int64_t host_slot, ChunkId chunk) const {
  return host_->device_slot(host_slot) +
         size_t(chunk % shape_.chunks_per_block()) * shape_.chunk_bytes();
}

void KvTiers::touch_host(int64_t slot) { host_slot_touched_[slot] = ++tick_; }

int64_t KvTiers::free_host_slot() {
  if (!free_host_.empty()) {
    int64_t s = free_host_.back();
    free_host_.pop_back();
    host_->slot(s);  // allocates its arena
    return s;
  }
  NOSA_ASSERT(disk_, "the host tier is full without a disk tier");
  // The coldest host block (least recently selected or written) moves to disk.
  int64_t victim = -1;
  for (int64_t s = 0; s < int64_t(host_slot_touched_.size()); ++s)
    if (victim < 0 || host_slot_touched_[s] < host_slot_touched_[victim]) victim = s;
  // Blocks touched in this round are sources of loads not yet performed: perform them first.
  if (host_slot_touched_[victim] >= round_tick_ && flush_loads_ && pending_ && !pending_->empty()) {
    flush_loads_(*pending_);
    pending_->clear();
    round_tick_ = tick_ + 1;
  }
  NOSA_CHECK_CODE(host_slot_touched_[victim] < round_tick_, ErrorCode::resource_exhausted,
                  "the host KV tier ({} blocks) cannot stage the blocks one step reads from disk; "
                  "raise --host-kv-gib or lower --max-batch-tokens",
                  host_->capacity());
  const int32_t block = block_of_host_slot_[victim];
  if (before_host_reuse_) before_host_reuse_();
  NOSA_CHECK_CODE(!free_disk_.empty(), ErrorCode::resource_exhausted,
                  "the host and disk KV budgets are full");
  const int64_t ds = free_disk_.back();
  free_disk_.pop_back();
  try {
    disk_->wait(disk_->write(ds, host_->slot(victim)));
    disk_slot_of_block_[block] = ds;
    stats_.bytes_disk_written += int64_t(host_->slot_bytes());
  } catch (const Error& e) {
    // The block's data is lost with its host slot: its sequence fails, the engine goes on.
    logger("memory")->error("moving KV block {} to disk failed: {}", block, e.message());
    failed_.push_back(block);
  }
  host_slot_of_block_[block] = -1;
  block_of_host_slot_[victim] = -1;
  return victim;
}

int64_t KvTiers::host_slot_for(int32_t block) {
  int64_t hs = host_slot_of_block_[block];
  if (hs >= 0) {
    touch_host(hs);
    return hs;
  }
  const int64_t ds = disk_slot_of_block_[block];
  NOSA_ASSERT(ds >= 0 && disk_, "KV block {} has no data in any tier", block);
  hs = free_host_slot();
  try {
    disk_->wait(disk_->read(ds, host_->slot(hs)));
  } catch (const Error& e) {
    free_host_.push_back(hs);
    failed_.push_back(block);
    NOSA_FAIL(ErrorCode::io, "reading KV block {} back from disk failed: {}", block, e.message());
  }
  stats_.bytes_disk_read += int64_t(host_->slot_bytes());
  disk_slot_of_block_[block] = -1;
  free_disk_.push_back(ds);
  host_slot_of_block_[block] = hs;
  block_of_host_slot_[hs] = block;
  touch_host(hs);
  return hs;
}

void KvTiers::acquire(const ChunkId* chunks, int64_t n, std::vector<ChunkCopy>& loads) {
  struct Pending {
    std::vector<ChunkCopy>*& slot;
    ~Pending() { slot = nullptr; }
  } guard{pending_};
  pending_ = &loads;
  std::vector<int32_t> slots(n);
  std::vector<BlockCache::Load> misses;
  cache_.acquire(chunks, n, slots.data(), misses);
  for (auto& m : misses) {
    ChunkCopy c{m.chunk, m.slot, m.evicted, nullptr};
    const int32_t block = int32_t(m.chunk / shape_.chunks_per_block());
    if (host_slot_of_block_[block] >= 0 || disk_slot_of_block_[block] >= 0) {
      c.host = chunk_host(host_slot_for(block), m.chunk);
      stats_.bytes_host_to_device += int64_t(shape_.chunk_bytes());
    }
    loads.push_back(c);
  }
}

void KvTiers::begin_step(const std::vector<int32_t>& writes, const std::vector<int32_t>& reads,
                         std::vector<ChunkCopy>& loads) {
  ++step_;
  round_tick_ = tick_ + 1;
  const int64_t per = shape_.chunks_per_block();
  std::vector<ChunkId> chunks;
  for (int32_t b : writes)
    if (!writing_[b])
      for (int64_t i = 0; i < per; ++i) chunks.push_back(b * per + i);
  for (int32_t b : reads)
    for (int64_t i = 0; i < per; ++i) chunks.push_back(b * per + i);
  acquire(chunks.data(), int64_t(chunks.size()), loads);
  for (int32_t b : writes)
    if (!writing_[b]) {
      for (int64_t i = 0; i < per; ++i) cache_.pin(b * per + i);
      writing_[b] = 1;
    }
  for (int32_t b : reads)
    for (int64_t i = 0; i < per; ++i) cache_.pin(b * per + i);
  step_reads_.insert(step_reads_.end(), reads.begin(), reads.end());
}

void KvTiers::select(const ChunkId* chunks, int64_t n, std::vector<ChunkCopy>& loads) {
  stats_.selected += n;
  const int64_t per = shape_.chunks_per_block();
  for (int64_t i = 0; i < n; ++i) {
    if (selected_step_[chunks[i]] + 1 == step_) ++stats_.overlap;
    selected_step_[chunks[i]] = step_;
    const int64_t hs = host_slot_of_block_[chunks[i] / per];
    if (hs >= 0) touch_host(hs);  // recency only: these blocks may still move to disk
  }
  // Only the blocks read for this round's loads are protected from reuse until they are done.
  round_tick_ = tick_ + 1;
  acquire(chunks, n, loads);
}

void KvTiers::end_step(const std::vector<int32_t>& full, std::vector<ChunkCopy>& stores) {
  round_tick_ = tick_ + 1;
  const int64_t per = shape_.chunks_per_block();
  for (int32_t b : full) {
    NOSA_ASSERT(writing_[b], "block {} completed without being written", b);
    const int64_t hs = free_host_slot();
    host_slot_of_block_[b] = hs;
    block_of_host_slot_[hs] = b;
    touch_host(hs);
    for (int64_t i = 0; i < per; ++i) {
      const ChunkId c = b * per + i;
      stores.push_back({c, cache_.slot_of(c), -1, chunk_host(hs, c)});
      cache_.unpin(c);
    }
    stats_.bytes_device_to_host += int64_t(per * shape_.chunk_bytes());
    writing_[b] = 0;
  }
  for (int32_t b : step_reads_)
    for (int64_t i = 0; i < per; ++i) cache_.unpin(b * per + i);
  step_reads_.clear();
}

void KvTiers::populate(const std::vector<int32_t>& blocks) {
  round_tick_ = tick_ + 1;
  for (int32_t b : blocks) {
    NOSA_ASSERT(host_slot_of_block_[b] < 0 && disk_slot_of_block_[b] < 0,
                "block {} already has data", b);
    const int64_t hs = free_host_slot();
    round_tick_ = tick_ + 1;  // one block at a time: older ones may move to disk
    host_slot_of_block_[b] = hs;
    block_of_host_slot_[hs] = b;
    touch_host(hs);
  }
}

void KvTiers::abort_step() {
  const int64_t per = shape_.chunks_per_block();
  for (int32_t b : step_reads_)
    for (int64_t i = 0; i < per; ++i) cache_.unpin(b * per + i);
  step_reads_.clear();
}

void KvTiers::release(const std::vector<int32_t>& blocks) {
  const int64_t per = shape_.chunks_per_block();
  for (int32_t b : blocks) {
    for (int64_t i = 0; i < per; ++i) {
      cache_.drop(b * per + i);
      selected_step_[b * per + i] = 0;
    }
    if (host_slot_of_block_[b] >= 0) {
      block_of_host_slot_[host_slot_of_block_[b]] = -1;
      host_slot_touched_[host_slot_of_block_[b]] = 0;
      free_host_.push_back(host_slot_of_block_[b]);
      host_slot_of_block_[b] = -1;
    }
    if (disk_slot_of_block_[b] >= 0) {
      free_disk_.push_back(disk_slot_of_block_[b]);
      disk_slot_of_block_[b] = -1;
    }
    writing_[b] = 0;
  }
}

std::vector<int32_t> KvTiers::take_failed_blocks() {
  std::vector<int32_t> out;
  out.swap(failed_);
  return out;
}

TierStats KvTiers::stats() const {
  TierStats s = stats_;
  s.hits = cache_.stats().hits;
  s.misses = cache_.stats().misses;
  s.evictions = cache_.stats().evictions;
  s.device_slots = cache_.capacity();
  s.device_slots_used = cache_.used();
  s.host_blocks = host_->capacity();
  s.host_blocks_used = host_->capacity() - int64_t(free_host_.size());
  s.disk_blocks = disk_ ? disk_->capacity() : 0;
  s.disk_blocks_used = disk_ ? disk_->capacity() - int64_t(free_disk_.size()) : 0;
  return s;
}

}  // namespace nosa::memory
