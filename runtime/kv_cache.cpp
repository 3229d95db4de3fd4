#include "runtime/kv_cache.h"

#include <algorithm>
#include <chrono>

#include <fmt/format.h>

#include "memory/partitions.h"
#include "runtime/backend.h"
#include "runtime/core/env.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::runtime {

size_t KvLayout::bytes_per_block() const {
  return size_t(chunks_per_block()) *
         (kv_chunk_bytes() + bias_chunk_bytes() + compressed_chunk_bytes());
}

KvCache::KvCache(const KvLayout& layout, int64_t n_blocks, Backend& backend,
                 const KvCacheOptions& options)
    : layout_(layout), pool_(n_blocks), backend_(backend) {
  NOSA_CHECK_CODE(n_blocks > 0, ErrorCode::resource_exhausted,
                  "no memory for the KV cache (0 blocks)");
  const int64_t chunks = n_blocks * layout.chunks_per_block();
  int64_t slots = chunks;
  if (options.offload != memory::Offload::none) {
    slots = options.device_slots;
    max_pieces_ = env_int("NOSA_RESIDENCY_PIECES", 4, 1, 64);
    NOSA_CHECK_CODE(slots > 0, ErrorCode::resource_exhausted,
                    "no device memory for the GPU block cache");
    memory::TierShape shape;
    shape.n_layers = layout.n_layers;
    shape.n_kv_heads = layout.n_kv_heads;
    shape.kv_chunk_bytes = layout.kv_chunk_bytes();
    shape.bias_chunk_bytes = layout.bias_chunk_bytes();
    shape.n_blocks = n_blocks;
    host_allocator_ = backend.host_allocator();
    // Partitions for device-side residency come out of the block cache; the host path keeps
    // the rest.
    partitioned_ = options.decode_partitions > 0;
    if (partitioned_) make_partitions(options, slots);
    memory::TierBudget budget;
    budget.device_slots = parts_ ? parts_->base : slots;
    budget.host_blocks = options.host_blocks > 0 ? options.host_blocks : n_blocks;
    if (options.offload == memory::Offload::host_disk) budget.disk_dir = options.disk_dir;
    tiers_ = std::make_unique<memory::KvTiers>(shape, budget, *host_allocator_);
    // A block moving to disk reuses host memory that queued copies may still read.
    tiers_->set_before_host_reuse([this] { backend_.synchronize(); });
    tiers_->set_flush_loads([this](std::vector<memory::ChunkCopy>& loads) {
      // After every gather already queued (micro-batches queue them on another stream): an
      // earlier gather that evicted one of these chunks must not clear its new slot-table entry.
      backend_.synchronize();
      backend_.copy_chunks(loads, true, *this);
      backend_.synchronize();
    });
    Tensor table = Tensor::empty_host(DType::i32, {chunks});
    std::fill_n(table.data<int32_t>(), chunks, -1);
    slot_table_ = backend.upload(table, DType::i32);
  }
  kv_ = backend.zeros(layout.dtype, {slots, 2, layout.block_size, layout.head_dim});
  bias_ = backend.zeros(DType::f32, {slots, layout.block_size});
  ck_ = backend.zeros(layout.dtype, {chunks, layout.keys_per_block, layout.head_dim});
  ck_scores_ = backend.zeros(DType::f32, {chunks, layout.keys_per_block});
}

