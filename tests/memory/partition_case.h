// Random states of device-side residency (memory/partitions.h) for tests: a decoding step's
// selections, partitions holding some of their sequences' chunks (mapped or stale), chunks the
// host path keeps, slots holding chunks of sequences that ended. The state is one the engine can
// reach: a running sequence's chunk is mapped only into its own partition or the host path's
// slots.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "memory/partitions.h"

namespace nosa::memory::test {

struct PartitionCase {
  static constexpr int32_t k_unwritten = -7;
  int T = 0, H = 0, k = 0, L = 0, layer = 0, R = 0, n_parts = 0, bt_stride = 0;
  int64_t part_base = 0, n_blocks = 0, kv_bytes = 64, bias_bytes = 16;
  uint32_t stamp = 0;  // the step stamp: after a round, the one it used
  bool speculative = false;  // a prefetch's round (it splits no rows)
  std::vector<int32_t> selection, token_seq, block_table, seq_partition, slot_table;
  // The selection split into hits and misses ([T][H][k] each; a value no round writes until one
  // does, so that an entry left unwritten shows).
  std::vector<int32_t> hit_rows, miss_rows;
  std::vector<int64_t> part_chunk, counters = std::vector<int64_t>(part_counters, 0);
  std::vector<uint32_t> part_stamp;
  std::vector<char> kv, bias, host;  // host: every block's bytes, block after block

