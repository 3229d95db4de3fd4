#include "runtime/core/env.h"

#include <charconv>
#include <cstdlib>
#include <cstring>

#include "runtime/core/error.h"

namespace nosa {

int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* text = std::getenv(name);
  if (!text) return fallback;
  int64_t value = 0;
  const char* end = text + std::strlen(text);
  const auto [ptr, ec] = std::from_chars(text, end, value);
  NOSA_CHECK(ec == std::errc() && ptr == end && ptr != text && value >= lo && value <= hi,
             "{} must be an integer from {} to {}, not '{}'", name, lo, hi, text);
  return value;
}

double env_double(const char* name, double fallback, double lo, double hi) {
  const char* text = std::getenv(name);
  if (!text) return fallback;
  double value = 0;
  const char* end = text + std::strlen(text);
  const auto [ptr, ec] = std::from_chars(text, end, value);
  NOSA_CHECK(ec == std::errc() && ptr == end && ptr != text && value >= lo && value <= hi,
             "{} must be a number from {} to {}, not '{}'", name, lo, hi, text);
  return value;
}

}  // namespace nosa
