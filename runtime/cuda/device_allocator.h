// A caching allocator of device memory for one GPU: freed blocks go back to a free list and are
// reused by later allocations of a similar size, so that the forward pass, which allocates its
// activations every step, makes no cudaMalloc (and no device synchronization) on the hot path.
// All work runs on one stream, so a block freed by one op can be reused by the next in stream
// order. Very large blocks (the KV cache, weights) bypass the cache.
#pragma once

#include <cstddef>
#include <memory>

namespace nosa::runtime::cuda {

class DeviceAllocator {
 public:
  DeviceAllocator();
  ~DeviceAllocator();
  DeviceAllocator(const DeviceAllocator&) = delete;
  DeviceAllocator& operator=(const DeviceAllocator&) = delete;

  // At least `bytes` of device memory (256-byte aligned); the block returns to the cache when the
  // last reference dies. Throws resource_exhausted when the device is out of memory even after
  // the cache was emptied.
  std::shared_ptr<void> allocate(size_t bytes);
  // Frees every cached block that is not in use.
  void release_cached();
  size_t cached_bytes() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace nosa::runtime::cuda
