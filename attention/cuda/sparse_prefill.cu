// The prefill attention kernel. Its building blocks are its own (not attention_tile.cuh's, which
// the decode kernel keeps): a warp here owns 32 query rows, two m16 tiles, so that every K and V
// fragment read from shared memory feeds two MMAs; a 16-row warp is bound by shared-memory
// bandwidth, not by the tensor cores.
#include <algorithm>
#include <climits>

#include "attention/cuda/device_common.cuh"
#include "attention/cuda/prefill_blocks.cuh"
#include "attention/cuda/prefill_wgmma.cuh"
#include "attention/cuda/sparse_prefill.cuh"

namespace nosa::attention::cuda {

namespace {

constexpr int k_warps = 4;
constexpr int k_threads = 32 * k_warps;
constexpr int k_warp_rows = 32;                // two m16 tiles
constexpr int k_rows = k_warps * k_warp_rows;  // rows of a tile
constexpr int k_max_tile_tokens = 64;          // one bit per token in the key masks
constexpr int k_keys = 64;                     // keys per stage

// Shared memory: the tile's Q rows, a ring of Slots buffers of 64 key or value rows, two stages
// of eviction scores, then the tile's block list. A stage is two halves (its keys, then its
// values); the half that is Slots - 1 halves ahead loads while one is used. Three slots (about
// 85 KB with D = 128) load each half a whole stage ahead, so that the barriers rarely wait for
// memory; four (about 102 KB) hold two whole stages, the next loading while one is used, and
// need one barrier per stage instead of two. The most slots that still let two tiles share an
// SM (their registers fill it) are taken: the block list of long prompts leaves fewer.
template <int D, int Slots>
struct PrefillLayout {
  static constexpr int lds = D + 8;  // padded row (elements): conflict-free ldmatrix
  static constexpr int q_bytes = k_rows * lds * 2;
  static constexpr int slot_bytes = k_keys * lds * 2;
  static constexpr int slot_offset = q_bytes;
  static constexpr int bias_offset = slot_offset + Slots * slot_bytes;  // [2][k_keys] f32
  static constexpr int fixed_bytes = bias_offset + 2 * k_keys * 4;
};

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

// Where the keys of a stage are in the tile's block list (its entries laid end to end). Block
// sizes are 16, 32 or multiples of 64, so with sub = min(block_size, 64) (a power of two) key x
// (0..63) of the stage is offset w0 + (x & (sub - 1)) of entry e0 + x / sub: shifts and masks
// instead of a division per key row, which used to cost more instructions than the MMAs' issue.
// Rows 8 apart in one block are rows of one entry, so both keys of a thread's pair are too.
struct StageKeys {
  int begin;  // first key (64 s)
  int e0;     // its entry
  int w0;     // its offset in that entry's block
};

__device__ __forceinline__ StageKeys stage_keys(int s, int bs) {
  StageKeys k;
  k.begin = s * k_keys;
  k.e0 = k.begin / bs;
  k.w0 = k.begin - k.e0 * bs;
  return k;
}

// Issues the cp.async loads of one half (K or V rows) of a stage into dst: keys [64 s, 64 s + 64)
// of the tile's block list, zero-filled past the list's end. base: the cache's keys or values
// (a chunk holds its keys, then its values). A thread loads one 16-byte column c of rows r0,
// r0 + step, ...: rows step apart from r0 < step <= 16 stay in one entry exactly when rows step
// apart from 0 do, so the entries and offsets come from j alone.
template <int D>
__device__ __forceinline__ void load_rows(uint32_t dst, const bf16* base, int chunk_elems,
                                          const StageKeys& sk, int lg, int total_keys,
                                          const int* uchunk) {
  constexpr int segs = D / 8, lds = D + 8, step = k_threads / segs;
  const int c = threadIdx.x % segs, r0 = threadIdx.x / segs;
  const uint32_t d0 = dst + (r0 * lds + c * 8) * 2;
  const int in_row = r0 * D + c * 8;
  if (lg == 6 && sk.begin + k_keys <= total_keys) {
    // Blocks of 64 keys or more: the whole stage lies in one block, its rows D apart.
    const bf16* src = base + int64_t(uchunk[sk.e0]) * chunk_elems + (sk.w0 * D + in_row);
#pragma unroll
    for (int j = 0; j < k_keys / step; ++j)
      cp_async16_u32(d0 + j * step * lds * 2, src + j * step * D);
    return;
  }
  const int sub_mask = (1 << lg) - 1;
#pragma unroll
  for (int j = 0; j < k_keys / step; ++j) {
    const bool valid = sk.begin + r0 + j * step < total_keys;
    const bf16* src = base;
    if (valid)
      src = base + int64_t(uchunk[sk.e0 + ((j * step) >> lg)]) * chunk_elems +
            ((sk.w0 + ((j * step) & sub_mask)) * D + in_row);
    cp_async16_or_zero(d0 + j * step * lds * 2, src, valid);
  }
}

// The stage's eviction scores, four keys per thread (a group of four never spans two blocks).
__device__ __forceinline__ void load_bias(float* dst, const KvView& kv, const StageKeys& sk,
                                          int lg, int total_keys, const int* uchunk) {
  if (threadIdx.x < k_keys / 4) {
    const int x = 4 * threadIdx.x;
    const bool valid = sk.begin + x < total_keys;
    const float* src = kv.bias;
    if (valid)
      src = kv.bias + int64_t(uchunk[sk.e0 + (x >> lg)]) * kv.block_size +
            (sk.w0 + (x & ((1 << lg) - 1)));
    cp_async16_or_zero(smem_u32(dst + x), src, valid);
  }
}

// A thread's share of its warp's 32 rows: m16 tile mi, half (rows lane/4 and lane/4 + 8).
template <int D>
struct RowState {
  float m[2][2];  // running max of the scores (S, unscaled)
  float l[2][2];  // this thread's partial sum
  float o[2][D / 8][4];
};

// S = Q K^T for a warp's 32 rows and the 64 keys of the stage: per 16 dims, the two Q fragments
// and, per 16 keys, one K fragment for 4 MMAs. With the bias the accumulators start at
// bias / scale, so that S * scale is the logit with its bias and the softmax is the same with or
// without it (adding the bias there took registers the accumulators need).
template <int D, bool Bias>
__device__ __forceinline__ void warp_scores(uint32_t q_smem, uint32_t k_smem, const float* bias,
                                            float inv_scale, float (&s)[2][8][4]) {
  constexpr int lds = D + 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    float2 b = make_float2(0.0f, 0.0f);
    if (Bias) {
      b = *reinterpret_cast<const float2*>(bias + nt * 8 + 2 * (lane & 3));
      b.x *= inv_scale;
      b.y *= inv_scale;
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      s[mi][nt][0] = s[mi][nt][2] = b.x;
      s[mi][nt][1] = s[mi][nt][3] = b.y;
    }
  }
  const uint32_t qp = q_smem + ((warp * k_warp_rows + (lane & 15)) * lds + (lane >> 4) * 8) * 2;
  const uint32_t kp = k_smem + (((lane & 7) + ((lane >> 4) << 3)) * lds + ((lane >> 3) & 1) * 8) * 2;
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

// What the masked path needs to know of the tile and the stage.
struct MaskView {
  const int* tok_pos;      // [tile tokens] positions
  const int* ulist;        // [entries] blocks
  const uint64_t* umask;   // [entries] tile tokens that selected each
  StageKeys sk;
  int n_keys, e_last;  // keys in the stage (64 but in the last), the entry of its last key
  int lg, bs, group, tile_tokens;
};

// The online-softmax update of a warp's 32 rows with the stage's scores s, then O += P V.
// Masked: each key is kept per row only if the row's token selected the key's block and the key
// is not after the token; otherwise every key is visible to every row (the caller checked).
// The maxima are taken on the scores (the scale is positive) and each exponent is one FMA,
// s * scale_log2 - m * scale_log2.
template <int D, bool Masked>
__device__ __forceinline__ void warp_softmax_values(uint32_t v_smem, float (&s)[2][8][4],
                                                    float scale_log2, const MaskView& mv,
                                                    RowState<D>& acc) {
  constexpr int lds = D + 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t4 = lane & 3;
  // The rows' tokens and positions, worked out here rather than kept in registers across stages
  // (the accumulators need them all).
  int row_tok[2][2], row_pos[2][2];
  if (Masked) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int ti = (warp * k_warp_rows + mi * 16 + half * 8 + (lane >> 2)) / mv.group;
        const bool valid = ti < mv.tile_tokens;
        row_tok[mi][half] = valid ? ti : 0;
        row_pos[mi][half] = valid ? mv.tok_pos[ti] : -1;  // sees no key
      }
  }

