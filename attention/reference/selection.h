// The block selection of docs/nosa.md, section 3, written literally: the CPU reference that
// every fast path must agree with block for block.
#pragma once

#include <cstdint>
#include <vector>

#include "attention/sparse_params.h"

namespace nosa::attention::reference {

// Compressed windows lying entirely inside positions 0..t (window j covers
// [j * kernel_stride, j * kernel_stride + kernel_size - 1]).
int64_t compressed_count(int64_t t, const SparseParams& p);

// Compressed key j: the mean of the rotated keys of window j. keys: [>= window end + 1][d].
void compressed_key(const float* keys, int64_t j, int d, const SparseParams& p, float* out);

// Query-aware score of every compressed key for one GQA group (step 3):
// S[j] = sum over the group's heads h of softmax_j(q_h . ck[j] / sqrt(d)).
// q: [group][d], ck: [n][d]. Returns n scores.
std::vector<float> query_scores(const float* q, int group, int d, const float* ck, int64_t n);

// Max-pools compressed scores into the scores of blocks 0..qb (steps 4 and 5): block b takes the
// max over j in [m*b - 1, m*b + m - 1] that exist (m = keys_per_block), -inf if none; forced
// blocks (b < init_blocks, or qb - local_blocks <= b <= qb) get +inf.
std::vector<float> pool_blocks(const float* scores, int64_t n, int64_t qb, const SparseParams& p);

// The k best of scores[0..n), ties toward the lower index; returned in ascending block order.
std::vector<int32_t> top_blocks(const std::vector<float>& scores, int64_t k);

// Whether a query at position t attends to every block (dense mode, a sequence shorter than
// dense_len, or no more blocks than topk).
bool selects_all(Mode mode, int64_t t, const SparseParams& p);
// How many blocks token t selects: all of its qb + 1 when selects_all, else topk.
int64_t selected_count(Mode mode, int64_t t, const SparseParams& p);

// The blocks a query token at position t selects for one KV head (step 6), ascending.
// q: the group's query heads [group][d] (rotated); ck: compressed keys [n][d] with
// n >= compressed_count(t); e: the query-agnostic window scores E[j] (NOSA only, else ignored).
std::vector<int32_t> select_blocks(Mode mode, const float* q, int group, int d, const float* ck,
                                   const float* e, int64_t t, const SparseParams& p);

}  // namespace nosa::attention::reference
