// The options every engine-running subcommand shares (generate, batch, worker, bench) and the
// objects they build from them: backend, communicator, model, KV cache, engine, tokenizer.
#pragma once

#include <CLI/CLI.hpp>
#include <chrono>
#include <memory>
#include <string>

#include "parallel/communicator.h"
#include "parallel/mpi.h"
#include "runtime/backend.h"
#include "runtime/engine.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"
#include "runtime/replica_runner.h"
#include "runtime/tokenizer.h"

namespace nosa::launcher {

// The backend a --device flag names (cpu, cuda, or auto: CUDA where a GPU exists), on this
// process's GPU (its local rank under mpirun); another value is an invalid_argument error.
std::unique_ptr<runtime::Backend> make_backend(const std::string& device);
// A replica's collectives on `backend`: NCCL between GPUs, MPI for the CPU backend (which CI
// tests); a rank missing for `timeout` is an error naming it.
std::unique_ptr<parallel::Communicator> make_communicator(const parallel::Replica& replica,
                                                          runtime::Backend& backend,
                                                          std::chrono::milliseconds timeout);

struct EngineFlags {
  std::string model;
  std::string device = "auto";
  std::string attention;  // empty: the checkpoint's mode
  int threads = 0;
  int64_t kv_blocks = 0;
  double kv_gib = 0;
  int64_t max_context = 0;
  int64_t max_batch_tokens = 0;
  int max_running = 256;
  std::string offload = "none";  // none | host | host+disk
  double gpu_kv_gib = 0;          // offloading: the GPU block cache
  double host_kv_gib = 0;         // offloading: host memory for the full KV
  std::string disk_kv_dir;        // host+disk: where KV files go
  double disk_kv_gib = 0;         // host+disk: disk budget
  int micro_batch_min_seqs = -1;  // offloading: micro-batches from this many sequences (-1: default)
  std::string prefetch;           // offloading: on | off | auto (empty: Model::default_prefetch)
  int tp = 1;                  // tensor-parallel ranks per replica (under mpirun)
  double rank_timeout_s = 60;  // a collective waits this long for a peer rank

  // Registers the flags on a subcommand.
  void add_to(CLI::App& app);
};

// Under mpirun, every rank builds its EngineSetup; the leader of each replica (rank 0 of its
// --tp ranks) drives `engine`, and the other ranks call run_follower(), which returns when the
// leader's EngineSetup is destroyed.
struct EngineSetup {
  parallel::Replica replica;
  std::unique_ptr<runtime::Backend> backend;
  std::unique_ptr<parallel::Communicator> comm;
  std::unique_ptr<runtime::Model> model;
  std::unique_ptr<runtime::KvCache> cache;
  std::unique_ptr<runtime::ReplicaRunner> runner;
  std::unique_ptr<runtime::Engine> engine;        // on every rank; only the leader steps it
  std::unique_ptr<runtime::Tokenizer> tokenizer;  // null when the checkpoint has none

  bool leader() const { return replica.leader(); }
  // Follower ranks: computes the leader's steps until the leader stops.
  void run_follower() { runner->follow(); }

  // Builds everything. Without --kv-blocks or --kv-gib the KV cache holds `tokens_hint` tokens
  // (capped by the backend's free memory); 0 means the whole budget.
  static EngineSetup create(const EngineFlags& flags, int64_t tokens_hint);
  // The checkpoint's tokenizer, or null when it has no tokenizer.model.
  static std::unique_ptr<runtime::Tokenizer> load_tokenizer(const std::string& model_dir);
};

// Parses "1,2,3" (commas or whitespace) or "@FILE" holding such a list or a JSON array.
std::vector<int32_t> parse_token_ids(const std::string& spec);

// The log level from --log-level, else NOSA_LOG, else info.
void apply_log_level(const std::string& flag);

}  // namespace nosa::launcher
