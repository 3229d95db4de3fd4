// Division and remainder of 32-bit values by a divisor fixed at run time, with two multiplies
// instead of a hardware divide (Lemire, Kaser and Kurz, "Faster remainder by direct computation",
// 2019: exact for every 32-bit numerator and divisor). The residency path splits every selected
// chunk id into (block, layer, head) several times per layer.
#pragma once

#include <cstdint>

namespace nosa::memory {

class FastDiv {
 public:
  FastDiv() = default;
  explicit FastDiv(uint32_t d) : d_(d), m_(d > 1 ? ~uint64_t(0) / d + 1 : 0) {}
  uint32_t divisor() const { return d_; }
  uint32_t div(uint32_t a) const {
    return d_ == 1 ? a : uint32_t((static_cast<unsigned __int128>(m_) * a) >> 64);
  }
  uint32_t mod(uint32_t a) const {
    return d_ == 1 ? 0 : uint32_t((static_cast<unsigned __int128>(m_ * a) * d_) >> 64);
  }

 private:
  uint32_t d_ = 1;
  uint64_t m_ = 0;
};

}  // namespace nosa::memory
