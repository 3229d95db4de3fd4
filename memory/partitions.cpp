#include "memory/partitions.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "runtime/core/error.h"

namespace nosa::memory {

void resident_partitions_reference(const PartitionArgs& a) {
  const int H = a.n_heads, R = a.part_slots;
  NOSA_ASSERT(!a.speculative || a.layer > 0, "a speculative round of layer 0");
  if (a.layer == 0) ++*a.step_stamp;
  // A speculative round's hits are not the layer's selection: nothing to count.
  int64_t ignored = 0;
  int64_t& hits = a.speculative ? ignored : a.counters[part_hits];
  int64_t& overlap = a.speculative ? ignored : a.counters[part_overlap];
  int64_t& prefetch_hits = a.speculative ? ignored : a.counters[part_prefetch_hits];
  int64_t& copied = a.counters[a.speculative ? part_prefetched : part_misses];
  const uint32_t stamp = *a.step_stamp;
  const int64_t chunk_bytes = a.kv_bytes + a.bias_bytes;
  std::vector<uint8_t> used(size_t(R), 0);
  std::vector<int64_t> miss_chunk, miss_block;
  std::vector<int> free_slots;
  for (int t = 0; t < a.n_tokens; ++t) {
    const int seq = a.token_seq[t];
    const int32_t* table = a.block_table + int64_t(seq) * a.bt_stride;
    const int64_t p = a.seq_partition[seq];
    for (int h = 0; h < H; ++h) {
      const int64_t local = ((p * a.n_layers + a.layer) * H + h) * R;
      const int64_t base = a.part_base + local;
      std::fill(used.begin(), used.end(), 0);
      miss_chunk.clear();
      miss_block.clear();
      const int64_t row_at = (int64_t(t) * H + h) * a.k;
      const int32_t* row = a.selection + row_at;
      int n_hits = 0;
      for (int i = 0; i < a.k && row[i] >= 0; ++i) {
        const int64_t block = table[row[i]];
        const int64_t chunk = (block * a.n_layers + a.layer) * H + h;
        const int32_t s = a.slot_table[chunk];
        if (s < 0) {
          if (a.miss_rows) a.miss_rows[row_at + int64_t(miss_chunk.size())] = row[i];
          miss_chunk.push_back(chunk);
          miss_block.push_back(block);
          continue;
        }
        if (a.hit_rows) a.hit_rows[row_at + n_hits++] = row[i];
        ++hits;
        if (s >= base && s < base + R) {
          used[size_t(s - base)] = 1;
          const uint32_t last = a.part_stamp[local + (s - base)];
          if (last + 1 == stamp) ++overlap;
          if (last == stamp) ++prefetch_hits;  // only a prefetch stamps a slot before the round
        } else {
          ++overlap;  // a block the host path keeps: being written, or recent
        }
      }
      if (a.hit_rows) std::fill(a.hit_rows + row_at + n_hits, a.hit_rows + row_at + a.k, -1);
      if (a.miss_rows)
        std::fill(a.miss_rows + row_at + int64_t(miss_chunk.size()), a.miss_rows + row_at + a.k,
                  -1);
      // A prefetch's wrong guesses (stamped this step, not selected) become as old as the step
      // before's selection: the next step must not count them as selected the step before.
      if (!a.speculative)
        for (int j = 0; j < R; ++j)
          if (!used[size_t(j)] && a.part_stamp[local + j] == stamp)
            a.part_stamp[local + j] = stamp - 1;
      // The misses take the least recently used slots this step does not use, in order.
      free_slots.clear();
      for (int j = 0; j < R; ++j)
        if (!used[size_t(j)]) free_slots.push_back(j);
      NOSA_ASSERT(miss_chunk.size() <= free_slots.size(),
                  "partition of {} slots: {} misses beside {} hits", R, miss_chunk.size(),
                  R - int(free_slots.size()));
      std::sort(free_slots.begin(), free_slots.end(), [&](int x, int y) {
        const uint32_t sx = a.part_stamp[local + x], sy = a.part_stamp[local + y];
        return sx != sy ? sx < sy : x < y;
      });
      for (size_t r = 0; r < miss_chunk.size(); ++r) {
        const int j = free_slots[r];
        const int32_t slot = int32_t(base + j);
        const int64_t old = a.part_chunk[local + j];
        if (old >= 0 && a.slot_table[old] == slot) {
          a.slot_table[old] = -1;
          ++a.counters[part_evictions];
        }
        const int64_t chunk = miss_chunk[r];
        a.part_chunk[local + j] = chunk;
        a.part_stamp[local + j] = stamp;
        a.slot_table[chunk] = slot;
        const char* host = a.block_host[miss_block[r]];
        NOSA_ASSERT(host, "block {} missed on the device has no host memory", miss_block[r]);
        host += (int64_t(a.layer) * H + h) * chunk_bytes;
        std::memcpy(a.kv + slot * a.kv_bytes, host, size_t(a.kv_bytes));
        std::memcpy(a.bias + slot * a.bias_bytes, host + a.kv_bytes, size_t(a.bias_bytes));
        ++copied;
      }
      // A prefetch stamps only what it copied: its hits keep their stamps, which say whether
      // the layer's own round finds them selected the step before (overlap).
      if (!a.speculative)
        for (int j = 0; j < R; ++j)
          if (used[size_t(j)]) a.part_stamp[local + j] = stamp;
    }
  }
}

}  // namespace nosa::memory
