#include "attention/cuda/compress.cuh"
#include "attention/cuda/dependent_launch.cuh"
#include "attention/cuda/device_common.cuh"

namespace nosa::attention::cuda {

namespace {

// grid (T, H), block d/2 threads (two elements each).
__global__ void append_kv_kernel(AppendKvArgs a) {
  dependent_launch_begin();
  const int t = blockIdx.x, h = blockIdx.y;
  const KvView& kv = a.kv;
  const int d = kv.head_dim, bs = kv.block_size, H = kv.n_kv_heads;
  const int seq = a.step.token_seq[t];
  const int pos = a.step.positions[t];
  const int block = a.step.block_table[int64_t(seq) * a.step.bt_stride + pos / bs];
  const int row = pos % bs;
  const int64_t chunk = kv_slot(kv, block, a.layer, h);
  bf16* base = static_cast<bf16*>(kv.kv);
  __nv_bfloat162* kdst = reinterpret_cast<__nv_bfloat162*>(base + (chunk * 2 * bs + row) * d);
  __nv_bfloat162* vdst =
      reinterpret_cast<__nv_bfloat162*>(base + ((chunk * 2 + 1) * bs + row) * d);
  const __nv_bfloat162* ksrc =
      reinterpret_cast<const __nv_bfloat162*>(static_cast<const bf16*>(a.k) + (int64_t(t) * H + h) * d);
  const __nv_bfloat162* vsrc = reinterpret_cast<const __nv_bfloat162*>(
      static_cast<const bf16*>(a.v_all) + (int64_t(t) * a.hv + a.v_head_begin + h) * d);
  for (int i = threadIdx.x; i < d / 2; i += blockDim.x) {
    kdst[i] = ksrc[i];
    vdst[i] = vsrc[i];
  }
  if (threadIdx.x == 0) kv.bias[chunk * bs + row] = a.c ? a.c[int64_t(t) * H + h] : 0.0f;
}

// grid (max_new_windows, S, H), block d threads. Sums in the CPU reference's order.
__global__ void update_compressed_kernel(UpdateCompressedArgs a) {
  dependent_launch_begin();
  const int s = blockIdx.y, h = blockIdx.z;
  const KvView& kv = a.kv;
  const int d = kv.head_dim, bs = kv.block_size, m = kv.keys_per_block;
  const int64_t n_past = a.step.seq_n_past[s], n_new = a.step.seq_n_new[s];
  const int j0 = compressed_count(n_past - 1, a.kernel_size, a.kernel_stride);
  const int j1 = compressed_count(n_past + n_new - 1, a.kernel_size, a.kernel_stride);
  const int j = j0 + blockIdx.x;
  if (j >= j1) return;
  const int32_t* table = a.step.block_table + int64_t(s) * a.step.bt_stride;
  const bf16* keys = static_cast<const bf16*>(kv.kv);
  const int64_t home = kv_chunk(kv, table[j / m], a.layer, h);
  for (int x = threadIdx.x; x < d; x += blockDim.x) {
    float acc = 0.0f;
    for (int i = 0; i < a.kernel_size; ++i) {
      const int64_t pos = int64_t(j) * a.kernel_stride + i;
      const int64_t chunk = kv_slot(kv, table[pos / bs], a.layer, h);
      acc = __fadd_rn(acc, __bfloat162float(keys[(chunk * 2 * bs + pos % bs) * d + x]));
    }
    static_cast<bf16*>(kv.ck)[(home * m + j % m) * d + x] =
        __float2bfloat16(__fdiv_rn(acc, float(a.kernel_size)));
  }
  if (threadIdx.x == 0) {
    double e = 0.0;
    if (a.scores)
      for (int i = 0; i < a.kernel_size; ++i) {
        const int64_t pos = int64_t(j) * a.kernel_stride + i;
        const int64_t chunk = kv_slot(kv, table[pos / bs], a.layer, h);
        e += double(kv.bias[chunk * bs + pos % bs]);
      }
    kv.ck_scores[home * m + j % m] = a.scores ? float(e / a.kernel_size) : 0.0f;
  }
}

}  // namespace

cudaError_t launch_append_kv(const AppendKvArgs& a, cudaStream_t stream) {
  if (a.step.n_tokens == 0) return cudaSuccess;
  dim3 grid(a.step.n_tokens, a.kv.n_kv_heads);
  return launch_dependent(append_kv_kernel, grid, a.kv.head_dim / 2 < 32 ? 32 : a.kv.head_dim / 2, 0,
                          stream, a);
}

cudaError_t launch_update_compressed(const UpdateCompressedArgs& a, cudaStream_t stream) {
  if (a.max_new_windows <= 0 || a.step.n_seqs == 0) return cudaSuccess;
  dim3 grid(a.max_new_windows, a.step.n_seqs, a.kv.n_kv_heads);
  return launch_dependent(update_compressed_kernel, grid, a.kv.head_dim, 0, stream, a);
}

}  // namespace nosa::attention::cuda
