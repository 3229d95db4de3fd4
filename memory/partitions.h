// Residency decided on the device for decoding steps (docs/memory.md, "Partitions").
//
// The host-driven path (KvTiers::select_misses) reads every layer's selection back, looks it up
// and hands the misses to a gather: a round trip per layer that the device waits for. For
// decoding steps whose KV is in host memory the same decision is made on the device instead,
// from the slot table alone, so that nothing waits for the host between layers:
//   - each running sequence owns a partition of the block cache: R slots per (layer, KV head),
//     used only by that sequence's selections of that layer and head;
//   - a selected chunk that the slot table maps to a slot (anywhere: its partition, or the part of
//     the cache the host path manages) is a hit;
//   - the misses of one (token, KV head) take the partition's least recently used slots that this
//     step does not use (the smallest stamp, then the lowest slot), in the order of the selection,
//     and are copied there from the block's host memory.
// A partition's slot whose chunk was later loaded elsewhere by the host path is stale, not
// wrong: a slot evicts its old chunk from the slot table only if the table still points at it.
// This relies on running sequences never sharing a block (the engine has no prefix sharing):
// each chunk a step selects belongs to one sequence, so to one partition.
// The state (slot table, per-slot chunk and stamp) lives where the backend's KV lives; this file
// holds the plain-pointer arguments and the reference implementation that the CUDA kernel
// (memory/cuda/partitions.cu) is tested against.
#pragma once

#include <cstdint>

namespace nosa::memory {

// Counters a partition round adds to (int64 each), in this order.
// part_errors counts misses that found no slot or no host memory (a bug: the partitions are sized
// for the selection's width and the step's blocks are checked first); the reference throws.
// A speculative round (a prefetch) counts the chunks it copies as part_prefetched, and neither
// hits nor misses; a later round's hits on slots a prefetch filled in the same step count as
// part_prefetch_hits (and as hits, not as overlap).
enum PartitionCounter {
  part_hits,
  part_misses,
  part_overlap,
  part_evictions,
  part_errors,
  part_prefetched,
  part_prefetch_hits,
  part_counters
};

constexpr int k_max_partition_slots = 1024;

struct PartitionArgs {
  // The step: selection [T][H][k] block indices (ascending, -1 padded), each token's sequence,
  // the sequences' block tables [S][bt_stride] and partitions [S].
  const int32_t* selection = nullptr;
  int n_tokens = 0, n_heads = 0, k = 0;
  const int32_t* token_seq = nullptr;
  const int32_t* block_table = nullptr;
  int bt_stride = 0;
  const int32_t* seq_partition = nullptr;
  int layer = 0, n_layers = 0;
  // The cache: chunk -> slot; partition p, layer l, head h owns the slots part_base +
  // ((p * n_layers + l) * n_heads + h) * part_slots + [0, part_slots); per partition slot (index
  // minus part_base): the chunk it holds (-1: none) and the stamp of the last step that used it.
  int32_t* slot_table = nullptr;
  int64_t part_base = 0;
  int part_slots = 0;  // at most k_max_partition_slots
  int64_t* part_chunk = nullptr;
  uint32_t* part_stamp = nullptr;
  // The step's stamp (> every earlier step's; 0 = never used), where the cache's state lives. A
  // round of layer 0 starts a step: it advances the stamp first (on the device for the kernel,
  // so that a step replayed from a graph gets a new one too).
  uint32_t* step_stamp = nullptr;
  // Slots' bytes, and each block's host memory (every layer and head of it, chunk after chunk:
  // keys and values, then eviction scores), as the copying code addresses it.
  char* kv = nullptr;
  char* bias = nullptr;
  int64_t kv_bytes = 0, bias_bytes = 0;
  char* const* block_host = nullptr;
  int64_t* counters = nullptr;  // [part_counters]
  // Optional ([T][H][k] each, null: not written): each row's selection split in two, the logical
  // blocks that were hits and those that were misses, each in the selection's order and -1
  // padded. Attention can then read the hits while the misses are still being copied.
  int32_t* hit_rows = nullptr;
  int32_t* miss_rows = nullptr;
  // A speculative round: a prefetch of this layer's blocks from a guess at its selection (made
  // before the layer's own round, which then finds them as hits). It never advances the step's
  // stamp (so it is never a round of layer 0), stamps only the slots it fills, with the step's
  // stamp (the layer's own round evicts them last; its hits keep theirs), and counts apart
  // (part_prefetched).
  bool speculative = false;
};

// The reference: every (token, KV head) in turn, copies with memcpy. Throws internal if a
// partition cannot hold its misses (part_slots below the selection's width) or a missed block has
// no host memory.
void resident_partitions_reference(const PartitionArgs& a);

}  // namespace nosa::memory
