// Prefill attention with Hopper's warpgroup MMA (wgmma, sm_90a): sparse_prefill.cu's kernel
// (dense, or over the tile's selected blocks, with or without the bias) for head_dim 128 and
// blocks of a multiple of 64 keys. A thread block takes a tile of 128 query rows ((token, head)
// pairs, as prefill_kernel) with two warpgroups of 64 rows and walks the tile's block list
// (prefill_blocks.cuh: the union of its tokens' selections, every block when dense); a
// warpgroup skips a stage none of its tokens selected or that lies after them all, and masks
// keys per row (the row token's own selection and causality) only in stages that some of its
// tokens do not fully see. Each 64-key stage's keys and values come into shared memory by
// cp.async in the 128-byte swizzled layout the descriptors name (16-byte chunk j of row r at
// chunk j ^ (r & 7) of its 1024-byte atom), S = Q K^T is eight m64n64k16 products from shared
// memory, and O += P V four m64n128k16 products with P from registers (the S accumulators'
// layout is mma.sync's, so P packs as prefill_kernel's does). Built only for sm_90a (its own
// library); launch_sparse_prefill takes it on sm_90 GPUs where it fits and is asked for
// (PrefillArgs::wgmma, from NOSA_PREFILL_WGMMA; force_prefill_wgmma in tests).
#include <climits>

#include "attention/cuda/device_common.cuh"
#include "attention/cuda/prefill_blocks.cuh"
#include "attention/cuda/prefill_wgmma.cuh"

namespace nosa::attention::cuda {

namespace {

constexpr int k_wg_threads = 256;  // two warpgroups
constexpr int k_wg_rows = 128;     // a tile's rows, as prefill_kernel's
constexpr int k_wg_keys = 64;      // keys per stage
constexpr int k_wg_d = 128;
// Shared memory (after aligning its start to 1024 bytes): Q [2 column halves][128 rows][128 B],
// then the stage buffers of K [2][64][128 B] and V [2][64][128 B], each buffer's 64 eviction
// scores (float), then the tile's block list (prefill_blocks.cuh: 16 bytes a block).
constexpr int k_q_half = k_wg_rows * 128;     // 16 KB
constexpr int k_kv_half = k_wg_keys * 128;    // 8 KB
constexpr int k_q_bytes = 2 * k_q_half;       // 32 KB
constexpr int k_stage_bytes = 4 * k_kv_half;  // K and V: 32 KB
// Stage buffers: two, or three for the pipelined loop (a stage's values are still read by its
// P V product while the next stage's keys are multiplied and the one after loads).
__host__ __device__ constexpr int wg_stages(bool pipelined) { return pipelined ? 3 : 2; }
constexpr int wg_fixed_smem(bool pipelined) {
  return 1024 + k_q_bytes + wg_stages(pipelined) * (k_stage_bytes + k_wg_keys * 4);
}
size_t wg_smem(bool pipelined, int nb_max) {
  return size_t(wg_fixed_smem(pipelined)) + size_t(nb_max) * (8 + 4 + 4);
}

// Where the 16-byte chunk j (0..15: dimensions 8 j..8 j + 7) of row r goes in a swizzled
// operand whose halves (dimensions 0..63, 64..127) are `half` bytes apart.
__device__ __forceinline__ uint32_t swizzled(int r, int j, int half) {
  return (j >> 3) * half + r * 128 + (((j & 7) ^ (r & 7)) << 4);
}

// A shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets (in 16-byte units).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared-memory writes of the generic proxy (cp.async) seen by the async proxy (wgmma).
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Ties the accumulators to the point after a wgmma wait: the compiler must not read (or move)
// registers an asynchronous wgmma is still writing.
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// S (+)= Q K^T for a warpgroup: m64n64k16, both operands in shared memory (descriptors),
// K-major; scale_d 0 starts the accumulators from zero.
__device__ __forceinline__ void wgmma_qk(float (&d)[32], uint64_t a, uint64_t b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(scale_d));
}

// O += P V for a warpgroup: m64n128k16, P from registers (the S accumulators' layout, as bf16),
// V in shared memory keys by dimensions (MN-major for this product: the transposed operand).
__device__ __forceinline__ void wgmma_pv(float (&d)[64], const uint32_t (&a)[4], uint64_t b,
                                         int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));
}

