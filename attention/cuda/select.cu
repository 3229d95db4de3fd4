#include <algorithm>
#include <cfloat>

#include "attention/cuda/dependent_launch.cuh"
#include "attention/cuda/device_common.cuh"
#include "attention/cuda/exp_core.cuh"
#include "attention/cuda/screen_bounds.h"
#include "attention/cuda/select.cuh"

namespace nosa::attention::cuda {

namespace {

constexpr int k_threads = 512;
constexpr int k_warps = k_threads / 32;
constexpr size_t k_scratch_budget_floats = size_t(64) << 20;  // 256 MiB
// The per-token kernel keeps the logits in shared memory up to this size: 200 KB on Hopper, 27 KB
// under the device's limit elsewhere.
size_t lg_smem_limit() {
  const size_t limit = max_shared_bytes();
  return limit > 27 * 1024 ? std::min<size_t>(200 * 1024, limit - 27 * 1024) : 0;
}

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

// Writes the indices b < nb with flag[b] set to out, in ascending order, and returns how many:
// one block-wide pass per blockDim.x indices (warp ballots, then the warps' counts in
// warp_count[blockDim.x / 32]). Every thread of the block must call it.
__device__ int compact_flags(const int* flag, int nb, int32_t* out, int* warp_count) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  int base = 0;
  for (int c0 = 0; c0 < nb; c0 += blockDim.x) {
    const int b = c0 + threadIdx.x;
    const bool f = b < nb && flag[b];
    const unsigned ballot = __ballot_sync(0xffffffffu, f);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = base, total = 0;
    for (int w = 0; w < n_warps; ++w) {
      const int c = warp_count[w];
      if (w < warp) offset += c;
      total += c;
    }
    if (f) out[offset + __popc(ballot & ((1u << lane) - 1u))] = b;
    base += total;
    __syncthreads();
  }
  return base;
}

// A token that takes every block of its context (all, in nosa.md's terms): blocks 0..nb-1 in
// order, -1 padded to k_max; the calling threads write entries first, first + step, ...
__device__ __forceinline__ void select_every_block(int32_t* out, int nb, int k_max, int first,
                                                   int step) {
  for (int i = first; i < k_max; i += step) out[i] = i < nb ? i : -1;
}

// Pooling (nosa.md): a block that is not forced scores the largest S over its keys and the key
// before them (keys m b - 1 .. m b + m - 1 of the n), and with NOSA the largest window score over
// the same keys; forced blocks (the first init_blocks, the last local_blocks up to the query's
// block qb) score +inf. score(j) and window(j) read key j's values. Every selection path pools
// here, so all of them compare in the same order.
template <class Score, class Window>
__device__ __forceinline__ void pool_block(const SparseView& p, int b, int m, int n, int qb,
                                           bool nosa, Score score, Window window, float& vs,
                                           float& ve) {
  if (b < p.init_blocks || b >= qb - p.local_blocks) {
    vs = ve = INFINITY;
    return;
  }
  vs = ve = -INFINITY;
  const int jb = max(0, m * b - 1), je = min(m * b + m - 1, n - 1);
  for (int j = jb; j <= je; ++j) {
    const float v = score(j);
    vs = vs < v ? v : vs;
    if (nosa) {
      const float e = window(j);
      ve = ve < e ? e : ve;
    }
  }
}

struct TokenSel {
  int pos, qb, nb, n;
  bool all;
};

__device__ __forceinline__ TokenSel token_sel(const SelectArgs& a, int t) {
  TokenSel s;
  const SparseView& p = a.p;
  s.pos = a.step.positions[t];
  s.qb = s.pos / p.block_size;
  s.nb = s.qb + 1;
  s.n = compressed_count(s.pos, p.kernel_size, p.kernel_stride);
  s.all = a.mode == SelectMode::dense || s.pos + 1 < p.dense_len || s.nb <= p.topk;
  return s;
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
  const TokenSel ts = token_sel(a, t);
  const int qb = ts.qb, nb = ts.nb;
  int32_t* out = a.out + (int64_t(t) * H + h) * a.k_max;
  if (ts.all) {
    select_every_block(out, nb, a.k_max, threadIdx.x, blockDim.x);
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

  const int n = ts.n;
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
    float vs, ve;
    pool_block(
        p, b, m, n, qb, nosa, [&](int j) { return sh.s[j]; },
        [&](int j) { return kv.ck_scores[kv_chunk(kv, table[j / m], a.layer, h) * m + j % m]; },
        vs, ve);
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
  compact_flags(sh.flag, nb, out, sh.warp_count);
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
  const bool lg_smem = shared_bytes(a.group, D, a.n_max, a.nb_max, true) <= lg_smem_limit();
  const size_t smem = shared_bytes(a.group, D, a.n_max, a.nb_max, lg_smem);
  if (smem > max_shared_bytes()) return cudaErrorInvalidValue;
  if (const cudaError_t e = allow_shared<select_kernel<D>>(smem); e != cudaSuccess) return e;
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


// ---- The split path (decode): four kernels over (key chunk | block chunk, KV head, token) -------
//
// 1. split_logits: 64 compressed keys of one (token, KV head) per thread block of 64 threads, the
//    block's block-table lookups first, then the rows staged in shared memory; each thread a
//    tile of 4 keys x up to 4 heads per pass; logits to the scratch, and each head's maximum
//    over the chunk.
// 2. split_sums: each head's maximum over the chunks (exact), and per chunk each head's double sum
//    of exp(double(logit - max)).
// 3. split_pool: each head's sum over the chunks (in chunk order, so every block of a (token, head)
//    gets the same value), the probabilities, S[j] summed over the heads in head order, and the
//    pooling of up to 128 / keys_per_block blocks (scores and eviction scores).
// 4. split_topk: one thread block of 512 threads per (token, KV head): the one or two top-k
//    stages by radix selection over order-preserving integer keys, ties toward the lower block,
//    and the compaction.
// split_finish does 2-4 in one thread block per (token, KV head), the same arithmetic in the same
// order, where that fills the GPU or a pair's logits are few (see k_finish_min_pairs).
//
// The dot products accumulate with fused multiply-add: q and the compressed keys are bf16, so
// every product q[x] * ck[x] (8 + 8 significant bits) is exact in float32 and fma(q, c, acc) is
// the reference's acc + q * c, rounded once (except for products below 2^-126 in magnitude,
// which bf16 attention inputs do not reach).

constexpr int k_split_keys = 64;      // keys per block of kernels 1 and 2
constexpr int k_sums_threads = 256;   // kernel 2: 4 slices of heads x 64 keys
constexpr int k_pool_threads = 256;
constexpr int k_pool_keys = 128;      // keys pooled per block of kernel 3 (about)
constexpr int k_topk_threads = 512;
constexpr int k_max_warps = 32;  // of any thread block: the top-k's per-warp counters
constexpr int k_count_topk_max = 512;  // radix_topk counts ranks up to this many blocks
// split_finish is a chain of dependent double-precision steps in one thread block per (token, KV
// head): 32 warps hide more of its latency than 16 (8b-like, B = 64, 32K: 12.0 -> 11.8 ms a
// step). Spreading a pair over a cluster of eight thread blocks (distributed shared memory) was
// slower (16K: 10.1 -> 11.1 ms: the cluster barriers waited on the slowest block), and four
// independent exponentials per thread at a time gained nothing measurable.
constexpr int k_finish_threads = 1024;
constexpr int k_split_max_tokens = 1024;
constexpr size_t k_split_budget_floats = size_t(64) << 20;  // 256 MiB

struct SplitLayout {
  int chunks = 1;      // key chunks at n_max
  int pool_blocks = 1; // pooled blocks per block of kernel 3
  int pool_chunks = 1; // blocks of kernel 3 at nb_max
  size_t lg = 0, cmax = 0, csum = 0, sb = 0, eb = 0, total = 0;  // offsets in floats
};

SplitLayout split_layout(int T, int H, int G, int m, int n_max, int nb_max) {
  auto up4 = [](size_t x) { return (x + 3) / 4 * 4; };
  SplitLayout L;
  const int n = n_max > 0 ? n_max : 1;
  L.chunks = (n + k_split_keys - 1) / k_split_keys;
  L.pool_blocks = m < k_pool_keys ? k_pool_keys / m : 1;
  L.pool_chunks = (nb_max + L.pool_blocks - 1) / L.pool_blocks;
  const size_t th = size_t(T) * H;
  L.lg = 0;
  L.cmax = up4(L.lg + th * G * size_t(n_max));
  L.csum = up4(L.cmax + th * G * size_t(L.chunks));
  L.sb = up4(L.csum + 2 * th * G * size_t(L.chunks));
  L.eb = up4(L.sb + th * size_t(nb_max));
  L.total = up4(L.eb + th * size_t(nb_max));
  return L;
}

// Kernel 1's shared memory: the query [G][d + 4] (floats; the padding puts the two heads a warp
// reads at once in different banks), the chunks of the block's compressed keys [65] (int64),
// then the block's 64 compressed-key rows [64][d / 8] (uint4, segment x of row r at x ^ (r & 7),
// so that eight threads reading eight rows hit different banks).
__host__ __device__ inline size_t logits_homes_offset(int G, int d) {
  return (size_t(G) * (d + 4) + 3) / 4 * 4;
}
__host__ __device__ inline size_t logits_rows_offset(int G, int d) {
  return logits_homes_offset(G, d) + ((size_t(k_split_keys) + 1) * 2 + 3) / 4 * 4;
}
size_t logits_smem(int G, int d) {
  return sizeof(float) * logits_rows_offset(G, d) + 16 * size_t(k_split_keys) * (d / 8);
}
size_t sums_smem(int G) { return sizeof(double) * 2 * G + sizeof(float) * G; }
__host__ __device__ inline size_t pool_keys(const SplitLayout& L, int m) {
  return size_t(L.pool_blocks) * m + 1;
}
size_t pool_smem(const SplitLayout& L, int G, int m) {
  const size_t nk = pool_keys(L, m);
  return sizeof(double) * G + sizeof(float) * (G + size_t(G) * nk + 2 * nk);
}
size_t topk_smem(int nb_max) {
  return sizeof(uint32_t) * 2 * size_t(nb_max) + sizeof(int) * size_t(nb_max) +
         sizeof(int) * (256 + k_max_warps + 4);
}

// The logits of one chunk of 64 keys as a register-tiled product: thread (hg, kg) of the 64
// (kg = thread % 16, hg = thread / 16) computes keys kg + 16 k (k < 4) against up to four of the
// heads hg + 4 i per pass (hs: the heads, nh of them; all four when FULL), so that each staged
// key value serves four heads and each query value four keys (a broadcast query read per FMA
// was the bound before). Every logit still accumulates in x order.
constexpr int k_logit_key_lanes = 16;   // kg
constexpr int k_logit_head_lanes = k_split_keys / k_logit_key_lanes;  // hg: 4
constexpr int k_logit_keys = k_split_keys / k_logit_key_lanes;        // keys per thread: 4
constexpr int k_logit_heads = 4;        // heads per thread and pass

template <int D, bool FULL>
__device__ __forceinline__ void logits_tile(const float* sq, const uint4* rows, int kg,
                                            const int (&hs)[k_logit_heads], int nh,
                                            float (&acc)[k_logit_heads][k_logit_keys]) {
  constexpr int P = D / 8, QS = D + 4;
  const int sw = kg & 7;  // the swizzle of this thread's rows: (kg + 16 k) & 7
#pragma unroll 2
  for (int x0 = 0; x0 < D; x0 += 8) {
    float cv[k_logit_keys][8];
#pragma unroll
    for (int k = 0; k < k_logit_keys; ++k) {
      const uint4 raw = rows[(kg + k_logit_key_lanes * k) * P + ((x0 / 8) ^ sw)];
      const bf16* e = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
      for (int xx = 0; xx < 8; ++xx) cv[k][xx] = __bfloat162float(e[xx]);
    }
#pragma unroll
    for (int hh = 0; hh < k_logit_heads; ++hh) {
      if (FULL || hh < nh) {
        const float4* qh = reinterpret_cast<const float4*>(sq + hs[hh] * QS + x0);
        const float4 qa = qh[0], qb = qh[1];
        const float qv[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
#pragma unroll
        for (int xx = 0; xx < 8; ++xx)
#pragma unroll
          for (int k = 0; k < k_logit_keys; ++k)
            acc[hh][k] = __fmaf_rn(qv[xx], cv[k][xx], acc[hh][k]);
      }
    }
  }
}

// One chunk of 64 keys of one (token, KV head) per thread block: the chunk's block-table lookups,
// then its rows staged in shared memory while the query is converted. (Two or four chunks per
// thread block, each staged while the one before is computed, were 1-5% slower a step on an
// H200 at B = 64: fewer thread blocks fit a multiprocessor, and they hid less latency.)
template <int D>
__global__ void __launch_bounds__(k_split_keys) split_logits(SelectArgs a, SplitLayout L) {
  extern __shared__ __align__(16) float sq[];  // see logits_smem
  dependent_launch_begin();
  const int cg = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
  const TokenSel s = token_sel(a, t);
  const int j0 = cg * k_split_keys;
  if (s.all || j0 >= s.n) return;
  const KvView& kv = a.kv;
  const int H = kv.n_kv_heads, G = a.group, m = kv.keys_per_block;
  const int64_t th = int64_t(t) * H + h;
  constexpr int P = D / 8, QS = D + 4;
  int64_t* homes = reinterpret_cast<int64_t*>(sq + logits_homes_offset(G, D));
  uint4* rows = reinterpret_cast<uint4*>(sq + logits_rows_offset(G, D));
  const int jl = min(j0 + k_split_keys, s.n);  // keys [j0, jl)
  const int lb0 = j0 / m, n_lb = (jl - 1) / m - lb0 + 1;
  {
    const int32_t* table = a.step.block_table + int64_t(a.step.token_seq[t]) * a.step.bt_stride;
    for (int i = threadIdx.x; i < n_lb; i += blockDim.x)
      homes[i] = kv_chunk(kv, table[lb0 + i], a.layer, h);
  }
  __syncthreads();
  {
    const uint4* ck = static_cast<const uint4*>(kv.ck);
#pragma unroll
    for (int it = 0; it < P; ++it) {
      const int idx = it * k_split_keys + threadIdx.x;
      const int r = idx / P, x = idx % P, jr = j0 + r;
      if (jr < jl)
        cp_async16(rows + r * P + (x ^ (r & 7)), ck + (homes[jr / m - lb0] * m + jr % m) * P + x);
    }
    cp_async_commit();
  }
  const uint4* q = reinterpret_cast<const uint4*>(static_cast<const bf16*>(a.q) + th * G * D);
  for (int i = threadIdx.x; i < G * P; i += blockDim.x) {
    const uint4 raw = q[i];
    const bf16* e = reinterpret_cast<const bf16*>(&raw);
    float* dst = sq + (i / P) * QS + (i % P) * 8;
#pragma unroll
    for (int x = 0; x < 8; ++x) dst[x] = __bfloat162float(e[x]);
  }
  cp_async_wait<0>();
  __syncthreads();

  float* lg = a.scratch + L.lg + th * G * int64_t(a.n_max);
  const int kg = threadIdx.x % k_logit_key_lanes, hg = threadIdx.x / k_logit_key_lanes;
  // Heads hg + 4 i: k_logit_heads of them per pass; every thread runs every pass (the maxima are
  // warp shuffles), a thread past the group's heads with nh = 0.
  constexpr int heads_per_pass = k_logit_head_lanes * k_logit_heads;
  for (int p0 = 0; p0 < G; p0 += heads_per_pass) {
    int hs[k_logit_heads];
    int nh = 0;
#pragma unroll
    for (int hh = 0; hh < k_logit_heads; ++hh) {
      hs[hh] = p0 + hg + k_logit_head_lanes * hh;
      if (hs[hh] < G) nh = hh + 1;
    }
    float acc[k_logit_heads][k_logit_keys];
#pragma unroll
    for (int hh = 0; hh < k_logit_heads; ++hh)
#pragma unroll
      for (int k = 0; k < k_logit_keys; ++k) acc[hh][k] = 0.0f;
    if (nh == k_logit_heads)
      logits_tile<D, true>(sq, rows, kg, hs, nh, acc);
    else if (nh > 0)
      logits_tile<D, false>(sq, rows, kg, hs, nh, acc);
#pragma unroll
    for (int hh = 0; hh < k_logit_heads; ++hh) {
      float mx = -INFINITY;
#pragma unroll
      for (int k = 0; k < k_logit_keys; ++k) {
        const int j = j0 + kg + k_logit_key_lanes * k;
        // Rows past n hold garbage: their logits are never stored nor counted.
        if (hh < nh && j < s.n) {
          const float l = __fmul_rn(acc[hh][k], a.scale);
          lg[int64_t(hs[hh]) * a.n_max + j] = l;
          mx = fmaxf(mx, l);
        }
      }
      // The chunk's maximum over the 16 key lanes of this half warp.
#pragma unroll
      for (int o = k_logit_key_lanes / 2; o > 0; o /= 2)
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      if (hh < nh && kg == 0) a.scratch[L.cmax + (th * G + hs[hh]) * L.chunks + cg] = mx;
    }
  }
}

__global__ void __launch_bounds__(k_sums_threads) split_sums(SelectArgs a, SplitLayout L) {
  extern __shared__ __align__(16) double sd[];  // [G][2] warp sums, then [G] maxima (float)
  dependent_launch_begin();
  const int c = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
  const TokenSel s = token_sel(a, t);
  const int j0 = c * k_split_keys;
  if (s.all || j0 >= s.n) return;
  const int H = a.kv.n_kv_heads, G = a.group;
  const int64_t th = int64_t(t) * H + h;
  float* mx = reinterpret_cast<float*>(sd + 2 * G);
  const int chunks = (s.n + k_split_keys - 1) / k_split_keys;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int g = warp; g < G; g += k_sums_threads / 32) {  // exact in any order
    const float* cm = a.scratch + L.cmax + (th * G + g) * L.chunks;
    float v = -INFINITY;
    for (int i = lane; i < chunks; i += 32) v = fmaxf(v, cm[i]);
    v = warp_max(v);
    if (lane == 0) mx[g] = v;
  }
  __syncthreads();
  const float* lg = a.scratch + L.lg + th * G * int64_t(a.n_max);
  const int jj = threadIdx.x % k_split_keys, slice = threadIdx.x / k_split_keys;
  const int half = warp % 2;
  constexpr int slices = k_sums_threads / k_split_keys;
  const int j = j0 + jj;
  const bool valid = j < s.n;
  for (int g = slice; g < G; g += slices) {
    double e = valid ? exp(double(__fsub_rn(lg[int64_t(g) * a.n_max + j], mx[g]))) : 0.0;
    e = warp_sum_d(e);
    if (lane == 0) sd[g * 2 + half] = e;
  }
  __syncthreads();
  if (threadIdx.x < G) {
    double* cs = reinterpret_cast<double*>(a.scratch + L.csum);
    cs[(th * G + threadIdx.x) * L.chunks + c] = sd[threadIdx.x * 2] + sd[threadIdx.x * 2 + 1];
  }
}

__global__ void __launch_bounds__(k_pool_threads) split_pool(SelectArgs a, SplitLayout L) {
  extern __shared__ __align__(16) double sp[];  // [G] sums; [G] maxima, [G][nk] p, [nk] S, E
  dependent_launch_begin();
  const int cb = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
  const TokenSel s = token_sel(a, t);
  const int b0 = cb * L.pool_blocks;
  if (s.all || b0 >= s.nb) return;
  const KvView& kv = a.kv;
  const SparseView& p = a.p;
  const int H = kv.n_kv_heads, G = a.group, m = kv.keys_per_block;
  const int64_t th = int64_t(t) * H + h;
  const int b1 = min(b0 + L.pool_blocks, s.nb);
  const int kb = max(0, m * b0 - 1), ke = min(m * b1 - 1, s.n - 1);
  const int nk = ke - kb + 1;  // may be <= 0
  const int stride_k = int(pool_keys(L, m));
  double* sum = sp;
  float* mx = reinterpret_cast<float*>(sp + G);
  float* pr = mx + G;
  float* S = pr + G * stride_k;
  float* E = S + stride_k;
  const bool nosa = a.mode == SelectMode::nosa;
  const int32_t* table = a.step.block_table + int64_t(a.step.token_seq[t]) * a.step.bt_stride;
  if (nosa)
    for (int k = threadIdx.x; k < nk; k += blockDim.x) {
      const int j = kb + k;
      const int64_t home = kv_chunk(kv, table[j / m], a.layer, h);
      E[k] = kv.ck_scores[home * m + j % m];
    }
  const int chunks = (s.n + k_split_keys - 1) / k_split_keys;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int g = warp; g < G; g += k_pool_threads / 32) {
    const float* cm = a.scratch + L.cmax + (th * G + g) * L.chunks;
    const double* cs =
        reinterpret_cast<const double*>(a.scratch + L.csum) + (th * G + g) * L.chunks;
    float v = -INFINITY;
    double z = 0.0;
    for (int i = lane; i < chunks; i += 32) {
      v = fmaxf(v, cm[i]);
      z += cs[i];
    }
    v = warp_max(v);
    z = warp_sum_d(z);  // lanes, then a fixed butterfly: the same sum in every block
    if (lane == 0) {
      mx[g] = v;
      sum[g] = z;
    }
  }
  __syncthreads();
  const float* lg = a.scratch + L.lg + th * G * int64_t(a.n_max);
  for (int i = threadIdx.x; i < G * nk; i += blockDim.x) {
    const int g = i / nk, k = i % nk;
    const float l = lg[int64_t(g) * a.n_max + kb + k];
    pr[g * stride_k + k] = __double2float_rn(exp(double(__fsub_rn(l, mx[g]))) / sum[g]);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < nk; k += blockDim.x) {
    float v = 0.0f;
    for (int g = 0; g < G; ++g) v = __fadd_rn(v, pr[g * stride_k + k]);
    S[k] = v;
  }
  __syncthreads();
  for (int b = b0 + threadIdx.x; b < b1; b += blockDim.x) {
    float vs, ve;
    pool_block(
        p, b, m, s.n, s.qb, nosa, [&](int j) { return S[j - kb]; },
        [&](int j) { return E[j - kb]; }, vs, ve);
    a.scratch[L.sb + th * a.nb_max + b] = vs;
    a.scratch[L.eb + th * a.nb_max + b] = ve;
  }
}

// Order-preserving key of a float (larger float, larger key; -0 and +0 the same key).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) == 0) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct TopkShared {
  int* hist;        // [256]
  int* warp_count;  // [k_max_warps]
  int* pick;        // [4]: digit, count above it, count in it
};

// The top-k's shared memory from `ks` on: ks, ke [nb_max] order keys (pooled scores, window
// scores), flag [nb_max], then the radix select's counters.
struct TopkLayout {
  uint32_t* ks;
  uint32_t* ke;
  int* flag;
  TopkShared sh;
};

__device__ TopkLayout topk_layout(uint32_t* ks, int nb_max) {
  TopkLayout l;
  l.ks = ks;
  l.ke = ks + nb_max;
  l.flag = reinterpret_cast<int*>(l.ke + nb_max);
  l.sh.hist = l.flag + nb_max;
  l.sh.warp_count = l.sh.hist + 256;
  l.sh.pick = l.sh.warp_count + k_max_warps;
  return l;
}

// flag[b] = rank of u[b] < k, rank by (u descending, index ascending). Up to k_count_topk_max
// keys (32K positions), each key's rank by counting the keys ahead of it (every thread reads the
// same key at once: a shared-memory broadcast), nb^2 comparisons in all; more, the radix-select
// threshold (the k-th largest key, found 8 bits at a time, a dozen barriers), then the
// lowest-indexed ties. (On an H200 the radix select of 256 keys took about 9 us a layer at
// B = 16, nearly all of it barriers and latency.)
__device__ void radix_topk(const uint32_t* u, int nb, int k, int* flag, const TopkShared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (k >= nb || k <= 0) {
    for (int b = threadIdx.x; b < nb; b += blockDim.x) flag[b] = k > 0;
    return;
  }
  if (nb <= k_count_topk_max) {
    for (int b = threadIdx.x; b < nb; b += blockDim.x) {
      const uint32_t ub = u[b];
      int ahead = 0;
#pragma unroll 8
      for (int j = 0; j < nb; ++j) {
        const uint32_t uj = u[j];
        ahead += int(uj > ub) | (int(uj == ub) & int(j < b));
      }
      flag[b] = ahead < k;
    }
    __syncthreads();
    return;
  }
  uint32_t prefix = 0, mask = 0;
  int remaining = k, in_bin = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    for (int c0 = 0; c0 < nb; c0 += blockDim.x) {
      const int b = c0 + threadIdx.x;
      const bool act = b < nb && (u[b] & mask) == prefix;
      const unsigned am = __ballot_sync(0xffffffffu, act);
      if (act) {
        const unsigned digit = (u[b] >> shift) & 255u;
        const unsigned peers = __match_any_sync(am, digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&sh.hist[digit], __popc(peers));
      }
    }
    __syncthreads();
    if (warp == 0) {
      int cnt[8], tot = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        cnt[i] = sh.hist[lane * 8 + i];
        tot += cnt[i];
      }
      int incl = tot;  // sum over lanes >= lane
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_down_sync(0xffffffffu, incl, o);
        if (lane + o < 32) incl += v;
      }
      int above = incl - tot;
#pragma unroll
      for (int i = 7; i >= 0; --i) {
        if (above < remaining && above + cnt[i] >= remaining) {
          sh.pick[0] = lane * 8 + i;
          sh.pick[1] = above;
          sh.pick[2] = cnt[i];
        }
        above += cnt[i];
      }
    }
    __syncthreads();
    prefix |= uint32_t(sh.pick[0]) << shift;
    mask |= 255u << shift;
    remaining -= sh.pick[1];
    in_bin = sh.pick[2];
  }
  // Keys above prefix: k - remaining of them, all taken; keys equal to it: in_bin, of which the
  // `remaining` lowest-indexed are taken.
  if (in_bin == remaining) {
    for (int b = threadIdx.x; b < nb; b += blockDim.x) flag[b] = u[b] >= prefix;
    __syncthreads();
    return;
  }
  int base = 0;
  for (int c0 = 0; c0 < nb; c0 += blockDim.x) {
    const int b = c0 + threadIdx.x;
    const bool eq = b < nb && u[b] == prefix;
    const unsigned ballot = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) sh.warp_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = base, total = 0;
    for (int w = 0; w < int(blockDim.x / 32); ++w) {
      const int c = sh.warp_count[w];
      if (w < warp) offset += c;
      total += c;
    }
    if (b < nb)
      flag[b] = u[b] > prefix || (eq && offset + __popc(ballot & ((1u << lane) - 1u)) < remaining);
    base += total;
    __syncthreads();
  }
}

