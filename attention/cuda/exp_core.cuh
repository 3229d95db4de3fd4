// exp_core: CUDA's exp() on doubles below 708 in magnitude, as straight-line code (device code,
// included by .cu files only). The selection's softmax sums compute exp(double) of float inputs
// and must agree with exp() bit for bit in every path: tests/cuda/cuda_exp_core_test.cpp checks
// this function against exp() on every such float, so a toolkit whose exp() changes is caught.
#pragma once

#include <cuda_runtime.h>

namespace nosa::attention::cuda {

// CUDA's exp(x) where |x| < 708: libdevice's fast path (__nv_exp), the same operations with the
// same constants, so the same value bit for bit, without the branch to the overflow and
// underflow cases: straight-line code, so that the compiler interleaves independent calls.
__device__ __forceinline__ double exp_core(double x) {
  const double t = __fma_rn(x, __longlong_as_double(0x3FF71547652B82FEll),
                            __longlong_as_double(0x4338000000000000ll));
  const int j = __double2loint(t);
  const double k = __dadd_rn(t, __longlong_as_double(0xC338000000000000ll));
  double r = __fma_rn(k, __longlong_as_double(0xBFE62E42FEFA39EFll), x);
  r = __fma_rn(k, __longlong_as_double(0xBC7ABC9E3B39803Fll), r);
  double p = __fma_rn(__longlong_as_double(0x3E5ADE1569CE2BDFll), r,
                      __longlong_as_double(0x3E928AF3FCA213EAll));
  p = __fma_rn(p, r, __longlong_as_double(0x3EC71DEE62401315ll));
  p = __fma_rn(p, r, __longlong_as_double(0x3EFA01997C89EB71ll));
  p = __fma_rn(p, r, __longlong_as_double(0x3F2A01A014761F65ll));
  p = __fma_rn(p, r, __longlong_as_double(0x3F56C16C1852B7AFll));
  p = __fma_rn(p, r, __longlong_as_double(0x3F81111111122322ll));
  p = __fma_rn(p, r, __longlong_as_double(0x3FA55555555502A1ll));
  p = __fma_rn(p, r, __longlong_as_double(0x3FC5555555555511ll));
  p = __fma_rn(p, r, __longlong_as_double(0x3FE000000000000Bll));
  p = __fma_rn(p, r, 1.0);
  p = __fma_rn(p, r, 1.0);
  return __hiloint2double(int(unsigned(__double2hiint(p)) + (unsigned(j) << 20)),
                          __double2loint(p));
}

}  // namespace nosa::attention::cuda
