#include "memory/kv_tiers.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

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
      per_div_(uint32_t(shape.chunks_per_block())),
      cache_(budget.device_slots, shape.n_blocks * shape.chunks_per_block(),
             shape.chunks_per_block(), shape.n_kv_heads) {
  NOSA_CHECK(shape.n_blocks > 0 && budget.host_blocks > 0, "empty KV tiers");
  NOSA_CHECK(shape.n_blocks * shape.chunks_per_block() < (int64_t(1) << 32),
             "{} KV blocks of {} chunks are too many for 32-bit chunk ids", shape.n_blocks,
             shape.chunks_per_block());
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
  host_links_.assign(host_blocks, HostLinks{});
  for (int64_t s = host_blocks - 1; s >= 0; --s) free_host_.push_back(s);
  writing_.assign(shape.n_blocks, 0);
  marks_.assign(size_t(shape.n_blocks * shape.chunks_per_block()), ChunkMark{});
  block_seen_.assign(shape.n_blocks, 0);
}

KvTiers::~KvTiers() {
  if (disk_) disk_->wait_all();
  std::free(bounce_);
}

// A host slot is on the list when it has a predecessor or is its head.
void KvTiers::host_unlink(int64_t s) {
  if (host_links_[s].prev < 0 && host_lru_.head != s) return;
  host_lru_.unlink(s, [this](int64_t i) -> HostLinks& { return host_links_[i]; });
}

void KvTiers::host_push_back(int64_t s) {
  host_lru_.push_back(s, [this](int64_t i) -> HostLinks& { return host_links_[i]; });
}

void KvTiers::host_push_front(int64_t s) {
  host_lru_.push_front(s, [this](int64_t i) -> HostLinks& { return host_links_[i]; });
}

char* KvTiers::chunk_host(int64_t host_slot, ChunkId chunk) const {
  return host_->device_slot(host_slot) +
         size_t(per_div_.mod(uint32_t(chunk))) * shape_.chunk_bytes();
}

// Ticks grow with every touch, so the list's order is the order of host_slot_touched_.
void KvTiers::touch_host(int64_t slot) {
  host_slot_touched_[slot] = ++tick_;
  if (host_lru_.tail == slot) return;
  host_unlink(slot);
  host_push_back(slot);
}

int64_t KvTiers::free_host_slot() {
  if (!free_host_.empty()) {
    int64_t s = free_host_.back();
    host_->slot(s);  // allocates its arena; if that fails, the slot stays free
    free_host_.pop_back();
    return s;
  }
  NOSA_ASSERT(disk_, "the host tier is full without a disk tier");
  // The coldest host block (least recently selected or written) moves to disk.
  const int64_t victim = host_lru_.head;
  NOSA_ASSERT(victim >= 0, "the host tier is full but holds no block");
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
  const bool clean = block >= 0 && disk_slot_of_block_[block] >= 0;
  if (!clean && free_disk_.empty()) {
    // Disk slots held by clean host blocks are spare copies: the coldest gives its up.
    for (int64_t s = host_lru_.head; s >= 0; s = host_links_[s].next) {
      const int32_t b = block_of_host_slot_[s];
      if (b >= 0 && disk_slot_of_block_[b] >= 0) {
        free_disk_.push_back(disk_slot_of_block_[b]);
        disk_slot_of_block_[b] = -1;
        break;
      }
    }
  }
  NOSA_CHECK_CODE(clean || !free_disk_.empty(), ErrorCode::resource_exhausted,
                  "the host and disk KV budgets are full");
  if (before_host_reuse_) before_host_reuse_();
  host_unlink(victim);
  if (!clean && block >= 0) {  // a clean block's disk copy is current: nothing to write
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
      free_disk_.push_back(ds);
    }
  }
  if (block >= 0) host_slot_of_block_[block] = -1;
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
  // The disk copy stays: the block is clean until it is written again, and moves back to disk
  // for free.
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
  slots_.resize(size_t(n));
  misses_.clear();
  try {
    cache_.acquire(chunks, n, slots_.data(), misses_);
  } catch (...) {
    forget_misses();
    throw;
  }
  add_loads(loads);
}