// The one or two top-k stages over the blocks' order keys ks (scores) and ke (eviction scores,
// NOSA), in shared memory, then the compaction into out: ascending blocks, -1 padded.
__device__ void topk_and_compact(const SelectArgs& a, uint32_t* ks, uint32_t* ke, int nb,
                                 int* flag, const TopkShared& sh, int32_t* out) {
  const SparseView& p = a.p;
  const int k = min(p.topk, nb);
  if (a.mode != SelectMode::nosa) {
    radix_topk(ks, nb, k, flag, sh);
  } else {
    radix_topk(ks, nb, min(p.q_select, nb), flag, sh);
    __syncthreads();
    const uint32_t inf = order_key(INFINITY);
    for (int b = threadIdx.x; b < nb; b += blockDim.x)
      if (flag[b]) ke[b] = inf;
    __syncthreads();
    radix_topk(ke, nb, k, flag, sh);
  }
  __syncthreads();
  compact_flags(flag, nb, out, sh.warp_count);
  for (int i = k + threadIdx.x; i < a.k_max; i += blockDim.x) out[i] = -1;
}

__global__ void __launch_bounds__(k_topk_threads) split_topk(SelectArgs a, SplitLayout L) {
  extern __shared__ __align__(16) uint32_t st[];
  dependent_launch_begin();
  const int h = blockIdx.x, t = blockIdx.y;
  const TokenSel s = token_sel(a, t);
  const int H = a.kv.n_kv_heads;
  const int64_t th = int64_t(t) * H + h;
  int32_t* out = a.out + th * a.k_max;
  const int nb = s.nb;
  if (s.all) {
    select_every_block(out, nb, a.k_max, threadIdx.x, blockDim.x);
    return;
  }
  const TopkLayout tl = topk_layout(st, a.nb_max);
  uint32_t* ks = tl.ks;
  uint32_t* ke = tl.ke;
  int* flag = tl.flag;
  const TopkShared& sh = tl.sh;
  const bool nosa = a.mode == SelectMode::nosa;
  const float* sb = a.scratch + L.sb + th * a.nb_max;
  const float* eb = a.scratch + L.eb + th * a.nb_max;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    ks[b] = order_key(sb[b]);
    if (nosa) ke[b] = order_key(eb[b]);
  }
  __syncthreads();
  topk_and_compact(a, ks, ke, nb, flag, sh, out);
}