void KvCache::make_partitions(const KvCacheOptions& o, int64_t slots) {
  const int64_t cpb = layout_.chunks_per_block();
  selection_width_ = std::max(1, o.min_partition_slots);
  const int64_t per = int64_t(o.decode_partitions) * cpb;  // partitions' (sequence, layer, head)s
  // The host path still needs the blocks being written and read (two per sequence, layer and
  // head) and one sequence's selection for a prompt's rounds.
  const int64_t host_min = 2 * per + cpb * std::max(1, o.min_partition_slots);
  const int64_t R =
      o.partition_slots > 0
          ? o.partition_slots
          : std::min(int64_t(memory::k_max_partition_slots), (slots - host_min) / per);
  if (R < std::max(1, o.min_partition_slots) || R > memory::k_max_partition_slots ||
      slots - R * per < host_min) {
    logger("memory")->info(
        "device-side residency off: {} chunks of block cache cannot give {} sequences "
        "partitions of {} to {} slots per layer and head beside the host path's {}",
        slots, o.decode_partitions, o.min_partition_slots, memory::k_max_partition_slots,
        host_min);
    return;
  }
  NOSA_CHECK(slots < (int64_t(1) << 31), "a block cache of {} chunks is too large", slots);
  DevicePartitions d;
  d.count = o.decode_partitions;
  d.slots = int(R);
  d.base = slots - R * per;
  const int64_t n = R * per;
  Tensor chunk = Tensor::empty_host(DType::i64, {n});
  std::fill_n(chunk.data<int64_t>(), n, int64_t(-1));
  d.chunk = backend_.upload(chunk, DType::i64);
  d.stamp = backend_.zeros(DType::i32, {n});
  d.counters = backend_.zeros(DType::i64, {memory::part_counters});
  d.step_stamp = backend_.zeros(DType::i32, {1});
  d.counters_host = static_cast<int64_t*>(
      host_allocator_->allocate(sizeof(int64_t) * memory::part_counters));
  const size_t table_bytes = size_t(pool_.capacity()) * sizeof(char*);
  d.block_host = static_cast<char**>(host_allocator_->allocate(table_bytes));
  std::fill_n(d.block_host, pool_.capacity(), nullptr);
  d.block_host_device = static_cast<char* const*>(host_allocator_->device_address(d.block_host));
  parts_ = std::move(d);
  partition_of_first_.assign(size_t(pool_.capacity()), -1);
  for (int p = o.decode_partitions - 1; p >= 0; --p) free_partitions_.push_back(p);
  logger("memory")->info(
      "device-side residency: {} partitions of {} slots per layer and head ({} chunks), the "
      "host path keeps {}",
      parts_->count, parts_->slots, n, parts_->base);
}

KvCache::~KvCache() {
  // Queued kernels may still read or write the pinned memory released below (unregistering
  // huge-page arenas does not wait for them, as cudaFreeHost did).
  if (tiers_) {
    try {
      backend_.synchronize();
    } catch (const std::exception& e) {
      logger("memory")->error("KV cache: waiting for the device before freeing: {}", e.what());
    }
  }
  if (parts_) release_partition_memory();
  backend_.forget_graphs(this);
  if (times_.calls == 0) return;
  const double n = double(times_.calls);
  logger("memory")->debug(
      "make_resident: {} calls, {:.0f} selected entries each; host us per call: waiting for "
      "the selection {:.1f}, chunk ids {:.1f}, tiers (misses) {:.1f}, enqueueing loads {:.1f}, "
      "hits' LRU after the enqueue {:.1f}",
      times_.calls, double(times_.selected) / n, double(times_.wait_ns) / n / 1e3,
      double(times_.index_ns) / n / 1e3, double(times_.tiers_ns) / n / 1e3,
      double(times_.enqueue_ns) / n / 1e3, double(times_.settle_ns) / n / 1e3);
}

void KvCache::begin_step(const StepBatch& step) {
  if (!tiers_) return;
  if (counts_queued_) {
    // The last step's device-side counters, copied at its end: done by now (its results came
    // back), so this waits for nothing.
    backend_.wait_host_copy();
    counts_queued_ = false;
    fold_counts(parts_->counters_host);
  }
  on_device_ = parts_ && step.decode_only() && assign_partitions(step);
  if (parts_ && !on_device_) keep_room_for(step);
  std::vector<int32_t>& writes = step_blocks_;
  std::vector<int32_t>& reads = step_reads_;
  writes.clear();
  reads.clear();
  const int64_t bs = layout_.block_size;
  for (const StepSequence& s : step.seqs) {
    const auto& blocks = *s.blocks;
    for (int64_t b = s.n_past / bs; b <= (s.n_past + s.n_new - 1) / bs; ++b)
      writes.push_back(blocks.at(b));
    // Compressed windows that end in this step may start in the block before the first one
    // written (windows are at most a block long when offloading).
    if (s.n_past / bs > 0) reads.push_back(blocks.at(s.n_past / bs - 1));
  }
  copies_.clear();
  try {
    tiers_->begin_step(writes, reads, copies_);
  } catch (...) {
    on_device_ = false;
    after_failed_round();
    throw;
  }
  backend_.copy_chunks(copies_, true, *this);
  if (on_device_ && device_steps_ == 0)
    logger("memory")->debug("a decoding step of {} sequences decides residency on the device",
                            step.seqs.size());
  device_steps_ += on_device_;
}

