// Device building blocks of the sparse attention kernels (included by .cu files only): loading a
// stage of 64 keys of a block list into shared memory with cp.async, and one warp's online-softmax
// update over keys of a stage with bf16 tensor-core MMAs (m16n8k16, f32 accumulation).
//
// A "block list" is the sequence of logical blocks a query attends to (its selection, the union
// of a tile's selections, or all blocks up to its own); stage s holds keys [64 s, 64 s + 64) of
// the list's tokens laid end to end, so that block sizes other than 64 work too.
#pragma once

#include <cfloat>

#include "attention/cuda/device_common.cuh"

namespace nosa::attention::cuda {

constexpr int k_stage_keys = 64;

template <int D>
struct StageLayout {
  static constexpr int lds = D + 8;  // padded row (elements): conflict-free ldmatrix
  static constexpr int tile_elems = k_stage_keys * lds;
  // Bytes of one stage: K and V tiles, then per-key bias (f32), position (i32), token mask (u64).
  static constexpr int bytes = 2 * tile_elems * 2 + k_stage_keys * (4 + 4 + 8);
};

template <int D>
struct Stage {
  bf16* k;
  bf16* v;
  float* add;       // [64] the keys' eviction scores (loaded only with the bias)
  int* pos;         // [64] key positions
  uint64_t* mask;   // [64] which tile tokens selected the key's block (prefill only)
  __device__ explicit Stage(unsigned char* base) {
    k = reinterpret_cast<bf16*>(base);
    v = k + StageLayout<D>::tile_elems;
    add = reinterpret_cast<float*>(v + StageLayout<D>::tile_elems);
    pos = reinterpret_cast<int*>(add + k_stage_keys);
    mask = reinterpret_cast<uint64_t*>(pos + k_stage_keys);
  }
};

__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(bytes));
}

// Issues the loads of stage s: K, V (and, with use_bias, the keys' eviction scores) through
// cp.async, zero-filled past the list's end; each key's position and token mask by plain stores
// (a key past the end gets position k_no_key). entry(e, chunk, lb, mask) resolves list entry e from
// shared memory, so no global load stalls the issue.
constexpr int k_no_key = 0x7fffffff;

template <int D, class Entry>
__device__ __forceinline__ void load_stage(const Stage<D>& st, const KvView& kv, int s,
                                           int total_keys, bool use_bias, Entry entry) {
  constexpr int segs = D / 8;
  const int bs = kv.block_size;
  const bf16* base = static_cast<const bf16*>(kv.kv);
  for (int i = threadIdx.x; i < k_stage_keys * segs; i += blockDim.x) {
    const int r = i / segs, c = i % segs;
    const int kk = s * k_stage_keys + r;
    const bool valid = kk < total_keys;
    int64_t off = 0;
    if (valid) {
      int64_t chunk;
      int lb;
      uint64_t mask;
      entry(kk / bs, chunk, lb, mask);
      off = (chunk * 2 * bs + kk % bs) * D + c * 8;
    }
    cp_async16_zfill(st.k + r * StageLayout<D>::lds + c * 8, base + off, valid);
    cp_async16_zfill(st.v + r * StageLayout<D>::lds + c * 8, base + off + int64_t(bs) * D, valid);
  }
  if (use_bias) {
    // Four keys at a time: block sizes are multiples of 16, so a group never spans two blocks.
    for (int g = threadIdx.x; g < k_stage_keys / 4; g += blockDim.x) {
      const int kk = s * k_stage_keys + 4 * g;
      const bool valid = kk < total_keys;
      int64_t off = 0;
      if (valid) {
        int64_t chunk;
        int lb;
        uint64_t mask;
        entry(kk / bs, chunk, lb, mask);
        off = chunk * bs + kk % bs;
      }
      cp_async16_zfill(st.add + 4 * g, kv.bias + off, valid);
    }
  }
  for (int r = threadIdx.x; r < k_stage_keys; r += blockDim.x) {
    const int kk = s * k_stage_keys + r;
    if (kk < total_keys) {
      int64_t chunk;
      int lb;
      uint64_t mask;
      entry(kk / bs, chunk, lb, mask);
      st.pos[r] = lb * bs + kk % bs;
      st.mask[r] = mask;
    } else {
      st.pos[r] = k_no_key;
      st.mask[r] = 0;
    }
  }
}

