// Plain views of the paged KV cache and of a step's metadata on the device, shared by the CUDA
// attention kernels and the CUDA backend (runtime/cuda). Host-includable: no device code here.
#pragma once

#include <cstdint>

namespace nosa::attention::cuda {

// One rank's paged KV cache (runtime/kv_cache.h): chunk(block, layer, head) =
// (block * n_layers + layer) * n_kv_heads + head. Compressed keys are indexed by chunk; keys,
// values and eviction scores by slot (the chunk itself unless the cache is offloaded).
struct KvView {
  void* kv = nullptr;          // [chunks][2][block_size][head_dim] bf16: keys, then values
  float* bias = nullptr;       // [chunks][block_size] eviction score c per token
  void* ck = nullptr;          // [chunks][keys_per_block][head_dim] bf16 compressed keys
  float* ck_scores = nullptr;  // [chunks][keys_per_block] mean c per compressed window
  // Offloaded caches: chunk -> device slot of kv and bias (-1: not resident); null: slot = chunk.
  const int32_t* slot_table = nullptr;
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  int keys_per_block = 0;
};

// The step's metadata, uploaded once per step (runtime/step.h).
struct StepView {
  const int32_t* tokens = nullptr;           // [T]
  const int32_t* positions = nullptr;        // [T]
  const int32_t* token_seq = nullptr;        // [T]
  const int32_t* seq_n_past = nullptr;       // [S]
  const int32_t* seq_n_new = nullptr;        // [S]
  const int32_t* seq_token_begin = nullptr;  // [S]
  const int32_t* block_table = nullptr;      // [S][bt_stride]: logical -> physical block
  const int32_t* logit_rows = nullptr;       // [n_logits]
  int bt_stride = 0;
  int n_tokens = 0;
  int n_seqs = 0;
  int n_logits = 0;
};

// attention::SparseParams, flattened for kernels.
struct SparseView {
  int block_size = 64;
  int kernel_size = 32;
  int kernel_stride = 16;
  int init_blocks = 1;
  int local_blocks = 16;
  int topk = 64;
  int q_select = 33;
  int dense_len = 0;
};

}  // namespace nosa::attention::cuda
