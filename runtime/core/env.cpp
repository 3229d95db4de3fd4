#include "runtime/core/env.h"

#include <charconv>
#include <cstdlib>
#include <cstring>

#include "runtime/core/error.h"

namespace nosa {

namespace {

// The value of `name` parsed whole as a T in [lo, hi], or `fallback` when it is unset.
template <class T>
T env_value(const char* name, T fallback, T lo, T hi, const char* what) {
  const char* text = std::getenv(name);
  if (!text) return fallback;
  T value{};
  const char* end = text + std::strlen(text);
  const auto [ptr, ec] = std::from_chars(text, end, value);
  NOSA_CHECK(ec == std::errc() && ptr == end && ptr != text && value >= lo && value <= hi,
             "{} must be {} from {} to {}, not '{}'", name, what, lo, hi, text);
  return value;
}

}  // namespace

int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  return env_value<int64_t>(name, fallback, lo, hi, "an integer");
}

double env_double(const char* name, double fallback, double lo, double hi) {
  return env_value<double>(name, fallback, lo, hi, "a number");
}

}  // namespace nosa
