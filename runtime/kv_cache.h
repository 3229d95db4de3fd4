// The paged KV cache of one rank: a pool of physical blocks, each holding block_size tokens of
// every layer and local KV head, stored as "chunks" of one (block, layer, KV head):
//   kv    [n_chunks][2][block_size][head_dim]   keys then values (rotated keys), kv dtype
//   bias  [n_chunks][block_size]                NOSA eviction score c per token, float32
//   ck    [n_chunks][keys_per_block][head_dim]  compressed keys whose window starts in the block
//   ckE   [n_chunks][keys_per_block]            mean of c over each compressed window (NOSA)
// chunk(block, layer, head) = (block * n_layers + layer) * n_kv_heads + head. One (layer, head)
// chunk is the unit the memory tiers move (32 KiB for 64 tokens x 128 dims in bf16).
#pragma once

#include <cstdint>
#include <memory>

#include "memory/block_pool.h"
#include "runtime/core/tensor.h"

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
  // Bytes of one block across every layer and head (KV, bias, compressed keys and scores).
  size_t bytes_per_block() const;
};

class Backend;

class KvCache {
 public:
  KvCache(const KvLayout& layout, int64_t n_blocks, Backend& backend);

  const KvLayout& layout() const { return layout_; }
  memory::BlockPool& pool() { return pool_; }
  const memory::BlockPool& pool() const { return pool_; }
  Tensor& kv() { return kv_; }
  Tensor& bias() { return bias_; }
  Tensor& ck() { return ck_; }
  Tensor& ck_scores() { return ck_scores_; }

 private:
  KvLayout layout_;
  memory::BlockPool pool_;
  Tensor kv_, bias_, ck_, ck_scores_;
};

}  // namespace nosa::runtime
