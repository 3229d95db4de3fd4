#include "runtime/core/tensor.h"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>

#include "runtime/core/error.h"

namespace nosa {

const char* device_name(Device device) { return device == Device::cpu ? "cpu" : "cuda"; }

std::string shape_string(const Shape& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Tensor::Tensor(std::shared_ptr<void> storage, void* data, DType dtype, Shape shape, Device device)
    : storage_(std::move(storage)), data_(data), dtype_(dtype), shape_(std::move(shape)),
      device_(device) {}

Tensor Tensor::empty_host(DType dtype, Shape shape) {
  size_t bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  size_t rounded = (bytes + 63) / 64 * 64;
  void* p = rounded ? std::aligned_alloc(64, rounded) : nullptr;
  NOSA_CHECK_CODE(p || rounded == 0, ErrorCode::resource_exhausted,
                  "out of host memory allocating {} bytes", bytes);
  std::shared_ptr<void> storage(p, [](void* q) { std::free(q); });
  return Tensor(std::move(storage), p, dtype, std::move(shape), Device::cpu);
}

Tensor Tensor::zeros_host(DType dtype, Shape shape) {
  Tensor t = empty_host(dtype, std::move(shape));
  if (t.bytes()) std::memset(t.raw(), 0, t.bytes());
  return t;
}

Tensor Tensor::borrow(void* data, DType dtype, Shape shape, Device device) {
  return Tensor(nullptr, data, dtype, std::move(shape), device);
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  NOSA_ASSERT(rank() >= 1 && begin >= 0 && begin <= end && end <= shape_[0],
              "rows [{}, {}) out of range for shape {}", begin, end, shape_string(shape_));
  Shape s = shape_;
  s[0] = end - begin;
  size_t row_bytes = shape_[0] ? bytes() / size_t(shape_[0]) : 0;
  return Tensor(storage_, static_cast<char*>(data_) + size_t(begin) * row_bytes, dtype_, s,
                device_);
}

Tensor Tensor::reshape(Shape shape) const {
  NOSA_ASSERT(shape_numel(shape) == numel(), "cannot reshape {} to {}", shape_string(shape_),
              shape_string(shape));
  return Tensor(storage_, data_, dtype_, std::move(shape), device_);
}

}  // namespace nosa
