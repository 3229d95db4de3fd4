// The prefill attention kernel. Its building blocks are its own (not attention_tile.cuh's, which
// the decode kernel keeps): a warp here owns 32 query rows, two m16 tiles, so that every K and V
// fragment read from shared memory feeds two MMAs; a 16-row warp is bound by shared-memory
// bandwidth, not by the tensor cores.
#include <algorithm>
#include <climits>

#include "attention/cuda/device_common.cuh"
#include "attention/cuda/sparse_prefill.cuh"

namespace nosa::attention::cuda {

namespace {

constexpr int k_warps = 4;
constexpr int k_threads = 32 * k_warps;
constexpr int k_warp_rows = 32;                // two m16 tiles
constexpr int k_rows = k_warps * k_warp_rows;  // rows of a tile
constexpr int k_max_tile_tokens = 64;          // one bit per token in the key masks
constexpr int k_keys = 64;                     // keys per stage
constexpr int k_no_key = INT_MAX;              // position of a key past the list's end
constexpr float k_log2e = 1.4426950408889634f;

// Shared memory: the tile's Q rows, one stage of keys and one of values (the values of a stage
// load while its keys are multiplied, the next keys while its values are), the stage's per-key
// data, then the tile's block list. About 70 KB with D = 128, so that two tiles share an SM
// (their registers fill it) and the block list of long prompts still fits beside them.
template <int D>
struct PrefillLayout {
  static constexpr int lds = D + 8;  // padded row (elements): conflict-free ldmatrix
  static constexpr int q_bytes = k_rows * lds * 2;
  static constexpr int kv_bytes = k_keys * lds * 2;
  static constexpr int k_offset = q_bytes;
  static constexpr int v_offset = k_offset + kv_bytes;
  // Per key: eviction score (f32), position (i32), mask of the tile tokens that selected it (u64).
  static constexpr int bias_offset = v_offset + kv_bytes;
  static constexpr int pos_offset = bias_offset + k_keys * 4;
  static constexpr int mask_offset = pos_offset + k_keys * 4;
  static constexpr int fixed_bytes = mask_offset + k_keys * 8;
};

// The views of a tile's shared memory.
template <int D>
struct PrefillSmem {
  bf16* q;
  bf16* k;
  bf16* v;
  float* bias;     // [64] the stage's keys' eviction scores (loaded only with the bias)
  int* pos;        // [64] the stage's key positions (k_no_key past the end)
  uint64_t* mask;  // [64] which tile tokens selected each key's block
  __device__ explicit PrefillSmem(unsigned char* base) {
    using L = PrefillLayout<D>;
    q = reinterpret_cast<bf16*>(base);
    k = reinterpret_cast<bf16*>(base + L::k_offset);
    v = reinterpret_cast<bf16*>(base + L::v_offset);
    bias = reinterpret_cast<float*>(base + L::bias_offset);
    pos = reinterpret_cast<int*>(base + L::pos_offset);
    mask = reinterpret_cast<uint64_t*>(base + L::mask_offset);
  }
};

__device__ __forceinline__ void cp_async16_or_zero(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
}

// ldmatrix on 32-bit shared-memory addresses: the kernel keeps its addresses in 32 bits, which
// leaves the registers to the accumulators.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Issues the cp.async loads of one half (K or V rows) of stage s: keys [64 s, 64 s + 64) of the
// tile's block list laid end to end, zero-filled past the list's end. half_offset: 0 for keys,
// block_size * D for values (a chunk holds its keys, then its values).
template <int D>
__device__ __forceinline__ void load_rows(bf16* dst, const KvView& kv, int s, int total_keys,
                                          int64_t half_offset, const int* uchunk) {
  constexpr int segs = D / 8, lds = PrefillLayout<D>::lds;
  const int bs = kv.block_size;
  const bf16* base = static_cast<const bf16*>(kv.kv) + half_offset;
  const int c = threadIdx.x % segs;
#pragma unroll
  for (int r = threadIdx.x / segs; r < k_keys; r += k_threads / segs) {
    const int kk = s * k_keys + r;
    const bool valid = kk < total_keys;
    int64_t off = 0;
    if (valid) {
      const int e = kk / bs;
      off = (int64_t(uchunk[e]) * 2 * bs + (kk - e * bs)) * D + c * 8;
    }
    cp_async16_or_zero(dst + r * lds + c * 8, base + off, valid);
  }
}

// The per-key data of stage s: the eviction scores (cp.async, with the bias), positions and token
// masks (plain stores).
template <int D>
__device__ __forceinline__ void load_key_data(const PrefillSmem<D>& sm, const KvView& kv, int s,
                                              int total_keys, bool use_bias, const int* uchunk,
                                              const int* ulist, const uint64_t* umask) {
  const int bs = kv.block_size;
  if (use_bias && threadIdx.x < k_keys / 4) {
    // Four keys at a time: block sizes are multiples of 16, so a group never spans two blocks.
    const int kk = s * k_keys + 4 * threadIdx.x;
    const bool valid = kk < total_keys;
    int64_t off = 0;
    if (valid) {
      const int e = kk / bs;
      off = int64_t(uchunk[e]) * bs + (kk - e * bs);
    }
    cp_async16_or_zero(sm.bias + 4 * threadIdx.x, kv.bias + off, valid);
  }
  if (threadIdx.x < k_keys) {
    const int kk = s * k_keys + threadIdx.x;
    if (kk < total_keys) {
      const int e = kk / bs;
      sm.pos[threadIdx.x] = ulist[e] * bs + (kk - e * bs);
      sm.mask[threadIdx.x] = umask[e];
    } else {
      sm.pos[threadIdx.x] = k_no_key;
      sm.mask[threadIdx.x] = 0;
    }
  }
}

// A thread's share of its warp's 32 rows: m16 tile mi, half (rows lane/4 and lane/4 + 8).
template <int D>
struct RowState {
  float m[2][2];  // running max, log2 units
  float l[2][2];  // this thread's partial sum
  float o[2][D / 8][4];
};

// S = Q K^T for a warp's 32 rows and the 64 keys of the stage: per 16 dims, the two Q fragments
// and, per 16 keys, one K fragment for 4 MMAs.
template <int D>
__device__ __forceinline__ void warp_scores(const PrefillSmem<D>& sm, float (&s)[2][8][4]) {
  constexpr int lds = PrefillLayout<D>::lds;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[mi][nt][0] = s[mi][nt][1] = s[mi][nt][2] = s[mi][nt][3] = 0;
  const uint32_t qp =
      smem_u32(sm.q) + ((warp * k_warp_rows + (lane & 15)) * lds + (lane >> 4) * 8) * 2;
  const uint32_t kp =
      smem_u32(sm.k) + (((lane & 7) + ((lane >> 4) << 3)) * lds + ((lane >> 3) & 1) * 8) * 2;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t qa[2][4];
    ldsm_x4(qa[0], qp + ks * 32);
    ldsm_x4(qa[1], qp + 16 * lds * 2 + ks * 32);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_x4(b, kp + np * 16 * lds * 2 + ks * 32);
      mma_bf16(s[0][2 * np], qa[0], b[0], b[1]);
      mma_bf16(s[1][2 * np], qa[1], b[0], b[1]);
      mma_bf16(s[0][2 * np + 1], qa[0], b[2], b[3]);
      mma_bf16(s[1][2 * np + 1], qa[1], b[2], b[3]);
    }
  }
}

