#include "runtime/kv_cache.h"

#include "runtime/backend.h"
#include "runtime/core/error.h"

namespace nosa::runtime {

size_t KvLayout::bytes_per_block() const {
  const size_t chunks = size_t(chunks_per_block());
  const size_t per_chunk = (2 * size_t(block_size) * head_dim + size_t(keys_per_block) * head_dim) *
                               dtype_size(dtype) +
                           (size_t(block_size) + keys_per_block) * 4;
  return chunks * per_chunk;
}

KvCache::KvCache(const KvLayout& layout, int64_t n_blocks, Backend& backend)
    : layout_(layout), pool_(n_blocks) {
  NOSA_CHECK_CODE(n_blocks > 0, ErrorCode::resource_exhausted,
                  "no memory for the KV cache (0 blocks)");
  const int64_t chunks = n_blocks * layout.chunks_per_block();
  kv_ = backend.zeros(layout.dtype, {chunks, 2, layout.block_size, layout.head_dim});
  bias_ = backend.zeros(DType::f32, {chunks, layout.block_size});
  ck_ = backend.zeros(layout.dtype, {chunks, layout.keys_per_block, layout.head_dim});
  ck_scores_ = backend.zeros(DType::f32, {chunks, layout.keys_per_block});
}

}  // namespace nosa::runtime
