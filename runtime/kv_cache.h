// The paged KV cache of one rank: a pool of logical blocks, each holding block_size tokens of
// every layer and local KV head, stored as "chunks" of one (block, layer, KV head):
//   kv    [slots][2][block_size][head_dim]       keys then values (rotated keys), kv dtype
//   bias  [slots][block_size]                    NOSA eviction score c per token, float32
//   ck    [n_chunks][keys_per_block][head_dim]   compressed keys whose window starts in the block
//   ckE   [n_chunks][keys_per_block]             mean of c over each compressed window (NOSA)
// chunk(block, layer, head) = (block * n_layers + layer) * n_kv_heads + head. One chunk is the
// unit the memory tiers move (32 KiB for 64 tokens x 128 dims in bf16).
//
// Without offloading every chunk has its own slot (slot = chunk). With offloading (--offload
// host|host+disk) the full KV lives in host memory (and on disk); the device holds a block cache
// of slots, and slot_table()[chunk] says where a resident chunk is (-1: not resident). Compressed
// keys stay on the device for every block: selection reads them all.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "memory/block_pool.h"
#include "memory/kv_tiers.h"
#include "memory/partitions.h"
#include "runtime/core/tensor.h"
#include "runtime/step.h"

namespace nosa::runtime {

struct KvLayout {
  int n_layers = 0;
  int n_kv_heads = 0;  // local to this rank
  int head_dim = 0;
  int block_size = 0;
  int keys_per_block = 0;
  DType dtype = DType::f32;

  int64_t chunks_per_block() const { return int64_t(n_layers) * n_kv_heads; }
  int64_t chunk(int64_t block, int layer, int head) const {
    return (block * n_layers + layer) * n_kv_heads + head;
  }
  // Bytes of one chunk's keys and values, and of its eviction scores.
  size_t kv_chunk_bytes() const { return 2 * size_t(block_size) * head_dim * dtype_size(dtype); }
  size_t bias_chunk_bytes() const { return size_t(block_size) * 4; }
  // Device bytes of one chunk's compressed keys and scores (kept for every block).
  size_t compressed_chunk_bytes() const {
    return size_t(keys_per_block) * (head_dim * dtype_size(dtype) + 4);
  }
  // Bytes of one block across every layer and head (KV, bias, compressed keys and scores).
  size_t bytes_per_block() const;
};

// Where the KV lives. offload none: everything on the device (n_blocks slots' worth); else the
// device holds device_slots chunks and host (+ disk) hold the n_blocks logical blocks.
struct KvCacheOptions {
  memory::Offload offload = memory::Offload::none;
  int64_t device_slots = 0;
  int64_t host_blocks = 0;
  std::filesystem::path disk_dir;
  // Decoding steps decide residency on the device (memory/partitions.h) for up to this many
  // sequences at once (0: never), each with partition_slots slots per layer and KV head taken
  // out of device_slots (0: all that the host path's minimum leaves, at most
  // memory::k_max_partition_slots; the host path then holds the blocks being written and read
  // and one sequence's selection, and no more for a prompt's rounds).
  // Partitions narrower than min_partition_slots (the selection's width) are not made.
  int decode_partitions = 0;
  int partition_slots = 0;
  int min_partition_slots = 1;
};

class Backend;
struct Selection;

// The device-side residency state of an offloaded cache (memory/partitions.h): partitions of
// `slots` slots per (sequence, layer, KV head) from slot `base` on; per partition slot its chunk
// (int64, -1: none) and last stamp (uint32 as i32); counters (int64 x part_counters); each
// block's host memory as the device addresses it (written by the host before each step).
struct DevicePartitions {
  int count = 0;
  int slots = 0;
  int64_t base = 0;
  Tensor chunk, stamp, counters;
  int64_t* counters_host = nullptr;  // host memory: the counters as of the last step's end
  char** block_host = nullptr;  // host memory, [n_blocks]
  char* const* block_host_device = nullptr;  // the same table as the device reads it
  Tensor step_stamp;  // uint32 as i32: the last step's stamp (layer 0's round advances it)
};

// Where make_resident's host time goes (summed over calls; nanoseconds).
struct ResidencyTimes {
  int64_t calls = 0;
  int64_t selected = 0;  // selection entries read (before removing duplicates)
  int64_t wait_ns = 0;   // until the selection is in host memory (the device catching up)
  int64_t index_ns = 0;  // selection entries -> chunk ids
  int64_t tiers_ns = 0;  // KvTiers::select: residency, LRU, disk reads
  int64_t enqueue_ns = 0;  // handing the loads to the backend
  int64_t settle_ns = 0;   // the hits' LRU bookkeeping, overlapping the device's gather
};

class KvCache {
 public:
  KvCache(const KvLayout& layout, int64_t n_blocks, Backend& backend,
          const KvCacheOptions& options = {});
  ~KvCache();

  const KvLayout& layout() const { return layout_; }
  memory::BlockPool& pool() { return pool_; }
  const memory::BlockPool& pool() const { return pool_; }
  Tensor& kv() { return kv_; }
  Tensor& bias() { return bias_; }
  Tensor& ck() { return ck_; }
  Tensor& ck_scores() { return ck_scores_; }
  // chunk -> device slot, int32 on the backend; undefined without offloading (slot = chunk).
  Tensor& slot_table() { return slot_table_; }
  bool offloaded() const { return tiers_ != nullptr; }
  memory::KvTiers* tiers() { return tiers_.get(); }

