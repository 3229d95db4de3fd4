// The block list of a prefill tile, shared by both prefill attention kernels (sparse_prefill.cu's
// mma.sync kernel, prefill_wgmma.cu's wgmma kernel): the union of the blocks the tile's tokens
// selected for one KV head, ascending, each with the tokens that selected it and its KV slot.
#pragma once

#include <cstdint>

#include "attention/cuda/device_common.cuh"
#include "attention/cuda/sparse_prefill.cuh"

namespace nosa::attention::cuda {

// Writes the tile's block list for KV head h: ulist[e] the e-th block, umask[e] the tile's tokens
// (bit i: token tile.first + i) that selected it, uchunk[e] its KV slot (chunk indices of device
// memory fit in 32 bits), and returns the number of entries. With a.selection, the union of the
// tokens' selections (blocks past nbu - 1, bad input, are ignored); without, every block up to
// nbu - 1, selected by every token. umask, ulist and uchunk hold nbu entries, warp_count
// Threads / 32 ints, all in shared memory. Every thread of the block (Threads of them) calls it;
// it ends with a barrier.
template <int Threads>
__device__ int tile_block_list(const PrefillArgs& a, const PrefillTile& tile, int h, int nbu,
                               const int32_t* table, uint64_t* umask, int* ulist, int* uchunk,
                               int* warp_count) {
  constexpr int warps = Threads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int H = a.kv.n_kv_heads;
  int n_entries = nbu;
  if (a.selection) {
    for (int b = threadIdx.x; b < nbu; b += Threads) umask[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < tile.count * a.k_max; i += Threads) {
      const int ti = i / a.k_max, e = i % a.k_max;
      const int b = a.selection[(int64_t(tile.first + ti) * H + h) * a.k_max + e];
      if (b >= 0 && b < nbu) atomicOr(reinterpret_cast<unsigned long long*>(&umask[b]), 1ull << ti);
    }
    __syncthreads();
    int base = 0;
    for (int c0 = 0; c0 < nbu; c0 += Threads) {
      const int b = c0 + threadIdx.x;
      const uint64_t mk = b < nbu ? umask[b] : 0;
      const bool f = mk != 0;
      const unsigned ballot = __ballot_sync(0xffffffffu, f);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();
      int offset = base, total = 0;
      for (int w = 0; w < warps; ++w) {
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
    for (int b = threadIdx.x; b < nbu; b += Threads) {
      ulist[b] = b;
      umask[b] = ~uint64_t(0);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_entries; e += Threads)
    uchunk[e] = int(kv_slot(a.kv, table[ulist[e]], a.layer, h));
  __syncthreads();
  return n_entries;
}

}  // namespace nosa::attention::cuda