// e / sum, correctly rounded, from r = the correctly rounded 1 / sum (Markstein's theorem).
__device__ __forceinline__ double quotient(double e, double sum, double r) {
  const double q0 = e * r;
  return __fma_rn(__fma_rn(-q0, sum, e), r, q0);
}

// Kernels 2, 3 and 4 in one thread block of 1024 threads per (token, KV head), for steps with
// enough (token, KV head) pairs to fill the GPU (so most decode batches): the same arithmetic in
// the same order (chunk sums of two 32-key warp butterflies each, their totals over the lanes and
// one butterfly, probabilities summed over the heads in head order), without the round trips
// through the scratch and two launches.
size_t finish_smem(const SplitLayout& L, int G, int n_max, int nb_max) {
  const size_t n = size_t(n_max > 0 ? n_max : 1);
  return sizeof(double) * (size_t(G) * L.chunks * 2 + 2 * G) + sizeof(float) * G +
         sizeof(float) * (size_t(G) * n + 2 * n) + sizeof(uint32_t) * 3 * size_t(nb_max) +
         sizeof(int) * (256 + k_max_warps + 4);
}

__global__ void __launch_bounds__(k_finish_threads) split_finish(SelectArgs a, SplitLayout L) {
  extern __shared__ __align__(16) double sf[];
  dependent_launch_begin();
  const int h = blockIdx.x, t = blockIdx.y;
  const TokenSel s = token_sel(a, t);
  const KvView& kv = a.kv;
  const SparseView& p = a.p;
  const int H = kv.n_kv_heads, G = a.group, m = kv.keys_per_block;
  const int64_t th = int64_t(t) * H + h;
  int32_t* out = a.out + th * a.k_max;
  const int nb = s.nb;
  if (s.all) {
    select_every_block(out, nb, a.k_max, threadIdx.x, blockDim.x);
    return;
  }
  const int nm = a.n_max > 0 ? a.n_max : 1;
  double* hs = sf;                              // [G][chunks][2] half-chunk sums
  double* sum = hs + size_t(G) * L.chunks * 2;  // [G]
  double* rcp = sum + G;                        // [G] 1 / sum, correctly rounded
  float* mx = reinterpret_cast<float*>(rcp + G);  // [G]
  float* lgs = mx + G;                          // [G][n_max] the logits
  float* S = lgs + size_t(G) * nm;              // [n_max]
  float* E = S + nm;                            // [n_max] window scores (NOSA)
  const TopkLayout tl = topk_layout(reinterpret_cast<uint32_t*>(E + nm), a.nb_max);
  uint32_t* ks = tl.ks;
  uint32_t* ke = tl.ke;
  int* flag = tl.flag;
  const TopkShared& sh = tl.sh;

  // The logits and the window scores into shared memory, every load in flight at once.
  const bool nosa = a.mode == SelectMode::nosa;
  const float* lg = a.scratch + L.lg + th * G * int64_t(a.n_max);
  for (int g = 0; g < G; ++g)
    for (int j = threadIdx.x; j < s.n; j += blockDim.x)
      cp_async4(lgs + g * nm + j, lg + int64_t(g) * a.n_max + j);
  cp_async_commit();
  const int32_t* table = a.step.block_table + int64_t(a.step.token_seq[t]) * a.step.bt_stride;
  if (nosa)
    for (int j = threadIdx.x; j < s.n; j += blockDim.x) {
      const int64_t home = kv_chunk(kv, table[j / m], a.layer, h);
      E[j] = kv.ck_scores[home * m + j % m];
    }

  const int chunks = (s.n + k_split_keys - 1) / k_split_keys;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  for (int g = warp; g < G; g += n_warps) {  // exact in any order
    const float* cm = a.scratch + L.cmax + (th * G + g) * L.chunks;
    float v = -INFINITY;
    for (int i = lane; i < chunks; i += 32) v = fmaxf(v, cm[i]);
    v = warp_max(v);
    if (lane == 0) mx[g] = v;
  }
  cp_async_wait<0>();
  __syncthreads();
  // Half-chunk sums: keys [64 c + 32 half, + 32) of head g, one warp butterfly each (split_sums).
  for (int task = warp; task < G * chunks * 2; task += n_warps) {
    const int g = task / (chunks * 2), ch = task % (chunks * 2);
    const int j = ch * 32 + lane;  // = 64 c + 32 half + lane
    double e = j < s.n ? exp(double(__fsub_rn(lgs[g * nm + j], mx[g]))) : 0.0;
    e = warp_sum_d(e);
    if (lane == 0) hs[(size_t(g) * L.chunks) * 2 + ch] = e;
  }
  __syncthreads();
  // Totals (split_pool): chunk sums lane by lane, then one butterfly.
  for (int g = warp; g < G; g += n_warps) {
    const double* c = hs + size_t(g) * L.chunks * 2;
    double z = 0.0;
    for (int i = lane; i < chunks; i += 32) z += c[2 * i] + c[2 * i + 1];
    z = warp_sum_d(z);
    if (lane == 0) {
      sum[g] = z;
      rcp[g] = __drcp_rn(z);
    }
  }
  __syncthreads();
  // S[j]: the probabilities summed over the heads in head order (the quotient without a double
  // division: the same correctly rounded value, see quotient()).
  for (int j = threadIdx.x; j < s.n; j += blockDim.x) {
    float v = 0.0f;
    for (int g = 0; g < G; ++g) {
      const double e = exp(double(__fsub_rn(lgs[g * nm + j], mx[g])));
      v = __fadd_rn(v, __double2float_rn(quotient(e, sum[g], rcp[g])));
    }
    S[j] = v;
  }
  __syncthreads();
  // Pooling with forced blocks, straight into order keys.
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    float vs, ve;
    pool_block(
        p, b, m, s.n, s.qb, nosa, [&](int j) { return S[j]; }, [&](int j) { return E[j]; }, vs,
        ve);
    ks[b] = order_key(vs);
    if (nosa) ke[b] = order_key(ve);
  }
  __syncthreads();
  topk_and_compact(a, ks, ke, nb, flag, sh, out);
}

bool split_fits(int n_kv_heads, int group, int head_dim, int keys_per_block, int n_max,
                int nb_max, int n_tokens) {
  if (n_tokens > k_split_max_tokens || n_tokens > 65535 || group > 64) return false;
  const SplitLayout L =
      split_layout(n_tokens, n_kv_heads, group, keys_per_block, n_max, nb_max);
  const size_t limit = max_shared_bytes();
  return L.total <= k_split_budget_floats && logits_smem(group, head_dim) <= limit &&
         pool_smem(L, group, keys_per_block) <= limit && topk_smem(nb_max) <= limit;
}

// split_finish replaces kernels 2-4 where its shared memory fits and the step has enough
// (token, KV head) pairs to fill about half of an H200, or a pair's logits are few enough for one
// thread block (decode of short contexts: up to 4K positions with 16 heads, 8K with 8). With
// fewer pairs at 16K-32K positions the four kernels spread each pair's exponentials over the
// GPU and win (H200, a step: 8b-like B = 16 7.21 -> 7.06 ms at 16K, 7.86 -> 7.52 at 32K;
// B = 1 6.63 -> 6.43 at 16K; 1b-like B = 16 3.36 -> 3.27 at 16K); from 128 pairs on
// (B = 64) split_finish wins (9.83 against 10.26 ms).
constexpr int k_finish_min_pairs = 64;
constexpr size_t k_finish_max_logits = 4096;

