#include "memory/cuda/partitions.cuh"

#include <algorithm>

#include "memory/cuda/chunk_copy.cuh"

namespace nosa::memory::cuda {

namespace {

constexpr int k_threads = 256;
// Up to this many misses in a row, warp 0 takes the least recently used free slots one at a time
// (a warp-wide minimum per miss); more misses rank every free slot against all the others. A
// decoding step misses a few blocks per row, and ranking all R slots (R^2 comparisons, about
// 1 million at R = 1024) was the kernel's cost whatever the misses.
constexpr int k_pick_max = 32;

// One thread block per (token, KV head): the row's hits and misses, then its misses' slots.
__global__ void decide_kernel(PartitionArgs a, PartitionCopy* copies, int* counts) {
  extern __shared__ unsigned long long smem[];
  const int R = a.part_slots, k = a.k, H = a.n_heads;
  unsigned long long* keys = smem;                                 // [R]: (stamp, slot) or max
  long long* miss_chunk = reinterpret_cast<long long*>(keys + R);  // [k]
  long long* miss_block = miss_chunk + k;                          // [k]
  int* miss_flag = reinterpret_cast<int*>(miss_block + k);         // [k]
  unsigned char* used = reinterpret_cast<unsigned char*>(miss_flag + k);  // [R]
  __shared__ unsigned long long count[part_counters];
  __shared__ int n_miss, width, n_picked;
  __shared__ int picked[k_pick_max];  // the slots taken, least recently used first

  const uint32_t stamp = *a.step_stamp;
  const int t = blockIdx.x / H, h = blockIdx.x % H;
  const int seq = a.token_seq[t];
  const int32_t* table = a.block_table + int64_t(seq) * a.bt_stride;
  const int64_t local = ((int64_t(a.seq_partition[seq]) * a.n_layers + a.layer) * H + h) * R;
  const int64_t base = a.part_base + local;
  const int32_t* row = a.selection + (int64_t(t) * H + h) * k;

  for (int j = threadIdx.x; j < R; j += blockDim.x) used[j] = 0;
  if (threadIdx.x < part_counters) count[threadIdx.x] = 0;
  if (threadIdx.x == 0) width = k;
  __syncthreads();
  // The row ends at its first -1, as in the reference.
  for (int i = threadIdx.x; i < k; i += blockDim.x)
    if (row[i] < 0) atomicMin(&width, i);
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    int miss = 0;
    const int32_t b = row[i];
    if (i < width) {
      const int64_t block = table[b];
      const int64_t chunk = (block * a.n_layers + a.layer) * H + h;
      const int32_t s = a.slot_table[chunk];
      if (s < 0) {
        miss = 1;
        miss_chunk[i] = chunk;
        miss_block[i] = block;
      } else {
        atomicAdd(&count[part_hits], 1ull);
        if (s >= base && s < base + R) {
          used[s - base] = 1;
          const uint32_t last = a.part_stamp[local + (s - base)];
          if (last + 1 == stamp) atomicAdd(&count[part_overlap], 1ull);
          // Only a prefetch stamps a slot of this layer before the layer's own round.
          if (last == stamp) atomicAdd(&count[part_prefetch_hits], 1ull);
        } else {
          atomicAdd(&count[part_overlap], 1ull);  // a block the host path keeps
        }
      }
    }
    miss_flag[i] = miss;
  }
  __syncthreads();
  // A prefetch's wrong guesses become as old as the step before's selection (as in the
  // reference); each thread re-stamps the slots whose keys it computes below.
  if (!a.speculative)
    for (int j = threadIdx.x; j < R; j += blockDim.x)
      if (!used[j] && a.part_stamp[local + j] == stamp) a.part_stamp[local + j] = stamp - 1;
  if (threadIdx.x < 32) {
    // Warp 0 lists the misses in the order of the selection, 32 entries at a time; miss_flag[i]
    // becomes entry i's place among the misses (r >= 0) or the hits (-1 - r). Each pass reads
    // its entries before any is moved, and an entry only moves down.
    const int lane = threadIdx.x;
    const unsigned below = (1u << lane) - 1;
    int r = 0, n_hit = 0;
    for (int at = 0; at < width; at += 32) {
      const int i = at + lane;
      const bool in = i < width, miss = in && miss_flag[i];
      const unsigned misses = __ballot_sync(~0u, miss), hits = __ballot_sync(~0u, in && !miss);
      long long chunk = 0, block = 0;
      if (miss) {
        chunk = miss_chunk[i];
        block = miss_block[i];
      }
      __syncwarp();
      if (miss) {
        const int place = r + __popc(misses & below);
        miss_chunk[place] = chunk;
        miss_block[place] = block;
        miss_flag[i] = place;
      } else if (in) {
        miss_flag[i] = -1 - (n_hit + __popc(hits & below));
      }
      __syncwarp();
      r += __popc(misses);
      n_hit += __popc(hits);
    }
    if (lane == 0) {
      n_miss = r;
      counts[blockIdx.x] = r;
    }
  }
  __syncthreads();
  const int m = n_miss;
  if (a.hit_rows) {
    const int64_t at = (int64_t(t) * H + h) * k;
    const int n_hit = width - m;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      if (i < width) {
        const int place = miss_flag[i];
        if (place >= 0)
          a.miss_rows[at + place] = row[i];
        else
          a.hit_rows[at - 1 - place] = row[i];
      }
      if (i >= n_hit) a.hit_rows[at + i] = -1;
      if (i >= m) a.miss_rows[at + i] = -1;
    }
  }
  if (m > 0) {
    for (int j = threadIdx.x; j < R; j += blockDim.x)
      keys[j] = used[j] ? ~0ull
                        : (static_cast<unsigned long long>(a.part_stamp[local + j]) << 32) |
                              static_cast<unsigned long long>(j);
    __syncthreads();
  }
  if (m > 0 && m <= k_pick_max && threadIdx.x < 32) {
    // The free slots by (stamp, slot), smallest first, one warp-wide minimum per miss; a lane
    // keeps the minimum of its slots (j = lane mod 32) and refreshes it when its slot is taken.
    const int lane = threadIdx.x;
    auto lane_min = [&] {
      unsigned long long least = ~0ull;
      for (int j = lane; j < R; j += 32) least = min(least, keys[j]);
      return least;
    };
    unsigned long long mine = lane_min();
    int r = 0;
    for (; r < m; ++r) {
      unsigned long long least = mine;
      for (int step = 16; step > 0; step >>= 1)
        least = min(least, __shfl_xor_sync(~0u, least, step));
      if (least == ~0ull) break;  // no free slot left
      const int j = int(least & 0xffffffffu);
      if (lane == 0) picked[r] = j;
      if ((j & 31) == lane) {
        keys[j] = ~0ull;
        mine = lane_min();
      }
    }
    if (lane == 0) n_picked = r;
  }
  __syncthreads();
  PartitionCopy* out = copies + int64_t(blockIdx.x) * k;  // this row's copies
  const int64_t chunk_bytes = a.kv_bytes + a.bias_bytes;
  // Free slot j takes miss `rank`: evicts the chunk it held if the table still points at it.
  auto take = [&](int j, int rank) {
    const int32_t slot = int32_t(base + j);
    const int64_t old = a.part_chunk[local + j];
    if (old >= 0 && atomicCAS(&a.slot_table[old], slot, -1) == slot)
      atomicAdd(&count[part_evictions], 1ull);
    const int64_t chunk = miss_chunk[rank];
    a.part_chunk[local + j] = chunk;
    a.part_stamp[local + j] = stamp;
    a.slot_table[chunk] = slot;
    const char* host = a.block_host[miss_block[rank]];
    if (!host) atomicAdd(&count[part_errors], 1ull);
    out[rank] = {host ? host + (int64_t(a.layer) * H + h) * chunk_bytes : nullptr, slot};
  };
  if (!a.speculative)  // a prefetch stamps only what it copies (as in the reference)
    for (int j = threadIdx.x; j < R; j += blockDim.x)
      if (used[j]) a.part_stamp[local + j] = stamp;
  if (m > 0 && m <= k_pick_max) {
    for (int r = threadIdx.x; r < n_picked; r += blockDim.x) take(picked[r], r);
    if (threadIdx.x == 0) count[part_misses] = static_cast<unsigned long long>(n_picked);
  } else if (m > 0) {
    int placed = 0;
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      if (used[j]) continue;
      // The j-th free slot's rank among the free ones, least recently used first.
      const unsigned long long key = keys[j];
      int rank = 0;
      for (int x = 0; x < R; ++x) rank += keys[x] < key;
      if (rank >= m) continue;
      ++placed;
      take(j, rank);
    }
    if (placed) atomicAdd(&count[part_misses], static_cast<unsigned long long>(placed));
  }
  __syncthreads();
  if (threadIdx.x == 0 && count[part_misses] < static_cast<unsigned long long>(m)) {
    // Misses without a slot: their copies stay empty and the step's result is wrong; the host
    // reports it (KvCache::sync_stats).
    count[part_errors] += static_cast<unsigned long long>(m) - count[part_misses];
    for (int r = int(count[part_misses]); r < m; ++r) out[r] = {nullptr, -1};
  }
  if (threadIdx.x == 0 && a.speculative) {
    // A prefetch's copies count apart, and its hits not at all (as in the reference).
    count[part_prefetched] = count[part_misses];
    count[part_misses] = count[part_hits] = count[part_overlap] = count[part_prefetch_hits] = 0;
  }
  __syncthreads();
  if (threadIdx.x < part_counters && count[threadIdx.x])
    atomicAdd(reinterpret_cast<unsigned long long*>(&a.counters[threadIdx.x]), count[threadIdx.x]);
}

