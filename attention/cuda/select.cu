#include <cfloat>

#include "attention/cuda/device_common.cuh"
#include "attention/cuda/select.cuh"

namespace nosa::attention::cuda {

namespace {

constexpr int k_threads = 512;
constexpr int k_warps = k_threads / 32;
constexpr size_t k_scratch_budget_floats = size_t(64) << 20;  // 256 MiB
constexpr size_t k_lg_smem_limit = 200 * 1024;  // logits in shared memory up to this size

struct Shared {
  float* q;      // [group][d]
  float* s;      // [n_max]
  float* sb;     // [nb_max]
  float* eb;     // [nb_max]
  int* flag;     // [nb_max]
  float* hmax;   // [group]
  double* hsum;  // [group]
  int* warp_count;  // [k_warps]
  float* lg;        // [group][n_max] logits, when they fit
  float* pmax;      // [group + k_warps] per (head, part) maxima
  double* psum;     // [group + k_warps] per (head, part) sums
};

// flag[b] = rank of v[b] < k, rank by (value descending, index ascending).
__device__ void rank_select(const float* v, int nb, int k, int* flag) {
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    const float x = v[b];
    int cnt = 0;
    for (int b2 = 0; b2 < nb; ++b2) {
      const float y = v[b2];
      cnt += (y > x) || (y == x && b2 < b);
      if ((b2 & 31) == 31 && cnt >= k) break;
    }
    flag[b] = cnt < k;
  }
}

// Logits go to shared memory when lg_smem (else to the global scratch).
template <int D>
__global__ void __launch_bounds__(k_threads, 1) select_kernel(SelectArgs a, int token_begin,
                                                           bool lg_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int t = token_begin + blockIdx.x;
  const int h = blockIdx.y;
  const KvView& kv = a.kv;
  const int H = kv.n_kv_heads, m = kv.keys_per_block, G = a.group;
  constexpr int d = D;
  const SparseView& p = a.p;
  const int pos = a.step.positions[t];
  const int qb = pos / p.block_size, nb = qb + 1;
  int32_t* out = a.out + (int64_t(t) * H + h) * a.k_max;

  const bool all = a.mode == SelectMode::dense || pos + 1 < p.dense_len || nb <= p.topk;
  if (all) {
    for (int i = threadIdx.x; i < a.k_max; i += blockDim.x) out[i] = i < nb ? i : -1;
    return;
  }

  Shared sh;
  {
    unsigned char* ptr = smem_raw;
    auto take = [&](size_t bytes) {
      unsigned char* r = ptr;
      ptr += (bytes + 15) / 16 * 16;
      return r;
    };
    sh.hsum = reinterpret_cast<double*>(take(sizeof(double) * G));
    sh.q = reinterpret_cast<float*>(take(sizeof(float) * G * d));
    sh.s = reinterpret_cast<float*>(take(sizeof(float) * a.n_max));
    sh.sb = reinterpret_cast<float*>(take(sizeof(float) * a.nb_max));
    sh.eb = reinterpret_cast<float*>(take(sizeof(float) * a.nb_max));
    sh.flag = reinterpret_cast<int*>(take(sizeof(int) * a.nb_max));
    sh.hmax = reinterpret_cast<float*>(take(sizeof(float) * G));
    sh.warp_count = reinterpret_cast<int*>(take(sizeof(int) * k_warps));
    sh.psum = reinterpret_cast<double*>(take(sizeof(double) * (G + k_warps)));
    sh.pmax = reinterpret_cast<float*>(take(sizeof(float) * (G + k_warps)));
    sh.lg = lg_smem ? reinterpret_cast<float*>(take(sizeof(float) * G * a.n_max)) : nullptr;
  }

  const int n = compressed_count(pos, p.kernel_size, p.kernel_stride);
  const int seq = a.step.token_seq[t];
  const int32_t* table = a.step.block_table + int64_t(seq) * a.step.bt_stride;
  const bf16* q = static_cast<const bf16*>(a.q) + (int64_t(t) * H * G + int64_t(h) * G) * d;
  for (int i = threadIdx.x; i < G * d; i += blockDim.x) sh.q[i] = __bfloat162float(q[i]);
  __syncthreads();

  // 1. Logits of every (head, compressed key), in the reference's summation order.
  float* lg = lg_smem ? sh.lg : a.scratch + (int64_t(blockIdx.x) * H + h) * G * int64_t(a.n_max);
  const bf16* ck = static_cast<const bf16*>(kv.ck);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t home = kv_chunk(kv, table[j / m], a.layer, h);
    const bf16* row = ck + (home * m + j % m) * d;
    // The whole row in registers first: its loads are all in flight at once.
    uint4 raws[d / 8];
#pragma unroll
    for (int x = 0; x < d / 8; ++x) raws[x] = reinterpret_cast<const uint4*>(row)[x];
    for (int h0 = 0; h0 < G; h0 += 8) {
      float acc[8];
#pragma unroll
      for (int hh = 0; hh < 8; ++hh) acc[hh] = 0.0f;
#pragma unroll
      for (int x0 = 0; x0 < d; x0 += 8) {
        const bf16* e = reinterpret_cast<const bf16*>(&raws[x0 / 8]);
        float c[8];
#pragma unroll
        for (int xx = 0; xx < 8; ++xx) c[xx] = __bfloat162float(e[xx]);
#pragma unroll
        for (int hh = 0; hh < 8; ++hh) {
          if (h0 + hh < G) {
            const float* qh = sh.q + (h0 + hh) * d + x0;
#pragma unroll
            for (int xx = 0; xx < 8; ++xx) acc[hh] = __fadd_rn(acc[hh], __fmul_rn(qh[xx], c[xx]));
          }
        }
      }
#pragma unroll
      for (int hh = 0; hh < 8; ++hh)
        if (h0 + hh < G) lg[int64_t(h0 + hh) * a.n_max + j] = __fmul_rn(acc[hh], a.scale);
    }
  }
  __syncthreads();

