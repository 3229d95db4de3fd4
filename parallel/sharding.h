// How a tensor-parallel rank's share of a model is cut: whole GQA groups of KV heads per rank
// (so that block selection stays local), or, with more ranks than KV heads, a replicated KV head
// whose group of query heads is split; FFN columns and vocabulary rows in contiguous ranges.
#pragma once

#include <cstdint>

namespace nosa::parallel {

struct Partition {
  int rank = 0, world = 1;
  int q_begin = 0, q_count = 0;    // query heads this rank attends with and projects out
  // Query heads this rank computes: every head of its KV heads' groups, because block selection
  // sums the query-aware scores over the whole group (differs from q_* when KV heads are
  // replicated and their query heads split).
  int group_q_begin = 0, group_q_count = 0;
  int kv_begin = 0, kv_count = 0;  // KV heads of this rank (replicated when world > n_kv)
  int64_t ffn_begin = 0, ffn_count = 0;
  int64_t vocab_begin = 0, vocab_count = 0;
};

// Throws invalid_argument, saying what does not divide, when the model cannot be split this way.
Partition make_partition(int n_heads, int n_kv_heads, int64_t intermediate, int64_t vocab,
                         int rank, int world);

}  // namespace nosa::parallel