  float mx[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    uint64_t km = 0;
    int kpos = 0;
    if (Masked) {
      // The 8 keys nt * 8.. lie in one entry (blocks of at least 16 keys); past the list's end
      // (the last stage of blocks under 64 keys) no token sees them.
      const int x = nt * 8, e = min(mv.sk.e0 + (x >> mv.lg), mv.e_last);
      km = x < mv.n_keys ? mv.umask[e] : 0;
      kpos = mv.ulist[e] * mv.bs + mv.sk.w0 + (x & ((1 << mv.lg) - 1)) + 2 * t4;
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        bool sel = true;
        if (Masked) sel = (km >> row_tok[mi][half]) & 1;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int i = 2 * half + j;
          float x = s[mi][nt][i];
          if (Masked) x = (sel && kpos + j <= row_pos[mi][half]) ? x : -INFINITY;
          s[mi][nt][i] = x;
          mx[mi][half] = fmaxf(mx[mi][half], x);
        }
      }
  }

  // Online softmax: the new row maxima; the running state is rescaled only when one of the
  // warp's maxima moved (late in a long row they rarely do).
  float neg_m[2][2], alpha[2][2];
  bool moved = false;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float v = mx[mi][half];
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
      const float m_old = acc.m[mi][half];
      const float m_new = fmaxf(m_old, v);
      // A row with nothing visible so far keeps m = -inf; exponents then use 0 (no NaN).
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      alpha[mi][half] = fast_exp2((m_old - m_use) * scale_log2);
      moved |= m_new != m_old;
      acc.m[mi][half] = m_new;
      neg_m[mi][half] = -m_use * scale_log2;
    }
  if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float al = alpha[mi][half];
        acc.l[mi][half] *= al;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          acc.o[mi][dn][2 * half] *= al;
          acc.o[mi][dn][2 * half + 1] *= al;
        }
      }
  }
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float x = s[mi][nt][i];
        const float p = fast_exp2(fmaf(x, scale_log2, neg_m[mi][i >> 1]));
        s[mi][nt][i] = p;
        acc.l[mi][i >> 1] += p;
      }

  // O += P V: per 16 keys, the two P fragments and, per 16 dims, one V fragment for 4 MMAs.
  const uint32_t vp = v_smem + (((lane & 7) + ((lane >> 3) & 1) * 8) * lds + (lane >> 4) * 8) * 2;
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
template <int D, int Slots, bool Bias>
__global__ void __launch_bounds__(k_threads, 2) prefill_kernel(PrefillArgs a) {
  using Layout = PrefillLayout<D, Slots>;
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

  bf16* q_s = reinterpret_cast<bf16*>(smem);
  const uint32_t q_smem = smem_u32(smem);
  const uint32_t slot_smem = q_smem + Layout::slot_offset;
  float* bias_s = reinterpret_cast<float*>(smem + Layout::bias_offset);    // [2][64]
  uint64_t* umask = reinterpret_cast<uint64_t*>(smem + Layout::fixed_bytes);  // [nb_max]
  int* uchunk = reinterpret_cast<int*>(umask + a.nb_max);                // [nb_max]
  int* ulist = uchunk + a.nb_max;                                        // [nb_max]
  int* tok_pos = ulist + a.nb_max;                                       // [64]
  int* warp_count = tok_pos + k_max_tile_tokens;                         // [k_warps]

  // The tile's query rows into shared memory, zero past the tile's tokens: their own cp.async
  // group, the oldest, complete by the first stage's keys.
  const bf16* qbase = static_cast<const bf16*>(a.q);
  constexpr int segs = D / 8;
  for (int i = threadIdx.x; i < k_rows * segs; i += k_threads) {
    const int r = i / segs, c = i % segs, ti = r / G;
    const bool valid = ti < tile.count;
    const bf16* src =
        valid ? qbase + ((int64_t(tile.first + ti) * H + h) * G + r % G) * D + c * 8 : qbase;
    cp_async16_or_zero(smem_u32(q_s + r * lds + c * 8), src, valid);
  }
  cp_async_commit();

  for (int i = threadIdx.x; i < tile.count; i += k_threads)
    tok_pos[i] = a.step.positions[tile.first + i];
  __syncthreads();
  int tile_max_pos = -1;
  for (int i = 0; i < tile.count; ++i) tile_max_pos = max(tile_max_pos, tok_pos[i]);
  const int nbu = tile_max_pos / bs + 1;

  // The union of the tile's selections (with, per block, the tokens that selected it), ascending.
  const int n_entries =
      tile_block_list<k_threads>(a, tile, h, nbu, table, umask, ulist, uchunk, warp_count);

  const int total_keys = n_entries * bs;
  const int n_stages = (total_keys + k_keys - 1) / k_keys;
  const int n_halves = 2 * n_stages;
  const int lg = 31 - __clz(min(bs, k_keys));  // log2 of min(block size, 64)
  const int chunk_elems = 2 * bs * D;  // elements of a chunk (its keys and values)
  const bf16* kbase = static_cast<const bf16*>(kv.kv);
  const bf16* vbase = kbase + int64_t(bs) * D;  // a chunk holds its keys, then its values

  // Half hh of the walk (stage hh / 2, keys and eviction scores when even, values when odd)
  // into slot hh % Slots; one cp.async group per half, empty past the end, so that the waits
  // count. The scores of stage s go to buffer s % 2: the stage before is still being read.
  auto issue = [&](int hh) {
    if (hh < n_halves) {
      const StageKeys sk = stage_keys(hh >> 1, bs);
      const uint32_t dst = slot_smem + (hh % Slots) * Layout::slot_bytes;
      if (hh & 1) {
        load_rows<D>(dst, vbase, chunk_elems, sk, lg, total_keys, uchunk);
      } else {
        load_rows<D>(dst, kbase, chunk_elems, sk, lg, total_keys, uchunk);
        if (Bias) load_bias(bias_s + ((hh >> 1) & 1) * k_keys, kv, sk, lg, total_keys, uchunk);
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int i = 0; i < (Slots == 4 ? 2 : Slots - 1); ++i) issue(i);

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
  const float scale_log2 = a.scale * k_log2e, inv_scale = 1.0f / a.scale;

  for (int s = 0; s < n_stages; ++s) {
    // The keys of stage s have landed (with four slots its values too), and every warp is done
    // with the half (four slots: the stage) whose slots the next loads take.
    if constexpr (Slots == 4) {
      cp_async_wait<0>();
      __syncthreads();
      issue(2 * s + 2);
      issue(2 * s + 3);
    } else {
      cp_async_wait<Slots - 2>();
      __syncthreads();
      issue(2 * s + Slots - 1);
    }

    // Whether the warp's tokens see any key of the stage (else it skips it), and whether they
    // all see every key (then no key needs a mask): from the stage's entries, which are whole
    // blocks (block sizes up to 64 divide 64) or a part of one, in ascending position order.
    const StageKeys sk = stage_keys(s, bs);
    const int k_end = min(total_keys, sk.begin + k_keys), n_keys = k_end - sk.begin;
    const int e_last = sk.e0 + ((n_keys - 1) >> lg);
    uint64_t any_bits = 0, all_bits = ~uint64_t(0);
    for (int e = sk.e0; e <= e_last; ++e) {
      any_bits |= umask[e];
      all_bits &= umask[e];
    }
    const int first_pos = ulist[sk.e0] * bs + sk.w0;
    const int last_pos = ulist[e_last] * bs + sk.w0 + ((n_keys - 1) & ((1 << lg) - 1));
    const bool attend = (any_bits & warp_bits) != 0 && first_pos <= warp_max_pos;
    const bool full =
        n_keys == k_keys && (all_bits & warp_bits) == warp_bits && last_pos <= warp_min_pos;

    float sc[2][8][4];
    if (attend)
      warp_scores<D, Bias>(q_smem, slot_smem + ((2 * s) % Slots) * Layout::slot_bytes,
                           bias_s + (s & 1) * k_keys, inv_scale, sc);
    // Two or three slots: the values of stage s have landed, and every warp is done with the
    // half before.
    if constexpr (Slots != 4) {
      cp_async_wait<Slots - 2>();
      __syncthreads();
      issue(2 * s + Slots);
    }
    if (attend) {
      const uint32_t v_smem = slot_smem + ((2 * s + 1) % Slots) * Layout::slot_bytes;
      const MaskView mv{tok_pos, ulist, umask, sk, n_keys, e_last, lg, bs, G, tile.count};
      if (full)
        warp_softmax_values<D, false>(v_smem, sc, scale_log2, mv, acc);
      else
        warp_softmax_values<D, true>(v_smem, sc, scale_log2, mv, acc);
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

template <int D, int Slots>
size_t shared_bytes(int nb_max) {
  return size_t(PrefillLayout<D, Slots>::fixed_bytes) + size_t(nb_max) * (8 + 4 + 4) +
         k_max_tile_tokens * 4 + k_warps * 4;
}

template <int D, int Slots, bool Bias>
cudaError_t launch_kernel(const PrefillArgs& a, size_t smem, cudaStream_t stream) {
  // All of the unified L1 as shared memory: two tiles per SM need up to about 200 KB.
  if (const cudaError_t e = allow_shared<prefill_kernel<D, Slots, Bias>>(smem, true);
      e != cudaSuccess)
    return e;
  const dim3 grid(unsigned(a.n_tiles) * unsigned(a.kv.n_kv_heads));
  prefill_kernel<D, Slots, Bias><<<grid, k_threads, smem, stream>>>(a);
  return cudaGetLastError();
}

int g_forced_slots = 0;  // force_prefill_slots()
int g_wgmma = -1;        // force_prefill_wgmma(); -1: PrefillArgs::wgmma
int64_t g_wgmma_launches = 0;

#ifdef NOSA_HAVE_WGMMA
// The wgmma kernel's variant (prefill_wgmma.cuh: 1, 2 or 3) where a launch takes it, else
// 0: an sm_90 GPU, and asked for (force_prefill_wgmma, else a.wgmma).
int wgmma_variant(const PrefillArgs& a) {
  const int want = g_wgmma >= 0 ? g_wgmma : a.wgmma;
  if (want < 1 || want > 3) return 0;
  return prefill_wgmma_available() ? want : 0;
}
#endif

template <int D>
cudaError_t launch(const PrefillArgs& a, cudaStream_t stream) {
  const size_t smem2 = shared_bytes<D, 2>(a.nb_max), smem3 = shared_bytes<D, 3>(a.nb_max),
               smem4 = shared_bytes<D, 4>(a.nb_max);
  const size_t limit = max_shared_bytes();
  // The block list grows with the context: past the device's limit (about 1900 blocks on a GPU
  // with 99 KB per thread block) the step is refused rather than launched.
  if (smem2 > limit) return cudaErrorInvalidConfiguration;
  // The most slots with which two tiles still share an SM; where none does, the most that fit.
  const DeviceLimits& dev = device_limits();
  const auto two_fit = [&](size_t bytes) {
    return 2 * (bytes + dev.reserved_per_block) <= dev.shared_per_sm;
  };
  int slots = 2;
  if (two_fit(smem4)) slots = 4;
  else if (two_fit(smem3)) slots = 3;
  else if (!two_fit(smem2)) slots = smem4 <= limit ? 4 : smem3 <= limit ? 3 : 2;
  if (g_forced_slots == 4 && smem4 <= limit) slots = 4;
  if (g_forced_slots == 3 && smem3 <= limit) slots = 3;
  if (g_forced_slots == 2) slots = 2;
  const bool b = a.use_bias;
  switch (slots) {
    case 4: return b ? launch_kernel<D, 4, true>(a, smem4, stream)
                     : launch_kernel<D, 4, false>(a, smem4, stream);
    case 3: return b ? launch_kernel<D, 3, true>(a, smem3, stream)
                     : launch_kernel<D, 3, false>(a, smem3, stream);
    default: return b ? launch_kernel<D, 2, true>(a, smem2, stream)
                      : launch_kernel<D, 2, false>(a, smem2, stream);
  }
}

}  // namespace

// The least the kernel needs (two slots); the launcher takes three or four where they fit.
size_t prefill_shared_bytes(int head_dim, int nb_max) {
  return head_dim == 64 ? shared_bytes<64, 2>(nb_max) : shared_bytes<128, 2>(nb_max);
}

size_t prefill_shared_limit() { return max_shared_bytes(); }

void force_prefill_slots(int slots) { g_forced_slots = slots; }

void force_prefill_wgmma(int variant) { g_wgmma = variant; }

int64_t prefill_wgmma_launches() { return g_wgmma_launches; }

bool prefill_wgmma_available() {
#ifdef NOSA_HAVE_WGMMA
  // The compute capability, asked once per device (the launcher asks at every launch).
  static int sm90[64] = {};  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return false;
  if (dev < 64 && sm90[dev]) return sm90[dev] == 1;
  int major = 0, minor = 0;
  const bool yes =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
      major == 9 && minor == 0;
  if (dev < 64) sm90[dev] = yes ? 1 : 2;
  return yes;
#else
  return false;
#endif
}

int prefill_tile_tokens(int group) {
  return group >= k_rows ? 1 : std::min(k_max_tile_tokens, k_rows / group);
}

cudaError_t launch_sparse_prefill(const PrefillArgs& a, cudaStream_t stream) {
  if (a.n_tiles == 0) return cudaSuccess;
  if (a.group < 1 || a.group > k_rows) return cudaErrorInvalidValue;
  // Both kernels lay out nb_max entries of the block list, and every tile has a block.
  if (a.nb_max < 1) return cudaErrorInvalidValue;
  // The softmax takes its maxima on the unscaled scores: the scale (1 / sqrt(d)) is positive.
  if (!(a.scale > 0.0f)) return cudaErrorInvalidValue;
  // Block sizes 16, 32 or multiples of 64 (stage_keys' shifts and masks rely on it).
  const int bs = a.kv.block_size;
  if (!(bs == 16 || bs == 32 || (bs > 0 && bs % 64 == 0))) return cudaErrorInvalidValue;
#ifdef NOSA_HAVE_WGMMA
  if (prefill_wgmma_fits(a))
    if (const int variant = wgmma_variant(a); variant > 0) {
      ++g_wgmma_launches;
      return launch_prefill_wgmma(a, variant, stream);
    }
#endif
  switch (a.kv.head_dim) {
    case 64: return launch<64>(a, stream);
    case 128: return launch<128>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace nosa::attention::cuda
