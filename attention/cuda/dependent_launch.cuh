// Programmatic dependent launch (Hopper and later) for the kernels of a decoding step: a kernel
// launched by launch_dependent() is scheduled while the kernel before it on the stream still
// runs, and waits inside (dependent_launch_begin) until that kernel has finished and its writes
// are visible. A step is hundreds of short kernels in a chain; this takes the launch and the
// ramp of each off the chain: on an H200, 0.2-0.9% a step in every decode configuration measured
// (8b-like NOSA B = 16 7.05 -> 7.01 ms, dense B = 1 6.29 -> 6.24). Included by .cu files only.
//
// The contract: a kernel launched by launch_dependent() calls dependent_launch_begin() before
// it touches global memory (reads and writes alike: the kernel before may still be reading what
// this one overwrites). Elsewhere (a plain launch, or a GPU before sm_90) the call does nothing.
// NOSA_PDL=0 in the environment launches every kernel plainly, and so does a build for any GPU
// before sm_90 (NOSA_CUDA_MIN_ARCH, from CMAKE_CUDA_ARCHITECTURES): such a kernel, compiled from
// its PTX on a newer GPU, would lack the wait.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <utility>

namespace nosa::attention::cuda {

// First statement of a kernel launched by launch_dependent(): waits for the previous kernel of
// the stream. (With an early trigger of the next one as well, its waiting thread blocks held
// multiprocessor resources that this one's needed: 8b-like NOSA B = 16 became 2% slower.)
__device__ __forceinline__ void dependent_launch_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

#ifndef NOSA_CUDA_MIN_ARCH
#define NOSA_CUDA_MIN_ARCH 0
#endif

// Whether launches on the current device use the attribute: every kernel built for sm_90 or
// later, a device of compute capability 9.0 or later, and not NOSA_PDL=0.
inline bool dependent_launch_enabled() {
  if (NOSA_CUDA_MIN_ARCH < 90) return false;
  static const bool allowed = [] {
    const char* e = std::getenv("NOSA_PDL");
    return !(e && e[0] == '0');
  }();
  if (!allowed) return false;
  constexpr int k_max_devices = 64;
  static std::atomic<int> major[k_max_devices] = {};  // 0: not asked yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= k_max_devices) return false;
  int m = major[dev].load(std::memory_order_relaxed);
  if (m == 0) {
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return false;
    major[dev].store(m, std::memory_order_relaxed);
  }
  return m >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...), scheduled early after the stream's previous
// kernel (see the contract above).
template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = dependent_launch_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace nosa::attention::cuda