// The online-softmax update of a warp's 32 rows with the stage's scores s, then O += P V.
// Masked: each key is kept per row only if the row's token selected the key's block and the key
// is not after the token; otherwise every key is visible to every row (the caller checked), and
// only the bias is added.
template <int D, bool Masked>
__device__ __forceinline__ void warp_softmax_values(const PrefillSmem<D>& sm, float (&s)[2][8][4],
                                                    float scale_log2, bool use_bias, int group,
                                                    int tile_tokens, const int* tok_pos,
                                                    RowState<D>& acc) {
  constexpr int lds = PrefillLayout<D>::lds;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t4 = lane & 3;
  // The rows' tokens and positions, worked out here rather than kept in registers across stages
  // (the accumulators need them all).
  int row_tok[2][2], row_pos[2][2];
  if (Masked) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int ti = (warp * k_warp_rows + mi * 16 + half * 8 + (lane >> 2)) / group;
        const bool valid = ti < tile_tokens;
        row_tok[mi][half] = valid ? ti : 0;
        row_pos[mi][half] = valid ? tok_pos[ti] : -1;  // sees no key
      }
  }

  // Logits in log2 units (the bias is added after the 1/sqrt(d) scaling), masked keys -inf.
  float mx[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int key = nt * 8 + 2 * t4;
    float2 add = make_float2(0.0f, 0.0f);
    if (use_bias) {
      add = *reinterpret_cast<const float2*>(sm.bias + key);
      add.x *= k_log2e;
      add.y *= k_log2e;
    }
    int2 kpos = make_int2(0, 0);
    ulonglong2 kmask = make_ulonglong2(0, 0);
    if (Masked) {
      kpos = *reinterpret_cast<const int2*>(sm.pos + key);
      kmask = *reinterpret_cast<const ulonglong2*>(sm.mask + key);
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int half = i >> 1;
        float x = s[mi][nt][i] * scale_log2 + ((i & 1) ? add.y : add.x);
        if (Masked) {
          const uint64_t km = (i & 1) ? kmask.y : kmask.x;
          const int kq = (i & 1) ? kpos.y : kpos.x;
          const bool keep = ((km >> row_tok[mi][half]) & 1) && kq <= row_pos[mi][half];
          x = keep ? x : -INFINITY;
        }
        s[mi][nt][i] = x;
        mx[mi][half] = fmaxf(mx[mi][half], x);
      }
  }

  // Online softmax: rescale the running state to the new row maxima.
  float m_use[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float v = mx[mi][half];
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
      const float m_new = fmaxf(acc.m[mi][half], v);
      // A row with nothing visible so far keeps m = -inf; exponents then use 0 (no NaN).
      m_use[mi][half] = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = fast_exp2(acc.m[mi][half] - m_use[mi][half]);
      acc.m[mi][half] = m_new;
      acc.l[mi][half] *= alpha;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        acc.o[mi][dn][2 * half] *= alpha;
        acc.o[mi][dn][2 * half + 1] *= alpha;
      }
    }
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = fast_exp2(s[mi][nt][i] - m_use[mi][i >> 1]);
        s[mi][nt][i] = p;
        acc.l[mi][i >> 1] += p;
      }

  // O += P V: per 16 keys, the two P fragments and, per 16 dims, one V fragment for 4 MMAs.
  const uint32_t vp =
      smem_u32(sm.v) + (((lane & 7) + ((lane >> 3) & 1) * 8) * lds + (lane >> 4) * 8) * 2;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t pa[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      pa[mi][0] = pack_bf16(s[mi][2 * kk][0], s[mi][2 * kk][1]);
      pa[mi][1] = pack_bf16(s[mi][2 * kk][2], s[mi][2 * kk][3]);
      pa[mi][2] = pack_bf16(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
      pa[mi][3] = pack_bf16(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldsm_x4_trans(b, vp + kk * 16 * lds * 2 + dp * 32);
      mma_bf16(acc.o[0][2 * dp], pa[0], b[0], b[1]);
      mma_bf16(acc.o[1][2 * dp], pa[1], b[0], b[1]);
      mma_bf16(acc.o[0][2 * dp + 1], pa[0], b[2], b[3]);
      mma_bf16(acc.o[1][2 * dp + 1], pa[1], b[2], b[3]);
    }
  }
}