template <int D>
cudaError_t launch_logits(const SelectArgs& a, const SplitLayout& L, cudaStream_t stream) {
  const int T = a.step.n_tokens, H = a.kv.n_kv_heads;
  const size_t smem = logits_smem(a.group, D);
  // The occupancy is bound by shared memory: all of the unified L1 as shared memory.
  cudaError_t e = allow_shared<split_logits<D>>(smem, true);
  if (e != cudaSuccess) return e;
  return launch_dependent(split_logits<D>, dim3(L.chunks, H, T), k_split_keys, smem, stream, a, L);
}

template <int D>
cudaError_t launch_split(const SelectArgs& a, cudaStream_t stream) {
  const int T = a.step.n_tokens, H = a.kv.n_kv_heads, G = a.group, m = a.kv.keys_per_block;
  const SplitLayout L = split_layout(T, H, G, m, a.n_max, a.nb_max);
  if (!a.scratch || a.scratch_floats < L.total) return cudaErrorInvalidValue;
  const size_t s2 = sums_smem(G), s3 = pool_smem(L, G, m), s4 = topk_smem(a.nb_max),
               s5 = finish_smem(L, G, a.n_max, a.nb_max);
  const bool finish =
      s5 <= max_shared_bytes() &&
      (a.split_finish >= 0 ? a.split_finish == 1
                           : T * H >= k_finish_min_pairs ||
                                 size_t(G) * a.n_max <= k_finish_max_logits);
  cudaError_t e;
  if (a.mode != SelectMode::dense && a.n_max > 0) {
    e = launch_logits<D>(a, L, stream);
    if (e != cudaSuccess) return e;
  }
  if (finish) {
    if ((e = allow_shared<split_finish>(s5)) != cudaSuccess) return e;
    return launch_dependent(split_finish, dim3(H, T), k_finish_threads, s5, stream, a, L);
  }
  if ((e = allow_shared<split_pool>(s3)) != cudaSuccess) return e;
  if ((e = allow_shared<split_topk>(s4)) != cudaSuccess) return e;
  if (a.mode != SelectMode::dense && a.n_max > 0) {
    if ((e = launch_dependent(split_sums, dim3(L.chunks, H, T), k_sums_threads, s2, stream, a, L)) !=
            cudaSuccess ||
        (e = launch_dependent(split_pool, dim3(L.pool_chunks, H, T), k_pool_threads, s3, stream, a,
                              L)) != cudaSuccess)
      return e;
  }
  return launch_dependent(split_topk, dim3(H, T), k_topk_threads, s4, stream, a, L);
}


// ---- The tiled path (prefill): one thread block per (tile of consecutive tokens, KV head) ------
//
// A prompt's tokens score against the same compressed keys, so the logits of a tile are a small
// GEMM: its rows are the tile's (token, query head) pairs (8 * RI of them: 8 * RI / group
// tokens), its columns the keys. Each round takes 128 keys, staged in shared memory as float32
// 64 dimensions at a time (the next part loaded into registers during the arithmetic), and every
// thread computes RI rows x 4 keys, so that a staged key serves all the tile's rows and a query
// value 4 keys. The logits stay in shared memory (global scratch where they do not fit); then
// each row's maximum and double sum, S[j] in place of the tile's first head's logits, and each
// token's pooling and top-k by one warp.
//
// The GEMM is bound by the float32 units, the rest by latency (chains of double-precision
// operations, shuffles, one warp per token), so the tile is sized for two thread blocks per
// multiprocessor where their shared memory fits (16 rows at 16K positions): one block's GEMM
// then runs beside the other's softmax and top-k. The exps go four at a time through libdevice's
// own straight-line code (exp_core), so that their chains interleave. Pooling reads the window
// scores from shared memory (staged once per sequence of the tile) and, up to 256 blocks, keeps
// the order keys in registers, where the top-k searches the k-th largest key two bits a round.
// On an H200, nosa-1b-like at 16K positions: 4.03 -> 2.93 ms a layer (one block per
// multiprocessor with 32 rows and the same code: 3.2 ms). Its stall samples then: ~17% on the
// key fetches' address arithmetic (block-table lookup, division by keys_per_block, per part),
// ~20% at barriers (most where one warp per token pools and selects while the block's other
// warps wait), ~22% on the GEMM's FFMA and shared loads, ~12% on the exps and quotients. Each
// key's row is now found once per round by one thread (key_rows) instead of by the eight
// threads loading its parts, once per part: NOSA prefill 16 x 16K, 1b 72.0K -> 73.6K tok/s,
// 8b 23.4K -> 23.6K. Not kept: a persistent kernel, one thread block per multiprocessor whose
// warps split into a logits team and a softmax team (one tile's GEMM beside the softmax,
// pooling and top-k of the tile before, the logits handed over in two shared-memory buffers by
// named barriers). Same selection, but slower (H200, 16K-token prompt, two layers' selection
// with the warm-up: 8b-like 10.4 ms here, 17.0 with 4 + 8 warps, 12.8 with 8 + 8; 1b-like 5.3,
// 8.6, 6.5): the exponentials and top-k are chains of latency that want every warp, and two of
// these thread blocks per multiprocessor already interleave their phases.
//
// The arithmetic is the reference's, as in the other paths: dot products in x order with
// fused multiply-add (exact products, see above), the maximum exact, the sum of exp(double) in
// another order (double precision absorbs it), the probabilities in double, rounded to float,
// summed over the heads in head order. The quotient e / sum is the reciprocal's product with
// one fused correction step (Markstein), which is the correctly rounded quotient, the
// reference's, for every value that is not below 2^-1000 (where either rounds to float 0).
// Tokens that take every block skip the arithmetic; keys read only by forced blocks get no S.
// A tile spanning two sequences (continuous batching) runs the GEMM once per sequence.

constexpr int k_tile_threads = 256;
constexpr int k_tile_warps = k_tile_threads / 32;
constexpr int k_tile_keys = 128;  // keys per round: 4 per thread of a warp's 8-lane row
constexpr int k_tile_xs = 64;     // dimensions staged at a time (head_dim 128: two parts)
constexpr int k_tile_sq = k_tile_xs + 4;  // floats per staged key (= 4 mod 32: conflict-free)
constexpr int k_tile_reg_lanes = 8;       // order keys per lane in registers: nb <= 256
constexpr size_t k_tile_header_bytes = 2 * 32 * sizeof(double) + 32 * sizeof(float) +
                                       4 * 32 * sizeof(int) + 2 * k_tile_keys * sizeof(int64_t);

struct TileShape {
  bool ok = false;
  int rows_per_thread = 4;  // RI
  int rows = 32;            // 8 * RI
  int tokens = 1;           // rows / group
  int lg_stride = 0;        // floats per row of logits (= 4 mod 32: conflict-free stores)
  int u_floats = 0;         // the staged keys; then each warp's top-k keys and window scores
  int e_offset = 0;         // where in u the window scores start
  bool lg_smem = true;
  bool two_per_sm = false;  // two thread blocks fit on a multiprocessor
  bool e_smem = true;       // the window scores staged in shared memory (else read from global)
  size_t smem = 0;
};

// The shared memory one of two thread blocks on a multiprocessor may take (half of the
// multiprocessor's, less the part the system reserves per block: 113 KB on Hopper), asked once
// per device.
size_t tile_two_per_sm_bytes() {
  const DeviceLimits& dev = device_limits();
  const size_t half = dev.shared_per_sm / 2;
  const size_t v = half > dev.reserved_per_block ? half - dev.reserved_per_block : 1;
  return std::min(v, dev.max_shared);
}

TileShape tile_shape_with(int group, int d, int n_max, int nb_max, bool e_smem) {
  TileShape s;
  if (group < 1 || group > 32 || (d != 64 && d != 128)) return s;
  s.e_smem = e_smem;
  s.lg_stride = (std::max(n_max, 1) + 31) / 32 * 32 + 4;
  s.e_offset = k_tile_warps * 2 * std::max(nb_max, 1);
  const size_t top = size_t(s.e_offset) + (e_smem ? size_t(std::max(n_max, 1)) : 0);
  const size_t u = std::max<size_t>(size_t(k_tile_keys) * k_tile_sq, top);
  s.u_floats = int((u + 3) / 4 * 4);
  auto bytes = [&](int rows, bool lg_smem) {
    return k_tile_header_bytes + sizeof(float) * (size_t(rows) * (d + 4) + s.u_floats) +
           (lg_smem ? sizeof(float) * size_t(rows) * s.lg_stride : 0);
  };
  auto take = [&](int ri, bool lg_smem, bool two) {
    s.ok = true;
    s.rows_per_thread = ri;
    s.rows = 8 * ri;
    s.tokens = s.rows / group;
    s.lg_smem = lg_smem;
    s.two_per_sm = two;
    s.smem = bytes(s.rows, lg_smem);
    return s;
  };
  // Two thread blocks per multiprocessor with 32 or 16 rows, else the widest tile whose logits
  // fit in shared memory, else 32 rows with the logits in the scratch.
  const size_t two = tile_two_per_sm_bytes();
  for (int ri : {4, 2})
    if (group <= 8 * ri && bytes(8 * ri, true) <= two) return take(ri, true, true);
  for (int ri : {4, 2, 1}) {
    if (group > 8 * ri) break;
    if (bytes(8 * ri, true) <= max_shared_bytes()) return take(ri, true, false);
  }
  take(4, false, bytes(32, false) <= two);
  s.ok = s.smem <= max_shared_bytes();
  return s;
}

// The window scores take n_max floats of shared memory: past about 170K positions (head_dim 128)
// they would leave no room for any tile, and the pooling reads them from global memory instead.
TileShape tile_shape(int group, int d, int n_max, int nb_max) {
  const TileShape s = tile_shape_with(group, d, n_max, nb_max, true);
  return s.ok ? s : tile_shape_with(group, d, n_max, nb_max, false);
}

// Whether a tiled step is screened (see "Screening" below): asked for, a mode that selects, tiles
// of 16 or 32 rows (the tensor cores' 16-row fragments) whose logits stay in shared memory, and
// groups of two or more heads (the bounds take the second head's row).
bool screen_fits(const TileShape& s, int group) {
  return s.ok && s.lg_smem && s.rows_per_thread >= 2 && group >= 2;
}
bool screens(const SelectArgs& a, const TileShape& s) {
  return a.screen && a.mode != SelectMode::dense && screen_fits(s, a.group);
}

// The logits' scratch of tiles whose logits do not fit in shared memory (tile_scratch below).
size_t tile_scratch_floats(const TileShape& s, int n_kv_heads, int n_tokens) {
  if (!s.ok || s.lg_smem) return 0;
  const size_t per_tile = size_t(n_kv_heads) * s.rows * s.lg_stride;
  const size_t tiles = (size_t(n_tokens) + s.tokens - 1) / s.tokens;
  size_t fit = k_scratch_budget_floats / per_tile;
  if (fit < 1) fit = 1;
  return std::min(fit, tiles) * per_tile;
}

// e[u] = exp(double(x[u])) for four floats, as exp() computes it: exp_core, or exp() itself
// where some |x| is not below 708 (or is not a number).
__device__ __forceinline__ void exp4(const float (&x)[4], double (&e)[4]) {
  bool slow = false;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    e[u] = exp_core(double(x[u]));
    slow |= !(fabsf(x[u]) < 708.0f);
  }
  if (slow) {
#pragma unroll
    for (int u = 0; u < 4; ++u) e[u] = exp(double(x[u]));
  }
}

