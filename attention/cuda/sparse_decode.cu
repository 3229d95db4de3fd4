#include <algorithm>
#include <type_traits>

#include "attention/cuda/attention_tile.cuh"
#include "attention/cuda/dependent_launch.cuh"
#include "attention/cuda/sparse_decode.cuh"

namespace nosa::attention::cuda {

namespace {

constexpr int k_warps = 4;
constexpr int k_stages = 3;
// A split covers at most this many stages, so that its list entries fit in shared memory.
constexpr int k_max_split_stages = 64;
constexpr int k_max_entries = k_max_split_stages * (k_stage_keys / 16) + 2;
constexpr int k_max_splits = 256;  // the merge keeps [group][splits] weights in shared memory

// Issues the loads of stage s of a decode split: K, V (and, with use_bias, the keys' eviction
// scores) by cp.async, zero-filled past the list's end, and each key's position. The stage's
// first entry and offset are found once (one division); a key's entry is then a shift: a block of
// 64 or more keys holds the whole stage (sh = 31), a smaller one (16 or 32, sh = log2) a slice.
template <int D>
__device__ __forceinline__ void load_decode_stage(const Stage<D>& st, const KvView& kv, int s,
                                                  int total_keys, bool use_bias, int sh,
                                                  const int64_t* ent_chunk, const int* ent_lb) {
  constexpr int segs = D / 8;
  constexpr int rows_per_pass = 32 * k_warps / segs;
  const int bs = kv.block_size;
  const int k0 = s * k_stage_keys;
  const int e0 = k0 / bs, o0 = k0 - e0 * bs;
  const int msk = sh == 31 ? 0x7fffffff : (1 << sh) - 1;
  const bf16* base = static_cast<const bf16*>(kv.kv);
  const int c = threadIdx.x % segs;
#pragma unroll
  for (int j = 0; j < k_stage_keys / rows_per_pass; ++j) {
    const int r = int(threadIdx.x) / segs + j * rows_per_pass, kr = o0 + r;
    const bool valid = k0 + r < total_keys;
    const bf16* src = base;
    if (valid) src = base + (ent_chunk[e0 + (kr >> sh)] * 2 * bs + (kr & msk)) * D + c * 8;
    cp_async16_zfill(st.k + r * StageLayout<D>::lds + c * 8, src, valid);
    cp_async16_zfill(st.v + r * StageLayout<D>::lds + c * 8, src + (valid ? bs * D : 0), valid);
  }
  if (threadIdx.x < k_stage_keys / 4 && use_bias) {
    // Four keys at a time: block sizes are multiples of 16, so a group never spans two blocks.
    const int kr = o0 + 4 * threadIdx.x;
    const bool valid = k0 + 4 * int(threadIdx.x) < total_keys;
    const float* src = kv.bias;
    if (valid) src = kv.bias + ent_chunk[e0 + (kr >> sh)] * bs + (kr & msk);
    cp_async16_zfill(st.add + 4 * threadIdx.x, src, valid);
  }
  if (threadIdx.x < k_stage_keys) {
    const int r = threadIdx.x, kr = o0 + r;
    st.pos[r] = k0 + r < total_keys ? ent_lb[e0 + (kr >> sh)] * bs + (kr & msk) : k_no_key;
  }
}

// grid (n_list, H, splits), 4 warps; warp w takes keys [16 w, 16 w + 16) of every stage. Writes
// the split's unnormalized output rows, their maxima and sums (partial_o / partial_ml).
// The splits whose partial results `partial` holds (and the merge reads).
__host__ __device__ inline int total_splits(const DecodeArgs& a) {
  return a.split_total > 0 ? a.split_total : a.splits;
}

template <int D>
__global__ void __launch_bounds__(32 * k_warps) decode_kernel(DecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  dependent_launch_begin();
  const KvView& kv = a.kv;
  const int li = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
  const int t = a.token_list[li];
  const int H = kv.n_kv_heads, G = a.group, bs = kv.block_size;
  const int pos = a.step.positions[t];
  const int seq = a.step.token_seq[t];
  const int32_t* table = a.step.block_table + int64_t(seq) * a.step.bt_stride;
  const int32_t* sel = a.selection ? a.selection + (int64_t(t) * H + h) * a.k_max : nullptr;

  int n_blocks = pos / bs + 1;
  if (sel) {
    int c = 0;
    for (int i0 = 0; i0 < a.k_max; i0 += blockDim.x) {
      const int i = i0 + threadIdx.x;
      c += __syncthreads_count(i < a.k_max && sel[i] >= 0);
    }
    n_blocks = c;
  }
  const int total_keys = n_blocks * bs;
  const int n_stages = (total_keys + k_stage_keys - 1) / k_stage_keys;
  const int per = (n_stages + a.splits - 1) / a.splits;
  const int s0 = min(split * per, n_stages), s1 = min(s0 + per, n_stages);
  // Where this split's rows go: G rows of D outputs, and (m, l) per row.
  const int total = total_splits(a);
  const int64_t unit = (int64_t(li) * H + h) * total + a.split_begin + split;
  float* po = a.partial + unit * 16 * D;
  float* pml = a.partial + int64_t(a.n_list) * H * total * 16 * D + unit * 16 * 2;
  if (s0 == s1) {
    // Nothing to attend (the misses' part of a row that missed few blocks, or none): the empty
    // partial the merge weighs 0, without the query loads and the warps' merge.
    for (int i = threadIdx.x; i < G * (D / 4); i += blockDim.x) {
      const int r = i / (D / 4), c = (i % (D / 4)) * 4;
      *reinterpret_cast<float4*>(po + r * D + c) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (c == 0) {
        pml[r * 2] = -INFINITY;
        pml[r * 2 + 1] = 0.0f;
      }
    }
    return;
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bf16* qbase = static_cast<const bf16*>(a.q) + (int64_t(t) * H * G + int64_t(h) * G) * D;
  uint32_t qa[D / 16][4];
  load_q_frags<D>(qa, [&](int r) -> const bf16* { return r < G ? qbase + int64_t(r) * D : nullptr; });

  // Resolve this split's list entries (logical block, chunk) once, into shared memory.
  int64_t* ent_chunk = reinterpret_cast<int64_t*>(smem + k_stages * StageLayout<D>::bytes);
  int* ent_lb = reinterpret_cast<int*>(ent_chunk + k_max_entries);
  const int e_base = s0 * k_stage_keys / bs;
  const int e_end = min(n_blocks, (s1 * k_stage_keys + bs - 1) / bs);
  for (int e = e_base + threadIdx.x; e < e_end; e += blockDim.x) {
    const int lb = sel ? int(sel[e]) : e;
    ent_lb[e - e_base] = lb;
    ent_chunk[e - e_base] = kv_slot(kv, table[lb], a.layer, h);
  }
  __syncthreads();
  // Entry arrays shifted so that list entry e is element e.
  const int64_t* ec = ent_chunk - e_base;
  const int* el = ent_lb - e_base;
  const int sh = bs >= k_stage_keys ? 31 : (bs == 16 ? 4 : 5);
  auto stage_at = [&](int i) { return Stage<D>(smem + i * StageLayout<D>::bytes); };
  const bool use_bias = a.use_bias;

  WarpAcc<D> acc;
  acc.init();
#pragma unroll
  for (int i = 0; i < k_stages - 1; ++i) {
    if (s0 + i < s1) load_decode_stage<D>(stage_at(i), kv, s0 + i, total_keys, use_bias, sh, ec, el);
    cp_async_commit();
  }
  for (int s = s0; s < s1; ++s) {
    const int next = s + k_stages - 1;
    if (next < s1)
      load_decode_stage<D>(stage_at((next - s0) % k_stages), kv, next, total_keys, use_bias, sh,
                           ec, el);
    cp_async_commit();
    cp_async_wait<k_stages - 1>();
    __syncthreads();
    const Stage<D> st = stage_at((s - s0) % k_stages);
    warp_attend<D, 2>(st, warp * 16, qa, a.scale, acc, [&](int, int key) {
      return st.pos[key] <= pos ? (use_bias ? st.add[key] : 0.0f) : -INFINITY;
    });
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  finish_rows<D>(acc);

  // Merge the four warps through shared memory: m, l per (warp, row), o per (warp, row, dim).
  float* ml = reinterpret_cast<float*>(smem);         // [4][16][2]
  float* ob = ml + k_warps * 16 * 2;                   // [4][16][D]
  const int g = lane >> 2, t4 = lane & 3;
  if (t4 == 0) {
    ml[(warp * 16 + g) * 2] = acc.m[0];
    ml[(warp * 16 + g) * 2 + 1] = acc.l[0];
    ml[(warp * 16 + g + 8) * 2] = acc.m[1];
    ml[(warp * 16 + g + 8) * 2 + 1] = acc.l[1];
  }
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    const int c = dn * 8 + 2 * t4;
    ob[(warp * 16 + g) * D + c] = acc.o[dn][0];
    ob[(warp * 16 + g) * D + c + 1] = acc.o[dn][1];
    ob[(warp * 16 + g + 8) * D + c] = acc.o[dn][2];
    ob[(warp * 16 + g + 8) * D + c + 1] = acc.o[dn][3];
  }
  __syncthreads();
  // Only the group's G rows are written: float4 of output, (m, l) per row.
  for (int i = threadIdx.x; i < G * (D / 4); i += blockDim.x) {
    const int r = i / (D / 4), c = (i % (D / 4)) * 4;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < k_warps; ++w) m = fmaxf(m, ml[(w * 16 + r) * 2]);
    const float mu = m == -INFINITY ? 0.0f : m;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float l = 0.0f;
#pragma unroll
    for (int w = 0; w < k_warps; ++w) {
      const float f = exp2f(ml[(w * 16 + r) * 2] - mu);
      const float4 v = *reinterpret_cast<const float4*>(ob + (w * 16 + r) * D + c);
      o.x += f * v.x;
      o.y += f * v.y;
      o.z += f * v.z;
      o.w += f * v.w;
      l += f * ml[(w * 16 + r) * 2 + 1];
    }
    *reinterpret_cast<float4*>(po + r * D + c) = o;
    if (c == 0) {
      pml[r * 2] = m;
      pml[r * 2 + 1] = l;
    }
  }
}

// grid (n_list, H), 256 threads: merges the splits of each query head of the group. Each row's
// split weights first (a warp per row, its lanes over the splits), then the outputs as float4.
template <int D>
__global__ void __launch_bounds__(256) combine_kernel(DecodeArgs a) {
  extern __shared__ __align__(16) float wsm[];  // [G][splits] weights, [G] 1 / sum
  dependent_launch_begin();
  const int li = blockIdx.x, h = blockIdx.y;
  const int t = a.token_list[li];
  const int H = a.kv.n_kv_heads, G = a.group, S = total_splits(a);
  const int64_t unit0 = (int64_t(li) * H + h) * S;
  const float* po = a.partial + unit0 * 16 * D;
  const float* pml = a.partial + int64_t(a.n_list) * H * S * 16 * D + unit0 * 16 * 2;
  float* inv = wsm + G * S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < G; r += blockDim.x / 32) {
    float m = -INFINITY;
    for (int s = lane; s < S; s += 32) m = fmaxf(m, pml[(s * 16 + r) * 2]);
    m = warp_max(m);
    const float mu = m == -INFINITY ? 0.0f : m;
    float l = 0.0f;
    for (int s = lane; s < S; s += 32) {
      const float f = exp2f(pml[(s * 16 + r) * 2] - mu);
      wsm[r * S + s] = f;
      l += f * pml[(s * 16 + r) * 2 + 1];
    }
    l = warp_sum(l);
    if (lane == 0) inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
  }
  __syncthreads();
  bf16* out = static_cast<bf16*>(a.out) + (int64_t(t) * H * G + int64_t(h) * G) * D;
  for (int i = threadIdx.x; i < G * (D / 4); i += blockDim.x) {
    const int r = i / (D / 4), c = (i % (D / 4)) * 4;
    const float* w = wsm + r * S;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float* pr = po + int64_t(r) * D + c;
    int s = 0;
    for (; s + 8 <= S; s += 8) {  // the loads of 8 splits in flight at once
      float4 v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        v[u] = __ldcg(reinterpret_cast<const float4*>(pr + int64_t(s + u) * 16 * D));
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float f = w[s + u];
        o.x += f * v[u].x;
        o.y += f * v[u].y;
        o.z += f * v[u].z;
        o.w += f * v[u].w;
      }
    }
    for (; s < S; ++s) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(pr + int64_t(s) * 16 * D));
      const float f = w[s];
      o.x += f * v.x;
      o.y += f * v.y;
      o.z += f * v.z;
      o.w += f * v.w;
    }
    const float k = inv[r];
    __nv_bfloat162 lo = __floats2bfloat162_rn(o.x * k, o.y * k);
    __nv_bfloat162 hi = __floats2bfloat162_rn(o.z * k, o.w * k);
    uint2 packed;
    packed.x = *reinterpret_cast<uint32_t*>(&lo);
    packed.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(out + int64_t(r) * D + c) = packed;
  }
}