// The A fragments' registers (P), tied like the accumulators: an asynchronous wgmma reads them
// until its wait.
__device__ __forceinline__ void reg_fence(uint32_t (&r)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// A warpgroup's S = Q K^T for one stage: eight k16 steps over the two 64-dimension halves of Q
// (its 64 rows) and K (the stage's 64 keys), both K-major. keep: the first step adds to sc (the
// bias, stage_bias) instead of starting from zero.
__device__ __forceinline__ void issue_qk(float (&sc)[32], uint32_t q_wg, uint32_t ks, int keep) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const uint32_t qa = q_wg + (k >> 2) * k_q_half + (k & 3) * 32;
    const uint32_t ka = ks + (k >> 2) * k_kv_half + (k & 3) * 32;
    wgmma_qk(sc, sw128_desc(qa, 16, 1024), sw128_desc(ka, 16, 1024), k > 0 ? 1 : keep);
  }
}

// The stage's eviction scores as the S accumulators' start, divided by the scale: S * scale is
// then the logit with its bias, and the softmax is the same with or without it (as
// prefill_kernel's warp_scores).
__device__ __forceinline__ void stage_bias(float (&sc)[32], const float* bias, int t4,
                                           float inv_scale) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const float2 b = *reinterpret_cast<const float2*>(bias + nt * 8 + 2 * t4);
    sc[nt * 4 + 0] = sc[nt * 4 + 2] = b.x * inv_scale;
    sc[nt * 4 + 1] = sc[nt * 4 + 3] = b.y * inv_scale;
  }
}

// O += P V for one stage: four k16 steps of 16 keys; V N-major (halves 8 KB apart along the
// dimensions, 8-key groups 1 KB apart).
__device__ __forceinline__ void issue_pv(float (&o)[64], const uint32_t (&p)[4][4], uint32_t vs) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_pv(o, p[kk], sw128_desc(vs + kk * 2048, k_kv_half, 1024), 1);
}

// One stage's online softmax on a thread's S values (rows g and g + 8 of its warp), in place:
// keys key0.. after a row's limit masked (its position, or -1 where its token did not select the
// stage's block; unless the whole stage is visible to every row), the new
// row maxima m, the factor alpha the output so far must be scaled by, l scaled and increased,
// and sc the exponentials. pack_p then packs them as the P V product's A fragments.
__device__ __forceinline__ void stage_softmax(float (&sc)[32], int key0, bool full, int t4,
                                              const int (&row_pos)[2], float scale_log2,
                                              float (&m)[2], float (&l)[2], float (&alpha)[2]) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int half = i >> 1, kpos = key0 + nt * 8 + 2 * t4 + (i & 1);
      float x = sc[nt * 4 + i];
      if (!full && kpos > row_pos[half]) x = -INFINITY;
      sc[nt * 4 + i] = x;
      mx[half] = fmaxf(mx[half], x);
    }
  float neg_m[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float v = mx[half];
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    const float m_new = fmaxf(m[half], v);
    // A row with nothing visible so far keeps m = -inf; exponents then use 0 (no NaN).
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    alpha[half] = fast_exp2((m[half] - m_use) * scale_log2);
    m[half] = m_new;
    neg_m[half] = -m_use * scale_log2;
    l[half] *= alpha[half];
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float e = fast_exp2(fmaf(sc[nt * 4 + i], scale_log2, neg_m[i >> 1]));
      sc[nt * 4 + i] = e;
      l[i >> 1] += e;
    }
}

// The exponentials as bf16 A fragments (mma.sync's layout, as the accumulators').
__device__ __forceinline__ void pack_p(const float (&sc)[32], uint32_t (&p)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    p[kk][0] = pack_bf16(sc[(2 * kk) * 4 + 0], sc[(2 * kk) * 4 + 1]);
    p[kk][1] = pack_bf16(sc[(2 * kk) * 4 + 2], sc[(2 * kk) * 4 + 3]);
    p[kk][2] = pack_bf16(sc[(2 * kk + 1) * 4 + 0], sc[(2 * kk + 1) * 4 + 1]);
    p[kk][3] = pack_bf16(sc[(2 * kk + 1) * 4 + 2], sc[(2 * kk + 1) * 4 + 3]);
  }
}

