#include <cuda_bf16.h>

#include <cfloat>

#include "runtime/cuda/sampling.cuh"

namespace nosa::runtime::cuda {

namespace {

constexpr int k_threads = 1024;
constexpr int k_warps = k_threads / 32;

struct Row {
  const void* data;
  bool f32;
  __device__ float operator[](int i) const {
    return f32 ? static_cast<const float*>(data)[i]
               : __bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]);
  }
};

// Orders (logit descending, id ascending) as one unsigned key, larger = earlier.
__device__ __forceinline__ uint64_t make_key(float f, int i) {
  if (f == 0.0f) f = 0.0f;  // -0 ties +0, as float comparison says
  uint32_t b = __float_as_uint(f);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (uint64_t(b) << 32) | uint64_t(0xffffffffu - uint32_t(i));
}
__device__ __forceinline__ int key_id(uint64_t k) {
  return int(0xffffffffu - uint32_t(k & 0xffffffffu));
}

struct Shared {
  double hist[256];
  double red_d[k_warps];
  float red_f[k_warps];
  unsigned long long red_k[k_warps];
  int red_i[k_warps];
  unsigned long long prefix;
  double above;
  unsigned long long top_keys[32];
  int n_found;
  int nonempty[256];
};

__device__ double block_sum(double v, Shared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) sh.red_d[warp] = v;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < k_warps; ++w) s += sh.red_d[w];
  return s;
}

__device__ float block_max(float v, Shared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) sh.red_f[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < k_warps; ++w) m = fmaxf(m, sh.red_f[w]);
  return m;
}

__device__ uint64_t block_max_key(uint64_t v, Shared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  __syncthreads();
  if (lane == 0) sh.red_k[warp] = v;
  __syncthreads();
  uint64_t m = 0;
  for (int w = 0; w < k_warps; ++w) m = sh.red_k[w] > m ? sh.red_k[w] : m;
  return m;
}

__device__ int block_or(int v, Shared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = __any_sync(0xffffffffu, v);
  __syncthreads();
  if (lane == 0) sh.red_i[warp] = v;
  __syncthreads();
  int r = 0;
  for (int w = 0; w < k_warps; ++w) r |= sh.red_i[w];
  return r;
}

// Adds w to hist[digit] for the lanes with digit >= 0, combining lanes that share a digit.
__device__ __forceinline__ void hist_add(double* hist, int digit, double w) {
  const unsigned active = __ballot_sync(0xffffffffu, digit >= 0);
  if (!active) return;
  const unsigned peers = __match_any_sync(0xffffffffu, digit);
  const int lane = threadIdx.x % 32;
  const bool leader = digit >= 0 && (__ffs(peers) - 1) == lane;
  const int groups = __popc(__ballot_sync(0xffffffffu, leader));
  if (groups > 4) {
    if (digit >= 0) atomicAdd(&hist[digit], w);
    return;
  }
  unsigned todo = __ballot_sync(0xffffffffu, leader);
  while (todo) {
    const int src = __ffs(todo) - 1;
    todo &= todo - 1;
    const int d = __shfl_sync(0xffffffffu, digit, src);
    double v = digit == d ? w : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == src) atomicAdd(&hist[d], v);
  }
}

// Among the candidates (key >= low), the first key in order whose inclusive cumulative weight
// reaches the target (> when strict, >= otherwise); the last candidate when none does.
// *incl receives that cumulative weight.
template <class Weight>
__device__ uint64_t radix_find(const Row& row, int vocab, uint64_t low, Weight weight,
                               double target, bool strict, Shared& sh, double* incl) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.above = 0.0;
  }
  for (int pass = 0; pass < 8; ++pass) {
    const int shift = 56 - 8 * pass;
    const uint64_t hi_mask = pass == 0 ? 0 : (~uint64_t(0) << (shift + 8));
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      sh.hist[b] = 0.0;
      sh.nonempty[b] = 0;
    }
    __syncthreads();
    const uint64_t prefix = sh.prefix;
    for (int i0 = 0; i0 < vocab; i0 += blockDim.x) {
      const int i = i0 + threadIdx.x;
      int digit = -1;
      double w = 0.0;
      if (i < vocab) {
        const float l = row[i];
        const uint64_t k = make_key(l, i);
        if (k >= low && (k & hi_mask) == prefix) {
          digit = int((k >> shift) & 255);
          w = weight(l);
          sh.nonempty[digit] = 1;
        }
      }
      hist_add(sh.hist, digit, w);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double cum = sh.above;
      int chosen = -1, lowest = -1;
      double lowest_cum = cum;
      for (int b = 255; b >= 0; --b) {
        if (!sh.nonempty[b]) continue;
        lowest = b;
        lowest_cum = cum;
        const double next = cum + sh.hist[b];
        if (strict ? next > target : next >= target) {
          chosen = b;
          break;
        }
        cum = next;
      }
      if (chosen < 0) {
        chosen = lowest < 0 ? 0 : lowest;
        cum = lowest_cum;
      }
      sh.above = cum;
      sh.prefix = prefix | (uint64_t(chosen) << shift);
    }
    __syncthreads();
  }
  const uint64_t key = sh.prefix;
  *incl = sh.above + weight(row[key_id(key)]);
  __syncthreads();
  return key;
}

