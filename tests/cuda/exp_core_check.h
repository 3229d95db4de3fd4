// The device side of cuda_exp_core_test (exp_core_check.cu, compiled by nvcc).
#pragma once

#include <cstdint>

namespace nosa::test {

struct ExpCoreCheck {
  int error = 0;            // a cudaError_t; 0: the comparison ran
  uint64_t checked = 0;     // floats compared
  uint64_t mismatches = 0;  // of them, where exp_core(x) and exp(x) differ in any bit
  uint32_t first_bad = 0;   // the bits of the lowest-bit-pattern float that differs
};

// exp_core(double(f)) against exp(double(f)) for every float f in (-708, 0]: the inputs of the
// selection's softmax sums (a logit less the row's maximum).
ExpCoreCheck check_exp_core();

}  // namespace nosa::test