__device__ __forceinline__ void rescale(float (&o)[64], const float (&alpha)[2]) {
#pragma unroll
  for (int dn = 0; dn < 16; ++dn)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[dn * 4 + i] *= alpha[i >> 1];
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NOSA_WGMMA_BODY 1
#endif

// grid (n_tiles * H), 256 threads; row r of a tile = token r / group, head r % group. Blocks:
// thread blocks meant to share a multiprocessor (2 caps the registers at 128 a thread).
// Pipelined: each stage's S = Q K^T is issued with the stage before's P V product and its
// softmax runs while that product does (three stage buffers, one block per multiprocessor).
// Bias: the eviction scores added to the logits (NOSA).
template <int Blocks, bool Pipelined, bool Bias>
__global__ void __launch_bounds__(k_wg_threads, Blocks) wgmma_prefill_kernel(PrefillArgs a) {
  constexpr int NB = wg_stages(Pipelined);
#ifdef NOSA_WGMMA_BODY
  extern __shared__ unsigned char smem_raw[];
  __shared__ int tok_pos[64];
  __shared__ int warp_count[k_wg_threads / 32];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t q_s = base, kv_s = base + k_q_bytes;
  float* bias_s = reinterpret_cast<float*>(smem_raw + (base - smem_u32(smem_raw)) + k_q_bytes +
                                           NB * k_stage_bytes);  // [NB][64]
  uint64_t* umask = reinterpret_cast<uint64_t*>(bias_s + NB * k_wg_keys);  // [nb_max]
  int* ulist = reinterpret_cast<int*>(umask + a.nb_max);                  // [nb_max]
  int* uchunk = ulist + a.nb_max;                                         // [nb_max]
  const KvView& kv = a.kv;
  const int H = kv.n_kv_heads, G = a.group, bs = kv.block_size;
  const int tile_index = a.n_tiles - 1 - int(blockIdx.x) / H;
  const int h = int(blockIdx.x) % H;
  const PrefillTile tile = a.tiles[tile_index];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
  const int32_t* table = a.step.block_table + int64_t(tile.seq) * a.step.bt_stride;
  const bf16* kbase = static_cast<const bf16*>(kv.kv);
  const int64_t chunk_elems = int64_t(2) * bs * k_wg_d;

  // The tile's queries (zero past its tokens): one cp.async group, the oldest.
  const bf16* q = static_cast<const bf16*>(a.q);
  for (int i = tid; i < k_wg_rows * 16; i += k_wg_threads) {
    const int r = i / 16, j = i % 16, ti = r / G;
    const bool valid = ti < tile.count;
    const bf16* src =
        valid ? q + ((int64_t(tile.first + ti) * H + h) * G + r % G) * k_wg_d + j * 8 : q;
    cp_async16_or_zero(q_s + swizzled(r, j, k_q_half), src, valid);
  }
  cp_async_commit();
  for (int i = tid; i < tile.count; i += k_wg_threads)
    tok_pos[i] = a.step.positions[tile.first + i];
  __syncthreads();
  int tile_max_pos = -1;
  for (int i = 0; i < tile.count; ++i) tile_max_pos = max(tile_max_pos, tok_pos[i]);
  const int n_entries = tile_block_list<k_wg_threads>(a, tile, h, tile_max_pos / bs + 1, table,
                                                      umask, ulist, uchunk, warp_count);
  // Stage s: keys 64 (s % per_block).. of entry s / per_block's block.
  const int per_block = bs / k_wg_keys, n_stages = n_entries * per_block;

  // Stage s's keys and values (and with the bias its eviction scores) into buffer s % NB: four
  // 16-byte chunks of each per thread.
  auto issue = [&](int s) {
    if (s < n_stages) {
      const int e = s / per_block, w0 = (s - e * per_block) * k_wg_keys;
      const bf16* kp = kbase + int64_t(uchunk[e]) * chunk_elems + int64_t(w0) * k_wg_d;
      const bf16* vp = kp + int64_t(bs) * k_wg_d;
      const uint32_t dk = kv_s + (s % NB) * k_stage_bytes, dv = dk + 2 * k_kv_half;
#pragma unroll
      for (int it = 0; it < 4; ++it) {
        const int i = it * k_wg_threads + tid, r = i / 16, j = i % 16;
        cp_async16_u32(dk + swizzled(r, j, k_kv_half), kp + r * k_wg_d + j * 8);
        cp_async16_u32(dv + swizzled(r, j, k_kv_half), vp + r * k_wg_d + j * 8);
      }
      if (Bias && tid < k_wg_keys / 4)
        cp_async16_u32(smem_u32(bias_s + (s % NB) * k_wg_keys + 4 * tid),
                       kv.bias + int64_t(uchunk[e]) * bs + w0 + 4 * tid);
    }
    cp_async_commit();
  };
  issue(0);

  // This thread's rows: 16 per warp, rows g and g + 8 of them; their tokens (0 past the tile's:
  // those rows see no key in masked stages, and in stages that need no mask accumulate from
  // their zero queries, never stored).
  const int row0 = wg * 64 + (warp % 4) * 16 + lane / 4;
  int row_pos[2], row_tok[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int ti = (row0 + 8 * half) / G;
    row_tok[half] = ti < tile.count ? ti : 0;
    row_pos[half] = ti < tile.count ? tok_pos[ti] : -1;
  }
  // The warpgroup's tokens (bits) and their smallest and largest positions: stages none of them
  // selected or past the largest are skipped, stages they all selected wholly at or before the
  // smallest need no mask.
  uint64_t wg_bits = 0;
  int wg_min = INT_MAX, wg_max = -1;
  for (int ti = (wg * 64) / G; ti <= min(tile.count - 1, (wg * 64 + 63) / G); ++ti) {
    wg_bits |= 1ull << ti;
    wg_min = min(wg_min, tok_pos[ti]);
    wg_max = max(wg_max, tok_pos[ti]);
  }

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float scale_log2 = a.scale * k_log2e, inv_scale = 1.0f / a.scale;
  const int t4 = lane % 4;
  // Stage s for this warpgroup: its first key's position, whether it attends at all, whether
  // every row sees every key, and each row's limit (its position, -1 where its token did not
  // select the block).
  struct StageView {
    int key0;
    bool attend, full;
    int lim[2];
  };
  auto stage_view = [&](int s) {
    StageView v;
    const int e = s / per_block;
    const uint64_t mk = umask[e];
    v.key0 = ulist[e] * bs + (s - e * per_block) * k_wg_keys;
    v.attend = (mk & wg_bits) != 0 && v.key0 <= wg_max;
    v.full = (mk & wg_bits) == wg_bits && v.key0 + k_wg_keys - 1 <= wg_min;
#pragma unroll
    for (int half = 0; half < 2; ++half)
      v.lim[half] = (mk >> row_tok[half]) & 1 ? row_pos[half] : -1;
    return v;
  };

  const uint32_t q_wg = q_s + wg * 64 * 128;  // the warpgroup's 64 rows of Q
  float sc[32], alpha[2];
  uint32_t p[4][4];
  if constexpr (!Pipelined) {
    for (int s = 0; s < n_stages; ++s) {
      cp_async_wait<0>();
      fence_async_shared();
      __syncthreads();  // stage s (and the queries) landed for all; stage s - 1's buffer is free
      issue(s + 1);
      const StageView sv = stage_view(s);
      if (!sv.attend) continue;
      const uint32_t ks = kv_s + (s % NB) * k_stage_bytes, vs = ks + 2 * k_kv_half;
      if (Bias) stage_bias(sc, bias_s + (s % NB) * k_wg_keys, t4, inv_scale);
      wgmma_fence();
      issue_qk(sc, q_wg, ks, Bias ? 1 : 0);
      wgmma_commit();
      wgmma_wait<0>();
      reg_fence(sc);
      stage_softmax(sc, sv.key0, sv.full, t4, sv.lim, scale_log2, m, l, alpha);
      pack_p(sc, p);
      rescale(o, alpha);
      wgmma_fence();
      issue_pv(o, p, vs);
      wgmma_commit();
      wgmma_wait<0>();
      reg_fence(o);
      reg_fence(p);
    }
  } else {
    // p holds the stage before's P while `pending`: its P V product is issued with this stage's
    // Q K^T, and waited for before the output is rescaled by this stage's maxima and p takes
    // this stage's P.
    bool pending = false;
    int pending_vs = 0;
    // The warpgroup's last stage's P V, alone.
    auto finish_pending = [&] {
      if (!pending) return;
      wgmma_fence();
      issue_pv(o, p, uint32_t(pending_vs));
      wgmma_commit();
      wgmma_wait<0>();
      reg_fence(o);
      reg_fence(p);
      pending = false;
    };
    for (int s = 0; s < n_stages; ++s) {
      cp_async_wait<0>();
      fence_async_shared();
      // Stage s landed for all, and every warpgroup is past stage s - 2's P V product (waited
      // for in iteration s - 1): its buffer, (s + 1) % 3, takes stage s + 1. Stage s - 1's
      // values stay for the P V product issued in this iteration.
      __syncthreads();
      issue(s + 1);
      const StageView sv = stage_view(s);
      if (!sv.attend) {
        finish_pending();
        continue;
      }
      const uint32_t ks = kv_s + (s % NB) * k_stage_bytes, vs = ks + 2 * k_kv_half;
      // The products are issued the same way at every stage: the first one's P V is of zeros
      // with its own values (adding nothing). Branching around them made ptxas serialize every
      // wgmma (its warning C7520), so nothing overlapped.
      if (!pending) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int j = 0; j < 4; ++j) p[kk][j] = 0u;
        pending_vs = int(vs);
      }
      if (Bias) stage_bias(sc, bias_s + (s % NB) * k_wg_keys, t4, inv_scale);
      wgmma_fence();
      issue_qk(sc, q_wg, ks, Bias ? 1 : 0);
      wgmma_commit();
      issue_pv(o, p, uint32_t(pending_vs));
      wgmma_commit();
      wgmma_wait<1>();  // Q K^T done; the P V product may still run
      reg_fence(sc);
      // The exponentials go to sc: nothing the P V product in flight reads or writes, so they
      // run beside it; P is packed over its registers only after the wait.
      stage_softmax(sc, sv.key0, sv.full, t4, sv.lim, scale_log2, m, l, alpha);
      wgmma_wait<0>();
      reg_fence(o);
      reg_fence(p);
      rescale(o, alpha);
      pack_p(sc, p);
      pending = true;
      pending_vs = int(vs);
    }
    finish_pending();
  }
  cp_async_wait<0>();

  bf16* out = static_cast<bf16*>(a.out);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float lt = l[half];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    const int r = row0 + 8 * half, ti = r / G;
    if (ti >= tile.count) continue;
    const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
    bf16* dst = out + ((int64_t(tile.first + ti) * H + h) * G + r % G) * k_wg_d;
