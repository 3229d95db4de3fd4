// The tiled selection's exp_core is CUDA's exp() bit for bit on every input it gets (the
// selection paths must agree with each other and with the CPU block for block). Skipped where no
// GPU exists.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/exp_core_check.h"

namespace nosa::test {
namespace {

TEST(CudaExpCore, IsExpBitForBitOnEveryFloatFromMinus708ToZero) {
  NOSA_REQUIRE_GPU();
  const ExpCoreCheck r = check_exp_core();
  ASSERT_EQ(r.error, 0) << cudaGetErrorString(cudaError_t(r.error));
  EXPECT_EQ(r.checked, 0x44310000u);
  EXPECT_EQ(r.mismatches, 0u) << "first differing float: bits 0x" << std::hex << r.first_bad;
}

}  // namespace
}  // namespace nosa::test