void KvTiers::forget_misses() {
  for (const auto& m : misses_) {
    cache_.drop(m.chunk);
    // Their slot-table entries may now name slots that hold something else: the chunk's (an
    // early flush may have loaded it) and the evicted chunk's (its clearing load never ran).
    stale_.push_back({m.chunk, -1, -1, nullptr});
    if (m.evicted >= 0) stale_.push_back({m.evicted, -1, -1, nullptr});
  }
  misses_.clear();
}

void KvTiers::add_loads(std::vector<ChunkCopy>& loads) {
  const size_t first = loads.size();
  try {
    if (disk_) read_back(misses_);
    for (auto& m : misses_) {
      ChunkCopy c{m.chunk, m.slot, m.evicted, nullptr};
      const int32_t block = block_of(m.chunk);
      if (host_slot_of_block_[block] >= 0 || disk_slot_of_block_[block] >= 0) {
        c.host = chunk_host(host_slot_for(block), m.chunk);
        stats_.bytes_host_to_device += int64_t(shape_.chunk_bytes());
      }
      loads.push_back(c);
    }
  } catch (...) {
    // The round's misses hold cache slots whose loads will never be performed: forget them, so
    // that a later round loads them again instead of taking them for hits.
    loads.resize(first);
    forget_misses();
    throw;
  }
}

void KvTiers::begin_step(const std::vector<int32_t>& writes, const std::vector<int32_t>& reads,
                         std::vector<ChunkCopy>& loads) {
  ++step_;
  round_tick_ = tick_ + 1;
  const int64_t per = shape_.chunks_per_block();
  std::vector<ChunkId>& chunks = step_chunks_;
  chunks.clear();
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
  select_misses(chunks, n, loads);
  finish_select();
}

void KvTiers::select_misses(const ChunkId* chunks, int64_t n, std::vector<ChunkCopy>& loads,
                            bool more) {
  if (!more && ++seen_stamp_ == 0) {  // wrapped: forget every stamp
    for (ChunkMark& m : marks_) m.seen = 0;
    seen_stamp_ = 1;
  }
  // Hits first (marked: no miss of this round evicts them), then the misses. The hits of earlier
  // pieces of the round wait in hit_slots_ for finish_select().
  if (!more) {
    cache_.begin_round();
    hit_slots_.clear();
  }
  missing_.clear();
  int64_t unique = 0;
  int32_t last_block = -1;
  // One pass: the chunk's mark (duplicates, overlap) and its slot in the block cache sit at the
  // same layer-major index of two arrays, both scattered: fetched ahead together, and the slot's
  // state once the slot is known.
  constexpr int64_t k_ahead = 16;
  for (int64_t i = 0; i < std::min(n, k_ahead); ++i) {
    const int64_t x = layer_major(chunks[i]);
    __builtin_prefetch(&marks_[size_t(x)]);
    cache_.prefetch_index(x);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (i + k_ahead < n) {
      const int64_t x = layer_major(chunks[i + k_ahead]);
      __builtin_prefetch(&marks_[size_t(x)]);
      cache_.prefetch_index(x);
    }
    if (i + k_ahead / 2 < n) cache_.prefetch_state(layer_major(chunks[i + k_ahead / 2]));
    const ChunkId c = chunks[i];
    const int64_t x = layer_major(c);
    ChunkMark& m = marks_[size_t(x)];
    if (m.seen == seen_stamp_) continue;  // asked for already in this round
    m.seen = seen_stamp_;
    ++unique;
    if (m.step + 1 == step_) ++stats_.overlap;
    m.step = step_;
    const int32_t s = cache_.mark_index(x);
    if (s >= 0) hit_slots_.push_back(s); else missing_.push_back(c);
    // Host recency decides which blocks move to disk: without a disk tier nothing does.
    if (!disk_) continue;
    const int32_t b = block_of(c);
    if (b == last_block) continue;  // the heads of one block come together
    last_block = b;
    const int64_t hs = host_slot_of_block_[b];
    if (hs >= 0) touch_host(hs);  // recency only: a hit's block may still move to disk
  }
  stats_.selected += unique;
  // Only the host blocks this round's loads read from (touched again by read_back) are protected
  // from reuse until the loads are done.
  round_tick_ = tick_ + 1;
  struct Pending {
    std::vector<ChunkCopy>*& slot;
    ~Pending() { slot = nullptr; }
  } guard{pending_};
  pending_ = &loads;
  misses_.clear();
  try {
    for (const ChunkId c : missing_) cache_.load(c, misses_);
  } catch (...) {
    forget_misses();  // slots taken for loads that will never be performed
    throw;
  }
  add_loads(loads);
}

