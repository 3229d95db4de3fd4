// Settings read from the environment (tuning switches and comparisons), checked like flags.
#pragma once

#include <cstdint>

namespace nosa {

// The integer in environment variable `name`, or `fallback` when it is unset; throws
// invalid_argument naming the variable when it is not an integer in [lo, hi].
int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi);
// The same for a number (decimal, as 2.5 or 3).
double env_double(const char* name, double fallback, double lo, double hi);

}  // namespace nosa
