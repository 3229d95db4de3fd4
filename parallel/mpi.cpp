#include "parallel/mpi.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::parallel {

namespace {

bool launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"})
    if (std::getenv(v)) return true;
  return false;
}

void mpi_check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  NOSA_FAIL(ErrorCode::unavailable, "{} failed: {}", what, std::string(text, size_t(len)));
}

// Waits for a non-blocking request, failing after `timeout`. A follower waits here for every
// step plan, about one step long: it polls without sleeping for the first 50 ms, so that the
// plan is taken up at once (sleeping in growing pauses made each step start up to a pause late),
// then sleeps in pauses of up to 1 ms, so that an idle replica does not hold a core.
void wait_for(MPI_Request& request, std::chrono::milliseconds timeout, const std::string& what) {
  using Clock = std::chrono::steady_clock;
  const bool forever = timeout == std::chrono::milliseconds::max();
  const auto start = Clock::now();
  const auto deadline = forever ? Clock::time_point::max() : start + timeout;
  const auto spin_until = start + std::chrono::milliseconds(50);
  int done = 0;
  auto pause = std::chrono::microseconds(10);
  for (;;) {
    mpi_check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
    if (done) return;
    const auto now = Clock::now();
    if (now > deadline)
      NOSA_FAIL(ErrorCode::unavailable,
                "{} did not complete within {} ms: a rank of this replica died or hangs", what,
                timeout.count());
    if (now < spin_until) {
      std::this_thread::yield();
      continue;
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

}  // namespace

MpiContext& MpiContext::get() {
  static MpiContext context;
  return context;
}

MpiContext::MpiContext() {
  char name[256] = {0};
  ::gethostname(name, sizeof(name) - 1);
  host_ = name;
  if (!launched_by_mpirun()) return;
  int provided = 0;
  mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread");
  // Errors come back as codes so that they become clear messages.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  active_ = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size_);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank_, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &local_rank_);
  MPI_Comm_free(&local);
  if (world_size_ > 1) set_log_rank(world_rank_);
}

MpiContext::~MpiContext() {
  if (active_) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
}

void MpiContext::abort(int code) {
  if (active_) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

Replica make_replica(int tp) {
  MpiContext& mpi = MpiContext::get();
  NOSA_CHECK(tp >= 1, "--tp must be at least 1, got {}", tp);
  NOSA_CHECK(mpi.world_size() % tp == 0,
             "the job has {} ranks, which is not a multiple of --tp {}", mpi.world_size(), tp);
  Replica r;
  r.size = tp;
  r.rank = mpi.world_rank() % tp;
  r.index = mpi.world_rank() / tp;
  r.count = mpi.world_size() / tp;
  if (mpi.active()) {
    mpi_check(MPI_Comm_split(MPI_COMM_WORLD, r.index, r.rank, &r.comm), "MPI_Comm_split");
    MPI_Comm_set_errhandler(r.comm, MPI_ERRORS_RETURN);
  }
  return r;
}

void broadcast_bytes(const Replica& replica, std::vector<char>& bytes,
                     std::chrono::milliseconds timeout) {
  if (replica.size == 1) return;
  uint64_t n = bytes.size();
  MPI_Request req;
  mpi_check(MPI_Ibcast(&n, 1, MPI_UINT64_T, 0, replica.comm, &req), "MPI_Ibcast");
  wait_for(req, timeout, fmt::format("step broadcast in replica {}", replica.index));
  bytes.resize(n);
  // MPI counts are int: send in pieces of at most 1 GiB.
  for (uint64_t off = 0; off < n;) {
    int piece = int(std::min<uint64_t>(n - off, 1u << 30));
    mpi_check(MPI_Ibcast(bytes.data() + off, piece, MPI_BYTE, 0, replica.comm, &req),
              "MPI_Ibcast");
    wait_for(req, timeout, fmt::format("step broadcast in replica {}", replica.index));
    off += uint64_t(piece);
  }
}

std::vector<char> all_gather_bytes(const Replica& replica, const std::vector<char>& mine,
                                   std::chrono::milliseconds timeout) {
  if (replica.size == 1) return mine;
  NOSA_CHECK(mine.size() < (1u << 30), "all_gather_bytes: {} bytes is too large", mine.size());
  std::vector<char> all(mine.size() * size_t(replica.size));
  MPI_Request req;
  mpi_check(MPI_Iallgather(mine.data(), int(mine.size()), MPI_BYTE, all.data(), int(mine.size()),
                           MPI_BYTE, replica.comm, &req),
            "MPI_Iallgather");
  wait_for(req, timeout, fmt::format("start-up exchange in replica {}", replica.index));
  return all;
}

namespace {

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(const Replica& r, std::chrono::milliseconds timeout)
      : replica_(r), timeout_(timeout) {}
  int rank() const override { return replica_.rank; }
  int size() const override { return replica_.size; }

  void all_reduce_sum(Tensor& t) override {
    NOSA_ASSERT(t.device() == Device::cpu && t.dtype() == DType::f32,
                "MPI all-reduce takes host float32 tensors (use NCCL for GPU tensors)");
    MPI_Request req;
    mpi_check(MPI_Iallreduce(MPI_IN_PLACE, t.raw(), int(t.numel()), MPI_FLOAT, MPI_SUM,
                             replica_.comm, &req),
              "MPI_Iallreduce");
    wait_for(req, timeout_, fmt::format("all-reduce in replica {}", replica_.index));
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    NOSA_ASSERT(in.device() == Device::cpu && out.bytes() == in.bytes() * size_t(size()),
                "MPI all-gather: bad tensors");
    MPI_Request req;
    mpi_check(MPI_Iallgather(in.raw(), int(in.bytes()), MPI_BYTE, out.raw(), int(in.bytes()),
                             MPI_BYTE, replica_.comm, &req),
              "MPI_Iallgather");
    wait_for(req, timeout_, fmt::format("all-gather in replica {}", replica_.index));
  }

 private:
  Replica replica_;
  std::chrono::milliseconds timeout_;  // a collective waits at most this long for a peer
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(const Replica& replica,
                                                   std::chrono::milliseconds timeout) {
  if (replica.size == 1) return make_single_rank_communicator();
  return std::make_unique<MpiCommunicator>(replica, timeout);
}

}  // namespace nosa::parallel
