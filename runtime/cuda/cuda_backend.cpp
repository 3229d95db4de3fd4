// The CUDA backend (host side). Device detection lives here; kernels come in .cu files.
#include <cuda_runtime.h>

#include "runtime/backend.h"
#include "runtime/core/error.h"

namespace nosa::runtime {

bool cuda_available() {
  int count = 0;  // left untouched when the driver is missing
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  NOSA_CHECK_CODE(cuda_available(), ErrorCode::unavailable, "no CUDA device is available");
  NOSA_FAIL(ErrorCode::unavailable, "the CUDA backend is not built yet; use --device cpu");
}

}  // namespace nosa::runtime