void KvTiers::finish_select() {
  cache_.settle(hit_slots_.data(), int64_t(hit_slots_.size()));
  hit_slots_.clear();
}

void KvTiers::read_back(const std::vector<BlockCache::Load>& misses) {
  if (++block_stamp_ == 0) {
    std::fill(block_seen_.begin(), block_seen_.end(), 0u);
    block_stamp_ = 1;
  }
  back_.clear();
  for (const auto& m : misses) {
    const int32_t b = block_of(m.chunk);
    if (block_seen_[b] == block_stamp_) continue;
    block_seen_[b] = block_stamp_;
    const int64_t hs = host_slot_of_block_[b];
    // A host block this round loads from is touched before any victim is chosen: touched in
    // this round, it is no victim of the round (else it would go to disk only to be read back).
    if (hs >= 0)
      touch_host(hs);
    else if (disk_slot_of_block_[b] >= 0)
      back_.push_back(b);
  }
  constexpr size_t k_group = 32;  // reads in flight (and bounce buffers)
  size_t i = 0;
  while (i < back_.size()) {
    group_.clear();
    while (i < back_.size() && group_.size() < k_group) {
      ReadBack r{back_[i], -1, -1};
      if (!free_host_.empty()) {
        r.host_slot = free_host_.back();
        host_->slot(r.host_slot);  // allocates its arena; if that fails, the slot stays free
        free_host_.pop_back();
      } else {
        const int64_t v = host_lru_.head;
        // A block touched in this round is the source of a load not yet performed: the rest
        // takes the one-at-a-time path, which performs those loads first.
        if (v < 0 || host_slot_touched_[v] >= round_tick_) break;
        host_unlink(v);
        r.host_slot = v;
        r.victim = block_of_host_slot_[v];
      }
      group_.push_back(r);
      ++i;
    }
    if (group_.empty()) return;
    read_back_group(group_);
  }
}

