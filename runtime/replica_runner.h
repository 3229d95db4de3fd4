// Runs a model on one replica of tensor-parallel ranks. The leader (rank 0) schedules; before
// each step it broadcasts the step's plan so that every rank computes the same step on its share
// of the heads, and followers never diverge. A rank that dies or hangs makes the others fail
// with a clear error within the timeout instead of hanging.
#pragma once

#include <chrono>

#include "parallel/mpi.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"
#include "runtime/step.h"

namespace nosa::runtime {

class ReplicaRunner {
 public:
  ReplicaRunner(const parallel::Replica& replica, Model& model, KvCache& cache,
                std::chrono::milliseconds timeout);
  // The leader tells its followers to stop.
  ~ReplicaRunner();

  const parallel::Replica& replica() const { return replica_; }
  // Leader: broadcasts the step to the followers, then runs its own part; returns the logits.
  Tensor forward(const StepBatch& step);
  // Leader: ends the followers' follow() (idempotent).
  void stop();
  // Follower: runs the leader's steps until it stops. Waiting for the next step has no deadline
  // (a service may be idle); the collectives inside a step do.
  void follow();

 private:
  parallel::Replica replica_;
  Model& model_;
  KvCache& cache_;
  std::chrono::milliseconds timeout_;
  bool stopped_ = false;
};

}  // namespace nosa::runtime