// Thread blocks (row, j) copy the row's misses j, j + gridDim.y, ...: short-lived blocks (a
// decoding step misses a few chunks per row), so that the kernels running beside the copies
// (attention over the hits) find multiprocessors as soon as a block ends, where a grid of
// long-lived blocks looping over one list held every multiprocessor for the whole copy. A grid
// with fewer blocks than rows copies the rows in turn.
__global__ void copy_kernel(const PartitionCopy* copies, const int* counts, int rows, int k,
                            char* kv, char* bias, int64_t kv_bytes, int64_t bias_bytes) {
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const int n = counts[r];
    const PartitionCopy* row = copies + int64_t(r) * k;
    for (int x = blockIdx.y; x < n; x += gridDim.y) {
      const PartitionCopy c = row[x];
      if (c.host)
        copy_chunk_block(c.host, kv + c.slot * kv_bytes, bias + c.slot * bias_bytes, kv_bytes,
                         bias_bytes, true);
    }
  }
}

__global__ void next_stamp_kernel(uint32_t* at) { *at += 1; }

}  // namespace

cudaError_t launch_partition_decisions(const PartitionArgs& a, PartitionCopy* copies, int* counts,
                                       cudaStream_t stream) {
  if (a.speculative && a.layer == 0) return cudaErrorInvalidValue;  // it would see the old stamp
  if (a.layer == 0) {  // a new step (as in the reference)
    next_stamp_kernel<<<1, 1, 0, stream>>>(a.step_stamp);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  const int64_t rows = int64_t(a.n_tokens) * a.n_heads;
  if (rows == 0 || a.k == 0) return cudaSuccess;
  if (a.kv_bytes % 16 || a.bias_bytes % 16 || a.part_slots < 1 ||
      a.part_slots > k_max_partition_slots || (a.hit_rows == nullptr) != (a.miss_rows == nullptr))
    return cudaErrorInvalidValue;
  const size_t shared = size_t(a.part_slots) * 9 + size_t(a.k) * 20 + 16;
  if (shared > 40 * 1024) {
    // Only a selection about a thousand blocks wide comes near the default 48 KiB (1024 slots
    // take 9 KiB; the kernel's own shared variables add a little); the device's limit then
    // decides.
    const cudaError_t e = cudaFuncSetAttribute(
        decide_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    if (e != cudaSuccess) return e;
  }
  decide_kernel<<<unsigned(rows), k_threads, shared, stream>>>(a, copies, counts);
  return cudaGetLastError();
}

cudaError_t launch_partition_copies(const PartitionArgs& a, const PartitionCopy* copies,
                                    const int* counts, cudaStream_t stream, int max_row_blocks) {
  const int64_t rows = int64_t(a.n_tokens) * a.n_heads;
  if (rows == 0 || a.k == 0) return cudaSuccess;
  // Two blocks per row: most rows miss one or two chunks.
  const int64_t row_blocks = max_row_blocks > 0 ? std::min<int64_t>(rows, max_row_blocks) : rows;
  const dim3 grid(unsigned(row_blocks), unsigned(std::min(a.k, 2)));
  copy_kernel<<<grid, 256, 0, stream>>>(copies, counts, int(rows), a.k, a.kv, a.bias,
                                         a.kv_bytes, a.bias_bytes);
  return cudaGetLastError();
}

cudaError_t launch_resident_partitions(const PartitionArgs& a, PartitionCopy* copies, int* counts,
                                       cudaStream_t stream) {
  const cudaError_t e = launch_partition_decisions(a, copies, counts, stream);
  if (e != cudaSuccess) return e;
  return launch_partition_copies(a, copies, counts, stream);
}

}  // namespace nosa::memory::cuda
