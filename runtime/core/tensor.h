// A tensor handle: a typed, shaped view of memory on one device, contiguous and row-major.
// Copies share the storage (like a shared_ptr); views keep the storage alive.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"

namespace nosa {

enum class Device : uint8_t { cpu, cuda };
const char* device_name(Device device);

using Shape = std::vector<int64_t>;
std::string shape_string(const Shape& shape);
int64_t shape_numel(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<void> storage, void* data, DType dtype, Shape shape, Device device);

  // Allocates uninitialised, 64-byte-aligned host memory.
  static Tensor empty_host(DType dtype, Shape shape);
  // Allocates zeroed host memory.
  static Tensor zeros_host(DType dtype, Shape shape);
  // A view of memory the caller keeps alive.
  static Tensor borrow(void* data, DType dtype, Shape shape, Device device = Device::cpu);

  bool defined() const { return data_ != nullptr || (!shape_.empty() && numel() == 0); }
  void* raw() const { return data_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return int(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t bytes() const { return size_t(numel()) * dtype_size(dtype_); }

  // Rows [begin, end) of the first dimension, sharing storage.
  Tensor rows(int64_t begin, int64_t end) const;
  // The same memory with another shape of the same element count.
  Tensor reshape(Shape shape) const;

 private:
  std::shared_ptr<void> storage_;
  void* data_ = nullptr;
  DType dtype_ = DType::f32;
  Shape shape_;
  Device device_ = Device::cpu;
};

}  // namespace nosa
