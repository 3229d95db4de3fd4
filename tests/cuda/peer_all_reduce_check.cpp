// Run under `mpirun -np N` with N GPUs on one host: the peer all-reduce must give every rank the
// float32 sum, in rank order, of every rank's tensor, rounded once, for bf16 and float32 tensors
// from 16 bytes to the 8 MiB limit, over many back-to-back calls (the two staging halves and the
// barrier flags), and when recorded in a CUDA graph that is replayed between direct calls (the
// kernel numbers its calls on the device). Exit 0: all equal; 1: a mismatch; 3: the peer path is unavailable here.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "parallel/mpi.h"
#include "parallel/peer_all_reduce.h"
#include "runtime/core/dtype.h"

using namespace nosa;

namespace {

// Rank r's value i in call c: distinct per rank, call and index, exactly representable in bf16.
float value(int r, int c, int64_t i) {
  uint32_t h = uint32_t(i) * 2654435761u ^ uint32_t(r * 7919 + c * 104729);
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  return bf16_to_f32(f32_to_bf16(float(int(h % 20001) - 10000) / 977.0f));
}

}  // namespace

int main() {
  parallel::MpiContext& mpi = parallel::MpiContext::get();
  const int np = mpi.world_size();
  int devices = 0;
  cudaGetDeviceCount(&devices);
  if (np < 2 || devices < np) {
    std::printf("peer all-reduce check: needs 2+ ranks with a GPU each (ranks %d, GPUs %d)\n", np,
                devices);
    return 3;
  }
  parallel::Replica replica = parallel::make_replica(np);
  const int device = mpi.local_rank();
  cudaSetDevice(device);
  auto peer = parallel::PeerAllReduce::create(replica, device, std::chrono::seconds(30));
  if (!peer) {
    std::printf("peer all-reduce check: the peer path is unavailable on this machine\n");
    return 3;
  }
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  struct Case {
    DType dtype;
    int64_t n;
    int calls;
  };
  const Case cases[] = {{DType::bf16, 8, 200},          {DType::f32, 4, 50},
                        {DType::bf16, 64 * 2048, 20},   {DType::bf16, 64 * 4096, 20},
                        {DType::f32, 64 * 4096, 10},    {DType::bf16, 4 * 1024 * 1024, 3},
                        {DType::f32, 2 * 1024 * 1024 - 4, 3}};
  int bad = 0, call = 0;
  for (const Case& c : cases) {
    const size_t esize = dtype_size(c.dtype);
    void* dev = nullptr;
    cudaMalloc(&dev, size_t(c.n) * esize);
    std::vector<char> host(size_t(c.n) * esize), back(host.size()), want(host.size());
    Tensor t = Tensor::borrow(dev, c.dtype, {c.n}, Device::cuda);
    if (!peer->accepts(t)) {
      std::printf("rank %d: tensor of %lld elements not accepted\n", replica.rank, (long long)c.n);
      ++bad;
      continue;
    }
    for (int k = 0; k < c.calls; ++k, ++call) {
      for (int64_t i = 0; i < c.n; ++i) {
        float sum = 0.f;
        for (int r = 0; r < np; ++r) sum += value(r, call, i);
        const float mine = value(replica.rank, call, i);
        if (c.dtype == DType::bf16) {
          const uint16_t a = f32_to_bf16(mine), b = f32_to_bf16(sum);
          std::memcpy(host.data() + i * 2, &a, 2);
          std::memcpy(want.data() + i * 2, &b, 2);
        } else {
          std::memcpy(host.data() + i * 4, &mine, 4);
          std::memcpy(want.data() + i * 4, &sum, 4);
        }
      }
      cudaMemcpyAsync(dev, host.data(), host.size(), cudaMemcpyHostToDevice, stream);
      peer->all_reduce_sum(t, stream);
      cudaMemcpyAsync(back.data(), dev, back.size(), cudaMemcpyDeviceToHost, stream);
      const cudaError_t rc = cudaStreamSynchronize(stream);
      if (rc != cudaSuccess) {
        std::printf("rank %d: CUDA error %s\n", replica.rank, cudaGetErrorString(rc));
        return 1;
      }
      if (back != want) {
        int64_t first = 0;
        while (std::memcmp(back.data() + first * esize, want.data() + first * esize, esize) == 0)
          ++first;
        std::printf("rank %d: %s x %lld, call %d: element %lld differs from the rank-order sum\n",
                    replica.rank, dtype_name(c.dtype), (long long)c.n, k, (long long)first);
        ++bad;
        break;
      }
    }
    cudaFree(dev);
  }
  // A CUDA graph of two all-reduces of different sizes (so different block counts), replayed with
  // new inputs, with a direct call between replays: every replay must sum its own inputs.
  {
    const int64_t n_big = 64 * 2048, n_small = 8;
    const int64_t n = n_big + n_small;
    void *dev = nullptr, *src = nullptr;
    cudaMalloc(&dev, size_t(n) * 2);
    cudaMalloc(&src, size_t(n) * 2);
    Tensor big = Tensor::borrow(dev, DType::bf16, {n_big}, Device::cuda);
    Tensor small = Tensor::borrow(static_cast<uint16_t*>(dev) + n_big, DType::bf16, {n_small},
                                  Device::cuda);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed);
    cudaMemcpyAsync(dev, src, size_t(n) * 2, cudaMemcpyDeviceToDevice, stream);
    peer->all_reduce_sum(big, stream);
    peer->all_reduce_sum(small, stream);
    cudaError_t rc = cudaStreamEndCapture(stream, &graph);
    if (rc == cudaSuccess) rc = cudaGraphInstantiate(&exec, graph, 0);
    if (rc != cudaSuccess) {
      std::printf("rank %d: recording the all-reduce graph failed: %s\n", replica.rank,
                  cudaGetErrorString(rc));
      return 1;
    }
    const size_t count = static_cast<size_t>(n);
    std::vector<uint16_t> host(count), want(count), back(count);
    for (int k = 0; k < 12 && !bad; ++k, ++call) {
      for (int64_t i = 0; i < n; ++i) {
        float sum = 0.f;
        for (int r = 0; r < np; ++r) sum += value(r, call, i);
        host[size_t(i)] = f32_to_bf16(value(replica.rank, call, i));
        want[size_t(i)] = f32_to_bf16(sum);
      }
      cudaMemcpy(src, host.data(), size_t(n) * 2, cudaMemcpyHostToDevice);
      cudaGraphLaunch(exec, stream);
      cudaMemcpyAsync(back.data(), dev, size_t(n) * 2, cudaMemcpyDeviceToHost, stream);
      // A direct call between replays (on data no one checks) moves the call counter on.
      if (k % 3 == 1) peer->all_reduce_sum(small, stream);
      rc = cudaStreamSynchronize(stream);
      if (rc != cudaSuccess) {
        std::printf("rank %d: CUDA error %s in graph replay %d\n", replica.rank,
                    cudaGetErrorString(rc), k);
        return 1;
      }
      if (back != want) {
        std::printf("rank %d: graph replay %d: the sums differ from the rank-order sums\n",
                    replica.rank, k);
        ++bad;
      }
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaFree(dev);
    cudaFree(src);
  }
  // Timing of the decode-sized case (512 KiB of bf16), for the record.
  {
    const int64_t n = 64 * 4096;
    void* dev = nullptr;
    cudaMalloc(&dev, size_t(n) * 2);
    cudaMemset(dev, 0, size_t(n) * 2);
    Tensor t = Tensor::borrow(dev, DType::bf16, {n}, Device::cuda);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int i = 0; i < 20; ++i) peer->all_reduce_sum(t, stream);
    cudaEventRecord(e0, stream);
    for (int i = 0; i < 200; ++i) peer->all_reduce_sum(t, stream);
    cudaEventRecord(e1, stream);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (replica.rank == 0)
      std::printf("peer all-reduce, %d ranks, 512 KiB bf16: %.1f us per call\n", np,
                  1000.0 * ms / 200);
    cudaFree(dev);
  }
  std::printf("rank %d: %s\n", replica.rank, bad ? "MISMATCH" : "all sums equal");
  return bad ? 1 : 0;
}