// The running softmax state of one warp's 16 rows (this thread: rows lane/4 and lane/4 + 8).
template <int D>
struct WarpAcc {
  float m[2];  // running max, log2 units
  float l[2];  // this thread's partial sum
  float o[D / 8][4];
  __device__ void init() {
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.0f;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  }
};

// Loads the A fragments of 16 query rows: row(r) gives the row's [D] bf16 vector or null (zero).
template <int D, class RowPtr>
__device__ __forceinline__ void load_q_frags(uint32_t (&qa)[D / 16][4], RowPtr row) {
  const int lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
  const bf16* r0 = row(g);
  const bf16* r1 = row(g + 8);
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int c = ks * 16 + 2 * t4;
    qa[ks][0] = r0 ? *reinterpret_cast<const uint32_t*>(r0 + c) : 0u;
    qa[ks][1] = r1 ? *reinterpret_cast<const uint32_t*>(r1 + c) : 0u;
    qa[ks][2] = r0 ? *reinterpret_cast<const uint32_t*>(r0 + c + 8) : 0u;
    qa[ks][3] = r1 ? *reinterpret_cast<const uint32_t*>(r1 + c + 8) : 0u;
  }
}

// One warp attends its 16 rows to keys [k0, k0 + 8 NT) of a stage. keep(i, key) returns the
// additive term of row i (0: lane/4, 1: lane/4 + 8) for the key: the bias, or -inf when masked.
template <int D, int NT, class Keep>
__device__ __forceinline__ void warp_attend(const Stage<D>& st, int k0,
                                            const uint32_t (&qa)[D / 16][4], float scale,
                                            WarpAcc<D>& acc, Keep keep) {
  static_assert(NT % 2 == 0, "keys come in pairs of 8-key tiles");
  constexpr int lds = StageLayout<D>::lds;
  const int lane = threadIdx.x % 32, t4 = lane & 3;
  float s[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    const bf16* kb = st.k + (k0 + nt * 8 + (lane & 7)) * lds + (lane >> 3) * 8;
#pragma unroll
    for (int ks = 0; ks < D / 16; ks += 2) {
      uint32_t b0, b1, b2, b3;
      ldmatrix_x4(b0, b1, b2, b3, kb + ks * 16);
      mma_bf16(s[nt], qa[ks], b0, b1);
      mma_bf16(s[nt], qa[ks + 1], b2, b3);
    }
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = k0 + nt * 8 + 2 * t4 + (i & 1);
      const float add = keep(i >> 1, key);
      const float x = add == -INFINITY ? -INFINITY : (s[nt][i] * scale + add) * k_log2e;
      s[nt][i] = x;
      mx[i >> 1] = fmaxf(mx[i >> 1], x);
    }
  float m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(acc.m[r], mx[r]);
    m_use[r] = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(acc.m[r] - m_use[r]);
    acc.m[r] = m_new;
    acc.l[r] *= alpha;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      acc.o[dn][2 * r] *= alpha;
      acc.o[dn][2 * r + 1] *= alpha;
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float pv = exp2f(s[nt][i] - m_use[i >> 1]);
      s[nt][i] = pv;
      acc.l[i >> 1] += pv;
    }
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    uint32_t a[4];
    a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    const bf16* vb =
        st.v + (k0 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * lds + (lane >> 4) * 8;
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b0, b1, b2, b3;
      ldmatrix_x4_trans(b0, b1, b2, b3, vb + dp * 16);
      mma_bf16(acc.o[2 * dp], a, b0, b1);
      mma_bf16(acc.o[2 * dp + 1], a, b2, b3);
    }
  }
}

// Sums the per-thread partial l over the quad that shares a row.
template <int D>
__device__ __forceinline__ void finish_rows(WarpAcc<D>& acc) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    acc.l[r] += __shfl_xor_sync(0xffffffffu, acc.l[r], 1);
    acc.l[r] += __shfl_xor_sync(0xffffffffu, acc.l[r], 2);
  }
}

}  // namespace nosa::attention::cuda
