// The weights of one tensor-parallel rank, on the backend, in the layout the forward pass uses:
// q/k/v fused into one projection (this rank's query and KV heads, plus the values of every KV
// head, which NOSA's eviction score reads), gate/up fused, o_proj and down cut by columns.
#pragma once

#include <vector>

#include "parallel/sharding.h"
#include "runtime/backend.h"
#include "runtime/model_config.h"
#include "runtime/safetensors.h"

namespace nosa::runtime {

struct LayerWeights {
  Tensor attn_norm;     // [hidden]
  Tensor qkv;           // [(group_q_count + kv_count + n_kv) * head_dim, hidden]
  Tensor qkv_bias;      // same rows, when attention_bias
  Tensor o_proj;        // [hidden, q_count * head_dim]
  Tensor o_bias;        // [hidden], on rank 0 only, when attention_bias
  Tensor mlp_norm;      // [hidden]
  Tensor gate_up;       // [2 * ffn_count, hidden]
  Tensor gate_up_bias;  // when mlp_bias
  Tensor down;          // [hidden, ffn_count]
  Tensor down_bias;     // [hidden], on rank 0 only, when mlp_bias
  Tensor nosa_a;        // [n_kv] float32 (NOSA)
  Tensor nosa_delta_w;  // [n_kv, n_kv * head_dim] float32 (NOSA)
  Tensor nosa_delta_b;  // [n_kv] float32, when present
};

struct ModelWeights {
  Tensor embed;       // [vocab, hidden]
  Tensor final_norm;  // [hidden]
  Tensor lm_head;     // [vocab, hidden] (the embedding when tied); only on rank 0
  std::vector<LayerWeights> layers;
};

// Whether the checkpoint carries NOSA's per-layer A and delta tensors.
bool has_nosa_tensors(const Checkpoint& ckpt, const ModelConfig& config);

// Loads, checks (every missing tensor or wrong shape is a bad_checkpoint error naming it), cuts
// and uploads this rank's weights. NOSA tensors are loaded when load_nosa.
ModelWeights load_weights(const Checkpoint& ckpt, const ModelConfig& config,
                          const parallel::Partition& part, bool load_nosa, Backend& backend);

}  // namespace nosa::runtime
