// The process's place in an `mpirun` job: MPI bootstrap, replicas of tensor-parallel ranks
// (MPI_Comm_split), and control messages among a replica's ranks with a deadline, so that a dead
// or hung rank ends the job with a clear error instead of a silent hang. Without mpirun the
// process is rank 0 of 1 and MPI is never initialised.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace nosa::parallel {

class MpiContext {
 public:
  // Initialises MPI when the process was started by mpirun (idempotent). Never throws for a
  // process started without mpirun.
  static MpiContext& get();
  ~MpiContext();

  bool active() const { return active_; }
  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  // The rank among the processes of this node (picks the GPU).
  int local_rank() const { return local_rank_; }
  const std::string& host() const { return host_; }
  // Ends every process of the job (after a fatal error on one rank).
  [[noreturn]] void abort(int code);

 private:
  MpiContext();
  bool active_ = false;
  int world_rank_ = 0, world_size_ = 1, local_rank_ = 0;
  std::string host_;
};

// This rank's replica: `tp` consecutive world ranks form one replica; rank 0 of each is its
// leader (it schedules, samples and talks to the coordinator).
struct Replica {
  int index = 0, count = 1;  // which replica, and how many in the job
  int rank = 0, size = 1;    // rank within the replica
  MPI_Comm comm = MPI_COMM_NULL;
  bool leader() const { return rank == 0; }
};

// Splits the job into replicas of `tp` ranks; throws invalid_argument when the world size is not
// a multiple of tp.
Replica make_replica(int tp);

// Broadcasts bytes from the replica's leader with a deadline: if the broadcast does not complete
// within `timeout` (a rank died or hung), throws unavailable naming the replica.
void broadcast_bytes(const Replica& replica, std::vector<char>& bytes,
                     std::chrono::milliseconds timeout);

// Gathers `mine` (the same size on every rank) from every rank of the replica, in rank order, with
// a deadline (start-up exchanges, e.g. of CUDA IPC handles).
std::vector<char> all_gather_bytes(const Replica& replica, const std::vector<char>& mine,
                                   std::chrono::milliseconds timeout);

// Broadcasts a value from the replica's leader (for start-up agreement, e.g. the KV cache size).
template <typename T>
void broadcast_value(const Replica& replica, T& value, std::chrono::milliseconds timeout) {
  std::vector<char> bytes(reinterpret_cast<char*>(&value), reinterpret_cast<char*>(&value) + sizeof(T));
  broadcast_bytes(replica, bytes, timeout);
  std::memcpy(&value, bytes.data(), sizeof(T));
}

// The smallest of every rank's value in the replica (start-up agreement on what all can hold).
template <typename T>
T all_min_value(const Replica& replica, T value, std::chrono::milliseconds timeout) {
  std::vector<char> mine(sizeof(T));
  std::memcpy(mine.data(), &value, sizeof(T));
  const std::vector<char> all = all_gather_bytes(replica, mine, timeout);
  for (size_t r = 0; r + sizeof(T) <= all.size(); r += sizeof(T)) {
    T other;
    std::memcpy(&other, all.data() + r, sizeof(T));
    if (other < value) value = other;
  }
  return value;
}

// Tensor collectives over MPI for host (CPU backend) tensors of float32; a collective that does
// not complete within `timeout` throws unavailable.
std::unique_ptr<Communicator> make_mpi_communicator(const Replica& replica,
                                                   std::chrono::milliseconds timeout);

}  // namespace nosa::parallel
