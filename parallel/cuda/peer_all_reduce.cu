#include <cuda_bf16.h>

#include <algorithm>

#include "parallel/cuda/peer_all_reduce.cuh"

namespace nosa::parallel::cuda {

namespace {

constexpr int k_threads = 512;

__device__ __forceinline__ void store_release(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// 16 bytes as float32 sums: 8 bf16 or 4 float.
template <typename T>
struct Vec;

template <>
struct Vec<__nv_bfloat16> {
  static constexpr int n = 8;
  __device__ static void add(float* acc, uint4 v) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static uint4 pack(const float* acc) {
    uint4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return v;
  }
};

template <>
struct Vec<float> {
  static constexpr int n = 4;
  __device__ static void add(float* acc, uint4 v) {
    acc[0] += __uint_as_float(v.x);
    acc[1] += __uint_as_float(v.y);
    acc[2] += __uint_as_float(v.z);
    acc[3] += __uint_as_float(v.w);
  }
  __device__ static uint4 pack(const float* acc) {
    return make_uint4(__float_as_uint(acc[0]), __float_as_uint(acc[1]), __float_as_uint(acc[2]),
                      __float_as_uint(acc[3]));
  }
};

// Thread block b owns the same range of 16-byte vectors on every rank: it stages that range,
// meets block b of every peer at the barrier, then sums the range from every rank's staging.
template <typename T>
__global__ void __launch_bounds__(k_threads) one_shot_kernel(PeerBuffers p, uint4* data,
                                                             int64_t n_vec) {
  // The previous call's last block advanced the counter before this kernel began (stream order),
  // and no block of this call writes it until every block has read it (see the end).
  __shared__ uint32_t call_shared;
  if (threadIdx.x == 0) call_shared = p.call_counter[0] + 1;
  __syncthreads();
  const uint32_t call = call_shared;
  const int64_t per = (n_vec + gridDim.x - 1) / gridDim.x;
  const int64_t begin = min(int64_t(blockIdx.x) * per, n_vec), end = min(begin + per, n_vec);
  const int64_t half = (call & 1) ? p.half_bytes : 0;
  uint4* mine = reinterpret_cast<uint4*>(p.staging[p.rank] + half);
  for (int64_t i = begin + threadIdx.x; i < end; i += k_threads) mine[i] = data[i];
  __syncthreads();
  if (threadIdx.x < p.size) {
    const int peer = threadIdx.x;
    // Release orders this block's staging writes (seen through the barrier) before the flag.
    store_release(p.flags[peer] + blockIdx.x * k_max_peer_ranks + p.rank, call);
    const uint32_t* flag = p.flags[p.rank] + blockIdx.x * k_max_peer_ranks + peer;
    const uint64_t start = global_ns();
    while (load_acquire(flag) != call) {
      if (global_ns() - start > p.timeout_ns) {
        __trap();
      }
    }
  }
  __syncthreads();
  constexpr int V = Vec<T>::n;
  for (int64_t i = begin + threadIdx.x; i < end; i += k_threads) {
    float acc[V] = {};
    for (int r = 0; r < p.size; ++r) {
      const uint4* src = reinterpret_cast<const uint4*>(p.staging[r] + half);
      Vec<T>::add(acc, __ldcg(src + i));
    }
    data[i] = Vec<T>::pack(acc);
  }
  // Every block read the counter before it counts itself done: the last one to finish advances it.
  if (threadIdx.x == 0) {
    const uint32_t done = atomicAdd(p.call_counter + 1, 1u);
    if (done == gridDim.x - 1) {
      p.call_counter[1] = 0;
      p.call_counter[0] = call;
    }
  }
}

}  // namespace

cudaError_t launch_peer_all_reduce(const PeerBuffers& buffers, void* data, int64_t n,
                                   ReduceDType dtype, cudaStream_t stream) {
  const int64_t elem = dtype == ReduceDType::bf16 ? 2 : 4;
  const int64_t bytes = n * elem;
  if (bytes % 16 != 0 || bytes > buffers.half_bytes || buffers.size > k_max_peer_ranks ||
      !buffers.call_counter)
    return cudaErrorInvalidValue;
  const int64_t n_vec = bytes / 16;
  if (n_vec == 0) return cudaSuccess;
  const int blocks = int(std::min<int64_t>(k_max_reduce_blocks, (n_vec + k_threads - 1) / k_threads));
  uint4* v = static_cast<uint4*>(data);
  if (dtype == ReduceDType::bf16)
    one_shot_kernel<__nv_bfloat16><<<blocks, k_threads, 0, stream>>>(buffers, v, n_vec);
  else
    one_shot_kernel<float><<<blocks, k_threads, 0, stream>>>(buffers, v, n_vec);
  return cudaGetLastError();
}

}  // namespace nosa::parallel::cuda
