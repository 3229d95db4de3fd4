// Tensor collectives among a replica's GPUs with NCCL: the unique id travels over MPI from the
// replica's leader, then one NCCL communicator per replica. Collectives are queued on the
// backend's CUDA stream.
#pragma once

#include <chrono>
#include <memory>

#include "parallel/communicator.h"
#include "parallel/mpi.h"

namespace nosa::parallel {

// Whether this build has NCCL.
bool nccl_available();

// Creates the replica's NCCL communicator on `device`, queuing on `cuda_stream`. NVLink
// multicast (NVLS) stays off unless NCCL_NVLS_ENABLE says otherwise: decode all-reduces are small
// and latency-bound, and multicast can take shared GPUs out of service. Throws unavailable when
// NCCL is missing or initialisation fails.
std::unique_ptr<Communicator> make_nccl_communicator(const Replica& replica, int device,
                                                    void* cuda_stream,
                                                    std::chrono::milliseconds timeout);

}  // namespace nosa::parallel