  // 2. Softmax statistics per head; each head's keys are shared by k_warps / G warps ("parts"),
  //    whose maxima (exact) and double sums are then combined.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int parts = G < k_warps ? k_warps / G : 1;
  for (int task = warp; task < G * parts; task += k_warps) {
    const int hh = task % G, part = task / G;
    const float* l = lg + int64_t(hh) * a.n_max;
    float mx = -INFINITY;
    for (int j = part * 32 + lane; j < n; j += parts * 32) mx = fmaxf(mx, l[j]);
    mx = warp_max(mx);
    if (lane == 0) sh.pmax[task] = mx;
  }
  __syncthreads();
  if (threadIdx.x < G) {
    float mx = -INFINITY;
    for (int part = 0; part < parts; ++part) mx = fmaxf(mx, sh.pmax[part * G + threadIdx.x]);
    sh.hmax[threadIdx.x] = mx;
  }
  __syncthreads();
  for (int task = warp; task < G * parts; task += k_warps) {
    const int hh = task % G, part = task / G;
    const float* l = lg + int64_t(hh) * a.n_max;
    const float mx = sh.hmax[hh];
    double sum = 0.0;
    for (int j = part * 32 + lane; j < n; j += parts * 32) sum += exp(double(__fsub_rn(l[j], mx)));
    sum = warp_sum_d(sum);
    if (lane == 0) sh.psum[task] = sum;
  }
  __syncthreads();
  if (threadIdx.x < G) {
    double sum = 0.0;
    for (int part = 0; part < parts; ++part) sum += sh.psum[part * G + threadIdx.x];
    sh.hsum[threadIdx.x] = sum;
  }
  __syncthreads();

  // 3. S[j] = sum over the group's heads of the softmax probabilities, in head order. Each
  //    thread owns its keys j across the head loop, so no barrier is needed inside it.
  for (int j = threadIdx.x; j < n; j += blockDim.x) sh.s[j] = 0.0f;
  for (int hh = 0; hh < G; ++hh) {
    const float mx = sh.hmax[hh];
    const double sum = sh.hsum[hh];
    const float* l = lg + int64_t(hh) * a.n_max;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
      sh.s[j] = __fadd_rn(sh.s[j], __double2float_rn(exp(double(__fsub_rn(l[j], mx))) / sum));
  }
  __syncthreads();