__global__ void __launch_bounds__(k_threads) sample_kernel(SampleArgs a) {
  __shared__ Shared sh;
  const int r = blockIdx.x;
  const int V = a.vocab;
  const SampleRowParams prm = a.params[r];
  const size_t elem = a.logits_f32 ? 4 : 2;
  const Row row{static_cast<const char*>(a.logits) + size_t(r) * V * elem, a.logits_f32};
  SampleRowResult* out = a.out + r;

  float mx = -INFINITY;
  uint64_t best = 0;
  int nan = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float l = row[i];
    if (isnan(l)) {
      nan = 1;
      continue;
    }
    mx = fmaxf(mx, l);
    const uint64_t k = make_key(l, i);
    best = k > best ? k : best;
  }
  mx = block_max(mx, sh);
  best = block_max_key(best, sh);
  nan = block_or(nan, sh);
  if (nan) {
    if (threadIdx.x == 0) {
      out->nan = 1;
      out->token = 0;
      out->logprob = 0.0f;
      out->n_top = 0;
    }
    return;
  }
  double z = 0.0;
  for (int i = threadIdx.x; i < V; i += blockDim.x) z += double(expf(__fsub_rn(row[i], mx)));
  z = block_sum(z, sh);
  const double log_z = double(mx) + log(z);

  int token = key_id(best);
  auto count = [](float) { return 1.0; };
  if (prm.temperature > 0.0f) {
    const double inv_t = 1.0 / double(prm.temperature);
    const double dmx = double(mx);
    auto mass = [=](float l) { return exp((double(l) - dmx) * inv_t); };
    uint64_t low = 0;
    double incl = 0.0;
    if (prm.top_k > 0 && prm.top_k < V)
      low = radix_find(row, V, 0, count, double(prm.top_k), false, sh, &incl);
    double total = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float l = row[i];
      if (make_key(l, i) >= low) total += mass(l);
    }
    total = block_sum(total, sh);
    if (prm.top_p < 1.0f) {
      low = radix_find(row, V, low, mass, double(prm.top_p) * total, false, sh, &incl);
      total = incl;
    }
    const uint64_t k = radix_find(row, V, low, mass, prm.u * total, true, sh, &incl);
    token = key_id(k);
  }
  if (threadIdx.x == 0) {
    out->nan = 0;
    out->token = token;
    out->logprob = float(double(row[token]) - log_z);
    out->n_top = 0;
  }
  const int n_top = prm.n_top < V ? prm.n_top : V;
  if (n_top > 0) {
    double incl = 0.0;
    const uint64_t kn = radix_find(row, V, 0, count, double(n_top), false, sh, &incl);
    if (threadIdx.x == 0) sh.n_found = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const uint64_t k = make_key(row[i], i);
      if (k >= kn) {
        const int slot = atomicAdd(&sh.n_found, 1);
        if (slot < 32) sh.top_keys[slot] = k;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int n = sh.n_found < n_top ? sh.n_found : n_top;
      for (int i = 1; i < n; ++i)
        for (int j = i; j > 0 && sh.top_keys[j] > sh.top_keys[j - 1]; --j) {
          const unsigned long long t = sh.top_keys[j];
          sh.top_keys[j] = sh.top_keys[j - 1];
          sh.top_keys[j - 1] = t;
        }
      for (int i = 0; i < n; ++i) {
        const int id = key_id(sh.top_keys[i]);
        out->top_ids[i] = id;
        out->top_logprobs[i] = float(double(row[id]) - log_z);
      }
      out->n_top = n;
    }
  }
}

}  // namespace

cudaError_t launch_sample(const SampleArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  sample_kernel<<<a.rows, k_threads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace nosa::runtime::cuda
