#include "attention/cuda/attention_tile.cuh"
#include "attention/cuda/sparse_prefill.cuh"

namespace nosa::attention::cuda {

namespace {

constexpr int k_warps = 4;
constexpr int k_rows = 16 * k_warps;
constexpr int k_stages = 2;

__device__ __forceinline__ uint64_t warp_or64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grid (n_tiles, H), 4 warps of 16 rows; row r = token r / group, head r % group.
template <int D>
__global__ void __launch_bounds__(32 * k_warps) prefill_kernel(PrefillArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const KvView& kv = a.kv;
  const PrefillTile tile = a.tiles[blockIdx.x];
  const int h = blockIdx.y;
  const int H = kv.n_kv_heads, G = a.group, bs = kv.block_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t* table = a.step.block_table + int64_t(tile.seq) * a.step.bt_stride;

  unsigned char* tail = smem + k_stages * StageLayout<D>::bytes;
  uint64_t* stage_bits = reinterpret_cast<uint64_t*>(tail);  // [k_stages][2]
  uint64_t* umask = stage_bits + 2 * k_stages;                // [nb_max]
  int64_t* uchunk = reinterpret_cast<int64_t*>(umask + a.nb_max);  // [nb_max]
  int* ulist = reinterpret_cast<int*>(uchunk + a.nb_max);     // [nb_max]
  int* tok_pos = ulist + a.nb_max;                            // [64]
  int* warp_count = tok_pos + 64;                             // [k_warps]
  int* stage_minpos = warp_count + k_warps;                   // [k_stages][2]

  for (int i = threadIdx.x; i < tile.count; i += blockDim.x)
    tok_pos[i] = a.step.positions[tile.first + i];
  __syncthreads();
  const int last_pos = tok_pos[tile.count - 1];
  const int nbu = last_pos / bs + 1;

  // The union of the tile's selections (with, per block, the tokens that selected it).
  int n_entries = nbu;
  if (a.selection) {
    for (int b = threadIdx.x; b < nbu; b += blockDim.x) umask[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < tile.count * a.k_max; i += blockDim.x) {
      const int ti = i / a.k_max, e = i % a.k_max;
      const int b = a.selection[(int64_t(tile.first + ti) * H + h) * a.k_max + e];
      if (b >= 0) atomicOr(reinterpret_cast<unsigned long long*>(&umask[b]), 1ull << ti);
    }
    __syncthreads();
    int base = 0;
    for (int c0 = 0; c0 < nbu; c0 += blockDim.x) {
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
    for (int b = threadIdx.x; b < nbu; b += blockDim.x) {
      ulist[b] = b;
      umask[b] = ~uint64_t(0);
    }
  }
  // Resolve every entry's chunk once.
  for (int e = threadIdx.x; e < n_entries; e += blockDim.x)
    uchunk[e] = kv_slot(kv, table[ulist[e]], a.layer, h);
  __syncthreads();
  auto entry = [&](int e, int64_t& chunk, int& lb, uint64_t& mask) {
    chunk = uchunk[e];
    lb = ulist[e];
    mask = umask[e];
  };
  const bool use_bias = a.use_bias;
  const int total_keys = n_entries * bs;
  const int n_stages = (total_keys + k_stage_keys - 1) / k_stage_keys;

  // This thread's rows: r0 = 16 warp + lane / 4, r1 = r0 + 8.
  const int g = lane >> 2;
  int row_tok[2], row_pos[2];
  uint64_t warp_bits = 0;
  int warp_max_pos = -1;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + g + 8 * i;
    const int ti = r / G;
    const bool valid = ti < tile.count;
    row_tok[i] = valid ? ti : 63;
    row_pos[i] = valid ? tok_pos[ti] : -1;
  }
  for (int r = warp * 16; r < warp * 16 + 16; ++r) {
    const int ti = r / G;
    if (ti < tile.count) {
      warp_bits |= 1ull << ti;
      warp_max_pos = max(warp_max_pos, tok_pos[ti]);
    }
  }
  const bf16* qbase = static_cast<const bf16*>(a.q);
  uint32_t qa[D / 16][4];
  load_q_frags<D>(qa, [&](int rr) -> const bf16* {
    const int r = warp * 16 + rr, ti = r / G;
    if (ti >= tile.count) return nullptr;
    return qbase + ((int64_t(tile.first + ti) * H + h) * G + r % G) * D;
  });

  auto stage_at = [&](int i) { return Stage<D>(smem + i * StageLayout<D>::bytes); };
  // Per stage: OR of the key masks and the smallest key position (two warps' halves).
  auto summarize = [&](const Stage<D>& st, int buf) {
    if (threadIdx.x < 64) {
      uint64_t bits = st.mask[threadIdx.x];
      int mp = st.pos[threadIdx.x];
      bits = warp_or64(bits);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mp = min(mp, __shfl_xor_sync(0xffffffffu, mp, o));
      if (lane == 0) {
        stage_bits[buf * 2 + warp] = bits;
        stage_minpos[buf * 2 + warp] = mp;
      }
    }
  };

  WarpAcc<D> acc;
  acc.init();
#pragma unroll
  for (int i = 0; i < k_stages - 1; ++i) {
    if (i < n_stages) load_stage<D>(stage_at(i), kv, i, total_keys, use_bias, entry);
    cp_async_commit();
  }
  if (0 < n_stages) {
    __syncthreads();
    summarize(stage_at(0), 0);
  }
  for (int s = 0; s < n_stages; ++s) {
    const int next = s + k_stages - 1;
    if (next < n_stages)
      load_stage<D>(stage_at(next % k_stages), kv, next, total_keys, use_bias, entry);
    cp_async_commit();
    cp_async_wait<k_stages - 1>();
    __syncthreads();
    if (next < n_stages) summarize(stage_at(next % k_stages), next % k_stages);
    const int buf = s % k_stages;
    const Stage<D> st = stage_at(buf);
    const uint64_t bits = stage_bits[buf * 2] | stage_bits[buf * 2 + 1];
    const int minpos = min(stage_minpos[buf * 2], stage_minpos[buf * 2 + 1]);
    if ((bits & warp_bits) != 0 && minpos <= warp_max_pos) {
      warp_attend<D, 8>(st, 0, qa, a.scale, acc, [&](int i, int key) {
        return ((st.mask[key] >> row_tok[i]) & 1) && st.pos[key] <= row_pos[i]
                   ? (use_bias ? st.add[key] : 0.0f)
                   : -INFINITY;
      });
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  finish_rows<D>(acc);

  const int t4 = lane & 3;
  bf16* out = static_cast<bf16*>(a.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + g + 8 * i, ti = r / G;
    if (ti >= tile.count) continue;
    const float inv = acc.l[i] > 0.0f ? 1.0f / acc.l[i] : 0.0f;
    bf16* o = out + ((int64_t(tile.first + ti) * H + h) * G + r % G) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int c = dn * 8 + 2 * t4;
      *reinterpret_cast<__nv_bfloat162*>(o + c) =
          __floats2bfloat162_rn(acc.o[dn][2 * i] * inv, acc.o[dn][2 * i + 1] * inv);
    }
  }
}

template <int D>
size_t shared_bytes(int nb_max) {
  return size_t(k_stages) * StageLayout<D>::bytes + size_t(nb_max) * (8 + 8 + 4) + 64 * 4 + 4 * 4 +
         k_stages * 2 * (8 + 4) + 16;
}

template <int D>
cudaError_t launch(const PrefillArgs& a, cudaStream_t stream) {
  const size_t smem = shared_bytes<D>(a.nb_max);
  static int configured = 0;
  if (int(smem) > configured) {
    cudaError_t e = cudaFuncSetAttribute(prefill_kernel<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    configured = int(smem);
  }
  dim3 grid(a.n_tiles, a.kv.n_kv_heads);
  prefill_kernel<D><<<grid, 32 * k_warps, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int prefill_tile_tokens(int group) { return group >= k_rows ? 1 : k_rows / group; }

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