void KvCache::keep_room_for(const StepBatch& step) {
  const int64_t bs = layout_.block_size, cpb = layout_.chunks_per_block();
  int64_t need = 0;
  for (const StepSequence& s : step.seqs) {
    // Pinned: the blocks written and the one before; one layer's round: the blocks its tokens
    // select, at most every block of the sequence.
    const int64_t written = (s.n_past + s.n_new - 1) / bs - s.n_past / bs + 1;
    const int64_t blocks = (s.n_past + s.n_new + bs - 1) / bs;
    need += (written + 1) * cpb +
            std::min(blocks, s.n_new * selection_width_) * layout_.n_kv_heads;
  }
  if (need <= parts_->base) return;
  hand_back_partitions(fmt::format(
      "a step on the host path may need {} chunks of block cache, the host path keeps {}", need,
      parts_->base));
}

void KvCache::hand_back_partitions(const std::string& why) {
  const int64_t n = int64_t(parts_->count) * layout_.chunks_per_block() * parts_->slots;
  logger("memory")->info(
      "{}: device-side residency off from now on, its {} slots go back to the host path", why, n);
  // Chunks the partitions held stay in the slot table: the host path never trusts an entry
  // for a chunk it does not hold (it loads the chunk, which rewrites the entry).
  try {
    backend_.synchronize();  // the partitions' rounds read the host table released below
    sync_stats();
  } catch (const std::exception& e) {
    logger("memory")->error("device-side residency's last counters are lost: {}", e.what());
  }
  tiers_->add_device_slots(n);
  release_partition_memory();
  parts_.reset();
  on_device_ = false;
  counts_queued_ = false;
}

void KvCache::release_partition_memory() {
  host_allocator_->release(parts_->block_host, size_t(pool_.capacity()) * sizeof(char*));
  host_allocator_->release(parts_->counters_host, sizeof(int64_t) * memory::part_counters);
}

void KvCache::after_failed_round() {
  // A host-path round that failed leaves slot-table entries naming slots that no longer hold
  // their chunk (loads that never ran): harmless to the host path, which never trusts an entry
  // for a chunk it does not hold, but the device path would take them for hits. Cleared now.
  std::vector<memory::ChunkCopy> clears = tiers_->take_stale_entries();
  if (!parts_ || clears.empty()) return;
  try {
    backend_.copy_chunks(clears, true, *this);
  } catch (const std::exception& e) {
    logger("memory")->error("clearing {} slot-table entries after a failed round: {}",
                            clears.size(), e.what());
    hand_back_partitions("the slot table could not be cleared");
  }
}

// Runs before the step's host-path round (begin_step's): that round never moves one of these
// blocks' host memory (the blocks it writes are not among them, and the block it reads was just
// found in host memory), so the addresses written here hold for the step.
bool KvCache::assign_partitions(const StepBatch& step) {
  size_t wanted = 0;
  for (const StepSequence& s : step.seqs)
    wanted += partition_of_first_[size_t(s.blocks->at(0))] < 0;
  if (wanted > free_partitions_.size()) return false;
  // Every block a selection can miss (all but the ones being written, which are resident) must
  // be in host memory: the device copies it from there.
  const int64_t bs = layout_.block_size;
  for (const StepSequence& s : step.seqs)
    for (int64_t b = 0; b < s.n_past / bs; ++b) {
      const int32_t block = s.blocks->at(size_t(b));
      char* host = tiers_->block_host_address(block);
      if (!host) return false;
      parts_->block_host[block] = host;
    }
  seq_partition_.clear();
  for (const StepSequence& s : step.seqs) {
    int32_t& p = partition_of_first_[size_t(s.blocks->at(0))];
    if (p < 0) {
      p = free_partitions_.back();
      free_partitions_.pop_back();
    }
    seq_partition_.push_back(p);
  }
  return true;
}

