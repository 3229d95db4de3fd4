#include "attention/cuda/attention_tile.cuh"
#include "attention/cuda/sparse_decode.cuh"

namespace nosa::attention::cuda {

namespace {

constexpr int k_warps = 4;
constexpr int k_stages = 3;
// A split covers at most this many stages, so that its list entries fit in shared memory.
constexpr int k_max_split_stages = 64;
constexpr int k_max_entries = k_max_split_stages * (k_stage_keys / 16) + 2;

// grid (n_list, H, splits), 4 warps; warp w takes keys [16 w, 16 w + 16) of every stage.
template <int D>
__global__ void __launch_bounds__(32 * k_warps) decode_kernel(DecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
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
  auto stage_at = [&](int i) { return Stage<D>(smem + i * StageLayout<D>::bytes); };
  auto entry = [&](int e, int64_t& chunk, int& lb, uint64_t& mask) {
    chunk = ent_chunk[e - e_base];
    lb = ent_lb[e - e_base];
    mask = ~uint64_t(0);
  };
  const bool use_bias = a.use_bias;

  WarpAcc<D> acc;
  acc.init();
#pragma unroll
  for (int i = 0; i < k_stages - 1; ++i) {
    if (s0 + i < s1) load_stage<D>(stage_at(i), kv, s0 + i, total_keys, use_bias, entry);
    cp_async_commit();
  }
  for (int s = s0; s < s1; ++s) {
    const int next = s + k_stages - 1;
    if (next < s1)
      load_stage<D>(stage_at((next - s0) % k_stages), kv, next, total_keys, use_bias, entry);
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
  float* part = a.partial + ((int64_t(li) * H + h) * a.splits + split) * 16 * (D + 2);
  for (int i = threadIdx.x; i < 16 * D; i += blockDim.x) {
    const int r = i / D, c = i % D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < k_warps; ++w) m = fmaxf(m, ml[(w * 16 + r) * 2]);
    const float mu = m == -INFINITY ? 0.0f : m;
    float o = 0.0f, l = 0.0f;
#pragma unroll
    for (int w = 0; w < k_warps; ++w) {
      const float f = exp2f(ml[(w * 16 + r) * 2] - mu);
      o += f * ob[(w * 16 + r) * D + c];
      l += f * ml[(w * 16 + r) * 2 + 1];
    }
    part[r * (D + 2) + c] = o;
    if (c == 0) {
      part[r * (D + 2) + D] = m;
      part[r * (D + 2) + D + 1] = l;
    }
  }
}

// grid (n_list, H), 256 threads over (row, dim): merges the splits of each query head of the group.
template <int D>
__global__ void combine_kernel(DecodeArgs a) {
  const int li = blockIdx.x, h = blockIdx.y;
  const int t = a.token_list[li];
  const int H = a.kv.n_kv_heads, G = a.group;
  const float* part = a.partial + (int64_t(li) * H + h) * a.splits * 16 * (D + 2);
  bf16* out = static_cast<bf16*>(a.out) + (int64_t(t) * H * G + int64_t(h) * G) * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int r = i / D, c = i % D;
    float m = -INFINITY;
    for (int s = 0; s < a.splits; ++s) m = fmaxf(m, part[(s * 16 + r) * (D + 2) + D]);
    const float mu = m == -INFINITY ? 0.0f : m;
    float o = 0.0f, l = 0.0f;
    for (int s = 0; s < a.splits; ++s) {
      const float* p = part + (s * 16 + r) * (D + 2);
      const float f = exp2f(p[D] - mu);
      o += f * p[c];
      l += f * p[D + 1];
    }
    out[int64_t(r) * D + c] = __float2bfloat16(l > 0.0f ? o / l : 0.0f);
  }
}

template <int D>
cudaError_t launch(const DecodeArgs& a, cudaStream_t stream) {
  const int smem_stages = k_stages * StageLayout<D>::bytes + k_max_entries * (8 + 4);
  const int smem_merge = (k_warps * 16 * 2 + k_warps * 16 * D) * 4;
  const int smem = smem_stages > smem_merge ? smem_stages : smem_merge;
  static bool configured = false;
  if (!configured) {
    cudaError_t e =
        cudaFuncSetAttribute(decode_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  dim3 grid(a.n_list, a.kv.n_kv_heads, a.splits);
  decode_kernel<D><<<grid, 32 * k_warps, smem, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  combine_kernel<D><<<dim3(a.n_list, a.kv.n_kv_heads), 256, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int decode_splits(int n_list, int n_kv_heads, int max_blocks, int block_size, int sm_count) {
  const int pairs = n_list * n_kv_heads;
  if (pairs <= 0) return 1;
  const int stages = (max_blocks * block_size + k_stage_keys - 1) / k_stage_keys;
  int splits = (4 * sm_count + pairs - 1) / pairs;
  const int cap = stages / 4 > 1 ? stages / 4 : 1;
  if (splits > cap) splits = cap;
  // Every split's share must fit k_max_split_stages (its entries live in shared memory).
  const int need = (stages + k_max_split_stages - 1) / k_max_split_stages;
  if (splits < need) splits = need;
  if (splits < 1) splits = 1;
  return splits;
}

size_t decode_partial_floats(int n_list, int n_kv_heads, int splits, int head_dim) {
  return size_t(n_list) * n_kv_heads * splits * 16 * (head_dim + 2);
}

cudaError_t launch_sparse_decode(const DecodeArgs& a, cudaStream_t stream) {
  if (a.n_list == 0) return cudaSuccess;
  if (a.group > 16 || a.group < 1) return cudaErrorInvalidValue;
  switch (a.kv.head_dim) {
    case 64: return launch<64>(a, stream);
    case 128: return launch<128>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace nosa::attention::cuda