  int64_t chunk(int64_t block, int l, int h) const { return (block * L + l) * H + h; }
  int64_t block_bytes() const { return int64_t(L) * H * (kv_bytes + bias_bytes); }
  // The arguments with `block_host` pointing into `host_base` (the host bytes where the
  // implementation reads them) and the other arrays given by the caller.
  PartitionArgs args(char* const* block_host) {
    PartitionArgs a;
    a.selection = selection.data();
    a.n_tokens = T;
    a.n_heads = H;
    a.k = k;
    a.token_seq = token_seq.data();
    a.block_table = block_table.data();
    a.bt_stride = bt_stride;
    a.seq_partition = seq_partition.data();
    a.layer = layer;
    a.n_layers = L;
    a.slot_table = slot_table.data();
    a.part_base = part_base;
    a.part_slots = R;
    a.part_chunk = part_chunk.data();
    a.part_stamp = part_stamp.data();
    a.step_stamp = &stamp;  // a round of layer 0 advances it
    a.kv = kv.data();
    a.bias = bias.data();
    a.kv_bytes = kv_bytes;
    a.bias_bytes = bias_bytes;
    a.block_host = block_host;
    a.counters = counters.data();
    hit_rows.assign(selection.size(), k_unwritten);
    miss_rows.assign(selection.size(), k_unwritten);
    a.speculative = speculative;
    a.hit_rows = speculative ? nullptr : hit_rows.data();
    a.miss_rows = speculative ? nullptr : miss_rows.data();
    return a;
  }
};

// A prefetch's round before the round of `c` (whose layer is not 0): a guess at c's selection,
// each row with its first, fourth, ... blocks moved one block down (some guessed right, some
// not), as a speculative round on c's state.
inline PartitionCase guessed_round(const PartitionCase& c) {
  PartitionCase g = c;
  g.speculative = true;
  for (int64_t r = 0; r < int64_t(c.T) * c.H; ++r) {
    int32_t* row = g.selection.data() + r * c.k;
    std::vector<int32_t> v;
    for (int i = 0; i < c.k && row[i] >= 0; ++i) v.push_back(i % 3 == 0 && row[i] > 0 ? row[i] - 1 : row[i]);
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    v.resize(size_t(c.k), -1);
    std::copy(v.begin(), v.end(), row);
  }
  return g;
}

inline PartitionCase random_partition_case(uint32_t seed, int max_tokens = 24, int max_width = 48) {
  std::mt19937 rng(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto chance = [&](double p) { return std::bernoulli_distribution(p)(rng); };
  PartitionCase c;
  c.T = pick(1, max_tokens);
  c.H = pick(1, 4);
  c.L = pick(1, 4);
  c.layer = pick(0, c.L - 1);
  c.k = pick(1, max_width);
  c.R = c.k + pick(0, 2 * c.k);
  c.n_parts = c.T + pick(0, 4);
  c.stamp = uint32_t(pick(2, 1000));
  // Blocks: each sequence's own, plus blocks of sequences that ended (stale partition slots).
  std::vector<std::vector<int32_t>> tables(size_t(c.T));
  int32_t next = 0;
  for (auto& t : tables) {
    const int n = pick(1, 3 * c.k / 2 + 1);
    for (int i = 0; i < n; ++i) t.push_back(next++);
  }
  const int32_t ended_first = next, ended = pick(1, 40);
  c.n_blocks = ended_first + ended;
  std::vector<int32_t> ids(size_t(c.n_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);  // physical ids in no particular order
  for (auto& t : tables)
    for (int32_t& b : t) b = ids[size_t(b)];
  for (const auto& t : tables) c.bt_stride = std::max(c.bt_stride, int(t.size()));
  c.block_table.assign(size_t(c.T) * c.bt_stride, 0);
  for (int s = 0; s < c.T; ++s) {
    std::copy(tables[s].begin(), tables[s].end(), c.block_table.begin() + int64_t(s) * c.bt_stride);
    c.token_seq.push_back(s);
  }
  std::vector<int32_t> parts(size_t(c.n_parts));
  std::iota(parts.begin(), parts.end(), 0);
  std::shuffle(parts.begin(), parts.end(), rng);
  c.seq_partition.assign(parts.begin(), parts.begin() + c.T);
  // Selections: ascending logical blocks, -1 padded.
  c.selection.assign(size_t(c.T) * c.H * c.k, -1);
  for (int t = 0; t < c.T; ++t)
    for (int h = 0; h < c.H; ++h) {
      const int n = int(tables[t].size());
      std::vector<int32_t> all(static_cast<size_t>(n));
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(size_t(std::min(n, pick(0, c.k))));
      std::sort(all.begin(), all.end());
      std::copy(all.begin(), all.end(), c.selection.begin() + (int64_t(t) * c.H + h) * c.k);
      // Now and then something after the padding's first -1, which ends the row.
      if (int(all.size()) + 1 < c.k && chance(0.1))
        c.selection[(int64_t(t) * c.H + h) * c.k + c.k - 1] = 0;
    }
  // The host path's slots first, then the partitions.
  c.part_base = pick(4, 64);
  const int64_t part_total = int64_t(c.n_parts) * c.L * c.H * c.R;
  const int64_t n_chunks = c.n_blocks * c.L * c.H;
  c.slot_table.assign(size_t(n_chunks), -1);
  c.part_chunk.assign(size_t(part_total), -1);
  c.part_stamp.assign(size_t(part_total), 0);
  for (auto& s : c.part_stamp) s = chance(0.2) ? 0 : uint32_t(pick(1, int(c.stamp) - 1));
  for (int t = 0; t < c.T; ++t) {
    for (int h = 0; h < c.H; ++h) {
      const int64_t local = ((int64_t(c.seq_partition[t]) * c.L + c.layer) * c.H + h) * c.R;
      for (int j = 0; j < c.R; ++j) {
        const int64_t slot = c.part_base + local + j;
        if (chance(0.3)) continue;  // empty
        if (chance(0.6)) {          // one of the owner's chunks, mapped here or stale
          const int64_t ch =
              c.chunk(tables[t][size_t(pick(0, int(tables[t].size()) - 1))], c.layer, h);
          c.part_chunk[local + j] = ch;
          if (c.slot_table[ch] < 0 && chance(0.7)) c.slot_table[ch] = int32_t(slot);
        } else {  // a chunk of a sequence that ended
          const int64_t ch = c.chunk(ids[size_t(ended_first + pick(0, ended - 1))], c.layer, h);
          c.part_chunk[local + j] = ch;
          if (c.slot_table[ch] < 0 && chance(0.5)) c.slot_table[ch] = int32_t(slot);
        }
      }
    }
    // Some of its chunks in the host path's slots (blocks being written, recent ones).
    for (int32_t b : tables[t])
      for (int h = 0; h < c.H; ++h)
        if (c.slot_table[c.chunk(b, c.layer, h)] < 0 && chance(0.1))
          c.slot_table[c.chunk(b, c.layer, h)] = int32_t(pick(0, int(c.part_base) - 1));
  }
  const int64_t slots = c.part_base + part_total;
  c.kv.resize(size_t(slots * c.kv_bytes));
  c.bias.resize(size_t(slots * c.bias_bytes));
  c.host.resize(size_t(c.n_blocks * c.block_bytes()));
  for (auto& x : c.kv) x = char(rng());
  for (auto& x : c.bias) x = char(rng());
  for (auto& x : c.host) x = char(rng());
  return c;
}

}  // namespace nosa::memory::test