template <int D>
cudaError_t launch_part(const DecodeArgs& a, cudaStream_t stream) {
  const int smem_stages = k_stages * StageLayout<D>::bytes + k_max_entries * (8 + 4);
  const int smem_merge = (k_warps * 16 * 2 + k_warps * 16 * D) * 4;
  const int smem = smem_stages > smem_merge ? smem_stages : smem_merge;
  if (const cudaError_t e = allow_shared<decode_kernel<D>>(smem); e != cudaSuccess) return e;
  dim3 grid(a.n_list, a.kv.n_kv_heads, a.splits);
  return launch_dependent(decode_kernel<D>, grid, 32 * k_warps, smem, stream, a);
}

template <int D>
cudaError_t launch_merge(const DecodeArgs& a, cudaStream_t stream) {
  const size_t smem_combine = sizeof(float) * size_t(a.group) * (total_splits(a) + 1);
  if (smem_combine > 48 * 1024) return cudaErrorInvalidValue;  // decode_splits keeps it small
  return launch_dependent(combine_kernel<D>, dim3(a.n_list, a.kv.n_kv_heads), 256, smem_combine,
                          stream, a);
}

// The checks every launch makes, then f(std::integral_constant<int, head_dim>).
template <typename F>
cudaError_t dispatch(const DecodeArgs& a, F f) {
  if (a.n_list == 0) return cudaSuccess;
  if (a.group > 16 || a.group < 1 || a.splits < 1 || a.split_begin < 0 ||
      a.split_begin + a.splits > total_splits(a))
    return cudaErrorInvalidValue;
  switch (a.kv.head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int decode_splits(int n_list, int n_kv_heads, int max_blocks, int block_size, int sm_count) {
  const int pairs = n_list * n_kv_heads;
  if (pairs <= 0) return 1;
  const int stages = (max_blocks * block_size + k_stage_keys - 1) / k_stage_keys;
  // Every split's share must fit k_max_split_stages (its entries live in shared memory).
  const int need = decode_min_splits(max_blocks, block_size);
  // The split count with the least estimated time: whole waves of thread blocks (two per
  // multiprocessor) times the stages of one block plus its start (about k_start stages: the
  // selection, block table and slot lookups before the first load). Ties: fewer splits (less to
  // merge). A split takes at least two stages.
  constexpr int k_start = 3;
  const int slots = 2 * (sm_count > 0 ? sm_count : 1);
  int hi = stages / 2 > need ? stages / 2 : need;
  if (hi > k_max_splits) hi = k_max_splits > need ? k_max_splits : need;
  int best = need;
  int64_t best_cost = -1;
  for (int k = best; k <= hi; ++k) {
    const int64_t waves = (int64_t(pairs) * k + slots - 1) / slots;
    const int64_t cost = waves * ((stages + k - 1) / k + k_start);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = k;
    }
  }
  return best;
}

size_t decode_partial_floats(int n_list, int n_kv_heads, int splits, int head_dim) {
  return size_t(n_list) * n_kv_heads * splits * 16 * (head_dim + 2);
}

int decode_min_splits(int max_blocks, int block_size) {
  const int stages = (max_blocks * block_size + k_stage_keys - 1) / k_stage_keys;
  return std::max(1, (stages + k_max_split_stages - 1) / k_max_split_stages);
}

cudaError_t launch_sparse_decode(const DecodeArgs& a, cudaStream_t stream) {
  return dispatch(a, [&](auto d) {
    const cudaError_t e = launch_part<decltype(d)::value>(a, stream);
    return e != cudaSuccess ? e : launch_merge<decltype(d)::value>(a, stream);
  });
}

cudaError_t launch_sparse_decode_part(const DecodeArgs& a, cudaStream_t stream) {
  return dispatch(a, [&](auto d) { return launch_part<decltype(d)::value>(a, stream); });
}

cudaError_t launch_sparse_decode_merge(const DecodeArgs& a, cudaStream_t stream) {
  return dispatch(a, [&](auto d) { return launch_merge<decltype(d)::value>(a, stream); });
}

}  // namespace nosa::attention::cuda