void KvCache::free_partition(int32_t first_block) {
  int32_t& p = partition_of_first_[size_t(first_block)];
  if (p < 0) return;
  // Its slots keep their chunks: the next owner evicts them (a chunk whose block was reused in
  // the meantime was made resident elsewhere when it was written, so the slot table no longer
  // points at the old slot and the eviction leaves it alone).
  free_partitions_.push_back(p);
  p = -1;
}

memory::PartitionArgs KvCache::partition_args(int layer) {
  NOSA_ASSERT(parts_, "partition_args: the cache has no partitions");
  memory::PartitionArgs a;
  a.n_heads = layout_.n_kv_heads;
  a.layer = layer;
  a.n_layers = layout_.n_layers;
  a.slot_table = slot_table_.data<int32_t>();
  a.part_base = parts_->base;
  a.part_slots = parts_->slots;
  a.part_chunk = parts_->chunk.data<int64_t>();
  a.part_stamp = reinterpret_cast<uint32_t*>(parts_->stamp.data<int32_t>());
  a.step_stamp = reinterpret_cast<uint32_t*>(parts_->step_stamp.data<int32_t>());
  a.kv = static_cast<char*>(kv_.raw());
  a.bias = static_cast<char*>(bias_.raw());
  a.kv_bytes = int64_t(layout_.kv_chunk_bytes());
  a.bias_bytes = int64_t(layout_.bias_chunk_bytes());
  a.block_host = parts_->block_host_device;
  a.counters = parts_->counters.data<int64_t>();
  return a;
}

memory::TierStats KvCache::stats() const {
  if (!tiers_) return {};
  memory::TierStats t = tiers_->stats();
  const int64_t* c = device_counts_;  // zeros if no step ever decided residency on the device
  t.hits += c[memory::part_hits];
  t.misses += c[memory::part_misses];
  t.evictions += c[memory::part_evictions];
  t.selected += c[memory::part_hits] + c[memory::part_misses];
  t.overlap += c[memory::part_overlap];
  t.prefetched += c[memory::part_prefetched];
  t.prefetch_hits += c[memory::part_prefetch_hits];
  const int64_t copied = c[memory::part_misses] + c[memory::part_prefetched];
  t.bytes_host_to_device +=
      copied * int64_t(layout_.kv_chunk_bytes() + layout_.bias_chunk_bytes());
  if (parts_) {
    const int64_t n = int64_t(parts_->count) * layout_.chunks_per_block() * parts_->slots;
    t.device_slots += n;
    t.device_slots_used += std::min(n, copied);
  }
  return t;
}

void KvCache::sync_stats() {
  if (!parts_) return;
  counts_queued_ = false;
  fold_counts(static_cast<const int64_t*>(backend_.read_back(parts_->counters)));
}

void KvCache::fold_counts(const int64_t* counts) {
  using namespace memory;
  const int64_t* was = device_counts_;
  const int64_t selected =
      counts[part_hits] + counts[part_misses] - was[part_hits] - was[part_misses];
  const int64_t fresh =
      counts[part_misses] + counts[part_prefetch_hits] - was[part_misses] - was[part_prefetch_hits];
  if (selected > 0 && fresh >= 0) last_traffic_ = {selected, fresh};
  std::copy_n(counts, int(memory::part_counters), device_counts_);
  NOSA_CHECK_CODE(device_counts_[memory::part_errors] == 0, ErrorCode::internal,
                  "device-side residency: {} misses found no partition slot or host memory",
                  device_counts_[memory::part_errors]);
}

void KvCache::prefetch(int layer, const Selection& guess, const StepBatch& step) {
  // Layer 2 on: a prefetch is queued one layer early, so that of layer 1 would come before
  // layer 0's round, which starts the step (its stamp).
  NOSA_ASSERT(on_device_ && layer >= 2 && step.seqs.size() == seq_partition_.size(),
              "prefetch: only within a step that decides residency on the device, from layer 2 "
              "on (layer {}, {} sequences, {} partitions)",
              layer, step.seqs.size(), seq_partition_.size());
  backend_.resident_partitions(layer, guess, step, seq_partition_, *this, true);
}