// The k (1 <= k < nb) largest keys of u[0..nb), ties toward the lower index, for one warp: every
// lane must call it. The selected indices go to out (ascending), or, with out null, their
// mark[b] becomes the +inf order key. For nb over 32 * k_tile_reg_lanes (see reg_topk).
__device__ void warp_topk(const uint32_t* u, int nb, int k, int32_t* out, uint32_t* mark) {
  const int lane = threadIdx.x % 32;
  // The k-th largest key: the largest threshold that at least k keys reach, bit by bit.
  uint32_t kth = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = kth | (1u << bit);
    unsigned c = 0;
    for (int b = lane; b < nb; b += 32) c += u[b] >= cand;
    if (__reduce_add_sync(0xffffffffu, c) >= unsigned(k)) kth = cand;
  }
  unsigned above = 0;
  for (int b = lane; b < nb; b += 32) above += u[b] > kth;
  const int ties_taken = k - int(__reduce_add_sync(0xffffffffu, above));
  const uint32_t inf = order_key(INFINITY);
  const unsigned lower = (1u << lane) - 1u;
  int eq_before = 0, written = 0;
  for (int c0 = 0; c0 < nb; c0 += 32) {
    const int b = c0 + lane;
    const uint32_t x = b < nb ? u[b] : 0u;
    const bool eq = b < nb && x == kth;
    const unsigned eqs = __ballot_sync(0xffffffffu, eq);
    const bool sel = (b < nb && x > kth) || (eq && eq_before + __popc(eqs & lower) < ties_taken);
    const unsigned sels = __ballot_sync(0xffffffffu, sel);
    if (sel) {
      if (out)
        out[written + __popc(sels & lower)] = b;
      else
        mark[b] = inf;
    }
    written += __popc(sels);
    eq_before += __popc(eqs);
  }
}

// warp_topk over keys in registers: v[c] is block 32 c + lane's key (nb <= 32 C, 0 past nb,
// which no threshold reaches: the threshold always has a bit set). The k-th largest key two bits
// a round (the three candidates' counts, at most 256 each, packed into one warp reduction);
// the selected blocks to out, or with kMark their mark[c] becomes the +inf order key.
template <int C, bool kMark>
__device__ __forceinline__ void reg_topk(const uint32_t (&v)[C], int nb, int k, int32_t* out,
                                         uint32_t (&mark)[C]) {
  const int lane = threadIdx.x % 32;
  uint32_t kth = 0;
#pragma unroll 1
  for (int sh = 30; sh >= 0; sh -= 2) {
    const uint32_t c1 = kth | (1u << sh), c2 = kth | (2u << sh), c3 = kth | (3u << sh);
    unsigned c = 0;
#pragma unroll
    for (int i = 0; i < C; ++i)
      c += unsigned(v[i] >= c1) + (unsigned(v[i] >= c2) << 10) + (unsigned(v[i] >= c3) << 20);
    c = __reduce_add_sync(0xffffffffu, c);
    const unsigned n1 = c & 1023u, n2 = (c >> 10) & 1023u, n3 = c >> 20;
    kth = n3 >= unsigned(k) ? c3 : n2 >= unsigned(k) ? c2 : n1 >= unsigned(k) ? c1 : kth;
  }
  unsigned above = 0;
#pragma unroll
  for (int i = 0; i < C; ++i) above += v[i] > kth;
  const int ties_taken = k - int(__reduce_add_sync(0xffffffffu, above));
  const uint32_t inf = order_key(INFINITY);
  const unsigned lower = (1u << lane) - 1u;
  int eq_before = 0, written = 0;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    if (32 * i >= nb) break;
    const int b = 32 * i + lane;
    const bool eq = b < nb && v[i] == kth;
    const unsigned eqs = __ballot_sync(0xffffffffu, eq);
    const bool sel = (b < nb && v[i] > kth) || (eq && eq_before + __popc(eqs & lower) < ties_taken);
    const unsigned sels = __ballot_sync(0xffffffffu, sel);
    if (sel) {
      if (kMark)
        mark[i] = inf;
      else
        out[written + __popc(sels & lower)] = b;
    }
    written += __popc(sels);
    eq_before += __popc(eqs);
  }
}

// The tile's tokens [s0, end) of one sequence (a tile can span sequences under continuous
// batching; tokens past the step, `left` = T - t0 of them, end it too), and the most compressed
// keys that any of them not taking every block scores.
struct TileSegment {
  int seq, end, n;
};

__device__ __forceinline__ TileSegment tile_segment(const int* tseq, const int* tn,
                                                    const int* tall, int s0, int Mt, int left) {
  TileSegment g;
  g.seq = tseq[s0];
  g.end = s0 + 1;
  while (g.end < Mt && g.end < left && tseq[g.end] == g.seq) ++g.end;
  g.n = 0;
  for (int i = s0; i < g.end; ++i)
    if (!tall[i]) g.n = max(g.n, tn[i]);
  return g;
}

// Screening (kScreen, NOSA and InfLLM-V2 prefill): the tiled kernel's logits by the tensor cores
// (bf16 products, exact, summed in another order) and its exponentials in float32 by the special
// function unit, each score with a bound on its distance from the reference's, then the top-k
// as usual. The query-aware top-k is certified when every chosen block that is not forced scores
// at least its bound above every block left out plus that one's bound: the reference then
// chooses the same blocks (the second, eviction-score top-k is exact anyway). A token whose
// choice is not certified (near ties, exact ties, inputs past the bounds' range) sends its tile
// and KV head to the exact kernel, which runs afterwards on those tiles only.
//
// The bounds and their derivation: attention/cuda/screen_bounds.h.
//
// The default (SelectArgs::screen; --select-path tiled-exact turns it off). On an H200 (16K-token
// prompt, two layers with the warm-up; bench/results/2026-11-29-h200-session15) the screened
// kernel took 3.96 ms and the exact one on the tiles it left 2.11 ms, against 8.74 ms for the
// exact kernel alone (8b-like); 2.15 + 1.70 ms against 4.50 (1b-like); prefill 16 x 16K +3.7%
// and +3.6%. Random inputs leave 22% (8b-like) to 35% (1b-like) of the tiles uncertified with
// the bound by the partial sums (132 u scale B, screen_bounds.h), where the CPU replay
// (tests/attention/screen_bound_test.cpp) puts the actual error some thousand times below the
// bound: bounds that hold for every input are what leave tokens uncertified. Loading the keys
// further ahead (cp.async, lookups two rounds ahead) took only 3% off the screened kernel; the
// barrier behind a one-warp top-k was its main wait (see pooled_topk).
// Tiles of more tokens would also share each key's load among more rows.

// Whether one warp's token's query-aware choice is certified: chosen(b) says whether block b was
// chosen, bounded(b, vs, ve) gives block b's pooled score and the bound of its distance from the
// reference's (the largest bound of the keys pooled). Every lane must call it.
template <class Bounded, class Chosen>
__device__ __forceinline__ bool screen_certified(const SparseView& p, int nb, int qb,
                                                 Bounded bounded, Chosen chosen) {
  float lo = INFINITY, hi = -INFINITY;
  bool ok = true;
  for (int b = threadIdx.x % 32; b < nb; b += 32) {
    if (b < p.init_blocks || b >= qb - p.local_blocks) continue;  // forced
    float vs, ve;
    bounded(b, vs, ve);
    ok &= vs >= 0.0f && vs < INFINITY && ve >= 0.0f && ve < INFINITY;
    if (chosen(b))
      lo = fminf(lo, __fsub_rd(vs, ve));
    else
      hi = fmaxf(hi, __fadd_ru(vs, ve));
  }
  lo = -warp_max(-lo);
  hi = warp_max(hi);
  return __all_sync(0xffffffffu, ok) && lo > hi;
}

// The screened kernel's logits (kScreen): the tile's queries and each round's 64 keys staged
// as bf16 rows of D + 8 values (ldmatrix reads eight rows 4 banks apart), and the tile's rows x
// keys by the tensor cores, m16n8k16: warp w takes the round's keys 8 w .. 8 w + 7 against all
// rows. A second product of the absolute values and the partial sums' magnitudes after each
// step give each row's largest B over its keys (habs; screen_bounds.h), which bounds the
// rounding error of every logit of the row. With so
// little arithmetic per round, the loads run ahead: each round's keys come by cp.async into one
// of two stage buffers while the round before is computed, and their rows (block-table lookups)
// are found two rounds ahead, in a ring of three (two would do with these barriers; the third
// slot is slack). (Against 128-key rounds with the next round's rows looked up and its keys
// fetched into registers during the products: 8b-like, 16K, two layers with the warm-up,
// 5.73 -> 5.56 ms on an H200, 1b-like unchanged at 2.99: the loads were not what the kernel
// waits on.)
constexpr int k_screen_keys = 64;

template <int D, int RI>
__device__ __forceinline__ void screen_logits(const SelectArgs& a, const TileShape& ts, int t0,
                                              int h, const int* tn, const int* tseq,
                                              const int* tall, int64_t* key_rows, float* qs,
                                              float* stage, float* lg, float* habs) {
  constexpr int P = D / 8, KS = D + 8, MT = RI / 2, KEYS = k_screen_keys;
  constexpr int LOADS = KEYS * P / k_tile_threads;
  const KvView& kv = a.kv;
  const int H = kv.n_kv_heads, G = a.group, m = kv.keys_per_block, T = a.step.n_tokens;
  const int Mt = ts.tokens, ns = ts.lg_stride;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  bf16* qh = reinterpret_cast<bf16*>(qs);     // [8 RI][KS]
  bf16* kst = reinterpret_cast<bf16*>(stage);  // [2][KEYS][KS]
  const bf16* q = static_cast<const bf16*>(a.q);
  for (int idx = tid; idx < 8 * RI * P; idx += k_tile_threads) {
    const int r = idx / P, x = idx % P, i = r / G;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < Mt * G && !tall[i])
      v = *reinterpret_cast<const uint4*>(q + ((int64_t(t0 + i) * H + h) * G + r % G) * D + x * 8);
    *reinterpret_cast<uint4*>(qh + r * KS + x * 8) = v;
  }
  const bf16* ck = static_cast<const bf16*>(kv.ck);
  for (int s0 = 0; s0 < Mt && t0 + s0 < T;) {
    const TileSegment sg = tile_segment(tseq, tn, tall, s0, Mt, T - t0);
    const int seq = sg.seq, n_seg = sg.n, r0 = s0 * G, r1 = sg.end * G;
    s0 = sg.end;
    if (n_seg == 0) continue;
    const int32_t* table = a.step.block_table + int64_t(seq) * a.step.bt_stride;
    const int rounds = (n_seg + KEYS - 1) / KEYS;
    // Round c's key rows (-1 past the segment's), looked up by the first KEYS threads.
    auto row_of = [&](int c) -> int64_t {
      const int j = c * KEYS + tid;
      return j < n_seg ? kv_chunk(kv, table[j / m], a.layer, h) * m + j % m : -1;
    };
    auto issue = [&](int c) {  // round c's keys into stage buffer c % 2
      const int64_t* rows = key_rows + (c % 3) * KEYS;
      bf16* dst = kst + (c % 2) * KEYS * KS;
#pragma unroll
      for (int it = 0; it < LOADS; ++it) {
        const int idx = it * k_tile_threads + tid, r = idx / P, x = idx % P;
        const int64_t row = rows[r];
        cp_async16_or_zero(smem_u32(dst + r * KS + x * 8), ck + (row >= 0 ? row : 0) * D + x * 8,
                           row >= 0);
      }
      cp_async_commit();
    };
    float amax[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) amax[mt][0] = amax[mt][1] = 0.0f;
    // The previous segment's last reads of key_rows and the stage ended before its last round's
    // barrier.
    if (tid < KEYS) {
      key_rows[tid] = row_of(0);
      if (rounds > 1) key_rows[KEYS + tid] = row_of(1);
    }
    __syncthreads();
    issue(0);
    for (int c = 0; c < rounds; ++c) {
      cp_async_wait<0>();
      // Round c's keys are in; every warp is done with round c - 1's buffer, and round c + 1's
      // rows (written a round ago) are visible.
      __syncthreads();
      if (c + 1 < rounds) issue(c + 1);
      const bool look = tid < KEYS && c + 2 < rounds;
      const int64_t ahead = look ? row_of(c + 2) : 0;  // its latency behind this round's products
      const bf16* ks = kst + (c % 2) * KEYS * KS;
      // part: the sum of |acc| after each step of 16 products (screen_bounds.h's B, with aab).
      float acc[MT][4] = {}, aab[MT][4] = {}, part[MT][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; kk += 2) {
        uint32_t b[4], ba[4];
        ldmatrix_x4(b[0], b[1], b[2], b[3],
                    ks + (8 * warp + lane % 8) * KS + kk * 16 + 8 * (lane / 8));
#pragma unroll
        for (int u = 0; u < 4; ++u) ba[u] = b[u] & 0x7fff7fffu;
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint32_t af[4], aa[4];
            ldmatrix_x4(af[0], af[1], af[2], af[3],
                        qh + (16 * mt + lane % 8 + 8 * ((lane / 8) % 2)) * KS + (kk + half) * 16 +
                            8 * (lane / 16));
#pragma unroll
            for (int u = 0; u < 4; ++u) aa[u] = af[u] & 0x7fff7fffu;
            mma_bf16(acc[mt], af, b[2 * half], b[2 * half + 1]);
            mma_bf16(aab[mt], aa, ba[2 * half], ba[2 * half + 1]);
#pragma unroll
            for (int u = 0; u < 4; ++u) part[mt][u] += fabsf(acc[mt][u]);
          }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int r = 16 * mt + lane / 4 + 8 * (u / 2);
          const int j = c * KEYS + 8 * warp + 2 * (lane % 4) + u % 2;
          if (r >= r0 && r < r1 && j < n_seg) {
            lg[int64_t(r) * ns + j] = __fmul_rn(acc[mt][u], a.scale);
            amax[mt][u / 2] = fmaxf(amax[mt][u / 2], aab[mt][u] + part[mt][u]);
          }
        }
      if (look) key_rows[((c + 2) % 3) * KEYS + tid] = ahead;
    }
    __syncthreads();  // the last round's reads of the stage and key_rows are done
    // Each row's largest B: over the four lanes of its fragment rows, then the warps.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        float v = amax[mt][hi];
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
        const int r = 16 * mt + lane / 4 + 8 * hi;
        // Non-negative floats (and NaN, above +inf) order as their bits do.
        if (lane % 4 == 0 && r >= r0 && r < r1)
          atomicMax(reinterpret_cast<int*>(habs + r), __float_as_int(v));
      }
  }
}

