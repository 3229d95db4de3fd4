// Physical KV block ids: allocation and accounting. A physical block holds block_size tokens of
// every layer and KV head of one sequence; the KV storage itself belongs to the backend.
#pragma once

#include <cstdint>
#include <vector>

namespace nosa::memory {

class BlockPool {
 public:
  explicit BlockPool(int64_t n_blocks);

  int64_t capacity() const { return capacity_; }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  int64_t used_blocks() const { return capacity_ - free_blocks(); }

  // Appends n free block ids to out and returns true, or leaves out unchanged and returns false
  // when fewer than n are free.
  bool allocate(int64_t n, std::vector<int32_t>& out);
  // Returns blocks to the pool. Freeing a block that is not allocated is a bug (throws).
  void release(const std::vector<int32_t>& blocks);

 private:
  int64_t capacity_;
  std::vector<int32_t> free_;
  std::vector<uint8_t> in_use_;
};

}  // namespace nosa::memory
