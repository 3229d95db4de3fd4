// A thread-safe driver around one Engine: any thread submits and cancels requests; the loop's
// own thread runs engine.step() while there is work and sleeps on a condition variable when
// there is none. Each request's events reach the callback given at submit, in order, ending
// with exactly one event whose finish is set; no accepted request is lost or left hanging,
// also when the engine fails or the loop shuts down. Used by `nosa worker` (behind the RPC
// server) and `nosa batch`.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

#include "runtime/core/error.h"
#include "runtime/engine.h"

namespace nosa::runtime {

// One event of a request as the loop delivers it. `event.id` is the loop's request id (the one
// submit returned), not the engine's.
struct LoopEvent {
  TokenEvent event;
  // When event.finish == error: what kind of error (invalid_argument for a request the engine
  // refused, resource_exhausted when the KV cache cannot hold it, unavailable when the loop shut
  // down, internal when a step failed).
  ErrorCode error_code = ErrorCode::internal;
};

// Called on the loop's thread, outside its lock: keep it short (hand the event to another thread
// or queue). It may call submit() and cancel() of the same loop.
using LoopCallback = std::function<void(const LoopEvent&)>;

struct EngineLoopStats {
  EngineStats engine;     // as of the last step (waiting includes not-yet-admitted submits)
  int64_t in_flight = 0;  // requests submitted and not finished
  int64_t steps = 0;      // steps run by this loop
  double step_seconds_total = 0;
  bool failed = false;  // a step threw: the loop accepts nothing more
};

struct EngineLoopOptions {
  // Called on the loop's thread after every step with its wall time (for latency histograms).
  std::function<void(double step_seconds)> on_step;
};

class EngineLoop {
 public:
  // Starts the loop's thread. The engine must outlive the loop and must not be used by anyone
  // else while the loop exists.
  explicit EngineLoop(Engine& engine, EngineLoopOptions options = {});
  // Shuts down (see shutdown()) and joins the thread.
  ~EngineLoop();
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  // Queues a request; returns its id at once. The engine validates it on the loop's thread: a
  // request it refuses ends with an error event (error_code invalid_argument or
  // resource_exhausted). After shutdown or a failed step, throws Error(unavailable).
  RequestId submit(GenerationRequest request, LoopCallback callback);
  // Ends a request at the next step with finish reason cancelled. Unknown or finished ids are
  // ignored, so cancel may race with the request's end.
  void cancel(RequestId id);
  // Blocks until no request is in flight (or the loop has shut down).
  void wait_idle();
  // Ends every outstanding request with an error event (error_code unavailable, finish error,
  // `reason` as the message), stops the thread and refuses further submits. Idempotent.
  void shutdown(const std::string& reason = "the engine is shutting down");
  EngineLoopStats stats() const;
  // The engine's limits, readable from any thread (they never change).
  int64_t max_context() const { return engine_.max_context(); }

 private:
  struct Pending {
    RequestId id;
    GenerationRequest request;
  };
  struct Active {
    LoopCallback callback;
    RequestId engine_id = 0;  // 0 until admitted into the engine
  };

  void run();
  void fail_all(ErrorCode code, const std::string& message);
  void deliver(const LoopCallback& cb, LoopEvent event);

  Engine& engine_;
  EngineLoopOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;                  // work arrived or shutdown
  std::condition_variable idle_;                  // in-flight count dropped to zero
  std::deque<Pending> pending_;                   // submitted, not yet handed to the engine
  std::vector<RequestId> cancels_;                // cancels to apply before the next step
  std::unordered_map<RequestId, Active> active_;  // every request in flight, by loop id
  std::unordered_map<RequestId, RequestId> by_engine_id_;
  RequestId next_id_ = 1;
  bool stopping_ = false;
  bool failed_ = false;
  std::string stop_reason_;
  EngineLoopStats stats_;
  std::thread thread_;
};

}  // namespace nosa::runtime