// One warp's selection of one (token, KV head), every lane calling: the blocks' scores by
// pool(b, vs, ve) (block b's pooled query-aware score and, with NOSA, its pooled eviction
// score), the top-k stages into out, -1 padded; ks and ke: the warp's nb_max order keys, used
// past 32 * k_tile_reg_lanes blocks. kScreen: the query-aware choice certified by
// screen_certified with bounded (see "Screening"), *uncertain set where it is not.
template <bool kScreen, class Pool, class Bounded>
__device__ __forceinline__ void select_token(const SelectArgs& a, int qb, Pool pool,
                                             Bounded bounded, uint32_t* ks, uint32_t* ke,
                                             int32_t* out, int* uncertain) {
  const SparseView& p = a.p;
  const bool nosa = a.mode == SelectMode::nosa;
  const int lane = threadIdx.x % 32, nb = qb + 1;
  const int k = min(p.topk, nb);
  const uint32_t key_inf = order_key(INFINITY);
  if (nb <= 32 * k_tile_reg_lanes) {
    constexpr int C = k_tile_reg_lanes;
    uint32_t vk[C], ek[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int b = 32 * c + lane;
      vk[c] = ek[c] = 0;
      if (b < nb) {
        float vs, ve;
        pool(b, vs, ve);
        vk[c] = order_key(vs);
        if (nosa) ek[c] = order_key(ve);
      }
    }
    if (kScreen) {
      // The query-aware choice marked in vk and certified, then the eviction-score stage
      // (NOSA) or that choice (InfLLM-V2) to out.
      reg_topk<C, true>(vk, nb, nosa ? min(p.q_select, nb) : k, nullptr, vk);
      unsigned chosen = 0;
#pragma unroll
      for (int c = 0; c < C; ++c) chosen |= unsigned(vk[c] == key_inf) << c;
      if (!screen_certified(p, nb, qb, bounded, [&](int b) { return (chosen >> (b / 32)) & 1u; }))
        *uncertain = 1;
      if (nosa) {
#pragma unroll
        for (int c = 0; c < C; ++c)
          if ((chosen >> c) & 1u) ek[c] = key_inf;
      }
      if (nosa)
        reg_topk<C, false>(ek, nb, k, out, ek);
      else
        reg_topk<C, false>(vk, nb, k, out, vk);
    } else if (nosa) {
      reg_topk<C, true>(vk, nb, min(p.q_select, nb), nullptr, ek);
      reg_topk<C, false>(ek, nb, k, out, ek);
    } else {
      reg_topk<C, false>(vk, nb, k, out, vk);
    }
  } else {
    for (int b = lane; b < nb; b += 32) {
      float vs, ve;
      pool(b, vs, ve);
      ks[b] = order_key(vs);
      if (nosa) ke[b] = order_key(ve);
    }
    __syncwarp();
    if (kScreen) {
      // As above, the marks in ks.
      warp_topk(ks, nb, nosa ? min(p.q_select, nb) : k, nullptr, ks);
      __syncwarp();
      if (!screen_certified(p, nb, qb, bounded, [&](int b) { return ks[b] == key_inf; }))
        *uncertain = 1;
      if (nosa)
        for (int b = lane; b < nb; b += 32)
          if (ks[b] == key_inf) ke[b] = key_inf;
      __syncwarp();
    } else if (nosa) {
      warp_topk(ks, nb, min(p.q_select, nb), nullptr, ke);
      __syncwarp();
    }
    warp_topk(nosa ? ke : ks, nb, k, out, nullptr);
    __syncwarp();  // the next token reuses ks and ke
  }
  for (int b = k + lane; b < a.k_max; b += 32) out[b] = -1;
}