  // 4. Pooling with forced blocks (and the eviction scores' pooling for NOSA).
  const bool nosa = a.mode == SelectMode::nosa;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    float vs = -INFINITY, ve = -INFINITY;
    if (b < p.init_blocks || b >= qb - p.local_blocks) {
      vs = ve = INFINITY;
    } else {
      const int jb = max(0, m * b - 1), je = min(m * b + m - 1, n - 1);
      for (int j = jb; j <= je; ++j) {
        vs = vs < sh.s[j] ? sh.s[j] : vs;
        if (nosa) {
          const int64_t home = kv_chunk(kv, table[j / m], a.layer, h);
          const float e = kv.ck_scores[home * m + j % m];
          ve = ve < e ? e : ve;
        }
      }
    }
    sh.sb[b] = vs;
    sh.eb[b] = ve;
  }
  __syncthreads();

  // 5. Top-k: one stage (InfLLM-V2) or two (NOSA).
  int k;
  if (!nosa) {
    k = min(p.topk, nb);
    rank_select(sh.sb, nb, k, sh.flag);
  } else {
    rank_select(sh.sb, nb, min(p.q_select, nb), sh.flag);
    __syncthreads();
    for (int b = threadIdx.x; b < nb; b += blockDim.x)
      if (sh.flag[b]) sh.eb[b] = INFINITY;
    __syncthreads();
    k = min(p.topk, nb);
    rank_select(sh.eb, nb, k, sh.flag);
  }
  __syncthreads();

  // 6. Compaction in ascending block order.
  int base = 0;
  for (int c0 = 0; c0 < nb; c0 += blockDim.x) {
    const int b = c0 + threadIdx.x;
    const bool f = b < nb && sh.flag[b];
    const unsigned ballot = __ballot_sync(0xffffffffu, f);
    if (lane == 0) sh.warp_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = base, total = 0;
    for (int w = 0; w < k_warps; ++w) {
      const int c = sh.warp_count[w];
      if (w < warp) offset += c;
      total += c;
    }
    if (f) out[offset + __popc(ballot & ((1u << lane) - 1u))] = b;
    base += total;
    __syncthreads();
  }
  for (int i = k + threadIdx.x; i < a.k_max; i += blockDim.x) out[i] = -1;
}

size_t shared_bytes(int group, int d, int n_max, int nb_max, bool lg_smem) {
  auto r = [](size_t b) { return (b + 15) / 16 * 16; };
  return r(sizeof(double) * group) + r(sizeof(float) * group * d) + r(sizeof(float) * n_max) +
         2 * r(sizeof(float) * nb_max) + r(sizeof(int) * nb_max) + r(sizeof(float) * group) +
         r(sizeof(int) * k_warps) + r(sizeof(double) * (group + k_warps)) +
         r(sizeof(float) * (group + k_warps)) + (lg_smem ? r(sizeof(float) * group * n_max) : 0);
}

template <int D>
cudaError_t launch(const SelectArgs& a, cudaStream_t stream) {
  const int T = a.step.n_tokens;
  const bool lg_smem = shared_bytes(a.group, D, a.n_max, a.nb_max, true) <= k_lg_smem_limit;
  const size_t smem = shared_bytes(a.group, D, a.n_max, a.nb_max, lg_smem);
  if (smem > 227 * 1024) return cudaErrorInvalidValue;
  static size_t configured = 48 * 1024;
  if (smem > configured) {
    cudaError_t e = cudaFuncSetAttribute(select_kernel<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    configured = smem;
  }
  const size_t per_token = size_t(a.kv.n_kv_heads) * a.group * size_t(a.n_max > 0 ? a.n_max : 1);
  // With the logits in shared memory the scratch is unused: one launch for every token.
  int chunk = lg_smem ? T : int(a.scratch_floats / per_token);
  if (chunk < 1) return cudaErrorInvalidValue;
  for (int t0 = 0; t0 < T; t0 += chunk) {
    const int count = T - t0 < chunk ? T - t0 : chunk;
    dim3 grid(count, a.kv.n_kv_heads);
    select_kernel<D><<<grid, k_threads, smem, stream>>>(a, t0, lg_smem);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

size_t select_scratch_floats(int n_kv_heads, int group, int head_dim, int n_max, int nb_max,
                             int n_tokens) {
  if (shared_bytes(group, head_dim, n_max, nb_max, true) <= k_lg_smem_limit) return 0;
  const size_t per_token = size_t(n_kv_heads) * group * size_t(n_max > 0 ? n_max : 1);
  size_t tokens = k_scratch_budget_floats / per_token;
  if (tokens < 1) tokens = 1;
  if (tokens > size_t(n_tokens)) tokens = size_t(n_tokens);
  return tokens * per_token;
}

cudaError_t launch_block_select(const SelectArgs& a, cudaStream_t stream) {
  if (a.step.n_tokens == 0) return cudaSuccess;
  switch (a.kv.head_dim) {
    case 64: return launch<64>(a, stream);
    case 128: return launch<128>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace nosa::attention::cuda
