#include "parallel/nccl_communicator.h"

#include <cstdlib>
#include <cstring>

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

#ifdef NOSA_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include "parallel/peer_all_reduce.h"
#endif

namespace nosa::parallel {

#ifdef NOSA_HAVE_NCCL

namespace {

#define NCCL_CHECK(expr)                                                                   \
  do {                                                                                     \
    ncclResult_t rc_ = (expr);                                                             \
    NOSA_CHECK_CODE(rc_ == ncclSuccess, ErrorCode::unavailable, "{} failed: {}", #expr, \
                    ncclGetErrorString(rc_));                                              \
  } while (0)

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return ncclFloat32;
    case DType::f16: return ncclFloat16;
    case DType::bf16: return ncclBfloat16;
    case DType::i32: return ncclInt32;
    default: NOSA_FAIL(ErrorCode::internal, "NCCL cannot reduce {}", dtype_name(dtype));
  }
  return ncclFloat32;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const Replica& r, int device, void* stream, std::chrono::milliseconds timeout)
      : replica_(r), stream_(static_cast<cudaStream_t>(stream)) {
    setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
    ncclUniqueId id;
    std::vector<char> bytes(sizeof(id));
    if (r.leader()) {
      NCCL_CHECK(ncclGetUniqueId(&id));
      std::memcpy(bytes.data(), &id, sizeof(id));
    }
    broadcast_bytes(r, bytes, timeout);
    std::memcpy(&id, bytes.data(), sizeof(id));
    NOSA_CHECK_CODE(cudaSetDevice(device) == cudaSuccess, ErrorCode::unavailable,
                    "cannot use CUDA device {}", device);
    NCCL_CHECK(ncclCommInitRank(&comm_, r.size, id, r.rank));
    logger("parallel")->info("NCCL communicator: rank {} of {} in replica {} on GPU {}", r.rank,
                             r.size, r.index, device);
    peer_ = PeerAllReduce::create(r, device, timeout);
  }
  ~NcclCommunicator() override {
    if (comm_) ncclCommDestroy(comm_);
  }
  int rank() const override { return replica_.rank; }
  int size() const override { return replica_.size; }
  void all_reduce_sum(Tensor& t) override {
    // Decode-sized tensors: one kernel over NVLink; large ones: NCCL's ring.
    if (peer_ && peer_->accepts(t)) {
      peer_->all_reduce_sum(t, stream_);
      return;
    }
    NCCL_CHECK(ncclAllReduce(t.raw(), t.raw(), size_t(t.numel()), nccl_type(t.dtype()), ncclSum,
                             comm_, stream_));
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    NCCL_CHECK(ncclAllGather(in.raw(), out.raw(), size_t(in.numel()), nccl_type(in.dtype()),
                             comm_, stream_));
  }
  // NCCL's collectives record into CUDA graphs, and the peer kernel numbers its calls on the
  // device.
  bool graph_capturable() const override { return true; }

 private:
  Replica replica_;
  cudaStream_t stream_;
  ncclComm_t comm_ = nullptr;
  std::unique_ptr<PeerAllReduce> peer_;
};

}  // namespace

bool nccl_available() { return true; }

std::unique_ptr<Communicator> make_nccl_communicator(const Replica& replica, int device,
                                                    void* cuda_stream,
                                                    std::chrono::milliseconds timeout) {
  if (replica.size == 1) return make_single_rank_communicator();
  return std::make_unique<NcclCommunicator>(replica, device, cuda_stream, timeout);
}

#else

bool nccl_available() { return false; }

std::unique_ptr<Communicator> make_nccl_communicator(const Replica& replica, int, void*,
                                                    std::chrono::milliseconds) {
  if (replica.size == 1) return make_single_rank_communicator();
  NOSA_FAIL(ErrorCode::unavailable,
            "tensor parallelism on GPUs needs NCCL, which this build does not have");
}

#endif

}  // namespace nosa::parallel