// kScreen: the screened kernel (see "Screening" above), which appends the tiles it cannot certify
// to redo ([0] their count, then tile * H + KV head); the exact kernel, given redo, computes
// those tiles (thread block i the i-th, past the count none), else tile tile_begin + blockIdx.x
// of KV head blockIdx.y. With pooled (exact kernel only), the tile's tokens' pooled query-aware
// scores go there ([T][H][nb_max]) for pooled_topk, all of the block's threads pooling, instead
// of one warp per token pooling and selecting while the others wait.
template <int D, int RI, bool kScreen>
__global__ void __launch_bounds__(k_tile_threads, 2)
    tile_select(SelectArgs a, TileShape ts, int tile_begin, int* redo, float* pooled) {
  extern __shared__ __align__(16) double tile_smem[];
  constexpr int QS = D + 4, P = D / 8, XP = k_tile_xs / 8, PARTS = D / k_tile_xs;
  const KvView& kv = a.kv;
  const SparseView& p = a.p;
  const int H = kv.n_kv_heads, G = a.group, m = kv.keys_per_block, T = a.step.n_tokens;
  int tile = tile_begin + blockIdx.x, h = blockIdx.y;
  if (!kScreen && redo) {
    if (int(blockIdx.x) >= redo[0]) return;
    tile = redo[1 + blockIdx.x] / H;
    h = redo[1 + blockIdx.x] % H;
  }
  const int Mt = ts.tokens, t0 = tile * Mt, ns = ts.lg_stride;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  double* hsum = tile_smem;        // [32] per row: the softmax sum
  double* hrcp = hsum + 32;        // [32] its reciprocal
  // kScreen keeps floats where the exact kernel keeps hsum and hrcp: per row the reciprocal of
  // the sum, the relative error bound of the probabilities, the largest B (screen_bounds.h).
  float* hrz = reinterpret_cast<float*>(hsum);
  float* heta = hrz + 32;
  float* habs = heta + 32;
  // kScreen: whether some token's selection is not certified (in hrcp's unused second half).
  int* uncertain = kScreen ? reinterpret_cast<int*>(habs + 32) : nullptr;
  float* hmax = reinterpret_cast<float*>(hrcp + 32);  // [32] the maximum logit
  int* tpos = reinterpret_cast<int*>(hmax + 32);      // [32] per token: position (-1: none)
  int* tn = tpos + 32;                                // compressed keys
  int* tseq = tn + 32;                                // sequence
  int* tall = tseq + 32;                              // takes every block (or none)
  // [2][128]: the compressed-key rows of a round's keys (-1 past the segment's), for this round
  // and the next, each found once per round rather than by every thread that loads a part of it
  int64_t* key_rows = reinterpret_cast<int64_t*>(tall + 32);
  float* qs = reinterpret_cast<float*>(key_rows + 2 * k_tile_keys);  // [R][QS] the queries
  float* stage = qs + 8 * RI * QS;  // [128][k_tile_sq] keys; then the top-k's keys, window scores
  float* lg = ts.lg_smem ? stage + ts.u_floats
                         : a.scratch + (int64_t(blockIdx.x) * H + h) * 8 * RI * ns;  // [R][ns]

  if (kScreen && tid == 0) *uncertain = 0;
  if (kScreen && tid < 32) habs[tid] = 0.0f;
  if (tid < Mt) {
    const int t = t0 + tid;
    if (t < T) {
      const TokenSel s = token_sel(a, t);
      tpos[tid] = s.pos;
      tn[tid] = s.n;
      tseq[tid] = a.step.token_seq[t];
      tall[tid] = s.all;
    } else {
      tpos[tid] = -1;
      tn[tid] = 0;
      tseq[tid] = -1;
      tall[tid] = 1;
    }
  }
  __syncthreads();
  bool any = false;
  for (int i = 0; i < Mt; ++i) any |= !tall[i];

  if (any) {
    if constexpr (kScreen) {
      screen_logits<D, RI>(a, ts, t0, h, tn, tseq, tall, key_rows, qs, stage, lg, habs);
    } else {
      // The queries as float32, zero for rows without a token that selects.
      const bf16* q = static_cast<const bf16*>(a.q);
      for (int idx = tid; idx < 8 * RI * P; idx += k_tile_threads) {
        const int r = idx / P, x = idx % P, i = r / G;
        float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (r < Mt * G && !tall[i]) {
          const uint4 raw = *reinterpret_cast<const uint4*>(
              q + ((int64_t(t0 + i) * H + h) * G + r % G) * D + x * 8);
          const bf16* e = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
          for (int xx = 0; xx < 8; ++xx) v[xx] = __bfloat162float(e[xx]);
        }
        float4* dst = reinterpret_cast<float4*>(qs + r * QS + x * 8);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
      }

      // The logits, one GEMM per sequence of the tile. Thread (rg, kg): rows rg + 8 i, keys
      // kg + 32 k of each round (row and key strides of 4 mod 32 floats: conflict-free float4
      // reads); each round's keys come in PARTS parts of k_tile_xs dimensions, in x order.
      const int rg = lane % 8, kg = warp * 4 + lane / 8;
      constexpr int LOADS = k_tile_keys * XP / k_tile_threads;
      const uint4* ck = static_cast<const uint4*>(kv.ck);
      for (int s0 = 0; s0 < Mt && t0 + s0 < T;) {
        const TileSegment sg = tile_segment(tseq, tn, tall, s0, Mt, T - t0);
        const int seq = sg.seq, s1 = sg.end, n_seg = sg.n;
        const int r0 = s0 * G, r1 = s1 * G;
        s0 = s1;
        if (n_seg == 0) continue;
        const int32_t* table = a.step.block_table + int64_t(seq) * a.step.bt_stride;
        auto row_of = [&](int j) -> int64_t {
          return j < n_seg ? kv_chunk(kv, table[j / m], a.layer, h) * m + j % m : -1;
        };
        auto find_rows = [&](int j0) {  // the rows of round j0's keys, by its first 128 threads
          if (tid < k_tile_keys)
            key_rows[((j0 / k_tile_keys) & 1) * k_tile_keys + tid] = row_of(j0 + tid);
        };
        uint4 pre[LOADS];
        auto fetch = [&](int j0, int part) {
          const int64_t* rows = key_rows + ((j0 / k_tile_keys) & 1) * k_tile_keys;
#pragma unroll
          for (int it = 0; it < LOADS; ++it) {
            const int idx = it * k_tile_threads + tid, r = idx / XP, x = idx % XP;
            const int64_t row = rows[r];
            pre[it] = row >= 0 ? ck[row * P + part * XP + x] : make_uint4(0, 0, 0, 0);
          }
        };
        // The previous segment's reads of key_rows ended before its last part's first barrier.
        find_rows(0);
        __syncthreads();
        fetch(0, 0);
        for (int j0 = 0; j0 < n_seg; j0 += k_tile_keys) {
          float acc[RI][4];
#pragma unroll
          for (int i = 0; i < RI; ++i)
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[i][k] = 0.0f;
#pragma unroll
          for (int part = 0; part < PARTS; ++part) {
            __syncthreads();  // the previous part's reads of the stage (and the queries) are done
#pragma unroll
            for (int it = 0; it < LOADS; ++it) {
              const int idx = it * k_tile_threads + tid, r = idx / XP, x = idx % XP;
              const bf16* e = reinterpret_cast<const bf16*>(&pre[it]);
              float4* dst = reinterpret_cast<float4*>(stage + r * k_tile_sq + x * 8);
              const float4 lo = make_float4(__bfloat162float(e[0]), __bfloat162float(e[1]),
                                            __bfloat162float(e[2]), __bfloat162float(e[3]));
              const float4 hi = make_float4(__bfloat162float(e[4]), __bfloat162float(e[5]),
                                            __bfloat162float(e[6]), __bfloat162float(e[7]));
              // The eight threads of a quarter warp (one store phase) write one row's 256 bytes,
              // 32 apart: x and x + 4 would hit the same banks, so the upper four store their
              // halves in the other order (a two-way conflict on every stage store otherwise:
              // about half of the kernel's shared-store wavefronts; 8b-like 16K prefill, a layer's
              // selection 5.34 -> 5.21 ms on an H200).
              const int swap = (x >> 2) & 1;
              dst[swap] = swap ? hi : lo;
              dst[swap ^ 1] = swap ? lo : hi;
            }
            // The next round's rows, read by its first fetch, after the last part's second
            // barrier (their buffer's last reads, two rounds back, were before this round's
            // first barrier). With two parts the lookups' latency passes behind part 0's
            // products, their rows stored after them (8b-like, 16K, two layers with the
            // warm-up: 10.40 -> 10.32 ms on an H200).
            const bool look =
                PARTS > 1 && part == 0 && j0 + k_tile_keys < n_seg && tid < k_tile_keys;
            const int64_t ahead = look ? row_of(j0 + k_tile_keys + tid) : 0;
            if (PARTS == 1 && j0 + k_tile_keys < n_seg) find_rows(j0 + k_tile_keys);
            __syncthreads();
            // The next part in flight during the dots.
            if (part + 1 < PARTS)
              fetch(j0, part + 1);
            else if (j0 + k_tile_keys < n_seg)
              fetch(j0 + k_tile_keys, 0);
            const float* qp = qs + part * k_tile_xs;
#pragma unroll 4
            for (int x = 0; x < k_tile_xs; x += 4) {
              float4 qv[RI], cv[4];
#pragma unroll
              for (int i = 0; i < RI; ++i)
                qv[i] = *reinterpret_cast<const float4*>(qp + (rg + 8 * i) * QS + x);
#pragma unroll
              for (int k = 0; k < 4; ++k)
                cv[k] = *reinterpret_cast<const float4*>(stage + (kg + 32 * k) * k_tile_sq + x);
#pragma unroll
              for (int i = 0; i < RI; ++i)
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                  acc[i][k] = __fmaf_rn(qv[i].x, cv[k].x, acc[i][k]);
                  acc[i][k] = __fmaf_rn(qv[i].y, cv[k].y, acc[i][k]);
                  acc[i][k] = __fmaf_rn(qv[i].z, cv[k].z, acc[i][k]);
                  acc[i][k] = __fmaf_rn(qv[i].w, cv[k].w, acc[i][k]);
                }
            }
            if (look) key_rows[((j0 / k_tile_keys + 1) & 1) * k_tile_keys + tid] = ahead;
          }
#pragma unroll
          for (int i = 0; i < RI; ++i) {
            const int r = rg + 8 * i;
            if (r < r0 || r >= r1) continue;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const int j = j0 + kg + 32 * k;
              if (j < n_seg) lg[int64_t(r) * ns + j] = __fmul_rn(acc[i][k], a.scale);
            }
          }
        }
      }
    }
    __syncthreads();

    // Each row's maximum (exact) and sum of exp(double(logit - max)): each lane adds its keys
    // lane, lane + 32, ... in order, four exps at a time.
    for (int r = warp; r < Mt * G; r += k_tile_warps) {
      const int i = r / G;
      if (tall[i]) continue;
      const int n = tn[i];
      const float* l = lg + int64_t(r) * ns;
      float mx = -INFINITY;
      for (int j = lane; j < n; j += 32) mx = fmaxf(mx, l[j]);
      mx = warp_max(mx);
      if constexpr (kScreen) {
        // The sum of 2^x2 (x2 = (logit - max) log2 e) and of 2^x2 |x2| (for the bound).
        float z = 0.0f, zw = 0.0f;
        for (int j = lane; j < n; j += 32) {
          const float x2 = __fmul_rn(__fsub_rn(l[j], mx), k_log2e), e = fast_exp2(x2);
          z += e;
          zw = __fmaf_rn(e, -x2, zw);
        }
        z = warp_sum(z);
        zw = warp_sum(zw);
        if (lane == 0) {
          hmax[r] = mx;
          hrz[r] = __frcp_rn(z);
          heta[r] = screen_eta(habs[r], a.scale, D, n, mx, z, zw);
        }
      } else {
        double z = 0.0;
        for (int j0 = lane; j0 < n; j0 += 128) {
          float x[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int j = j0 + 32 * u;
            x[u] = j < n ? __fsub_rn(l[j], mx) : 0.0f;
          }
          double e[4];
          exp4(x, e);
#pragma unroll
          for (int u = 0; u < 4; ++u)
            if (j0 + 32 * u < n) z += e[u];
        }
        z = warp_sum_d(z);
        if (lane == 0) {
          hmax[r] = mx;
          hsum[r] = z;
          hrcp[r] = __drcp_rn(z);
        }
      }
    }
    __syncthreads();

    // S[j] over the keys that a block which is not forced pools, written over the logits of the
    // token's first head (each key's thread reads its heads' logits first); the tile's tokens'
    // keys dealt to the threads as one range, each key's heads four exps at a time.
    int base = 0;
    for (int i = 0; i < Mt; ++i) {
      if (tall[i]) continue;
      const int qb = tpos[i] / p.block_size;
      const int jlo = max(0, m * p.init_blocks - 1), jhi = min(tn[i], m * (qb - p.local_blocks));
      const int cnt = max(0, jhi - jlo);
      float* row = lg + int64_t(i) * G * ns;
      const int first = base + (tid - base % k_tile_threads + k_tile_threads) % k_tile_threads;
      for (int idx = first; idx < base + cnt; idx += k_tile_threads) {
        const int j = jlo + idx - base;
        float v = 0.0f;
        if constexpr (kScreen) {
          // S and its error bound, in the second head's row (screened tiles have two or more).
          float err = 0.0f;
          for (int g = 0; g < G; ++g) {
            const int r = i * G + g;
            const float x2 = __fmul_rn(__fsub_rn(row[int64_t(g) * ns + j], hmax[r]), k_log2e);
            const float pr = __fmul_rn(fast_exp2(x2), hrz[r]);
            v = __fadd_rn(v, pr);
            err = __fmaf_rn(pr, __fmaf_rn(-k_screen_exp_arg, x2, heta[r]), err);
          }
          row[ns + j] = screen_score_error(err, v, G);
        } else {
          for (int g0 = 0; g0 < G; g0 += 4) {
            float x[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int g = g0 + u;
              x[u] = g < G ? __fsub_rn(row[int64_t(g) * ns + j], hmax[i * G + g]) : 0.0f;
            }
            double e[4];
            exp4(x, e);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int r = i * G + g0 + u;
              if (g0 + u < G)
                v = __fadd_rn(v, __double2float_rn(quotient(e[u], hsum[r], hrcp[r])));
            }
          }
        }
        row[j] = v;
      }
      base += cnt;
    }
    __syncthreads();
  }

  // Pooling and the top-k, one warp per token, per sequence of the tile: its window scores
  // first staged in shared memory (NOSA, where they fit: see tile_shape).
  const bool nosa = a.mode == SelectMode::nosa;
  float* E = stage + ts.e_offset;
  uint32_t* ks = reinterpret_cast<uint32_t*>(stage) + warp * 2 * a.nb_max;
  uint32_t* ke = ks + a.nb_max;
  for (int s0 = 0; s0 < Mt && t0 + s0 < T;) {
    const TileSegment sg = tile_segment(tseq, tn, tall, s0, Mt, T - t0);
    const int seq = sg.seq, s1 = sg.end, n_seg = sg.n;
    const int32_t* table = a.step.block_table + int64_t(seq) * a.step.bt_stride;
    auto window_score = [&](int j) {
      return kv.ck_scores[kv_chunk(kv, table[j / m], a.layer, h) * m + j % m];
    };
    if (pooled) {
      // kScreen: the pooled bounds too, in the second half of pooled.
      for (int i = s0; i < s1; ++i) {
        const int t = t0 + i, qb = tpos[i] / p.block_size, nb = qb + 1, n = tn[i];
        if (tall[i]) {
          select_every_block(a.out + (int64_t(t) * H + h) * a.k_max, nb, a.k_max, tid,
                             k_tile_threads);
          continue;
        }
        const float* S = lg + int64_t(i) * G * ns;
        auto score = [&](int j) { return S[j]; };
        auto bound = [&](int j) { return S[ns + j]; };
        const int64_t at = (int64_t(t) * H + h) * a.nb_max;
        for (int b = tid; b < nb; b += k_tile_threads) {
          float vs, ve;
          pool_block(p, b, m, n, qb, kScreen, score, bound, vs, ve);
          pooled[at + b] = vs;
          if (kScreen) pooled[int64_t(T) * H * a.nb_max + at + b] = ve;
        }
      }
      s0 = s1;
      continue;
    }
    if (nosa && ts.e_smem)
      for (int j = tid; j < n_seg; j += k_tile_threads) E[j] = window_score(j);
    __syncthreads();
    for (int i = s0 + warp; i < s1; i += k_tile_warps) {
      const int t = t0 + i;
      int32_t* out = a.out + (int64_t(t) * H + h) * a.k_max;
      const int qb = tpos[i] / p.block_size, nb = qb + 1, n = tn[i];
      if (tall[i]) {
        select_every_block(out, nb, a.k_max, lane, 32);
        continue;
      }
      const float* S = lg + int64_t(i) * G * ns;
      auto score = [&](int j) { return S[j]; };
      auto window = [&](int j) { return ts.e_smem ? E[j] : window_score(j); };
      auto pool = [&](int b, float& vs, float& ve) {
        pool_block(p, b, m, n, qb, nosa, score, window, vs, ve);
      };
      // kScreen: the scores' bounds are in the second head's row.
      auto bounded = [&](int b, float& vs, float& ve) {
        pool_block(p, b, m, n, qb, true, score, [&](int j) { return S[ns + j]; }, vs, ve);
      };
      select_token<kScreen>(a, qb, pool, bounded, ks, ke, out, uncertain);
    }
    __syncthreads();  // the next sequence's window scores replace these
    s0 = s1;
  }
  if (kScreen && tid == 0 && *uncertain) redo[1 + atomicAdd(redo, 1)] = tile * H + h;
}

