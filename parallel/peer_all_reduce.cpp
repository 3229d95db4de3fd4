#include "parallel/peer_all_reduce.h"

#include <cuda_runtime.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "parallel/cuda/peer_all_reduce.cuh"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::parallel {

namespace {

void cuda_check(cudaError_t rc, const char* what) {
  NOSA_CHECK_CODE(rc == cudaSuccess, ErrorCode::unavailable, "{} failed: {}", what,
                  cudaGetErrorString(rc));
}

// What each rank tells the others at start-up.
struct PeerInfo {
  char host[64] = {};
  int device = -1;
  int ok = 0;  // this rank could allocate and export its buffers
  cudaIpcMemHandle_t handle{};
};

}  // namespace

struct PeerAllReduce::State {
  cuda::PeerBuffers buffers;
  char* own = nullptr;  // this rank's allocation: flags, the two staging halves, the call counter
  std::vector<char*> opened;
  size_t max_bytes = 0;
  int device = 0;

  ~State() {
    if (device >= 0) cudaSetDevice(device);
    for (char* p : opened) cudaIpcCloseMemHandle(p);
    if (own) cudaFree(own);
  }
};

PeerAllReduce::PeerAllReduce(std::unique_ptr<State> state) : s_(std::move(state)) {}
PeerAllReduce::~PeerAllReduce() = default;

std::unique_ptr<PeerAllReduce> PeerAllReduce::create(const Replica& r, int device,
                                                     std::chrono::milliseconds timeout,
                                                     size_t max_bytes) {
  if (r.size < 2) return nullptr;
  const char* env = std::getenv("NOSA_PEER_ALL_REDUCE");
  std::string unwanted;
  if (env && std::string(env) == "0") unwanted = "NOSA_PEER_ALL_REDUCE=0";
  else if (r.size > cuda::k_max_peer_ranks) unwanted = "more than 8 ranks";
  const bool wanted = unwanted.empty();
  max_bytes = max_bytes / 16 * 16;

  auto state = std::make_unique<State>();
  state->device = device;
  state->max_bytes = max_bytes;
  PeerInfo me;
  gethostname(me.host, sizeof(me.host) - 1);
  me.device = device;
  if (wanted) {
    const size_t bytes = size_t(cuda::k_flag_bytes) + 2 * max_bytes + cuda::k_call_counter_bytes;
    if (cudaSetDevice(device) == cudaSuccess &&
        cudaMalloc(reinterpret_cast<void**>(&state->own), bytes) == cudaSuccess &&
        cudaMemset(state->own, 0, bytes) == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess &&
        cudaIpcGetMemHandle(&me.handle, state->own) == cudaSuccess)
      me.ok = 1;
    cudaGetLastError();  // a failure above is answered by falling back to NCCL
  }
  std::vector<char> mine(sizeof(PeerInfo));
  std::memcpy(mine.data(), &me, sizeof(PeerInfo));
  std::vector<char> all = all_gather_bytes(r, mine, timeout);
  std::vector<PeerInfo> peers(size_t(r.size));
  for (int i = 0; i < r.size; ++i)
    std::memcpy(&peers[size_t(i)], all.data() + size_t(i) * sizeof(PeerInfo), sizeof(PeerInfo));

  // Every rank sees the same table, so every rank reaches the same verdict on these checks.
  std::string why;
  for (const PeerInfo& p : peers) {
    if (!p.ok) why = "a rank could not set up its staging buffer";
    else if (std::strncmp(p.host, peers[0].host, sizeof(p.host)) != 0)
      why = "the replica spans hosts";
  }
  if (!wanted) why = unwanted;
  // Peer access is per pair of GPUs: each rank checks its own row, then the ranks agree.
  int reach = why.empty() ? 1 : 0;
  for (const PeerInfo& p : peers) {
    if (!reach || p.device == device) continue;
    int can = 0;
    cudaDeviceCanAccessPeer(&can, device, p.device);
    reach = can;
  }
  std::vector<char> mine_reach(1, char(reach));
  std::vector<char> reaches = all_gather_bytes(r, mine_reach, timeout);
  for (char c : reaches)
    if (!c && why.empty()) why = "a pair of GPUs cannot access each other's memory";

  if (why.empty()) {
    cuda::PeerBuffers& b = state->buffers;
    b.rank = r.rank;
    b.size = r.size;
    b.half_bytes = int64_t(max_bytes);
    b.call_counter =
        reinterpret_cast<uint32_t*>(state->own + cuda::k_flag_bytes + 2 * int64_t(max_bytes));
    b.timeout_ns = uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout).count());
    for (int i = 0; i < r.size; ++i) {
      char* base = state->own;
      if (i != r.rank) {
        void* p = nullptr;
        if (cudaIpcOpenMemHandle(&p, peers[size_t(i)].handle, cudaIpcMemLazyEnablePeerAccess) !=
            cudaSuccess) {
          cudaGetLastError();
          why = "cannot map a peer's staging buffer";
          break;
        }
        base = static_cast<char*>(p);
        state->opened.push_back(base);
      }
      b.flags[i] = reinterpret_cast<uint32_t*>(base);
      b.staging[i] = base + cuda::k_flag_bytes;
    }
    std::vector<char> mine_ok(1, char(why.empty()));
    for (char c : all_gather_bytes(r, mine_ok, timeout))
      if (!c && why.empty()) why = "a rank cannot map a peer's staging buffer";
  }
  if (!why.empty()) {
    if (r.leader())
      logger("parallel")->info("all-reduce: NCCL only ({})", why);
    return nullptr;
  }
  if (r.leader())
    logger("parallel")->info("all-reduce: peer one-shot kernel for tensors up to {} KiB, NCCL above",
                             max_bytes >> 10);
  return std::unique_ptr<PeerAllReduce>(new PeerAllReduce(std::move(state)));
}

bool PeerAllReduce::accepts(const Tensor& t) const {
  return (t.dtype() == DType::bf16 || t.dtype() == DType::f32) && t.bytes() % 16 == 0 &&
         t.bytes() <= s_->max_bytes;
}

void PeerAllReduce::all_reduce_sum(Tensor& t, void* cuda_stream) {
  NOSA_ASSERT(accepts(t), "peer all-reduce: tensor not accepted");
  const auto dtype = t.dtype() == DType::bf16 ? cuda::ReduceDType::bf16 : cuda::ReduceDType::f32;
  cuda_check(cuda::launch_peer_all_reduce(s_->buffers, t.raw(), t.numel(), dtype,
                                          static_cast<cudaStream_t>(cuda_stream)),
             "peer all-reduce");
}

}  // namespace nosa::parallel
