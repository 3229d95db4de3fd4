#include "launcher/engine_setup.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "memory/partitions.h"
#include "parallel/nccl_communicator.h"
#include "runtime/core/env.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"
#include "runtime/core/thread_pool.h"

namespace nosa::launcher {

namespace fs = std::filesystem;

void EngineFlags::add_to(CLI::App& app) {
  app.add_option("--model", model, "Model directory (Hugging Face layout)")->required();
  app.add_option("--device", device, "cpu, cuda, or auto (cuda when a GPU is present)")
      ->capture_default_str();
  app.add_option("--attention", attention,
                 "Attention mode: dense, infllmv2 or nosa (default: the checkpoint's)");
  app.add_option("--threads", threads, "CPU threads (default: all cores)");
  app.add_option("--kv-blocks", kv_blocks, "KV cache size in blocks (default: from --kv-gib)");
  app.add_option("--kv-gib", kv_gib,
                 "KV cache budget in GiB (default: free device memory; 4 GiB on the CPU)");
  app.add_option("--max-context", max_context,
                 "Tokens per sequence, prompt included (default: the model's maximum)");
  app.add_option("--max-batch-tokens", max_batch_tokens,
                 "Tokens computed per step: decode tokens plus prefill chunks (default: 2048 on "
                 "the CPU, 16384 on a GPU)");
  app.add_option("--max-running", max_running, "Sequences in the running batch")
      ->capture_default_str();
  app.add_option("--offload", offload,
                 "Where the KV cache lives: none (all on the device), host (host memory, the "
                 "device caches the selected blocks; decoding steps decide which to load on the "
                 "device, in a partition of the cache per sequence; NOSA_DEVICE_RESIDENCY=0 "
                 "decides on the host) or host+disk")
      ->capture_default_str();
  app.add_option("--gpu-kv-gib", gpu_kv_gib,
                 "Offloading: GiB of device memory for the block cache (default: what is free; "
                 "1 GiB on the CPU)");
  app.add_option("--host-kv-gib", host_kv_gib,
                 "Offloading: GiB of host memory for the KV (default: 4, or enough for the job)");
  app.add_option("--disk-kv-dir", disk_kv_dir, "host+disk: directory for KV files");
  app.add_option("--disk-kv-gib", disk_kv_gib, "host+disk: GiB of disk for KV files")
      ->capture_default_str();
  app.add_option("--micro-batch-min-seqs", micro_batch_min_seqs,
                 "Offloading with residency decided on the host (NOSA_DEVICE_RESIDENCY=0): "
                 "decoding steps of at least this many sequences run as two micro-batches, one "
                 "half's blocks gathered while the other half computes (0: never; default: 32, or "
                 "NOSA_MICRO_BATCH_MIN_SEQS)")
      ->check(CLI::Range(0, 1000000));
  app.add_option("--prefetch", prefetch,
                 "Offloading with residency on the device: on = while layer l runs, layer l + 1's "
                 "blocks (from layer 2 on) are selected from layer l's input and the missing ones "
                 "copied beside it, so that fewer copies wait; results are unchanged. auto (the "
                 "default; NOSA_PREFETCH=0/1/2 sets off/on/auto) = on a GPU, each step whose "
                 "blocks to move would leave the bus room for the guesses' extra copies, judged "
                 "from the step before")
      ->check(CLI::IsMember({"on", "off", "auto"}));
  app.add_option("--tp", tp,
                 "Tensor-parallel ranks per replica; under mpirun, -np N starts N / tp replicas")
      ->capture_default_str();
  app.add_option("--rank-timeout", rank_timeout_s,
                 "Seconds a rank waits for its peers inside a step before failing the job")
      ->capture_default_str();
}

std::unique_ptr<runtime::Tokenizer> EngineSetup::load_tokenizer(const std::string& model_dir) {
  NOSA_CHECK_CODE(fs::is_directory(model_dir), ErrorCode::bad_checkpoint,
                  "model directory '{}' does not exist", model_dir);
  if (!fs::exists(fs::path(model_dir) / "tokenizer.model")) return nullptr;
  return runtime::Tokenizer::load(model_dir);
}

namespace {

constexpr double k_gib = double(1ull << 30);

// Sizes the tiers of an offloaded KV cache; returns the logical blocks (host + disk) and fills
// the device slots and host blocks.
int64_t offload_plan(const EngineFlags& f, const runtime::Model& model, runtime::Backend& backend,
                     int64_t tokens_hint, runtime::KvCacheOptions& o) {
  const runtime::KvLayout layout = model.kv_layout();
  const auto& sp = model.config().sparse;
  NOSA_CHECK(model.mode() != attention::Mode::dense,
             "--offload {} needs a sparse attention mode (infllmv2 or nosa): dense attention "
             "reads every block each step",
             f.offload);
  NOSA_CHECK(sp.kernel_size <= sp.block_size,
             "--offload needs compressed windows no longer than a block ({} > {})",
             sp.kernel_size, sp.block_size);
  const double block_host_bytes =
      double(layout.chunks_per_block() * (layout.kv_chunk_bytes() + layout.bias_chunk_bytes()));
  int64_t host_blocks = 0;
  if (f.host_kv_gib > 0) {
    host_blocks = int64_t(f.host_kv_gib * k_gib / block_host_bytes);
  } else {
    const int64_t wanted = tokens_hint > 0 ? (tokens_hint + layout.block_size - 1) / layout.block_size
                                           : INT64_MAX / 2;
    host_blocks = std::min<int64_t>(wanted, int64_t(4 * k_gib / block_host_bytes));
  }
  NOSA_CHECK(host_blocks > 0, "--host-kv-gib holds no KV block ({} bytes each)",
             int64_t(block_host_bytes));
  int64_t disk_blocks = 0;
  if (memory::parse_offload(f.offload) == memory::Offload::host_disk) {
    NOSA_CHECK(!f.disk_kv_dir.empty(), "--offload host+disk needs --disk-kv-dir");
    NOSA_CHECK(f.disk_kv_gib > 0, "--offload host+disk needs --disk-kv-gib");
    disk_blocks = int64_t(f.disk_kv_gib * k_gib / block_host_bytes);
    o.disk_dir = f.disk_kv_dir;
  }
  const int64_t blocks = host_blocks + disk_blocks;
  // The device keeps every block's compressed keys, and a block cache in what remains.
  const double compressed = double(blocks * layout.chunks_per_block() *
                                   int64_t(layout.compressed_chunk_bytes() + 4));
  const double device_budget =
      f.gpu_kv_gib > 0 ? f.gpu_kv_gib * k_gib
                       : (backend.device() == Device::cpu ? 1.0 * k_gib
                                                          : 0.9 * double(backend.free_memory_bytes()));
  const double slot_bytes = double(layout.kv_chunk_bytes() + layout.bias_chunk_bytes());
  o.device_slots = int64_t((device_budget - compressed) / slot_bytes);
  o.host_blocks = host_blocks;
  NOSA_CHECK(o.device_slots >= layout.chunks_per_block() * (sp.topk + 2),
             "--gpu-kv-gib leaves room for {} chunks, less than one sequence's selection ({}): "
             "raise it",
             std::max<int64_t>(0, o.device_slots), layout.chunks_per_block() * (sp.topk + 2));
  logger("memory")->info(
      "offload {}: GPU block cache {} chunks ({:.2f} GiB), host {} blocks ({:.2f} GiB), disk {} "
      "blocks ({:.2f} GiB)",
      f.offload, o.device_slots, double(o.device_slots) * slot_bytes / k_gib, host_blocks,
      double(host_blocks) * block_host_bytes / k_gib, disk_blocks,
      double(disk_blocks) * block_host_bytes / k_gib);
  return blocks;
}

}  // namespace

std::unique_ptr<runtime::Backend> make_backend(const std::string& device) {
  NOSA_CHECK(device == "cpu" || device == "cuda" || device == "auto",
             "unknown device '{}' (use cpu, cuda or auto)", device);
  const bool cuda = device == "cuda" || (device == "auto" && runtime::cuda_available());
  return cuda ? runtime::make_cuda_backend(parallel::MpiContext::get().local_rank())
              : runtime::make_cpu_backend();
}

std::unique_ptr<parallel::Communicator> make_communicator(const parallel::Replica& replica,
                                                          runtime::Backend& backend,
                                                          std::chrono::milliseconds timeout) {
  if (backend.device() == Device::cuda)
    return parallel::make_nccl_communicator(replica, parallel::MpiContext::get().local_rank(),
                                            backend.native_stream(), timeout);
  return parallel::make_mpi_communicator(replica, timeout);
}

EngineSetup EngineSetup::create(const EngineFlags& f, int64_t tokens_hint) {
  if (f.threads > 0) ThreadPool::set_global_threads(f.threads);
  EngineSetup s;
  const auto timeout = std::chrono::milliseconds(int64_t(f.rank_timeout_s * 1000));
  NOSA_CHECK(f.rank_timeout_s > 0, "--rank-timeout must be positive");
  s.replica = parallel::make_replica(f.tp);
  s.backend = make_backend(f.device);
  const bool want_cuda = s.backend->device() == Device::cuda;
  s.comm = make_communicator(s.replica, *s.backend, timeout);
  runtime::LoadOptions lo;
  if (!f.attention.empty()) lo.mode = attention::parse_mode(f.attention);
  s.model = runtime::load_model(f.model, lo, *s.backend, *s.comm);
  // Every rank of a replica must split the same steps (the halves' collectives come in their
  // own order): the leader's threshold holds, also when the ranks' environments differ.
  int micro = f.micro_batch_min_seqs >= 0 ? f.micro_batch_min_seqs : s.model->micro_batch_min_seqs();
  parallel::broadcast_value(s.replica, micro, timeout);
  s.model->set_micro_batch_min_seqs(micro);
  runtime::KvLayout layout = s.model->kv_layout();
  runtime::KvCacheOptions kv_options;
  kv_options.offload = memory::parse_offload(f.offload);
  // Prefetching moves blocks from host memory: without offloading there is nothing to move.
  NOSA_CHECK(f.prefetch != "on" || kv_options.offload != memory::Offload::none,
             "--prefetch on needs --offload host or host+disk (with --offload none every block "
             "is on the device already)");
  if (!f.prefetch.empty()) s.model->set_prefetch(runtime::Model::parse_prefetch(f.prefetch));
  int64_t blocks = 0;
  if (kv_options.offload == memory::Offload::none) {
    size_t budget = f.kv_gib > 0 ? size_t(f.kv_gib * double(1ull << 30))
                                 : s.backend->free_memory_bytes();
    const bool explicit_budget = f.kv_blocks > 0 || f.kv_gib > 0;
    blocks = runtime::kv_blocks_for(
        layout, f.kv_blocks, explicit_budget || tokens_hint <= 0 ? INT64_MAX / 2 : tokens_hint,
        budget);
  } else {
    blocks = offload_plan(f, *s.model, *s.backend, tokens_hint, kv_options);
  }
  // Every rank of a replica holds the same block ids: the leader's count decides.
  parallel::broadcast_value(s.replica, blocks, timeout);
  runtime::EngineOptions eo;
  eo.max_batch_tokens =
      f.max_batch_tokens > 0 ? f.max_batch_tokens : (want_cuda ? 16384 : 2048);
  eo.max_running = f.max_running;
  if (kv_options.offload != memory::Offload::none) {
    // The running batch's selections must fit the block cache at once (topk blocks and the
    // block being written, per layer and head).
    // Every rank caches its share of the same selections, each in a block cache sized from its
    // own free memory: the smallest fit in the replica decides.
    const auto& sp = s.model->config().sparse;
    const int64_t per_seq = layout.chunks_per_block() * (sp.topk + 2);
    const int64_t fit =
        parallel::all_min_value<int64_t>(s.replica, kv_options.device_slots / per_seq, timeout);
    eo.max_running = int(std::max<int64_t>(1, std::min<int64_t>(eo.max_running, fit)));
    // Decoding steps keep their residency on the device (docs/memory.md, "Partitions"): a
    // partition per running sequence, at least half again the selection's width, in at most
    // half of the block cache (the rest stays the host path's, for the prompts' rounds);
    // batches larger than the partitions take the host path.
    if (s.model->mode() != attention::Mode::dense) {
      // Every rank of a replica makes the same partitions (the smallest fit decides).
      // NOSA_DEVICE_RESIDENCY=0 keeps every step on the host path (and its micro-batches).
      const int64_t cpb = layout.chunks_per_block(), room = kv_options.device_slots / 2;
      const bool wanted = env_int("NOSA_DEVICE_RESIDENCY", 1, 0, 1) == 1;
      const int64_t n = parallel::all_min_value<int64_t>(
          s.replica,
          wanted ? std::min<int64_t>(eo.max_running,
                                     room / (cpb * std::max(1, sp.topk + sp.topk / 2)))
                 : 0,
          timeout);
      if (n > 0) {
        kv_options.decode_partitions = int(n);
        kv_options.partition_slots = int(parallel::all_min_value<int64_t>(
            s.replica, std::min<int64_t>(memory::k_max_partition_slots, room / (cpb * n)),
            timeout));
        kv_options.min_partition_slots = sp.topk;
      }
    }
  }
  s.cache = std::make_unique<runtime::KvCache>(layout, blocks, *s.backend, kv_options);
  eo.max_context = f.max_context;
  s.runner = std::make_unique<runtime::ReplicaRunner>(s.replica, *s.model, *s.cache, timeout);
  runtime::ReplicaRunner* runner = s.runner.get();
  s.engine = std::make_unique<runtime::Engine>(
      *s.model, *s.cache, eo, [runner](const runtime::StepBatch& b) { return runner->forward(b); });
  s.tokenizer = load_tokenizer(f.model);
  logger("runtime")->info("KV cache: {} blocks of {} tokens ({:.1f} MiB)", blocks,
                          layout.block_size,
                          double(blocks) * double(layout.bytes_per_block()) / (1 << 20));
  return s;
}

std::vector<int32_t> parse_token_ids(const std::string& spec) {
  std::string text = spec;
  std::string origin = "--prompt-ids";
  if (!spec.empty() && spec[0] == '@') {
    origin = spec.substr(1);
    std::ifstream in(origin);
    NOSA_CHECK(in.good(), "cannot read token ids from '{}'", origin);
    std::stringstream ss;
    ss << in.rdbuf();
    text = ss.str();
  }
  std::vector<int32_t> ids;
  std::string cleaned;
  for (char ch : text) cleaned.push_back(ch == ',' || ch == '[' || ch == ']' ? ' ' : ch);
  std::istringstream in(cleaned);
  std::string word;
  while (in >> word) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(word, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    NOSA_CHECK(used == word.size() && v >= 0 && v <= INT32_MAX,
               "{}: '{}' is not a token id (expected non-negative integers)", origin, word);
    ids.push_back(int32_t(v));
  }
  NOSA_CHECK(!ids.empty(), "{}: no token ids", origin);
  return ids;
}

void apply_log_level(const std::string& flag) {
  std::string level = flag;
  if (level.empty())
    if (const char* env = std::getenv("NOSA_LOG")) level = env;
  if (level.empty()) level = "info";
  set_log_level(level);
}

}  // namespace nosa::launcher
