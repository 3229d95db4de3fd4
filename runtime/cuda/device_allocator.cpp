#include "runtime/cuda/device_allocator.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>

#include "runtime/core/error.h"

namespace nosa::runtime::cuda {

namespace {
constexpr size_t k_small = size_t(1) << 20;
constexpr size_t k_uncached = size_t(1) << 30;

size_t round_size(size_t bytes) {
  if (bytes < k_small) return (bytes + 511) / 512 * 512;
  const size_t unit = size_t(2) << 20;
  return (bytes + unit - 1) / unit * unit;
}
}  // namespace

struct DeviceAllocator::State {
  std::mutex mutex;
  std::multimap<size_t, void*> free_blocks;
  size_t cached = 0;

  void release_locked() {
    for (auto& [size, ptr] : free_blocks) cudaFree(ptr);
    free_blocks.clear();
    cached = 0;
  }
};

DeviceAllocator::DeviceAllocator() : state_(std::make_shared<State>()) {}

DeviceAllocator::~DeviceAllocator() { release_cached(); }

std::shared_ptr<void> DeviceAllocator::allocate(size_t bytes) {
  const size_t size = round_size(bytes < 1 ? 1 : bytes);
  void* ptr = nullptr;
  if (size < k_uncached) {
    std::lock_guard lock(state_->mutex);
    auto it = state_->free_blocks.lower_bound(size);
    if (it != state_->free_blocks.end() && it->first <= size + size / 4) {
      ptr = it->second;
      const size_t got = it->first;
      state_->cached -= got;
      state_->free_blocks.erase(it);
      std::weak_ptr<State> weak = state_;
      return std::shared_ptr<void>(ptr, [weak, got](void* p) {
        if (auto s = weak.lock()) {
          std::lock_guard lock(s->mutex);
          s->free_blocks.emplace(got, p);
          s->cached += got;
        } else {
          cudaFree(p);
        }
      });
    }
  }
  cudaError_t err = cudaMalloc(&ptr, size);
  if (err != cudaSuccess) {
    cudaGetLastError();
    release_cached();
    err = cudaMalloc(&ptr, size);
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_bytes = 0, total = 0;
    cudaMemGetInfo(&free_bytes, &total);
    NOSA_FAIL(ErrorCode::resource_exhausted,
              "out of GPU memory: {:.1f} MiB requested, {:.1f} MiB free of {:.1f} MiB",
              double(size) / (1 << 20), double(free_bytes) / (1 << 20), double(total) / (1 << 20));
  }
  if (size >= k_uncached) return std::shared_ptr<void>(ptr, [](void* p) { cudaFree(p); });
  std::weak_ptr<State> weak = state_;
  return std::shared_ptr<void>(ptr, [weak, size](void* p) {
    if (auto s = weak.lock()) {
      std::lock_guard lock(s->mutex);
      s->free_blocks.emplace(size, p);
      s->cached += size;
    } else {
      cudaFree(p);
    }
  });
}

void DeviceAllocator::release_cached() {
  std::lock_guard lock(state_->mutex);
  state_->release_locked();
}

size_t DeviceAllocator::cached_bytes() const {
  std::lock_guard lock(state_->mutex);
  return state_->cached;
}

}  // namespace nosa::runtime::cuda