  // Residency around one step (no-ops without offloading): the blocks the step writes (and the
  // block before them, which compressed windows read) become resident; after each layer's
  // selection, the selected chunks; at the end, the blocks the step filled go to the host.
  // A decoding step whose sequences all have (or get) a partition and whose blocks are all in
  // host memory decides its layers' residency on the device (no read back, nothing waited for).
  void begin_step(const StepBatch& step);
  void make_resident(int layer, const Selection& selection, const StepBatch& step);
  // Device-side residency only (on_device()), layers after the first: copies the chunks of a
  // guess at `layer`'s selection into the layer's partitions before its own round
  // (memory/partitions.h, speculative rounds). The layer's make_resident then finds them as
  // hits; attention still reads exactly its own selection.
  void prefetch(int layer, const Selection& guess, const StepBatch& step);
  // Two micro-batches in flight: a round's loads must not evict the previous round's chunks,
  // which the other micro-batch's attention may still be reading.
  void set_micro_batches(bool on) {
    if (tiers_) tiers_->set_protected_rounds(on ? 2 : 1);
  }
  void end_step(const StepBatch& step);
  // Frees a sequence's blocks in every tier.
  void release(std::vector<int32_t>& blocks);
  // Tensor parallelism with offloading: every rank keeps its own tiers for the same block ids, but
  // only the leader's engine releases blocks. With keep_released, release() also records the ids,
  // which the leader sends with its next step plan (take_released); a follower passes them to
  // release_tiers, which frees their tier state (a follower's block pool is never used).
  void keep_released(bool on) { keep_released_ = on; }
  std::vector<int32_t> take_released() { return std::exchange(released_, {}); }
  void release_tiers(const std::vector<int32_t>& blocks);
  const ResidencyTimes& residency_times() const { return times_; }
  // Device-side residency: whether the cache has partitions (false when never made, or handed
  // back to the host path); on_device(): whether the current step uses them.
  bool has_partitions() const { return parts_.has_value(); }
  bool on_device() const { return on_device_; }
  // Whether partitions were asked for at construction (also when they were not made, or were
  // handed back since): the same on every rank of a replica, for decisions ranks must share.
  bool partitioned() const { return partitioned_; }
  int64_t device_steps() const { return device_steps_; }  // steps that used them, so far
  // The arguments of a device-side round of `layer` that the cache holds (the slot table, the
  // partitions, the slots' bytes, the host table, the counters, the layout); the backend adds
  // the step's (selection, tokens, block tables, partitions of the sequences).
  memory::PartitionArgs partition_args(int layer);
  // The current device step's sequences' partitions (begin_step's decision), in step order.
  const std::vector<int32_t>& step_partitions() const { return seq_partition_; }
  // The tiers' statistics with the device-side rounds' counters folded in (as of the last
  // begin_step or sync_stats).
  memory::TierStats stats() const;
  // Folds the device-side counters in now (waits for the queued work).
  void sync_stats();
  // What the device-side rounds counted between the last two folds that saw any (normally the
  // step before): chunks selected, and of them those new to their partitions (misses and
  // prefetch hits), which had to cross the bus whether the step prefetched or not.
  struct StepTraffic {
    int64_t selected = 0, fresh = 0;
  };
  StepTraffic last_step_traffic() const { return last_traffic_; }
 private:
  KvLayout layout_;
  memory::BlockPool pool_;
  Backend& backend_;
  std::unique_ptr<memory::HostAllocator> host_allocator_;
  std::unique_ptr<memory::KvTiers> tiers_;
  Tensor kv_, bias_, ck_, ck_scores_, slot_table_;
  std::vector<memory::ChunkCopy> copies_;
  std::vector<memory::ChunkId> wanted_;
  std::vector<int32_t> step_blocks_, step_reads_;  // begin_step / end_step scratch
  bool keep_released_ = false;
  std::vector<int32_t> released_;
  ResidencyTimes times_;
  std::optional<DevicePartitions> parts_;
  std::vector<int32_t> partition_of_first_;  // by a sequence's first block: its partition, or -1
  std::vector<int32_t> free_partitions_;
  std::vector<int32_t> seq_partition_;       // the device step's sequences' partitions
  bool on_device_ = false;
  int64_t device_steps_ = 0;
  int64_t device_counts_[memory::part_counters] = {};  // as last folded in
  bool counts_queued_ = false;  // end_step queued a copy of the counters to counters_host
  StepTraffic last_traffic_;
  void fold_counts(const int64_t* counts);
  void release_partition_memory();
  int selection_width_ = 1;
  void make_partitions(const KvCacheOptions& options, int64_t slots);
  bool partitioned_ = false;
  // A step on the host path whose rounds may need more of the block cache than the host path
  // keeps: the partitions go back to the host path, and residency stays there from then on.
  void keep_room_for(const StepBatch& step);
  void hand_back_partitions(const std::string& why);
  void after_failed_round();
  bool assign_partitions(const StepBatch& step);
  void free_partition(int32_t first_block);
  // At most this many pieces per layer's residency (NOSA_RESIDENCY_PIECES, default 4; 1: the
  // whole selection in one piece), for comparisons.
  int64_t max_pieces_ = 4;
};

}  // namespace nosa::runtime
