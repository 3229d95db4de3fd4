// Sparse (and dense) attention for single query tokens, flash-decoding style: the blocks a token
// attends to are split over several thread blocks (split-K), each streaming its share of the
// paged KV cache through shared memory (cp.async, three stages) into bf16 tensor-core MMAs with
// the GQA group's query heads as the rows; a second kernel merges the splits. The NOSA bias
// (eviction score c of each key) is added to the scaled logits when use_bias.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention/cuda/kv_view.cuh"

namespace nosa::attention::cuda {

struct DecodeArgs {
  KvView kv;
  StepView step;
  int layer = 0;
  const void* q = nullptr;  // [T][H * group][d] bf16
  int group = 1;            // at most 16
  float scale = 1.0f;
  bool use_bias = false;
  const int32_t* selection = nullptr;  // [T][H][k_max] ascending, -1 padded; null: all blocks
  int k_max = 0;
  int max_blocks = 0;                  // most blocks any listed token attends to
  const int32_t* token_list = nullptr; // tokens handled: [n_list] indices into the step
  int n_list = 0;
  int splits = 1;                      // from decode_splits()
  // Attention in parts (launch_sparse_decode_part): this part's partial results go to splits
  // [split_begin, split_begin + splits) of split_total (0: splits).
  int split_begin = 0;
  int split_total = 0;
  float* partial = nullptr;            // decode_partial_floats() floats, for split_total
  void* out = nullptr;                 // [T][H * group][d] bf16
};

// A split count that fills the GPU in whole waves of thread blocks (two per multiprocessor),
// >= 2 stages each; decode_partial_floats() floats of partial results for the merge.
int decode_splits(int n_list, int n_kv_heads, int max_blocks, int block_size, int sm_count);
// The fewest splits for a part of up to max_blocks blocks (a split's list entries live in shared
// memory).
int decode_min_splits(int max_blocks, int block_size);
size_t decode_partial_floats(int n_list, int n_kv_heads, int splits, int head_dim);
cudaError_t launch_sparse_decode(const DecodeArgs& args, cudaStream_t stream);

// Attention over a selection given in parts (each [T][H][k_max], -1 padded; together the blocks
// of the selection): each part's splits, then one merge of all of them. Device-side residency
// attends over the resident blocks while the missing ones are copied, then over those.
// The part with `a.selection` and `a.splits` of its own, split_begin where it starts.
cudaError_t launch_sparse_decode_part(const DecodeArgs& args, cudaStream_t stream);
// The merge of split_total splits (a.splits is ignored).
cudaError_t launch_sparse_decode_merge(const DecodeArgs& args, cudaStream_t stream);

}  // namespace nosa::attention::cuda