#pragma unroll
    for (int dn = 0; dn < 16; ++dn) {
      const int c = dn * 8 + 2 * t4;
      *reinterpret_cast<__nv_bfloat162*>(dst + c) =
          __floats2bfloat162_rn(o[dn * 4 + 2 * half] * inv, o[dn * 4 + 2 * half + 1] * inv);
    }
  }
#else
  __trap();  // built without sm_90a code: launch_sparse_prefill never takes this kernel there
#endif
}

}  // namespace

// The kernel's static shared memory (tok_pos, warp_count), which counts against the same
// per-block limit as the dynamic part.
constexpr size_t k_wg_static_smem = (64 + k_wg_threads / 32) * sizeof(int);

bool prefill_wgmma_fits(const PrefillArgs& a) {
  // The block list grows with the context: past the device's shared memory (about 6000 blocks
  // on Hopper) the mma.sync kernel, whose stages take less, is left.
  return a.kv.head_dim == k_wg_d && a.kv.block_size > 0 && a.kv.block_size % k_wg_keys == 0 &&
         a.group >= 1 && a.group <= k_wg_rows && (!a.use_bias || a.kv.bias) &&
         wg_smem(true, a.nb_max) + k_wg_static_smem <= max_shared_bytes();
}

template <int Blocks, bool Pipelined, bool Bias>
cudaError_t launch_variant(const PrefillArgs& a, cudaStream_t stream) {
  const size_t smem = wg_smem(Pipelined, a.nb_max);
  if (const cudaError_t e =
          allow_shared<wgmma_prefill_kernel<Blocks, Pipelined, Bias>>(smem, true);
      e != cudaSuccess)
    return e;
  wgmma_prefill_kernel<Blocks, Pipelined, Bias>
      <<<unsigned(a.n_tiles) * unsigned(a.kv.n_kv_heads), k_wg_threads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <int Blocks, bool Pipelined>
cudaError_t launch_variant(const PrefillArgs& a, cudaStream_t stream) {
  return a.use_bias ? launch_variant<Blocks, Pipelined, true>(a, stream)
                    : launch_variant<Blocks, Pipelined, false>(a, stream);
}

cudaError_t launch_prefill_wgmma(const PrefillArgs& a, int variant, cudaStream_t stream) {
  if (!prefill_wgmma_fits(a)) return cudaErrorInvalidValue;
  switch (variant) {
    case 1:
      return launch_variant<1, false>(a, stream);
    case 2:
      return launch_variant<2, false>(a, stream);
    case 3:
      return launch_variant<1, true>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace nosa::attention::cuda
