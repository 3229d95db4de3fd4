// A one-shot all-reduce among the GPUs of one host, for the small, latency-bound all-reduces of
// decoding (a few hundred KiB per layer): every rank copies its tensor into a staging buffer that
// the others map (CUDA IPC over NVLink), the ranks meet at a flag barrier, and each sums all
// staging buffers in rank order, so every rank gets the same bits. One kernel, no NCCL protocol
// round trips: about 10 us where NCCL takes 35 us.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nosa::parallel::cuda {

constexpr int k_max_peer_ranks = 8;
constexpr int k_max_reduce_blocks = 64;
// Bytes of one rank's flags: [k_max_reduce_blocks][k_max_peer_ranks] uint32.
constexpr int64_t k_flag_bytes = int64_t(k_max_reduce_blocks) * k_max_peer_ranks * 4;

struct PeerBuffers {
  // Each rank's staging memory, two halves of half_bytes (calls alternate between them, so a
  // rank may fill one while slower peers still read the other).
  char* staging[k_max_peer_ranks] = {};
  // Each rank's flags: flags[r][block * k_max_peer_ranks + s] = the last call in which rank s's
  // thread block `block` reached the barrier, written by s into r's memory.
  uint32_t* flags[k_max_peer_ranks] = {};
  // This rank's call counter in its own device memory: [0] the last call made, [1] the thread
  // blocks of the current call that have finished. The kernel numbers its call itself (the last
  // block to finish advances [0]), so a CUDA graph that records the launch numbers every replay
  // anew; the ranks agree because they launch the same all-reduces in the same order.
  uint32_t* call_counter = nullptr;
  int64_t half_bytes = 0;
  int rank = 0, size = 1;
  // A peer that does not reach the barrier within this time died or hangs: the kernel traps, so
  // the rank fails with a CUDA error instead of spinning forever.
  uint64_t timeout_ns = 0;
};

enum class ReduceDType { bf16, f32 };

// Bytes of the call counter (PeerBuffers::call_counter), zeroed before the first call.
constexpr int64_t k_call_counter_bytes = 16;

// Sums `n` elements of `data` (device memory of this rank) over the ranks, in place. n * element
// size must be a multiple of 16 and at most half_bytes. Safe to record in a CUDA graph.
cudaError_t launch_peer_all_reduce(const PeerBuffers& buffers, void* data, int64_t n,
                                   ReduceDType dtype, cudaStream_t stream);

}  // namespace nosa::parallel::cuda
