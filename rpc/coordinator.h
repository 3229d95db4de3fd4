// The coordinator of `nosa serve`: an OpenAI-compatible HTTP front end (Boost.Beast) and the
// RPC endpoint its replicas connect to, on one Asio event loop.
//
// HTTP: POST /v1/completions, POST /v1/chat/completions (JSON or server-sent events with
// "stream": true), GET /v1/models, GET /health (200 once a replica is registered, else 503),
// GET /metrics (Prometheus text). Errors use OpenAI's body {"error": {...}} with the status
// codes of rpc/openai_api.h. With an API key, /v1/* needs "Authorization: Bearer KEY".
//
// Routing and failures: each request goes to the least loaded replica serving its model
// (rpc/router.h). A replica that closes its connection or misses heartbeats for worker_timeout
// is removed; its requests that have sent nothing to their client yet are retried on another
// replica (up to max_attempts), the others end with a clear error (an SSE error event for a
// stream). A client that disconnects has its request cancelled on the replica.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace nosa::rpc {

struct CoordinatorOptions {
  std::string host = "127.0.0.1";  // address both ports bind to
  uint16_t http_port = 8000;       // 0: any free port (see http_port())
  uint16_t workers_port = 9000;    // 0: any free port
  std::string api_key;             // empty: no authentication
  size_t max_body_bytes = size_t(8) << 20;
  size_t max_frame_bytes = size_t(64) << 20;
  uint32_t heartbeat_interval_ms = 500;  // asked of the workers
  double worker_timeout_s = 5.0;         // no heartbeat for this long: the replica is removed
  int max_attempts = 3;                  // replicas a request may be tried on
  int64_t max_outstanding = 8192;        // requests in flight before new ones get 429
  double idle_timeout_s = 120;           // an idle keep-alive HTTP connection is closed after this
};

class Coordinator {
 public:
  explicit Coordinator(CoordinatorOptions options);
  ~Coordinator();

  // Binds and listens on both ports. Throws Error(io) when an address is taken or invalid.
  void start();
  uint16_t http_port() const;
  uint16_t workers_port() const;
  // Runs the event loop on the calling thread until stop() (or SIGINT/SIGTERM when
  // handle_signals).
  void run(bool handle_signals = true);
  // Thread-safe.
  void stop();

  struct Impl;  // the implementation (rpc/coordinator.cpp)

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace nosa::rpc
