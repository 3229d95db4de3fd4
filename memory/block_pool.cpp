#include "memory/block_pool.h"

#include "runtime/core/error.h"

namespace nosa::memory {

BlockPool::BlockPool(int64_t n_blocks) : capacity_(n_blocks), in_use_(n_blocks, 0) {
  NOSA_CHECK(n_blocks >= 0 && n_blocks < (int64_t(1) << 31), "bad KV block count {}", n_blocks);
  free_.reserve(n_blocks);
  // Hand out low ids first: the stack pops from the back.
  for (int64_t i = n_blocks - 1; i >= 0; --i) free_.push_back(int32_t(i));
}

bool BlockPool::allocate(int64_t n, std::vector<int32_t>& out) {
  if (n > int64_t(free_.size())) return false;
  for (int64_t i = 0; i < n; ++i) {
    int32_t id = free_.back();
    free_.pop_back();
    in_use_[id] = 1;
    out.push_back(id);
  }
  return true;
}

void BlockPool::release(const std::vector<int32_t>& blocks) {
  for (int32_t id : blocks) {
    NOSA_ASSERT(id >= 0 && id < capacity_ && in_use_[id], "releasing KV block {} twice", id);
    in_use_[id] = 0;
    free_.push_back(id);
  }
}

}  // namespace nosa::memory