// Each block is read from its disk slot, and keeps it (a clean copy: the block moves back to
// disk for free). It lands straight in its host slot when that slot is free or holds a clean
// block (which just loses its host copy); when the slot holds a dirty block (no disk copy), the
// read lands in a bounce buffer, the dirty block takes over the disk slot just read (a swap, so
// a full disk tier needs no free slot) and the bounce buffer is copied in. Several reads and
// writes are in flight at once.
void KvTiers::read_back_group(std::vector<ReadBack>& group) {
  const size_t bytes = host_->slot_bytes();
  auto dirty = [&](const ReadBack& r) {
    return r.victim >= 0 && disk_slot_of_block_[r.victim] < 0;
  };
  size_t n_dirty = 0;
  for (const ReadBack& r : group) n_dirty += dirty(r) ? 1 : 0;
  try {
    if (n_dirty > bounce_slots_) {
      std::free(bounce_);
      bounce_slots_ = 0;  // until the new buffer exists: a failed allocation leaves none
      bounce_ = static_cast<char*>(std::aligned_alloc(4096, group.size() * bytes));
      NOSA_CHECK_CODE(bounce_, ErrorCode::resource_exhausted, "out of host memory ({} bytes)",
                      group.size() * bytes);
      bounce_slots_ = group.size();
    }
    // Victims' memory may be the source of copies already queued (earlier rounds).
    const bool any_victim =
        std::any_of(group.begin(), group.end(), [](const ReadBack& r) { return r.victim >= 0; });
    if (any_victim && before_host_reuse_) before_host_reuse_();
  } catch (...) {
    // Nothing was read or moved yet: the host slots go back where they were taken from, the
    // victims to the cold end in their order, else they would never make room again.
    for (size_t j = group.size(); j-- > 0;) {
      if (group[j].victim >= 0)
        host_push_front(group[j].host_slot);
      else
        free_host_.push_back(group[j].host_slot);
    }
    throw;
  }
  std::vector<DiskStore::Ticket> tickets(group.size());
  std::vector<char*> landing(group.size(), nullptr);
  size_t next_bounce = 0;
  for (size_t j = 0; j < group.size(); ++j) {
    const ReadBack& r = group[j];
    landing[j] = dirty(r) ? bounce_ + (next_bounce++) * bytes : host_->slot(r.host_slot);
    tickets[j] = disk_->read(disk_slot_of_block_[r.block], landing[j]);
  }
  std::vector<std::string> errors(group.size());
  for (size_t j = 0; j < group.size(); ++j) {
    try {
      disk_->wait(tickets[j]);
    } catch (const Error& e) {
      errors[j] = e.message();
    }
  }
  // Dirty victims of successful reads go to the disk slots those reads came from.
  std::vector<uint8_t> swapped(group.size(), 0);
  for (size_t j = 0; j < group.size(); ++j) {
    tickets[j] = 0;
    if (errors[j].empty() && dirty(group[j])) {
      swapped[j] = 1;
      tickets[j] = disk_->write(disk_slot_of_block_[group[j].block],
                                host_->slot(group[j].host_slot));
    }
  }
  std::string first_error;
  int32_t first_failed = -1;
  for (size_t j = 0; j < group.size(); ++j) {
    ReadBack& r = group[j];
    if (!errors[j].empty()) {
      // The block stays on disk (and its sequence fails). A dirty victim was not touched; a
      // clean one's host copy may have been overwritten, but its disk copy is current.
      failed_.push_back(r.block);
      if (!dirty(r)) {
        if (r.victim >= 0) {
          host_slot_of_block_[r.victim] = -1;
          block_of_host_slot_[r.host_slot] = -1;
        }
        free_host_.push_back(r.host_slot);
      }
      if (first_failed < 0) {
        first_failed = r.block;
        first_error = errors[j];
      }
      continue;  // a dirty victim goes back to the cold end below
    }
    const int64_t ds = disk_slot_of_block_[r.block];
    if (swapped[j]) {
      try {
        disk_->wait(tickets[j]);
        disk_slot_of_block_[r.victim] = ds;
        stats_.bytes_disk_written += int64_t(bytes);
      } catch (const Error& e) {
        // The dirty block's data is lost with its host slot: its sequence fails.
        logger("memory")->error("moving KV block {} to disk failed: {}", r.victim, e.message());
        failed_.push_back(r.victim);
        free_disk_.push_back(ds);
      }
      std::memcpy(host_->slot(r.host_slot), landing[j], bytes);
      disk_slot_of_block_[r.block] = -1;  // its disk slot went to the victim: dirty now
    }
    if (r.victim >= 0) host_slot_of_block_[r.victim] = -1;
    stats_.bytes_disk_read += int64_t(bytes);
    host_slot_of_block_[r.block] = r.host_slot;
    block_of_host_slot_[r.host_slot] = r.block;
    touch_host(r.host_slot);
  }
  // Dirty victims of failed reads keep their blocks and go back to the cold end in the order
  // they were taken from it (the coldest first), so the round leaves their recency as it was.
  for (size_t j = group.size(); j-- > 0;)
    if (!errors[j].empty() && dirty(group[j])) host_push_front(group[j].host_slot);
  if (first_failed >= 0)
    NOSA_FAIL(ErrorCode::io, "reading KV block {} back from disk failed: {}", first_failed,
              first_error);
}

void KvTiers::end_step(const std::vector<int32_t>& full, std::vector<ChunkCopy>& stores) {
  round_tick_ = tick_ + 1;
  const int64_t per = shape_.chunks_per_block();
  for (int32_t b : full) {
    NOSA_ASSERT(writing_[b], "block {} completed without being written", b);
    // A disk copy of the block (one that was partly filled before) is stale now; a host copy
    // is rewritten in place.
    if (disk_slot_of_block_[b] >= 0) {
      free_disk_.push_back(disk_slot_of_block_[b]);
      disk_slot_of_block_[b] = -1;
    }
    int64_t hs = host_slot_of_block_[b];
    if (hs < 0) {
      hs = free_host_slot();
      host_slot_of_block_[b] = hs;
      block_of_host_slot_[hs] = b;
    }
    touch_host(hs);
    for (int64_t i = 0; i < per; ++i) {
      const ChunkId c = b * per + i;
      stores.push_back({c, cache_.slot_of(c), -1, chunk_host(hs, c)});
      cache_.unpin(c);
    }
    stats_.bytes_device_to_host += int64_t(per * shape_.chunk_bytes());
    writing_[b] = 0;
  }
  unpin_step_reads();
}