// grid (n_tiles * H), 4 warps of 32 rows; row r = token r / group, head r % group.
template <int D>
__global__ void __launch_bounds__(k_threads, 2) prefill_kernel(PrefillArgs a) {
  using Layout = PrefillLayout<D>;
  constexpr int lds = Layout::lds;
  extern __shared__ __align__(16) unsigned char smem[];
  const KvView& kv = a.kv;
  const int H = kv.n_kv_heads, G = a.group, bs = kv.block_size;
  // The heaviest tiles first: a sequence's later tokens attend to more keys, and the tiles come
  // in token order, so the short ones fill the machine's tail instead of the long ones.
  const int tile_index = a.n_tiles - 1 - int(blockIdx.x) / H;
  const int h = int(blockIdx.x) % H;
  const PrefillTile tile = a.tiles[tile_index];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t* table = a.step.block_table + int64_t(tile.seq) * a.step.bt_stride;

  const PrefillSmem<D> sm(smem);
  uint64_t* umask = reinterpret_cast<uint64_t*>(smem + Layout::fixed_bytes);  // [nb_max]
  int* uchunk = reinterpret_cast<int*>(umask + a.nb_max);                // [nb_max]
  int* ulist = uchunk + a.nb_max;                                        // [nb_max]
  int* tok_pos = ulist + a.nb_max;                                       // [64]
  int* warp_count = tok_pos + k_max_tile_tokens;                         // [k_warps]

  // The tile's query rows into shared memory, zero past the tile's tokens; their cp.async group
  // completes with the first stage's keys.
  const bf16* qbase = static_cast<const bf16*>(a.q);
  constexpr int segs = D / 8;
  for (int i = threadIdx.x; i < k_rows * segs; i += k_threads) {
    const int r = i / segs, c = i % segs, ti = r / G;
    const bool valid = ti < tile.count;
    const bf16* src =
        valid ? qbase + ((int64_t(tile.first + ti) * H + h) * G + r % G) * D + c * 8 : qbase;
    cp_async16_or_zero(sm.q + r * lds + c * 8, src, valid);
  }

  for (int i = threadIdx.x; i < tile.count; i += k_threads)
    tok_pos[i] = a.step.positions[tile.first + i];
  __syncthreads();
  int tile_max_pos = -1;
  for (int i = 0; i < tile.count; ++i) tile_max_pos = max(tile_max_pos, tok_pos[i]);
  const int nbu = tile_max_pos / bs + 1;

  // The union of the tile's selections (with, per block, the tokens that selected it), ascending.
  int n_entries = nbu;
  if (a.selection) {
    for (int b = threadIdx.x; b < nbu; b += k_threads) umask[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < tile.count * a.k_max; i += k_threads) {
      const int ti = i / a.k_max, e = i % a.k_max;
      const int b = a.selection[(int64_t(tile.first + ti) * H + h) * a.k_max + e];
      if (b >= 0) atomicOr(reinterpret_cast<unsigned long long*>(&umask[b]), 1ull << ti);
    }
    __syncthreads();
    int base = 0;
    for (int c0 = 0; c0 < nbu; c0 += k_threads) {
      const int b = c0 + threadIdx.x;
      const uint64_t mk = b < nbu ? umask[b] : 0;
      const bool f = mk != 0;
      const unsigned ballot = __ballot_sync(0xffffffffu, f);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();
      int offset = base, total = 0;
      for (int w = 0; w < k_warps; ++w) {
        const int c = warp_count[w];
        if (w < warp) offset += c;
        total += c;
      }
      // Every thread has read umask[c0..] above; compacting in place only writes below b.
      if (f) {
        const int o = offset + __popc(ballot & ((1u << lane) - 1u));
        ulist[o] = b;
        umask[o] = mk;
      }
      base += total;
      __syncthreads();
    }
    n_entries = base;
  } else {
    for (int b = threadIdx.x; b < nbu; b += k_threads) {
      ulist[b] = b;
      umask[b] = ~uint64_t(0);
    }
  }
  __syncthreads();
  // Resolve every entry's chunk once (chunk indices of device memory fit in 32 bits).
  for (int e = threadIdx.x; e < n_entries; e += k_threads)
    uchunk[e] = int(kv_slot(kv, table[ulist[e]], a.layer, h));
  __syncthreads();

  const bool use_bias = a.use_bias;
  const int total_keys = n_entries * bs;
  const int n_stages = (total_keys + k_keys - 1) / k_keys;
  const int64_t v_offset = int64_t(bs) * D;  // a chunk holds its keys, then its values
  if (n_stages > 0) load_rows<D>(sm.k, kv, 0, total_keys, 0, uchunk);
  cp_async_commit();

  // The tokens (bits) and position range of the warp's rows.
  uint64_t warp_bits = 0;
  int warp_min_pos = INT_MAX, warp_max_pos = -1;
  const int warp_last_tok = min(tile.count - 1, (warp * k_warp_rows + k_warp_rows - 1) / G);
  for (int ti = warp * k_warp_rows / G; ti <= warp_last_tok; ++ti) {
    warp_bits |= 1ull << ti;
    warp_min_pos = min(warp_min_pos, tok_pos[ti]);
    warp_max_pos = max(warp_max_pos, tok_pos[ti]);
  }

  RowState<D> acc;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      acc.m[mi][half] = -INFINITY;
      acc.l[mi][half] = 0.0f;
    }
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      acc.o[mi][dn][0] = acc.o[mi][dn][1] = acc.o[mi][dn][2] = acc.o[mi][dn][3] = 0.0f;
  const float scale_log2 = a.scale * k_log2e;

  for (int s = 0; s < n_stages; ++s) {
    // The keys of stage s have landed, and every warp is done with the values of stage s - 1
    // (and the per-key data), whose buffers take those of stage s.
    cp_async_wait<0>();
    __syncthreads();
    load_rows<D>(sm.v, kv, s, total_keys, v_offset, uchunk);
    load_key_data<D>(sm, kv, s, total_keys, use_bias, uchunk, ulist, umask);
    cp_async_commit();

    // Whether the warp's tokens see any key of the stage (else it skips it), and whether they
    // all see every key (then no key needs a mask): from the stage's entries, which are whole
    // blocks (block sizes up to 64 divide 64) or a part of one, in ascending position order.
    const int k_begin = s * k_keys, k_end = min(total_keys, k_begin + k_keys);
    const int e_first = k_begin / bs, e_last = (k_end - 1) / bs;
    uint64_t any_bits = 0, all_bits = ~uint64_t(0);
    for (int e = e_first; e <= e_last; ++e) {
      any_bits |= umask[e];
      all_bits &= umask[e];
    }
    const int first_pos = ulist[e_first] * bs + (k_begin - e_first * bs);
    const int last_pos = ulist[e_last] * bs + (k_end - 1 - e_last * bs);
    const bool attend = (any_bits & warp_bits) != 0 && first_pos <= warp_max_pos;
    const bool full =
        k_end - k_begin == k_keys && (all_bits & warp_bits) == warp_bits && last_pos <= warp_min_pos;

    float sc[2][8][4];
    if (attend) warp_scores<D>(sm, sc);
    // The values of stage s have landed, and every warp is done with its keys.
    cp_async_wait<0>();
    __syncthreads();
    if (s + 1 < n_stages) load_rows<D>(sm.k, kv, s + 1, total_keys, 0, uchunk);
    cp_async_commit();
    if (attend) {
      if (full)
        warp_softmax_values<D, false>(sm, sc, scale_log2, use_bias, G, tile.count, tok_pos, acc);
      else
        warp_softmax_values<D, true>(sm, sc, scale_log2, use_bias, G, tile.count, tok_pos, acc);
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t4 = lane & 3;
  bf16* out = static_cast<bf16*>(a.out);
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l = acc.l[mi][half];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int r = warp * k_warp_rows + mi * 16 + half * 8 + g, ti = r / G;
      if (ti >= tile.count) continue;
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      bf16* o = out + ((int64_t(tile.first + ti) * H + h) * G + r % G) * D;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const int c = dn * 8 + 2 * t4;
        *reinterpret_cast<__nv_bfloat162*>(o + c) = __floats2bfloat162_rn(
            acc.o[mi][dn][2 * half] * inv, acc.o[mi][dn][2 * half + 1] * inv);
      }
    }
}

