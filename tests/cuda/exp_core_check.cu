// exp_core (attention/cuda/exp_core.cuh) against CUDA's exp() on every float it serves: the
// tiled selection computes its softmax sums with it and must agree bit for bit with the paths
// that call exp().
#include <cuda_runtime.h>

#include "attention/cuda/exp_core.cuh"
#include "tests/cuda/exp_core_check.h"

namespace nosa::test {
namespace {

constexpr uint32_t k_sign = 0x80000000u;
constexpr uint32_t k_708 = 0x44310000u;  // the bits of 708.0f

// Floats with bits k_sign + [0, count): -0 and the negative floats above -708.
__global__ void compare(uint32_t count, unsigned long long* mismatches, unsigned* first_bad) {
  unsigned long long local = 0;
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
    const uint32_t bits = k_sign + i;
    const double x = double(__uint_as_float(bits));
    if (__double_as_longlong(attention::cuda::exp_core(x)) != __double_as_longlong(exp(x))) {
      ++local;
      atomicMin(first_bad, bits);
    }
  }
  if (local) atomicAdd(mismatches, local);
}

}  // namespace

ExpCoreCheck check_exp_core() {
  ExpCoreCheck r;
  unsigned long long* mismatches = nullptr;
  unsigned* first_bad = nullptr;
  cudaError_t e = cudaMalloc(&mismatches, sizeof(*mismatches));
  if (e == cudaSuccess) e = cudaMalloc(&first_bad, sizeof(*first_bad));
  if (e == cudaSuccess) e = cudaMemset(mismatches, 0, sizeof(*mismatches));
  if (e == cudaSuccess) e = cudaMemset(first_bad, 0xff, sizeof(*first_bad));
  if (e == cudaSuccess) {
    compare<<<4096, 256>>>(k_708, mismatches, first_bad);
    e = cudaGetLastError();
  }
  unsigned long long m = 0;
  unsigned bad = 0;
  if (e == cudaSuccess) e = cudaMemcpy(&m, mismatches, sizeof(m), cudaMemcpyDeviceToHost);
  if (e == cudaSuccess) e = cudaMemcpy(&bad, first_bad, sizeof(bad), cudaMemcpyDeviceToHost);
  cudaFree(mismatches);
  cudaFree(first_bad);
  r.error = int(e);
  r.checked = e == cudaSuccess ? k_708 : 0;
  r.mismatches = m;
  r.first_bad = bad;
  return r;
}

}  // namespace nosa::test