void KvCache::make_resident(int layer, const Selection& selection, const StepBatch& step) {
  if (!tiers_) return;
  if (on_device_) {
    NOSA_ASSERT(step.seqs.size() == seq_partition_.size(),
                "make_resident: not the step begin_step saw ({} sequences, {} partitions)",
                step.seqs.size(), seq_partition_.size());
    backend_.resident_partitions(layer, selection, step, seq_partition_, *this, false);
    ++times_.calls;
    return;
  }
  using Clock = std::chrono::steady_clock;
  auto ns = [](Clock::time_point a, Clock::time_point b) {
    return int64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count());
  };
  const auto t0 = Clock::now();
  // [T][H][k_max], ascending block indices per row, -1 padded.
  const auto* sel = static_cast<const int32_t*>(backend_.read_back_selection(selection));
  const auto t1 = Clock::now();
  const int H = layout_.n_kv_heads, k = selection.k_max;
  const int64_t T = step.n_tokens();
  wanted_.clear();
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<int32_t>& blocks = *step.seqs[step.token_seq[t]].blocks;
    const int32_t n_blocks = int32_t(blocks.size());
    const int32_t* row = sel + t * H * k;
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < k && row[h * k + i] >= 0; ++i) {
        const int32_t b = row[h * k + i];
        NOSA_ASSERT(b < n_blocks, "selected block {} of a sequence of {} blocks", b, n_blocks);
        wanted_.push_back(layout_.chunk(blocks[b], layer, h));
      }
  }
  const auto t2 = Clock::now();
  // The selection in pieces of one round: the device gathers a piece's misses while the host
  // looks up the next piece (prefill tokens select mostly the same blocks: each chunk is asked
  // for once per round). Small selections go whole: a piece costs a launch.
  const int64_t n = int64_t(wanted_.size());
  constexpr int64_t k_min_piece = 512;
  const int64_t pieces = std::clamp<int64_t>(n / k_min_piece, 1, max_pieces_);
  int64_t tiers_ns = 0, enqueue_ns = 0;
  for (int64_t i = 0; i < pieces; ++i) {
    const int64_t begin = n * i / pieces, end = n * (i + 1) / pieces;
    const auto a = Clock::now();
    copies_.clear();
    try {
      tiers_->select_misses(wanted_.data() + begin, end - begin, copies_, i > 0);
    } catch (...) {
      after_failed_round();
      throw;
    }
    const auto b = Clock::now();
    backend_.gather_selected(copies_, *this);
    tiers_ns += ns(a, b);
    enqueue_ns += ns(b, Clock::now());
  }
  const auto t4 = Clock::now();
  // The hits' LRU bookkeeping while the device gathers the misses.
  tiers_->finish_select();
  const auto t5 = Clock::now();
  ++times_.calls;
  times_.selected += int64_t(wanted_.size());
  times_.wait_ns += ns(t0, t1);
  times_.index_ns += ns(t1, t2);
  times_.tiers_ns += tiers_ns;
  times_.enqueue_ns += enqueue_ns;
  times_.settle_ns += ns(t4, t5);
}

void KvCache::end_step(const StepBatch& step) {
  if (!tiers_) return;
  std::vector<int32_t>& full = step_blocks_;
  full.clear();
  const int64_t bs = layout_.block_size;
  for (const StepSequence& s : step.seqs) {
    const int64_t end = s.n_past + s.n_new;
    for (int64_t b = s.n_past / bs; b < end / bs; ++b) full.push_back(s.blocks->at(b));
  }
  copies_.clear();
  tiers_->end_step(full, copies_);
  backend_.copy_chunks(copies_, false, *this);
  if (on_device_) {
    backend_.queue_copy_to_host(parts_->counters, parts_->counters_host);
    counts_queued_ = true;
  }
}

void KvCache::release(std::vector<int32_t>& blocks) {
  release_tiers(blocks);
  if (tiers_ && keep_released_) released_.insert(released_.end(), blocks.begin(), blocks.end());
  pool_.release(blocks);
  blocks.clear();
}

void KvCache::release_tiers(const std::vector<int32_t>& blocks) {
  if (!tiers_) return;
  tiers_->release(blocks);
  // A follower gets the released blocks of several sequences in one list: any of them may be a
  // sequence's first.
  if (parts_)
    for (int32_t b : blocks) free_partition(b);
}

}  // namespace nosa::runtime
