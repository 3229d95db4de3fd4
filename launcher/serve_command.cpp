// `nosa serve`: the coordinator (OpenAI-compatible HTTP API and the RPC endpoint of the workers).
#include <fstream>
#include <nlohmann/json.hpp>

#include "launcher/commands.h"
#include "rpc/coordinator.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::launcher {

namespace {
struct ServeFlags {
  rpc::CoordinatorOptions options;
  std::string api_key_file;
  std::string ports_file;
  double max_body_mib = 8;
};

int run_serve(ServeFlags& f) {
  if (!f.api_key_file.empty()) {
    std::ifstream in(f.api_key_file);
    NOSA_CHECK(in.good(), "cannot read --api-key-file '{}'", f.api_key_file);
    std::getline(in, f.options.api_key);
    while (!f.options.api_key.empty() && isspace((unsigned char)f.options.api_key.back()))
      f.options.api_key.pop_back();
    NOSA_CHECK(!f.options.api_key.empty(), "--api-key-file '{}' is empty", f.api_key_file);
  }
  NOSA_CHECK(f.max_body_mib > 0, "--max-body-mib must be positive");
  f.options.max_body_bytes = size_t(f.max_body_mib * double(1 << 20));
  NOSA_CHECK(f.options.worker_timeout_s > 0, "--worker-timeout must be positive");
  rpc::Coordinator coordinator(f.options);
  coordinator.start();
  if (!f.ports_file.empty()) {
    // Written to a temporary name and renamed, so that a reader never sees half a file.
    const std::string tmp = f.ports_file + ".tmp";
    {
      std::ofstream out(tmp);
      out << nlohmann::json{{"http_port", coordinator.http_port()},
                            {"workers_port", coordinator.workers_port()}}
                 .dump()
          << "\n";
      NOSA_CHECK_CODE(out.good(), ErrorCode::io, "cannot write --ports-file '{}'", tmp);
    }
    NOSA_CHECK_CODE(std::rename(tmp.c_str(), f.ports_file.c_str()) == 0, ErrorCode::io,
                    "cannot write --ports-file '{}'", f.ports_file);
  }
  if (f.options.host != "127.0.0.1" && f.options.host != "::1" && f.options.api_key.empty())
    logger("rpc")->warn("serving on {} without --api-key: anyone who reaches it can use it",
                        f.options.host);
  coordinator.run();
  return 0;
}
}  // namespace

Runner add_serve_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "serve",
      "Run the coordinator: an OpenAI-compatible HTTP API (POST /v1/completions, POST "
      "/v1/chat/completions, GET /v1/models, GET /health, GET /metrics) that routes requests to "
      "the replicas started with `nosa worker --coordinator HOST:WORKERS_PORT`");
  auto f = std::make_shared<ServeFlags>();
  auto& o = f->options;
  cmd->add_option("--port", o.http_port, "HTTP port for clients (0: any free port)")
      ->capture_default_str();
  cmd->add_option("--workers-port", o.workers_port,
                  "Port the workers connect to (0: any free port)")
      ->capture_default_str();
  cmd->add_option("--host", o.host,
                  "Address both ports bind to (0.0.0.0 or :: to accept other machines)")
      ->capture_default_str();
  cmd->add_option("--api-key", o.api_key,
                  "Require 'Authorization: Bearer KEY' on /v1/* (visible in the process list: "
                  "prefer --api-key-file)");
  cmd->add_option("--api-key-file", f->api_key_file, "Read the API key from the file's first line");
  cmd->add_option("--max-body-mib", f->max_body_mib, "Largest request body accepted (MiB)")
      ->capture_default_str();
  cmd->add_option("--worker-timeout", o.worker_timeout_s,
                  "Seconds without a heartbeat after which a replica is removed")
      ->capture_default_str();
  cmd->add_option("--heartbeat-ms", o.heartbeat_interval_ms,
                  "Heartbeat interval asked of the workers (ms)")
      ->capture_default_str();
  cmd->add_option("--max-attempts", o.max_attempts,
                  "Replicas a request is tried on when the one serving it fails")
      ->capture_default_str();
  cmd->add_option("--max-outstanding", o.max_outstanding,
                  "Requests in flight before new ones are answered 429")
      ->capture_default_str();
  cmd->add_option("--ports-file", f->ports_file,
                  "Write {\"http_port\": N, \"workers_port\": M} to this file once listening "
                  "(for scripts that pass port 0)");
  return [f] { return run_serve(*f); };
}

}  // namespace nosa::launcher