void KvTiers::populate(const std::vector<int32_t>& blocks) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  auto last = t0;
  const size_t bytes = host_->slot_bytes();
  constexpr double gib = double(1ull << 30);
  for (int32_t b : blocks)
    NOSA_ASSERT(host_slot_of_block_[b] < 0 && disk_slot_of_block_[b] < 0,
                "block {} already has data", b);
  // As if populated one by one with the coldest moving to disk: the oldest host blocks go
  // first (one at a time, below), then the first new ones, which are written to disk directly.
  const int64_t n = int64_t(blocks.size());
  const int64_t used = host_->capacity() - int64_t(free_host_.size());
  const int64_t overflow = std::max<int64_t>(0, used + n - host_->capacity());
  const int64_t direct = std::max<int64_t>(0, overflow - used);
  std::vector<DiskStore::Ticket> writes;
  char* zeros = nullptr;
  if (direct > 0) {
    NOSA_ASSERT(disk_, "the host tier is full without a disk tier");
    NOSA_CHECK_CODE(int64_t(free_disk_.size()) >= direct, ErrorCode::resource_exhausted,
                    "the host and disk KV budgets are full");
    zeros = static_cast<char*>(std::aligned_alloc(4096, bytes));
    NOSA_CHECK_CODE(zeros, ErrorCode::resource_exhausted, "out of host memory");
    std::memset(zeros, 0, bytes);
    writes.reserve(size_t(direct));
    for (int64_t i = 0; i < direct; ++i) {
      const int64_t ds = free_disk_.back();
      free_disk_.pop_back();
      disk_slot_of_block_[blocks[i]] = ds;
      writes.push_back(disk_->write(ds, zeros));
    }
  }
  auto progress = [&](int64_t done, bool force) {
    const auto now = Clock::now();
    if (!force && now - last < std::chrono::seconds(5)) return;
    last = now;
    const double s = std::chrono::duration<double>(now - t0).count();
    const int64_t on_disk = disk_ ? disk_->capacity() - int64_t(free_disk_.size()) : 0;
    logger("memory")->info(
        "KV population: {}/{} blocks in {:.0f} s; host {:.1f} GiB pinned, disk {:.1f} GiB "
        "({:.1f} GiB written)",
        done, n, s, double(host_->allocated_bytes()) / gib, double(on_disk) * double(bytes) / gib,
        disk_ ? double(disk_->bytes_written()) / gib : 0.0);
  };
  const bool log = n * int64_t(bytes) > (int64_t(8) << 30);  // only large populations report
  for (int64_t i = direct; i < n; ++i) {
    const int32_t b = blocks[i];
    round_tick_ = tick_ + 1;  // one block at a time: older ones may move to disk
    const int64_t hs = free_host_slot();  // pins a new arena every 1 GiB
    host_slot_of_block_[b] = hs;
    block_of_host_slot_[hs] = b;
    touch_host(hs);
    if (log) progress(i, false);
  }
  std::string error;
  for (size_t i = 0; i < writes.size(); ++i) {
    try {
      disk_->wait(writes[i]);
      stats_.bytes_disk_written += int64_t(bytes);
    } catch (const Error& e) {
      error = e.message();
    }
    if (log) progress(int64_t(i), false);
  }
  std::free(zeros);
  NOSA_CHECK_CODE(error.empty(), ErrorCode::io, "writing KV blocks to disk failed: {}", error);
  if (log) progress(n, true);
}

// The blocks a step read (the windows reaching into the block before its writes) stay pinned
// in the block cache until the step ends.
void KvTiers::unpin_step_reads() {
  const int64_t per = shape_.chunks_per_block();
  for (int32_t b : step_reads_)
    for (int64_t i = 0; i < per; ++i) cache_.unpin(b * per + i);
  step_reads_.clear();
}

void KvTiers::abort_step() { unpin_step_reads(); }

void KvTiers::release(const std::vector<int32_t>& blocks) {
  const int64_t per = shape_.chunks_per_block();
  for (int32_t b : blocks) {
    for (int64_t i = 0; i < per; ++i) {
      cache_.drop(b * per + i);
      marks_[size_t(layer_major(b * per + i))].step = 0;
    }
    if (host_slot_of_block_[b] >= 0) {
      host_unlink(host_slot_of_block_[b]);
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
