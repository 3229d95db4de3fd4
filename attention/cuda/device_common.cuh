// Device helpers shared by the CUDA kernels (included by .cu files only): bf16 conversion,
// warp reductions, cp.async, ldmatrix and the bf16 tensor-core MMA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/cuda/kv_view.cuh"

namespace nosa::attention::cuda {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ int64_t kv_chunk(const KvView& kv, int64_t block, int layer, int head) {
  return (block * kv.n_layers + layer) * kv.n_kv_heads + head;
}

// Where a chunk's keys, values and eviction scores are: its slot in an offloaded cache.
__device__ __forceinline__ int64_t kv_slot(const KvView& kv, int64_t block, int layer, int head) {
  const int64_t chunk = kv_chunk(kv, block, layer, head);
  return kv.slot_table ? int64_t(kv.slot_table[chunk]) : chunk;
}

// compressed_count of attention/reference/selection.h: windows inside positions 0..t.
__device__ __host__ __forceinline__ int compressed_count(int64_t t, int kernel_size,
                                                         int kernel_stride) {
  if (t + 1 < kernel_size) return 0;
  return int((t + 1 - kernel_size) / kernel_stride + 1);
}

// What kernels size themselves by, asked once per device: the shared memory a thread block may
// opt in to (227 KB on Hopper, 163 KB on A100, 99 KB on Ada), a multiprocessor's, and the part
// of it the runtime reserves per thread block (for how many blocks share a multiprocessor).
struct DeviceLimits {
  size_t max_shared = 48 * 1024;
  size_t shared_per_sm = 0;
  size_t reserved_per_block = 1024;
};

inline const DeviceLimits& device_limits() {
  static DeviceLimits cached[64];
  static bool asked[64] = {};
  static const DeviceLimits fallback;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return fallback;
  if (!asked[dev]) {
    int opt_in = 0, per_sm = 0, reserved = 0;
    cudaDeviceGetAttribute(&opt_in, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
    cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev);
    DeviceLimits& l = cached[dev];
    l.max_shared = opt_in > 0 ? size_t(opt_in) : size_t(48 * 1024);
    l.shared_per_sm = per_sm > 0 ? size_t(per_sm) : 0;
    l.reserved_per_block = reserved >= 0 ? size_t(reserved) : 1024;
    asked[dev] = true;
  }
  return cached[dev];
}

inline size_t max_shared_bytes() { return device_limits().max_shared; }

// Lets Kernel (the __global__ function itself) take `bytes` of dynamic shared memory on the
// current device and, with max_carveout, prefer all of the unified L1 as shared memory (for
// several blocks per multiprocessor). Function attributes belong to a device, so what was set is
// remembered per device; past 64 devices it is set at every call.
template <auto Kernel>
cudaError_t allow_shared(size_t bytes, bool max_carveout = false) {
  static size_t allowed[64] = {};
  static bool carved[64] = {};
  int dev = 0;
  const bool known = cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < 64;
  if (bytes > 48 * 1024 && (!known || bytes > allowed[dev])) {
    const cudaError_t e =
        cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (e != cudaSuccess) return e;
    if (known) allowed[dev] = bytes;
  }
  if (max_carveout && (!known || !carved[dev])) {
    const cudaError_t e = cudaFuncSetAttribute(
        Kernel, cudaFuncAttributePreferredSharedMemoryCarveout, int(cudaSharedmemCarveoutMaxShared));
    if (e != cudaSuccess) return e;
    if (known) carved[dev] = true;
  }
  return cudaSuccess;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}
// 16 bytes to a 32-bit shared-memory address (kernels that keep their addresses in 32 bits).
__device__ __forceinline__ void cp_async16_u32(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem));
}
// 16 bytes, or zeros where !valid (the source is not read then).
__device__ __forceinline__ void cp_async16_or_zero(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(valid ? 16 : 0));
}
constexpr float k_log2e = 1.4426950408889634f;  // exp(x) = 2^(x log2 e): the softmax's exponent
// 2^x by the special function unit (flush-to-zero): the attention kernels' softmax.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_u32(p)));
}

// D = A * B + D, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

}  // namespace nosa::attention::cuda