// The top-k stages of the (token, KV head) pairs whose pooled query-aware scores tile_select
// wrote to pooled ([T][H][nb_max]): one warp per pair, the eviction scores pooled here, the same
// selection as the tile kernel's own (select_token). Tokens that take every block were written by
// the tile kernel. Dynamic shared memory: each warp's two nb_max order-key arrays. Selecting in
// the tile kernel left its other warps waiting at a barrier for the one that selected (17% of
// the exact kernel's stall samples; an 8b-like tile holds one token). The screened kernels still
// select inside (34% of the screened kernel's stall samples at that barrier).
// Apart, on an H200 (16K-token prompt, two layers with the warm-up): 8b-like 10.32 ms ->
// 8.74 + 0.33, 1b-like 5.27 -> 4.49 + 0.33; prefill 16 x 16K +2.4% and +2.9%.
//
// kScreen (screened tiles, tile_tokens tokens a tile): the choice certified against the pooled
// bounds (pooled's second half); a pair that is not certified flags its tile (flags[tile * H +
// KV head]) and appends it once to redo. The exact pass after the exact tile kernel has redone
// those tiles (with flags): only the flagged tiles' pairs.
template <bool kScreen>
__global__ void __launch_bounds__(k_tile_threads)
    pooled_topk(SelectArgs a, const float* pooled, int tile_tokens, int* redo, int* flags) {
  extern __shared__ uint32_t topk_keys[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32;
  const KvView& kv = a.kv;
  const SparseView& p = a.p;
  const int H = kv.n_kv_heads, m = kv.keys_per_block;
  const int64_t pair = int64_t(blockIdx.x) * warps + warp;
  if (pair >= int64_t(a.step.n_tokens) * H) return;
  const int t = int(pair / H), h = int(pair % H), item = t / tile_tokens * H + h;
  const TokenSel s = token_sel(a, t);
  if (s.all || (!kScreen && flags && !flags[item])) return;
  const bool nosa = a.mode == SelectMode::nosa;
  const int32_t* table = a.step.block_table + int64_t(a.step.token_seq[t]) * a.step.bt_stride;
  const float* ps = pooled + pair * a.nb_max;
  auto none = [](int) { return 0.0f; };
  auto window = [&](int j) {
    return kv.ck_scores[kv_chunk(kv, table[j / m], a.layer, h) * m + j % m];
  };
  auto pool = [&](int b, float& vs, float& ve) {
    float unused;
    vs = ps[b];
    ve = 0.0f;
    if (nosa) pool_block(p, b, m, s.n, s.qb, true, none, window, unused, ve);
  };
  uint32_t* ks = topk_keys + size_t(warp) * 2 * a.nb_max;
  const float* pe = pooled + int64_t(a.step.n_tokens) * H * a.nb_max + pair * a.nb_max;
  auto bounded = [&](int b, float& vs, float& ve) {
    vs = ps[b];
    ve = pe[b];
  };
  int uncertain = 0;
  select_token<kScreen>(a, s.qb, pool, bounded, ks, ks + a.nb_max, a.out + pair * a.k_max,
                        &uncertain);
  if (kScreen && uncertain && threadIdx.x % 32 == 0 && atomicExch(flags + item, 1) == 0)
    redo[1 + atomicAdd(redo, 1)] = item;
}

// Whether a tiled step's pooled scores (and with screen their bounds) fit the scratch budget
// (pooled_topk).
bool pooled_fits(const TileShape& s, int n_kv_heads, int nb_max, int n_tokens, bool screen) {
  const size_t per = size_t(n_tokens) * n_kv_heads * size_t(std::max(nb_max, 1));
  return s.ok && s.lg_smem && (screen ? 2 : 1) * per <= k_scratch_budget_floats &&
         2 * sizeof(uint32_t) * size_t(std::max(nb_max, 1)) <= max_shared_bytes();
}

// The scratch of a tiled step: with screening, the list of tiles to redo (a count, then up to
// every (tile, KV head)); with pooled scores, those (and with screening, the tiles' flags before
// them and the bounds after them); else, where the logits do not fit in shared memory, theirs.
struct TileScratch {
  bool screen = false, pooled = false;
  size_t redo = 0, flags = 0, scores = 0, total = 0;  // offsets in floats, and the size
};

TileScratch tile_scratch(const TileShape& s, int n_kv_heads, int group, int nb_max, int n_tokens,
                         bool screen, bool pooled) {
  TileScratch l;
  const size_t tiles = s.ok ? (size_t(n_tokens) + s.tokens - 1) / s.tokens : 0;
  l.screen = screen && screen_fits(s, group);
  l.pooled = pooled && pooled_fits(s, n_kv_heads, nb_max, n_tokens, l.screen);
  size_t at = 0;
  if (l.screen) {
    l.redo = at;
    at += 1 + tiles * n_kv_heads;
    if (l.pooled) {
      l.flags = at;
      at += tiles * n_kv_heads;
    }
  }
  if (l.pooled) {
    l.scores = at;
    at += (l.screen ? 2 : 1) * size_t(n_tokens) * n_kv_heads * nb_max;
  }
  l.total = at;
  if (!l.screen && !l.pooled) l.total = tile_scratch_floats(s, n_kv_heads, n_tokens);
  return l;
}

template <int D, int RI>
cudaError_t launch_tiles(const SelectArgs& a, const TileShape& ts, cudaStream_t stream) {
  const int T = a.step.n_tokens, H = a.kv.n_kv_heads;
  // Two blocks per multiprocessor need all of its shared memory.
  if (const cudaError_t e = allow_shared<tile_select<D, RI, false>>(ts.smem, true);
      e != cudaSuccess)
    return e;
  const int tiles = (T + ts.tokens - 1) / ts.tokens;
  const TileScratch l = tile_scratch(ts, H, a.group, a.nb_max, T, screens(a, ts), a.pooled_topk);
  if ((l.screen || l.pooled) && (!a.scratch || a.scratch_floats < l.total))
    return cudaErrorInvalidValue;
  int* redo = reinterpret_cast<int*>(a.scratch + l.redo);
  int* flags = reinterpret_cast<int*>(a.scratch + l.flags);
  float* pooled = l.pooled ? a.scratch + l.scores : nullptr;
  // pooled_topk: one warp per (token, KV head), as many warps per block as their keys fit.
  const size_t per_warp = 2 * sizeof(uint32_t) * size_t(std::max(a.nb_max, 1));
  const int warps = int(std::clamp<size_t>(max_shared_bytes() / per_warp, 1, k_tile_warps));
  const int topk_blocks = int((int64_t(T) * H + warps - 1) / warps);
  if (l.pooled) {
    if (const cudaError_t e = allow_shared<pooled_topk<false>>(warps * per_warp); e != cudaSuccess)
      return e;
  }
  if constexpr (RI >= 2) {
    if (l.screen) {
      // The screened kernel (with pooled scores, then its top-k), then the exact one on the tiles
      // it could not certify (with pooled scores, then their top-k).
      if (const cudaError_t e = allow_shared<tile_select<D, RI, true>>(ts.smem, true);
          e != cudaSuccess)
        return e;
      if (const cudaError_t e = cudaMemsetAsync(redo, 0, sizeof(int), stream); e != cudaSuccess)
        return e;
      tile_select<D, RI, true>
          <<<dim3(tiles, H), k_tile_threads, ts.smem, stream>>>(a, ts, 0, redo, pooled);
      if (l.pooled) {
        if (const cudaError_t e = allow_shared<pooled_topk<true>>(warps * per_warp);
            e != cudaSuccess)
          return e;
        const size_t flag_bytes = sizeof(int) * size_t(tiles) * H;
        if (const cudaError_t e = cudaMemsetAsync(flags, 0, flag_bytes, stream); e != cudaSuccess)
          return e;
        pooled_topk<true><<<topk_blocks, 32 * warps, warps * per_warp, stream>>>(
            a, pooled, ts.tokens, redo, flags);
      }
      tile_select<D, RI, false>
          <<<dim3(tiles * H, 1), k_tile_threads, ts.smem, stream>>>(a, ts, 0, redo, pooled);
      if (l.pooled)
        pooled_topk<false><<<topk_blocks, 32 * warps, warps * per_warp, stream>>>(
            a, pooled, ts.tokens, nullptr, flags);
      return cudaGetLastError();
    }
  }
  if (l.pooled) {
    // The tile kernel pools, then pooled_topk selects.
    tile_select<D, RI, false>
        <<<dim3(tiles, H), k_tile_threads, ts.smem, stream>>>(a, ts, 0, nullptr, pooled);
    pooled_topk<false><<<topk_blocks, 32 * warps, warps * per_warp, stream>>>(
        a, pooled, ts.tokens, nullptr, nullptr);
    return cudaGetLastError();
  }
  int chunk = tiles;
  if (!ts.lg_smem) {
    const size_t per_tile = size_t(H) * ts.rows * ts.lg_stride;
    if (!a.scratch) return cudaErrorInvalidValue;
    chunk = int(std::min<size_t>(a.scratch_floats / per_tile, size_t(tiles)));
    if (chunk < 1) return cudaErrorInvalidValue;
  }
  for (int t0 = 0; t0 < tiles; t0 += chunk) {
    const int count = std::min(chunk, tiles - t0);
    tile_select<D, RI, false>
        <<<dim3(count, H), k_tile_threads, ts.smem, stream>>>(a, ts, t0, nullptr, nullptr);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <int D>
cudaError_t launch_tiled(const SelectArgs& a, cudaStream_t stream) {
  const TileShape ts = tile_shape(a.group, D, a.n_max, a.nb_max);
  if (!ts.ok) return cudaErrorInvalidValue;
  switch (ts.rows_per_thread) {
    case 4: return launch_tiles<D, 4>(a, ts, stream);
    case 2: return launch_tiles<D, 2>(a, ts, stream);
    default: return launch_tiles<D, 1>(a, ts, stream);
  }
}

}  // namespace

SelectPath select_path(SelectPath requested, int n_kv_heads, int group, int head_dim,
                       int keys_per_block, int n_max, int nb_max, int n_tokens) {
  if (requested == SelectPath::per_token) return SelectPath::per_token;
  const bool tile_fits = tile_shape(group, head_dim, n_max, nb_max).ok;
  if (requested == SelectPath::tiled) return tile_fits ? SelectPath::tiled : SelectPath::per_token;
  if (split_fits(n_kv_heads, group, head_dim, keys_per_block, n_max, nb_max, n_tokens))
    return SelectPath::split;
  return tile_fits ? SelectPath::tiled : SelectPath::per_token;
}

size_t select_scratch_floats(SelectPath path, int n_kv_heads, int group, int head_dim,
                             int keys_per_block, int n_max, int nb_max, int n_tokens, bool screen,
                             bool pooled_topk) {
  if (path == SelectPath::split)
    return split_layout(n_tokens, n_kv_heads, group, keys_per_block, n_max, nb_max).total;
  if (path == SelectPath::tiled)
    return tile_scratch(tile_shape(group, head_dim, n_max, nb_max), n_kv_heads, group, nb_max,
                        n_tokens, screen, pooled_topk)
        .total;
  if (shared_bytes(group, head_dim, n_max, nb_max, true) <= lg_smem_limit()) return 0;
  const size_t per_token = size_t(n_kv_heads) * group * size_t(n_max > 0 ? n_max : 1);
  size_t tokens = k_scratch_budget_floats / per_token;
  if (tokens < 1) tokens = 1;
  if (tokens > size_t(n_tokens)) tokens = size_t(n_tokens);
  return tokens * per_token;
}

bool per_token_fits(int group, int head_dim, int n_max, int nb_max) {
  return shared_bytes(group, head_dim, n_max, nb_max, false) <= max_shared_bytes();
}

int screened_tiles(const SelectArgs& a) {
  if (a.path != SelectPath::tiled) return 0;
  const TileShape ts = tile_shape(a.group, a.kv.head_dim, a.n_max, a.nb_max);
  if (!screens(a, ts)) return 0;
  return (a.step.n_tokens + ts.tokens - 1) / ts.tokens * a.kv.n_kv_heads;
}

cudaError_t launch_block_select(const SelectArgs& a, cudaStream_t stream) {
  if (a.step.n_tokens == 0) return cudaSuccess;
  const SelectPath path = a.path;
  switch (a.kv.head_dim) {
    case 64:
      return path == SelectPath::split   ? launch_split<64>(a, stream)
             : path == SelectPath::tiled ? launch_tiled<64>(a, stream)
                                         : launch<64>(a, stream);
    case 128:
      return path == SelectPath::split   ? launch_split<128>(a, stream)
             : path == SelectPath::tiled ? launch_tiled<128>(a, stream)
                                         : launch<128>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace nosa::attention::cuda
