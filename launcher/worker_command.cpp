// `nosa worker`: one replica of the service. Loads the model, runs the engine loop and serves it
// to the coordinator of `nosa serve`. Under mpirun with --tp N, each replica's leader rank (rank
// 0 of its N ranks) talks to the coordinator and the other ranks follow its steps.
#include <filesystem>

#include "launcher/commands.h"
#include "launcher/engine_setup.h"
#include "rpc/worker_server.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"
#include "runtime/engine_loop.h"

namespace nosa::launcher {

namespace {
struct WorkerFlags {
  EngineFlags engine;
  rpc::WorkerOptions options;
  std::string chat_format;
};

// The one place that builds a worker's engine (so that other parallel layouts can swap it).
EngineSetup create_worker_engine(const EngineFlags& flags) {
  // tokens_hint 0: without --kv-blocks / --kv-gib the KV cache takes the whole memory budget.
  return EngineSetup::create(flags, 0);
}

std::string default_model_name(const std::string& dir) {
  std::filesystem::path p(dir);
  while (!p.empty() && p.filename().empty()) p = p.parent_path();  // "dir/" -> "dir"
  std::string name = p.filename().string();
  return name.empty() ? "model" : name;
}

int run_worker(WorkerFlags& f) {
  if (f.options.model_name.empty()) f.options.model_name = default_model_name(f.engine.model);
  NOSA_CHECK(f.options.connect_timeout_s > 0, "--connect-timeout must be positive");
  rpc::ChatFormat chat = f.chat_format.empty() ? rpc::ChatFormat::for_model(f.engine.model)
                                               : rpc::ChatFormat::named(f.chat_format);
  EngineSetup s = create_worker_engine(f.engine);
  if (!s.leader()) {
    s.run_follower();
    return 0;
  }
  auto step_seconds = std::make_shared<rpc::Histogram>(rpc::step_latency_bounds());
  runtime::EngineLoopOptions lo;
  lo.on_step = [step_seconds](double seconds) { step_seconds->observe(seconds); };
  runtime::EngineLoop loop(*s.engine, lo);
  rpc::ReplicaInfo info;
  const auto& config = s.model->config();
  const auto stats = s.engine->stats();
  info.max_context = s.engine->max_context();
  info.vocab_size = config.vocab_size;
  info.kv_blocks_total = stats.kv_blocks_total;
  info.kv_block_tokens = s.cache->layout().block_size;
  info.max_running = f.engine.max_running;
  info.tp = f.engine.tp;
  info.device = s.backend->name();
  logger("rpc")->info("serving model '{}' (chat format {}, context {} tokens)",
                      f.options.model_name, chat.name(), info.max_context);
  rpc::WorkerServer server(loop, s.tokenizer.get(), chat, info, f.options, step_seconds);
  server.run();
  loop.shutdown("the worker is stopping");
  return 0;
}
}  // namespace

Runner add_worker_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "worker",
      "Run one replica of the service: load a model and serve it to the coordinator started "
      "with `nosa serve`. Under mpirun, -np N with --tp T starts N / T replicas; each one's "
      "first rank connects to the coordinator");
  auto f = std::make_shared<WorkerFlags>();
  f->engine.add_to(*cmd);
  cmd->add_option("--coordinator", f->options.coordinator,
                  "HOST:PORT of the coordinator's workers port (nosa serve --workers-port)")
      ->capture_default_str();
  cmd->add_option("--served-model-name", f->options.model_name,
                  "The model name clients use (default: the model directory's name)");
  cmd->add_option("--chat-format", f->chat_format,
                  "Chat template: default, chatml or llama3 (default: recognised from the "
                  "checkpoint's tokenizer_config.json, else default)");
  cmd->add_option("--connect-timeout", f->options.connect_timeout_s,
                  "Seconds to keep trying to reach the coordinator (at start and after losing "
                  "it) before exiting with an error")
      ->capture_default_str();
  return [f] { return run_worker(*f); };
}

}  // namespace nosa::launcher
