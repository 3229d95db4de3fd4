// The worker side of the RPC: connects a replica's EngineLoop to the coordinator. It registers
// the model and its limits, sends heartbeats with the load, turns Submit messages into engine
// requests (tokenizing text and chat prompts, applying stop strings with hold-back) and streams
// each request's tokens and text back as Events. When the coordinator goes away it cancels its
// requests and reconnects (for up to connect_timeout) so that a restarted coordinator gets its
// replicas back.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "rpc/chat_format.h"
#include "rpc/metrics.h"
#include "runtime/engine_loop.h"
#include "runtime/tokenizer.h"

namespace nosa::rpc {

struct WorkerOptions {
  std::string coordinator = "127.0.0.1:9000";  // HOST:PORT of `nosa serve --workers-port`
  std::string model_name;                      // the name clients ask for
  uint32_t heartbeat_ms = 500;                 // until the coordinator asks for another interval
  double connect_timeout_s = 60;               // keep trying to reach the coordinator this long
  size_t max_frame_bytes = size_t(64) << 20;
  bool handle_signals = true;  // SIGINT/SIGTERM stop run() cleanly
};

// What the replica registers with (its engine's limits).
struct ReplicaInfo {
  int64_t max_context = 0;
  int64_t vocab_size = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_block_tokens = 0;
  int max_running = 0;
  int tp = 1;
  std::string device = "cpu";
};

class WorkerServer {
 public:
  // `tokenizer` may be null (then only token-id prompts work). `step_seconds` is the histogram
  // the loop's on_step fills (sent with heartbeats); may be null.
  WorkerServer(runtime::EngineLoop& loop, const runtime::Tokenizer* tokenizer, ChatFormat chat,
               ReplicaInfo info, WorkerOptions options,
               std::shared_ptr<Histogram> step_seconds = nullptr);
  ~WorkerServer();

  // Serves until stop(), or until the coordinator cannot be reached for connect_timeout_s
  // (throws Error(unavailable)), or the coordinator refuses this worker (throws
  // Error(invalid_argument), e.g. a protocol version mismatch).
  void run();
  // Thread-safe; run() returns soon after.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nosa::rpc
