// Element types of tensors and the host-side conversions between them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace nosa {

enum class DType : uint8_t { f32, f16, bf16, i32, i64, u8 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
// Parses a safetensors dtype name ("F32", "F16", "BF16", "I32", "I64", "U8"); throws otherwise.
DType dtype_from_safetensors(const std::string& name);
const char* dtype_to_safetensors(DType dtype);

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as PyTorch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements of `src` (any float dtype) to float32.
void convert_to_f32(const void* src, DType dtype, float* dst, size_t n);
// Converts n float32 values to `dtype` (f32, f16 or bf16).
void convert_from_f32(const float* src, DType dtype, void* dst, size_t n);

}  // namespace nosa
