#include "runtime/replica_runner.h"

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::runtime {

ReplicaRunner::ReplicaRunner(const parallel::Replica& replica, Model& model, KvCache& cache,
                             std::chrono::milliseconds timeout)
    : replica_(replica), model_(model), cache_(cache), timeout_(timeout) {
  if (replica_.leader() && replica_.size > 1) cache_.keep_released(true);
}

ReplicaRunner::~ReplicaRunner() {
  try {
    stop();
  } catch (const std::exception& e) {
    logger("parallel")->warn("could not stop the followers: {}", e.what());
  }
}

Tensor ReplicaRunner::forward(const StepBatch& step) {
  NOSA_ASSERT(replica_.leader(), "only a replica's leader schedules steps");
  if (replica_.size > 1) {
    std::vector<char> bytes = encode_step(step, StepPlan::Kind::run, cache_.take_released());
    parallel::broadcast_bytes(replica_, bytes, timeout_);
  }
  return model_.forward(step, cache_);
}

void ReplicaRunner::stop() {
  if (!replica_.leader() || stopped_ || replica_.size == 1) return;
  stopped_ = true;
  std::vector<char> bytes = encode_step(StepBatch{}, StepPlan::Kind::stop);
  parallel::broadcast_bytes(replica_, bytes, timeout_);
}

void ReplicaRunner::follow() {
  NOSA_ASSERT(!replica_.leader(), "the leader does not follow");
  StepPlan plan;
  std::vector<char> bytes;
  for (;;) {
    bytes.clear();
    parallel::broadcast_bytes(replica_, bytes, std::chrono::milliseconds::max());
    decode_step(bytes, plan);
    if (plan.kind == StepPlan::Kind::stop) return;
    cache_.release_tiers(plan.released);
    model_.forward(plan.batch, cache_);
  }
}

}  // namespace nosa::runtime