template <int D>
size_t shared_bytes(int nb_max) {
  return size_t(PrefillLayout<D>::fixed_bytes) + size_t(nb_max) * (8 + 4 + 4) +
         k_max_tile_tokens * 4 + k_warps * 4;
}

template <int D>
cudaError_t launch(const PrefillArgs& a, cudaStream_t stream) {
  const size_t smem = shared_bytes<D>(a.nb_max);
  // The block list grows with the context: past the device's limit (about 1900 blocks on a GPU
  // with 99 KB per thread block) the step is refused rather than launched.
  if (smem > max_shared_bytes()) return cudaErrorInvalidConfiguration;
  static int configured = 0;
  if (int(smem) > configured) {
    cudaError_t e = cudaFuncSetAttribute(prefill_kernel<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    // All of the unified L1 as shared memory: two tiles per SM need about 220 KB.
    e = cudaFuncSetAttribute(prefill_kernel<D>, cudaFuncAttributePreferredSharedMemoryCarveout,
                             int(cudaSharedmemCarveoutMaxShared));
    if (e != cudaSuccess) return e;
    configured = int(smem);
  }
  const dim3 grid(unsigned(a.n_tiles) * unsigned(a.kv.n_kv_heads));
  prefill_kernel<D><<<grid, k_threads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

size_t prefill_shared_bytes(int head_dim, int nb_max) {
  return head_dim == 64 ? shared_bytes<64>(nb_max) : shared_bytes<128>(nb_max);
}

size_t prefill_shared_limit() { return max_shared_bytes(); }

int prefill_tile_tokens(int group) {
  return group >= k_rows ? 1 : std::min(k_max_tile_tokens, k_rows / group);
}

cudaError_t launch_sparse_prefill(const PrefillArgs& a, cudaStream_t stream) {
  if (a.n_tiles == 0) return cudaSuccess;
  if (a.group < 1 || a.group > k_rows) return cudaErrorInvalidValue;
  switch (a.kv.head_dim) {
    case 64: return launch<64>(a, stream);
    case 128: return launch<128>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace nosa::attention::cuda
