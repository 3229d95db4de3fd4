// `nosa bench`: throughput benchmarks of the engine, by suite (docs/performance.md says how
// numbers are taken and reported).
//   decode  - one decoding step of B sequences at a context of C tokens, with the KV cache filled
//             with random contents on the device (no prefill), so that 64 x 32K contexts are
//             practical; tokens/s, median step time, and the step's floor (weights + the KV the
//             attention reads, at 4.3 TB/s) with the ratio.
//   prefill - P prompts of L tokens through the engine (chunked prefill, continuous batching);
//             tokens/s.
//   offload - decode with the KV cache offloaded to host (and disk), optionally at a controlled
//             miss rate.
//   smoke   - a fixed tiny run of the three (seconds on a CPU): for CI and to check a build.
// Models are random weights of a named shape made directly on the device (or a checkpoint with
// --model). Results go to stdout as a table and, with --json / --csv, to files that carry the
// machine, the commit, the command and the configuration; --plot writes PNG charts of the rows.
// --report-from reads results back instead of running (charts, Markdown tables, comparisons and
// targets for bench/README.md; scripts/bench-report.sh). A new suite is a function added to
// suites().
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>
#include <tuple>

#include "attention/reference/selection.h"
#include "launcher/bench/gpu_clocks.h"
#include "launcher/bench/progress.h"
#include "launcher/bench/report.h"
#include "launcher/commands.h"
#include "launcher/engine_setup.h"
#include "parallel/mpi.h"
#include "parallel/nccl_communicator.h"
#include "parallel/sharding.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"
#include "runtime/core/thread_pool.h"
#include "runtime/make_model.h"

namespace nosa::launcher {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// docs/performance.md: the lent H200's copy rate (the prefetch rule uses the same ceilings)
constexpr double k_hbm_bytes_per_s = runtime::Model::k_hbm_bytes_per_s;

struct BenchFlags {
  std::string suite = "decode";
  std::string shape = "nosa-1b-like";
  std::string model;  // a checkpoint instead of random weights
  int layers = 0;
  std::string device = "auto";
  std::vector<std::string> modes = {"dense", "nosa"};
  std::vector<int> batch = {1, 16, 64};
  std::vector<int64_t> context = {16384, 32768};
  int steps = 20;
  int warmup = 3;
  int prompts = 16;
  int64_t prompt_len = 16384;
  int64_t max_batch_tokens = 16384;
  uint64_t seed = 1;
  int threads = 0;
  int tp = 1;                        // tensor-parallel ranks (run under mpirun -np tp)
  std::string offload = "host";      // offload suite: host or host+disk
  double gpu_kv_gib = 0, host_kv_gib = 0, disk_kv_gib = 0;
  std::string disk_kv_dir;
  std::vector<double> miss_rates = {-1};  // offload suite: < 0 = the model's own selection
  // Offload suite, residency on the host: Model::set_micro_batch_min_seqs values whose steps
  // alternate in one run (empty: the model's default).
  std::vector<int> micro_min_seqs;
  // Offload suite: where decoding steps decide residency (device: partitions of the block cache,
  // host: the selection read back each layer); several values give a row each, own tiers each.
  std::vector<std::string> residency = {"device"};
  // Offload suite, residency on the device: whether the misses' copies overlap attention over the
  // hits (on, off); several values alternate step by step like the micro-batch variants (empty:
  // the backend's default).
  std::vector<std::string> copy_overlap;
  std::vector<std::string> prefetch;
  // CUDA block selection: split (split-finish, split-spread), tiled, per-token, automatic (empty)
  std::string select_path;
  std::string cuda_graphs = "on";  // decoding steps replayed from CUDA graphs: on or off
  bool speculation_probe = false;  // decode suite: Model::set_speculation_probe
  std::string json_out, csv_out, label, commit;
  std::string plot_dir, plot_prefix, plot_link, markdown_out;
  std::vector<std::string> report_from;  // read these results instead of running
  std::vector<std::string> sections;     // of --markdown: figures, comparisons, targets
};

std::string run_text(const std::string& cmd) {
  std::string out;
  if (FILE* p = ::popen(cmd.c_str(), "r")) {
    char buf[256];
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    ::pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

std::string commit_id(const std::string& flag) {
  if (!flag.empty()) return flag;
  std::string c = run_text("git rev-parse HEAD 2>/dev/null");
  if (c.empty()) return "unknown";
  if (!run_text("git status --porcelain --untracked-files=no 2>/dev/null").empty()) c += "-dirty";
  return c;
}

json machine_info(runtime::Backend& be) {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  std::string cpu;
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  return {{"hostname", host},
          {"backend", be.name()},
          {"cpu", cpu},
          {"cpu_threads", std::thread::hardware_concurrency()}};
}

// A model of random weights on the backend (made where it lives: no disk, no host copy).
struct BenchModel {
  std::unique_ptr<parallel::Communicator> comm;
  std::unique_ptr<runtime::Model> model;
  double weight_bytes = 0;  // Model::weight_bytes
};

// The ranks of a tensor-parallel benchmark (one rank without mpirun).
struct BenchRanks {
  parallel::Replica replica;
  std::function<std::unique_ptr<parallel::Communicator>()> make_comm;
};

BenchModel random_model(runtime::Backend& be, const BenchFlags& f, attention::Mode mode,
                        const BenchRanks& ranks) {
  runtime::ModelConfig c = runtime::shape_config(f.shape, mode);
  if (f.layers > 0) c.num_hidden_layers = f.layers;
  BenchModel bm;
  bm.comm = ranks.make_comm();
  parallel::Partition part = parallel::make_partition(c.num_attention_heads, c.num_key_value_heads,
                                                      c.intermediate_size, c.vocab_size,
                                                      ranks.replica.rank, ranks.replica.size);
  const DType act = be.activation_dtype();
  const int64_t H = c.hidden_size, d = c.head_dim, V = c.vocab_size;
  const int64_t nkv = c.num_key_value_heads;
  uint64_t seed = f.seed * 1000;
  auto make = [&](Shape shape, float lo, float hi, DType dt) {
    Tensor t = be.alloc(dt, std::move(shape));
    be.fill_uniform(t, seed++, lo, hi);
    return t;
  };
  const float a = 0.035f;  // ~ N(0, 0.02) in scale
  runtime::ModelWeights w;
  w.embed = make({V, H}, -a, a, act);
  w.final_norm = make({H}, 1.0f, 1.0f, act);
  if (part.rank == 0) w.lm_head = c.tie_word_embeddings ? w.embed : make({V, H}, -a, a, act);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    runtime::LayerWeights L;
    L.attn_norm = make({H}, 1.0f, 1.0f, act);
    L.mlp_norm = make({H}, 1.0f, 1.0f, act);
    L.qkv = make({(part.group_q_count + part.kv_count + nkv) * d, H}, -a, a, act);
    L.o_proj = make({H, part.q_count * d}, -a, a, act);
    L.gate_up = make({2 * part.ffn_count, H}, -a, a, act);
    L.down = make({H, part.ffn_count}, -a, a, act);
    L.nosa_a = make({nkv}, 0.5f, 1.0f, DType::f32);
    L.nosa_delta_w = make({nkv, nkv * d}, -0.05f, 0.05f, DType::f32);
    w.layers.push_back(std::move(L));
  }
  bm.model = std::make_unique<runtime::Model>(c, std::move(w), part, mode, be, *bm.comm);
  bm.weight_bytes = bm.model->weight_bytes();
  return bm;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, size_t(q * double(v.size())))];
}

struct SuiteContext {
  const BenchFlags& flags;
  runtime::Backend& backend;
  std::vector<json>& rows;
  BenchRanks ranks;
  bench::BenchProgress* progress = nullptr;  // the leader's progress line
  bool leader() const { return ranks.replica.leader(); }
  // A configuration starts / a result line is about to be logged.
  void next(const std::string& what) {
    if (progress) progress->next(what);
  }
  void clear() {
    if (progress) progress->clear();
  }
};

// Samples on the leader (the only rank with logits); followers wait for their queued work.
void finish_step(SuiteContext& ctx, const Tensor& logits,
                 const std::vector<runtime::SamplingParams>& params) {
  if (ctx.leader()) ctx.backend.sample(logits, params);
  else ctx.backend.synchronize();
}

// ---- decode -------------------------------------------------------------------------------------

// The attention of one decoding step alone, all layers (what PyTorch's SDPA is compared with,
// scripts/bench_sdpa.py): block selection and attention over the selected blocks (sparse modes),
// or attention over every block (dense), for one query token per sequence at position `context`,
// on the KV already in the cache; no projections, no KV append. Median milliseconds after warm-up
// (wall clock around a synchronized batch of kernels). One rank only.
// Tokens a decoding token at position `context` attends to: its selected blocks (all of them in
// dense mode), at most the context itself.
int64_t attended_tokens(attention::Mode mode, const attention::SparseParams& p, int64_t context) {
  return std::min<int64_t>(context + 1,
                           attention::reference::selected_count(mode, context, p) * p.block_size);
}

// Bytes of KV (keys, values and, for NOSA, eviction scores) one decoding step of B sequences at
// `context` reads over every layer and local KV head: the HBM part of a step's floor.
double kv_read_bytes(attention::Mode mode, const attention::SparseParams& p,
                     const runtime::KvLayout& layout, int64_t context, int B, int layers) {
  const double per_token = 2.0 * layout.head_dim * double(dtype_size(layout.dtype)) +
                           (mode == attention::Mode::nosa ? 4.0 : 0.0);
  return double(B) * layers * layout.n_kv_heads * double(attended_tokens(mode, p, context)) *
         per_token;
}

double attention_ms(runtime::Backend& be, runtime::Model& model, runtime::KvCache& cache,
                    const std::vector<std::vector<int32_t>>& tables, int64_t context,
                    const BenchFlags& f) {
  const runtime::ModelConfig& c = model.config();
  const attention::Mode mode = model.mode();
  const bool sparse = mode != attention::Mode::dense;
  const bool nosa = mode == attention::Mode::nosa;
  runtime::StepBatch step;
  for (const auto& table : tables) step.add({3}, context, &table);
  const int64_t T = step.n_tokens();
  Tensor q = be.alloc(be.activation_dtype(), {T, c.num_attention_heads, c.head_dim});
  be.fill_uniform(q, f.seed + 15, -1.0f, 1.0f);
  Tensor out = be.alloc(be.activation_dtype(), {T, c.num_attention_heads, c.head_dim});
  std::vector<double> times;
  for (int s = 0; s < f.warmup + f.steps; ++s) {
    be.begin_step(step);
    be.synchronize();
    const auto t0 = Clock::now();
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      if (sparse) {
        runtime::Selection sel = be.select_blocks(l, mode, q, c.sparse, cache);
        be.attend(l, q, 0, &sel, nosa, cache, out);
      } else {
        be.attend(l, q, 0, nullptr, false, cache, out);
      }
    }
    be.synchronize();
    if (s >= f.warmup)
      times.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return median(times);
}

void run_decode(SuiteContext& ctx) {
  const BenchFlags& f = ctx.flags;
  runtime::Backend& be = ctx.backend;
  for (const std::string& mode_name : f.modes) {
    const attention::Mode mode = attention::parse_mode(mode_name);
    BenchModel bm = random_model(be, f, mode, ctx.ranks);
    runtime::Model& model = *bm.model;
    model.set_speculation_probe(f.speculation_probe);
    const runtime::ModelConfig& c = model.config();
    const attention::SparseParams& p = c.sparse;
    runtime::KvLayout layout = model.kv_layout();
    for (int64_t context : f.context)
      for (int B : f.batch) {
        ctx.next(fmt::format("decode {} B={} C={}", mode_name, B, context));
        json row = {{"suite", "decode"},       {"shape", f.shape},
                    {"layers", c.num_hidden_layers}, {"mode", mode_name},
                    {"batch", B},              {"context", context},
                    {"steps", f.steps},        {"label", f.label},
                    {"tp", ctx.ranks.replica.size}, {"offload", "none"}};
        const int64_t blocks_per_seq = (context + 1 + layout.block_size - 1) / layout.block_size;
        const int64_t n_blocks = blocks_per_seq * B;
        const double kv_bytes = double(n_blocks) * double(layout.bytes_per_block());
        if (kv_bytes > double(be.free_memory_bytes())) {
          row["skipped"] = fmt::format("the KV cache needs {:.1f} GiB, more than is free",
                                       kv_bytes / double(1ull << 30));
          ctx.clear();
          logger("bench")->warn("decode {} B={} C={}: skipped ({})", mode_name, B, context,
                                row["skipped"].get<std::string>());
          ctx.rows.push_back(row);
          continue;
        }
        std::unique_ptr<runtime::KvCache> cache;
        try {
          cache = std::make_unique<runtime::KvCache>(layout, n_blocks, be);
        } catch (const Error& e) {
          row["skipped"] = e.message();
          ctx.rows.push_back(row);
          continue;
        }
        // Random KV contents (keys, values, eviction scores, compressed keys and their scores).
        be.fill_uniform(cache->kv(), f.seed + 11, -1.0f, 1.0f);
        be.fill_uniform(cache->bias(), f.seed + 12, 0.0f, 1.0f);
        be.fill_uniform(cache->ck(), f.seed + 13, -1.0f, 1.0f);
        be.fill_uniform(cache->ck_scores(), f.seed + 14, 0.0f, 1.0f);
        std::vector<std::vector<int32_t>> tables(B);
        for (int i = 0; i < B; ++i)
          for (int64_t j = 0; j < blocks_per_seq; ++j)
            tables[i].push_back(int32_t(i * blocks_per_seq + j));
        std::mt19937 rng(uint32_t(f.seed));
        std::vector<runtime::SamplingParams> greedy(B);
        std::vector<double> times_ms, enqueue_ms;
        int64_t replays_before = 0;
        bench::GpuSampler clocks(be.pci_bus_id());
        for (int s = 0; s < f.warmup + f.steps; ++s) {
          runtime::StepBatch step;
          for (int i = 0; i < B; ++i)
            step.add({int32_t(rng() % uint32_t(c.vocab_size))}, context, &tables[i]);
          if (s == f.warmup) {
            replays_before = runtime::cuda_graph_replays();
            model.reset_speculation_stats();
            clocks.start();
          }
          const auto t0 = Clock::now();
          Tensor logits = model.forward(step, *cache);
          const auto t1 = Clock::now();  // the host has queued the step's work
          finish_step(ctx, logits, greedy);
          const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
          if (s >= f.warmup) {
            times_ms.push_back(ms);
            enqueue_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
          }
        }
        if (const auto cs = clocks.stop()) bench::add_gpu_clock_stats(*cs, row);
        // The floor: weights plus what the attention reads per (sequence, layer, KV head).
        const bool sparse = mode != attention::Mode::dense;
        const bool nosa = mode == attention::Mode::nosa;
        const double kv_elem = double(dtype_size(layout.dtype));
        const int64_t n_ck = sparse ? attention::reference::compressed_count(context, p) : 0;
        const double ck_bytes = double(n_ck) * (layout.head_dim * kv_elem + (nosa ? 4.0 : 0.0));
        const double heads = double(B) * c.num_hidden_layers * layout.n_kv_heads;
        const int64_t attended = attended_tokens(mode, p, context);
        const double kv_read = kv_read_bytes(mode, p, layout, context, B, c.num_hidden_layers);
        const double ck_read = heads * ck_bytes;
        const double floor_ms = (bm.weight_bytes + kv_read) / k_hbm_bytes_per_s * 1e3;
        const double floor_ck_ms = (bm.weight_bytes + kv_read + ck_read) / k_hbm_bytes_per_s * 1e3;
        const double med = median(times_ms);
        row["step_ms_median"] = med;
        row["step_ms_p10"] = percentile(times_ms, 0.1);
        row["step_ms_p90"] = percentile(times_ms, 0.9);
        if (ctx.ranks.replica.size == 1) {
          try {
            const double attn = attention_ms(be, model, *cache, tables, context, f);
            row["attention_ms_median"] = attn;
            row["attention_ms_per_layer"] = attn / c.num_hidden_layers;
          } catch (const Error& e) {  // the step's figures stand without it
            row["attention_error"] = e.message();
          }
        }
        if (f.speculation_probe && sparse) {
          // Over the timed steps: how much of each layer's selection, and of the blocks it did
          // not select the step before, the selection made from the layer before's input found.
          using Stats = runtime::Model::SpeculationStats;
          const Stats& st = model.speculation_stats();
          const int64_t sel = st.selected, pred = st.predicted, wasted = st.wasted,
                        fresh = Stats::total(st.fresh),
                        fresh_pred = Stats::total(st.fresh_predicted);
          auto share = [](int64_t a, int64_t b) { return b > 0 ? double(a) / double(b) : 0.0; };
          json by_layer = json::array();  // layers 1.. (layer 0 has no layer before)
          for (size_t l = 1; l < st.fresh.size(); ++l)
            by_layer.push_back(share(st.fresh_predicted[l], st.fresh[l]));
          row["speculation"] = {{"selected", sel},         {"predicted", pred},
                                {"fresh", fresh},          {"fresh_predicted", fresh_pred},
                                {"wasted", wasted},        {"predicted_share", share(pred, sel)},
                                {"fresh_predicted_share", share(fresh_pred, fresh)},
                                {"wasted_per_fresh", share(wasted, fresh)},
                                {"fresh_predicted_share_by_layer", by_layer}};
          logger("bench")->info(
              "decode {} B={} C={}: the selection from the layer before's input took {:.1f}% of "
              "the selected blocks and {:.1f}% of those new since the step before ({} of {}), "
              "plus {:.2f} blocks nobody used per new one",
              mode_name, B, context, 100 * share(pred, sel), 100 * share(fresh_pred, fresh),
              fresh_pred, fresh, share(wasted, fresh));
        }
        // Host time to queue the forward pass: near the step time means the CPU is the limit.
        row["enqueue_ms_median"] = median(enqueue_ms);
        row["cuda_graphs"] = f.cuda_graphs == "on";
        row["graph_replays"] = runtime::cuda_graph_replays() - replays_before;
        row["tokens_per_s"] = med > 0 ? double(B) * 1e3 / med : 0;
        row["weight_bytes"] = bm.weight_bytes;
        row["kv_bytes_read"] = kv_read;
        row["ck_bytes_read"] = ck_read;
        row["attended_tokens"] = attended;
        row["floor_ms"] = floor_ms;
        row["floor_ms_with_compressed_keys"] = floor_ck_ms;
        row["ratio_to_floor"] = floor_ms > 0 ? med / floor_ms : 0;
        ctx.rows.push_back(row);
        ctx.clear();
        logger("bench")->info(
            "decode {:8s} B={:3d} C={:6d}: {:8.3f} ms/step  {:9.1f} tok/s  floor {:.3f} ms  "
            "x{:.2f}  (host enqueue {:.3f} ms{})",
            mode_name, B, context, med, row["tokens_per_s"].get<double>(), floor_ms,
            row["ratio_to_floor"].get<double>(), row["enqueue_ms_median"].get<double>(),
            row.contains("attention_ms_median")
                ? fmt::format(", attention alone {:.3f} ms",
                              row["attention_ms_median"].get<double>())
                : std::string());
      }
  }
}

// ---- prefill ------------------------------------------------------------------------------------

void run_prefill(SuiteContext& ctx) {
  const BenchFlags& f = ctx.flags;
  runtime::Backend& be = ctx.backend;
  for (const std::string& mode_name : f.modes) {
    const attention::Mode mode = attention::parse_mode(mode_name);
    ctx.next(fmt::format("prefill {} {} x {}", mode_name, f.prompts, f.prompt_len));
    BenchModel bm = random_model(be, f, mode, ctx.ranks);
    runtime::Model& model = *bm.model;
    const runtime::ModelConfig& c = model.config();
    runtime::KvLayout layout = model.kv_layout();
    const int64_t L = f.prompt_len;
    json row = {{"suite", "prefill"},    {"shape", f.shape},   {"layers", c.num_hidden_layers},
                {"mode", mode_name},     {"prompts", f.prompts}, {"prompt_len", L},
                {"max_batch_tokens", f.max_batch_tokens},       {"label", f.label}};
    const int64_t n_blocks = int64_t(f.prompts) * ((L + 2 + layout.block_size - 1) / layout.block_size) + 8;
    const double kv_bytes = double(n_blocks) * double(layout.bytes_per_block());
    if (kv_bytes > double(be.free_memory_bytes())) {
      row["skipped"] = fmt::format("the KV cache needs {:.1f} GiB, more than is free",
                                   kv_bytes / double(1ull << 30));
      ctx.rows.push_back(row);
      continue;
    }
    runtime::KvCache cache(layout, n_blocks, be);
    runtime::EngineOptions eo;
    eo.max_batch_tokens = f.max_batch_tokens;
    eo.max_running = std::max(1, f.prompts);
    std::mt19937 rng(uint32_t(f.seed));
    auto prompt = [&](int64_t n) {
      std::vector<int32_t> ids(n);
      for (auto& id : ids) id = int32_t(3 + rng() % uint32_t(c.vocab_size - 3));
      return ids;
    };
    auto run = [&](int n_prompts, int64_t len) {
      runtime::Engine engine(model, cache, eo);
      for (int i = 0; i < n_prompts; ++i) {
        runtime::GenerationRequest r;
        r.prompt = prompt(len);
        r.max_tokens = 1;
        r.ignore_eos = true;
        engine.submit(std::move(r));
      }
      int64_t steps = 0;
      const auto t0 = Clock::now();
      while (engine.has_work()) {
        engine.step();
        ++steps;
      }
      be.synchronize();
      return std::pair{std::chrono::duration<double>(Clock::now() - t0).count(), steps};
    };
    run(1, std::min<int64_t>(L, 2048));  // warm-up: kernels, cuBLAS heuristics, allocator
    bench::GpuSampler clocks(be.pci_bus_id());
    clocks.start();
    auto [seconds, steps] = run(f.prompts, L);
    if (const auto s = clocks.stop()) bench::add_gpu_clock_stats(*s, row);
    row["seconds"] = seconds;
    row["steps"] = steps;
    row["tokens_per_s"] = double(f.prompts) * double(L) / seconds;
    ctx.rows.push_back(row);
    ctx.clear();
    logger("bench")->info("prefill {:8s} {} x {}: {:.2f} s, {:.0f} tok/s", mode_name, f.prompts, L,
                          seconds, row["tokens_per_s"].get<double>());
  }
}


// ---- offload ------------------------------------------------------------------------------------

// Decoding with the KV cache offloaded: the full KV in host memory (and on disk), the GPU block
// cache holding the selection. Reports the measured step-to-step overlap of selections and the
// cache's miss rate, the PCIe traffic, and the floor max(HBM time, PCIe time at 51 GB/s). With
// --miss-rate r >= 0 each step replaces a fraction r of every (sequence, layer, head)'s
// non-forced selected blocks with random other blocks, so that throughput can be read off at the
// locality a trained model shows (random weights do not show it).
// Zero-copy gather of scattered blocks.
constexpr double k_gather_bytes_per_s = runtime::Model::k_bus_bytes_per_s;

// Controlled selections: per (sequence, layer, KV head), the last step's blocks with a fraction
// replaced.
class SyntheticSelection {
 public:
  SyntheticSelection(const attention::SparseParams& p, double replace, uint64_t seed)
      : p_(p), replace_(replace), rng_(uint32_t(seed)) {}

  void apply(runtime::Backend& be, int layer, const runtime::StepBatch& step,
             runtime::Selection& sel, int n_heads) {
    const int64_t T = step.n_tokens();
    Tensor host = Tensor::empty_host(DType::i32, {T, n_heads, sel.k_max});
    std::fill_n(host.data<int32_t>(), host.numel(), -1);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = step.positions[t], qb = pos / p_.block_size;
      const int64_t k = std::min<int64_t>(p_.topk, qb + 1);
      for (int h = 0; h < n_heads; ++h) {
        // Keyed by the sequence's block table, the same object in every step (and in either
        // micro-batch of a step).
        auto& cur = state_[{step.seqs[step.token_seq[t]].blocks, layer, h}];
        auto forced = [&](int64_t b) {
          return b < p_.init_blocks || b >= qb - p_.local_blocks();
        };
        if (int64_t(cur.size()) != k) {  // first step: forced blocks, then random others
          cur.clear();
          for (int64_t b = 0; b <= qb; ++b)
            if (forced(b)) cur.push_back(int32_t(b));
          fill(cur, qb, k);
        } else {
          std::vector<int32_t> kept;
          for (int32_t b : cur)
            if (forced(b) || std::uniform_real_distribution<double>(0, 1)(rng_) >= replace_)
              kept.push_back(b);
          cur = kept;
          fill(cur, qb, k);
        }
        std::sort(cur.begin(), cur.end());
        std::copy(cur.begin(), cur.end(),
                  host.data<int32_t>() + (t * n_heads + h) * sel.k_max);
      }
    }
    sel.blocks = be.upload(host, DType::i32);
  }

 private:
  void fill(std::vector<int32_t>& cur, int64_t qb, int64_t k) {
    while (int64_t(cur.size()) < k) {
      int32_t b = int32_t(rng_() % uint32_t(qb + 1));
      if (std::find(cur.begin(), cur.end(), b) == cur.end()) cur.push_back(b);
    }
  }
  attention::SparseParams p_;
  double replace_;
  std::mt19937 rng_;
  std::map<std::tuple<const std::vector<int32_t>*, int, int>, std::vector<int32_t>> state_;
};

// AnonHugePages of this process (/proc/self/smaps_rollup) in GiB; -1 where it cannot be read.
double anon_huge_pages_gib() {
  std::ifstream f("/proc/self/smaps_rollup");
  std::string key;
  double kb = -1;
  while (f >> key) {
    if (key == "AnonHugePages:") {
      f >> kb;
      break;
    }
    f.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return kb < 0 ? -1 : kb / (1 << 20);
}

void run_offload(SuiteContext& ctx) {
  const BenchFlags& f = ctx.flags;
  runtime::Backend& be = ctx.backend;
  constexpr double gib = double(1ull << 30);
  NOSA_CHECK(f.offload == "host" || f.offload == "host+disk",
             "the offload suite takes --offload host or host+disk, not '{}'", f.offload);
  NOSA_CHECK(f.offload == "host" || !f.disk_kv_dir.empty(),
             "--offload host+disk needs --disk-kv-dir (where the KV files go)");
  for (const int m : f.micro_min_seqs)
    NOSA_CHECK(m >= 0, "--micro-batch-min-seqs takes sequence counts >= 0 (0: never), not {}", m);
  for (const std::string& r : f.residency)
    NOSA_CHECK(r == "device" || r == "host", "--residency takes device or host, not '{}'", r);
  for (const std::string& o : f.copy_overlap)
    NOSA_CHECK(o == "on" || o == "off", "--copy-overlap takes on or off, not '{}'", o);
  for (const std::string& o : f.prefetch) runtime::Model::parse_prefetch(o);
  // The prefetch guesses from the model; a controlled miss rate replaces each layer's selection
  // after that guess, so the two do not measure anything together.
  const bool controlled = std::any_of(f.miss_rates.begin(), f.miss_rates.end(),
                                      [](double m) { return m >= 0; });
  NOSA_CHECK(!controlled || std::all_of(f.prefetch.begin(), f.prefetch.end(),
                                        [](const std::string& o) { return o == "off"; }),
             "--prefetch on or auto needs the model's own selection (--miss-rate -1): a "
             "controlled miss rate replaces each layer's selection after the prefetch has "
             "guessed it");
  for (const std::string& mode_name : f.modes) {
    const attention::Mode mode = attention::parse_mode(mode_name);
    NOSA_CHECK(mode != attention::Mode::dense,
               "the offload suite runs infllmv2 or nosa (dense reads every block each step)");
    BenchModel bm = random_model(be, f, mode, ctx.ranks);
    runtime::Model& model = *bm.model;
    const runtime::ModelConfig& c = model.config();
    const attention::SparseParams& p = c.sparse;
    runtime::KvLayout layout = model.kv_layout();
    const int64_t cpb = layout.chunks_per_block();
    const double slot_bytes = double(layout.kv_chunk_bytes() + layout.bias_chunk_bytes());
    std::vector<std::pair<double, std::string>> cases;  // (miss rate, residency)
    for (double miss : f.miss_rates)
      for (const std::string& r : f.residency) cases.emplace_back(miss, r);
    for (int64_t context : f.context)
      for (int B : f.batch)
        for (const auto& one_case : cases) {
          const double miss = one_case.first;
          const std::string& residency = one_case.second;
          ctx.next(fmt::format("offload {} B={} C={} miss={} residency={}", mode_name, B, context,
                               miss < 0 ? "model" : fmt::format("{:.2f}", miss), residency));
          json row = {{"suite", "offload"},  {"shape", f.shape},  {"layers", c.num_hidden_layers},
                      {"mode", mode_name},   {"batch", B},        {"context", context},
                      {"steps", f.steps},    {"label", f.label},  {"offload", f.offload},
                      {"tp", ctx.ranks.replica.size},
                      {"controlled_miss_rate", miss < 0 ? json() : json(miss)},
                      {"residency", residency}};
          const int64_t blocks_per_seq = (context + 1 + layout.block_size - 1) / layout.block_size;
          const int64_t n_blocks = blocks_per_seq * B;
          runtime::KvCacheOptions o;
          o.offload = memory::parse_offload(f.offload);
          // Default block cache: twice the batch's selection, so that recently dropped blocks
          // can come back as hits.
          o.device_slots = f.gpu_kv_gib > 0 ? int64_t(f.gpu_kv_gib * gib / slot_bytes)
                                            : int64_t(B) * cpb * (p.topk + 2) * 2;
          o.host_blocks = f.host_kv_gib > 0
                              ? int64_t(f.host_kv_gib * gib / (double(cpb) * slot_bytes))
                              : n_blocks;
          if (o.offload == memory::Offload::host_disk) o.disk_dir = f.disk_kv_dir;
          if (residency == "device") {
            o.decode_partitions = B;
            o.min_partition_slots = p.topk;
          }
          // A configuration the tiers cannot hold (host budget, disk, pinning) is reported as
          // skipped with the reason, and the run goes on.
          auto skip = [&](const Error& e) {
            model.set_selection_override({});
            row["skipped"] = e.message();
            ctx.rows.push_back(row);
            ctx.clear();
            logger("bench")->warn("offload {} B={} C={}: skipped ({})", mode_name, B, context,
                                  e.message());
          };
          std::unique_ptr<runtime::KvCache> cache;
          try {
            cache = std::make_unique<runtime::KvCache>(layout, n_blocks, be, o);
          } catch (const Error& e) {
            skip(e);
            continue;
          }
          be.fill_uniform(cache->ck(), f.seed + 13, -1.0f, 1.0f);
          be.fill_uniform(cache->ck_scores(), f.seed + 14, 0.0f, 1.0f);
          std::vector<int32_t> all(n_blocks);
          for (int64_t i = 0; i < n_blocks; ++i) all[i] = int32_t(i);
          std::vector<std::vector<int32_t>> tables(B);
          std::unique_ptr<SyntheticSelection> synth;
          // The variants whose steps alternate: with residency on the host, micro-batch
          // thresholds (-1: the model's default); on the device (a cache with partitions runs
          // whole steps), copy overlaps and prefetching (-1: the defaults), every pair.
          struct Variant {
            int micro = -1, overlap = -1, prefetch = -1;
          };
          std::vector<Variant> variants;
          if (residency == "device") {
            const std::vector<std::string> none = {""};
            for (const std::string& o : f.copy_overlap.empty() ? none : f.copy_overlap)
              for (const std::string& pf : f.prefetch.empty() ? none : f.prefetch)
                variants.push_back({-1, o.empty() ? -1 : int(o == "on"),
                                    pf.empty() ? -1 : int(runtime::Model::parse_prefetch(pf))});
          } else {
            for (const int m : f.micro_min_seqs) variants.push_back({m, -1});
          }
          if (variants.empty()) variants.push_back({});
          const size_t nv = variants.size();
          const bool overlap_default = be.partition_copy_overlap();
          using Prefetch = runtime::Model::Prefetch;
          const Prefetch prefetch_default = model.prefetch();
          auto restore = [&] {
            model.set_micro_batch_min_seqs(runtime::Model::default_micro_batch_min_seqs());
            be.set_partition_copy_overlap(overlap_default);
            model.set_prefetch(prefetch_default);
          };
          std::vector<std::vector<double>> times_ms(nv);
          std::vector<memory::TierStats> delta(nv);  // summed over each variant's timed steps
          std::vector<int64_t> micro_steps(nv, 0);   // of those, run as two micro-batches
          std::vector<int64_t> prefetch_steps(nv, 0);  // of those, prefetching
          std::vector<int64_t> device_steps(nv, 0);  // of those, with residency on the device
          try {
            const auto t_pop = Clock::now();
            cache->tiers()->populate(all);  // pins host memory, writes overflow to disk
            row["populate_s"] = std::chrono::duration<double>(Clock::now() - t_pop).count();
            // Where the pinned KV landed against the GPU's node: gathers across the socket
            // interconnect are slower, and the placement may differ from process to process.
            json numa = json::object();
            std::string where;
            for (const auto& [node, pages] : cache->tiers()->host_numa_pages()) {
              numa[std::to_string(node)] = pages;
              where += fmt::format("{}{}: {}", where.empty() ? "" : ", ", node, pages);
            }
            row["host_numa_pages"] = numa;
            // How much of the process's memory is in 2 MiB pages (the pinned KV arenas ask for
            // them: the gathers' address translation depends on it).
            row["anon_huge_pages_gib"] = anon_huge_pages_gib();
            row["device_numa_node"] = be.numa_node();
            logger("bench")->info("host KV pages sampled by NUMA node: {}; the device's node: {}",
                                  where, be.numa_node());
            for (int i = 0; i < B; ++i)
              for (int64_t j = 0; j < blocks_per_seq; ++j)
                tables[i].push_back(int32_t(i * blocks_per_seq + j));
            if (miss >= 0) {
              model.set_prefetch(Prefetch::off);  // whatever NOSA_PREFETCH says (see above)
              synth = std::make_unique<SyntheticSelection>(p, miss, f.seed + 21);
              model.set_selection_override(
                  [&](int layer, const runtime::StepBatch& st, runtime::Selection& sel) {
                    synth->apply(be, layer, st, sel, layout.n_kv_heads);
                  });
            } else {
              model.set_selection_override({});
            }
            std::mt19937 rng(uint32_t(f.seed));
            std::vector<runtime::SamplingParams> greedy(B);
            // Every variant warms up, twice when they alternate (a step graph is recorded at a
            // key's second step, and each variant has its own); then the timed steps take the
            // variants in turn.
            const int warmup = std::max<int>(f.warmup, nv > 1 ? 2 * int(nv) : 1);
            for (int s = 0; s < warmup + f.steps * int(nv); ++s) {
              const size_t v = size_t(s) % nv;
              if (variants[v].micro >= 0) model.set_micro_batch_min_seqs(variants[v].micro);
              if (variants[v].overlap >= 0) be.set_partition_copy_overlap(variants[v].overlap);
              if (variants[v].prefetch >= 0) model.set_prefetch(Prefetch(variants[v].prefetch));
              runtime::StepBatch step;
              for (int i = 0; i < B; ++i)
                step.add({int32_t(rng() % uint32_t(c.vocab_size))}, context, &tables[i]);
              cache->sync_stats();  // the warm-up steps' device-side counters too
              const memory::TierStats st0 = cache->stats();
              const int64_t micro0 = model.micro_batch_steps();
              const int64_t prefetch0 = model.prefetch_steps();
              const auto t0 = Clock::now();
              Tensor logits = model.forward(step, *cache);
              finish_step(ctx, logits, greedy);
              const double ms =
                  std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
              if (s < warmup) continue;
              times_ms[v].push_back(ms);
              micro_steps[v] += model.micro_batch_steps() - micro0;
              prefetch_steps[v] += model.prefetch_steps() - prefetch0;
              device_steps[v] += cache->on_device();
              cache->sync_stats();
              const memory::TierStats st1 = cache->stats();
              memory::TierStats& d = delta[v];
              d.selected += st1.selected - st0.selected;
              d.overlap += st1.overlap - st0.overlap;
              d.misses += st1.misses - st0.misses;
              d.prefetched += st1.prefetched - st0.prefetched;
              d.prefetch_hits += st1.prefetch_hits - st0.prefetch_hits;
              d.bytes_host_to_device += st1.bytes_host_to_device - st0.bytes_host_to_device;
              d.bytes_device_to_host += st1.bytes_device_to_host - st0.bytes_device_to_host;
              d.bytes_disk_read += st1.bytes_disk_read - st0.bytes_disk_read;
              d.bytes_disk_written += st1.bytes_disk_written - st0.bytes_disk_written;
            }
          } catch (const Error& e) {
            restore();
            skip(e);
            continue;
          }
          model.set_selection_override({});
          restore();
          const memory::TierStats after = cache->stats();
          for (size_t v = 0; v < nv; ++v) {
            json vrow = row;
            const memory::TierStats& d = delta[v];
            std::string label = f.label;
            auto add_label = [&](const std::string& part) {
              label += (label.empty() ? "" : " ") + part;
            };
            if (f.residency.size() > 1) add_label(residency + "-residency");
            if (variants[v].micro >= 0) {
              vrow["micro_batch_min_seqs"] = variants[v].micro;
              if (f.micro_min_seqs.size() > 1)
                add_label(fmt::format("micro-{}", variants[v].micro));
            }
            if (variants[v].overlap >= 0) {
              vrow["copy_overlap"] = variants[v].overlap == 1;
              if (f.copy_overlap.size() > 1)
                add_label(variants[v].overlap ? "overlap-on" : "overlap-off");
            }
            // What the steps ran with: a controlled miss rate turns prefetching off (above), and
            // residency on the host never prefetches (no field).
            const Prefetch pf = miss >= 0                  ? Prefetch::off
                                : variants[v].prefetch >= 0 ? Prefetch(variants[v].prefetch)
                                                            : model.prefetch();
            if (residency == "device" && (pf != Prefetch::off || variants[v].prefetch >= 0)) {
              // on and off as true and false; auto by name, with the steps it prefetched.
              if (pf == Prefetch::automatic)
                vrow["prefetch"] = "auto";
              else
                vrow["prefetch"] = pf == Prefetch::on;
              vrow["prefetch_steps"] = prefetch_steps[v];
              if (f.prefetch.size() > 1)
                add_label(pf == Prefetch::on ? "prefetch-on"
                                             : pf == Prefetch::off ? "prefetch-off" : "prefetch-auto");
            }
            vrow["label"] = label;
            const double steps = double(f.steps);
            const double selected = double(d.selected);
            const double h2d = double(d.bytes_host_to_device) / steps;
            const double d2h = double(d.bytes_device_to_host) / steps;
            const double disk = double(d.bytes_disk_read) / steps;
            const double disk_written = double(d.bytes_disk_written) / steps;
            // The HBM part of the floor: weights and the selected KV (as the decode suite counts
            // it).
            const double kv_read = kv_read_bytes(mode, p, layout, context, B, c.num_hidden_layers);
            const double hbm_ms = (bm.weight_bytes + kv_read) / k_hbm_bytes_per_s * 1e3;
            const double pcie_ms = (h2d + d2h) / k_gather_bytes_per_s * 1e3;
            // Reads and writes share the disk (measured: 1.4 GB/s reads, 1.5 GB/s writes).
            const double disk_ms = (disk / 1.4e9 + disk_written / 1.5e9) * 1e3;
            const double floor_ms = std::max({hbm_ms, pcie_ms, disk_ms});
            const double med = median(times_ms[v]);
            vrow["step_ms_median"] = med;
            vrow["micro_batch_steps"] = micro_steps[v];
            vrow["device_residency_steps"] = device_steps[v];
            vrow["step_ms_p10"] = percentile(times_ms[v], 0.1);
            vrow["step_ms_p90"] = percentile(times_ms[v], 0.9);
            vrow["tokens_per_s"] = med > 0 ? double(B) * 1e3 / med : 0;
            vrow["overlap"] = selected > 0 ? double(d.overlap) / selected : 0;
            vrow["miss_rate"] = selected > 0 ? double(d.misses) / selected : 0;
            // With prefetching: the misses left on the critical path above; the blocks new to
            // the layers' partitions (misses and prefetch hits), and the prefetch's copies.
            vrow["new_rate"] = selected > 0 ? double(d.misses + d.prefetch_hits) / selected : 0;
            vrow["prefetched_per_step"] = double(d.prefetched) / steps;
            vrow["prefetch_hits_per_step"] = double(d.prefetch_hits) / steps;
            vrow["pcie_bytes_per_step"] = h2d + d2h;
            vrow["disk_bytes_per_step"] = disk;
            vrow["disk_write_bytes_per_step"] = disk_written;
            vrow["disk_floor_ms"] = disk_ms;
            vrow["hbm_floor_ms"] = hbm_ms;
            vrow["pcie_floor_ms"] = pcie_ms;
            vrow["floor_ms"] = floor_ms;
            vrow["ratio_to_floor"] = floor_ms > 0 ? med / floor_ms : 0;
            vrow["gpu_cache_gib"] = double(o.device_slots) * slot_bytes / gib;
            vrow["host_gib"] = double(after.host_blocks) * double(cpb) * slot_bytes / gib;
            vrow["disk_gib"] = double(after.disk_blocks) * double(cpb) * slot_bytes / gib;
            ctx.rows.push_back(vrow);
            logger("bench")->info(
                "offload {:8s} B={:3d} C={:6d} miss={:5s} {}{}: {:8.3f} ms/step {:9.1f} tok/s  "
                "overlap {:.3f} miss rate {:.3f}{}  PCIe {:.1f} MB/step{}  floor {:.3f} ms x{:.2f}",
                mode_name, B, context, miss < 0 ? "model" : fmt::format("{:.2f}", miss),
                device_steps[v] > 0 ? "device" : "host", label.empty() ? "" : " " + label, med,
                vrow["tokens_per_s"].get<double>(), vrow["overlap"].get<double>(),
                vrow["miss_rate"].get<double>(),
                d.prefetched > 0 ? fmt::format(" (new {:.3f}; prefetched {:.0f}, {:.0f} used /step)",
                                               vrow["new_rate"].get<double>(),
                                               vrow["prefetched_per_step"].get<double>(),
                                               vrow["prefetch_hits_per_step"].get<double>())
                                 : std::string(),
                (h2d + d2h) / 1e6,
                disk + disk_written > 0
                    ? fmt::format("  disk {:.1f} MB read, {:.1f} MB written/step", disk / 1e6,
                                  disk_written / 1e6)
                    : std::string(),
                floor_ms, vrow["ratio_to_floor"].get<double>());
          }
          ctx.clear();
        }
  }
}

// ---- smoke --------------------------------------------------------------------------------------

// A fixed, quick run of every suite on the tiny shape (small batches and contexts, a few steps):
// seconds on a CPU. Only --device, --threads, --tp, --seed and the outputs apply.
std::vector<BenchFlags> smoke_parts(const BenchFlags& f) {
  BenchFlags base = f;
  base.shape = "tiny";
  base.layers = 0;
  base.steps = 4;
  base.warmup = 1;
  base.gpu_kv_gib = base.host_kv_gib = base.disk_kv_gib = 0;
  BenchFlags d = base;
  d.suite = "decode";
  d.modes = {"dense", "infllmv2", "nosa"};
  d.batch = {1, 2, 4};
  d.context = {256, 1024};
  BenchFlags o = base;
  o.suite = "offload";
  o.offload = "host";
  o.modes = {"infllmv2", "nosa"};
  o.batch = {2};
  o.context = {1024};
  o.miss_rates = {-1, 0, 0.2, 0.5};
  BenchFlags p = base;
  p.suite = "prefill";
  p.modes = {"dense", "nosa"};
  p.prompts = 2;
  p.prompt_len = 256;
  p.max_batch_tokens = 128;
  if (f.tp > 1) return {d, o};  // prefill runs on one rank
  return {d, o, p};
}

void run_smoke(SuiteContext& ctx);

std::map<std::string, std::function<void(SuiteContext&)>> suites() {
  return {{"decode", run_decode},
          {"prefill", run_prefill},
          {"offload", run_offload},
          {"smoke", run_smoke}};
}

void run_smoke(SuiteContext& ctx) {
  for (const BenchFlags& part : smoke_parts(ctx.flags)) {
    SuiteContext sub{part, ctx.backend, ctx.rows, ctx.ranks, ctx.progress};
    suites().at(part.suite)(sub);
  }
}

// Configurations a run will measure (the progress line's total).
int config_count(const BenchFlags& f) {
  if (f.suite == "smoke") {
    int n = 0;
    for (const BenchFlags& p : smoke_parts(f)) n += config_count(p);
    return n;
  }
  const int modes = int(f.modes.size());
  if (f.suite == "prefill") return modes;
  const int n = modes * int(f.context.size() * f.batch.size());
  return f.suite == "offload" ? n * int(f.miss_rates.size() * f.residency.size()) : n;
}

// An argument as a shell reads it back: quoted where it is empty or holds a special character.
std::string shell_word(const std::string& arg) {
  if (!arg.empty() && arg.find_first_of(" \t\"'$&;|<>*?()\\") == std::string::npos) return arg;
  std::string q = "'";
  for (char ch : arg) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

// The engine's settings this process took from its environment (the NOSA_ variables, sorted)
// as shell assignments, each followed by a space. Not the scripts' and tests' own variables,
// which say where things are or which commit results are recorded under.
std::string environment_settings() {
  static const char* const k_not_settings[] = {"NOSA_COMMIT=", "NOSA_BINARY=",
                                               "NOSA_SOURCE_DIR=", "NOSA_GPU_BUILD="};
  std::vector<std::string> vars;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv = *e;
    bool setting = kv.rfind("NOSA_", 0) == 0 && kv.find('=') != std::string::npos;
    for (const char* name : k_not_settings) setting = setting && kv.rfind(name, 0) != 0;
    if (setting) vars.push_back(kv);
  }
  std::sort(vars.begin(), vars.end());
  std::string out;
  for (const std::string& kv : vars) {
    const size_t eq = kv.find('=');
    out += kv.substr(0, eq + 1) + shell_word(kv.substr(eq + 1)) + " ";
  }
  return out;
}

// The command line of this process ("nosa bench ..."; "mpirun -np N env " first under MPI),
// with the NOSA_ settings of its environment in front, arguments quoted where a shell needs
// it, and without the output files (--json, --csv, --plot, --markdown): what reproduces the
// numbers, not where one run put them.
std::string command_line(int world_size) {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string settings = environment_settings();
  std::string out = world_size > 1 ? fmt::format("mpirun -np {} ", world_size) : "";
  if (world_size > 1 && !settings.empty()) out += "env ";  // mpirun passes on only what it names
  out += settings;
  static const char* const k_outputs[] = {"--json", "--csv", "--plot", "--markdown"};
  bool skip_value = false;
  size_t start = 0;
  for (int i = 0; start < all.size(); ++i) {
    size_t end = all.find('\0', start);
    if (end == std::string::npos) end = all.size();
    std::string arg = all.substr(start, end - start);
    start = end + 1;
    if (skip_value) {
      skip_value = false;
      continue;
    }
    bool output = false;
    for (const char* flag : k_outputs) {
      if (arg == flag) output = skip_value = true;
      if (arg.rfind(std::string(flag) + "=", 0) == 0) output = true;
    }
    if (output) continue;
    if (i == 0) arg = std::filesystem::path(arg).filename().string();
    out += (i ? " " : "") + shell_word(arg);
  }
  return out;
}

void write_csv(const std::string& path, const std::vector<json>& rows, const json& meta) {
  std::vector<std::string> cols = {"commit", "machine", "backend", "date", "command"};
  for (const json& r : rows)
    for (auto it = r.begin(); it != r.end(); ++it)
      if (std::find(cols.begin(), cols.end(), it.key()) == cols.end()) cols.push_back(it.key());
  std::ofstream out(path);
  NOSA_CHECK_CODE(out.good(), ErrorCode::io, "cannot write {}", path);
  for (size_t i = 0; i < cols.size(); ++i) out << (i ? "," : "") << cols[i];
  out << "\n";
  for (const json& r : rows) {
    for (size_t i = 0; i < cols.size(); ++i) {
      json v;
      if (cols[i] == "commit") v = meta["commit"];
      else if (cols[i] == "machine") v = meta["machine"]["hostname"];
      else if (cols[i] == "backend") v = meta["machine"]["backend"];
      else if (cols[i] == "date" || cols[i] == "command")
        v = meta[cols[i]];
      else if (r.contains(cols[i])) v = r[cols[i]];
      std::string s = v.is_null() ? "" : v.is_string() ? v.get<std::string>() : v.dump();
      if (s.find_first_of(",\"\n") != std::string::npos) {
        std::string q = "\"";
        for (char ch : s) q += ch == '"' ? std::string("\"\"") : std::string(1, ch);
        s = q + "\"";
      }
      out << (i ? "," : "") << s;
    }
    out << "\n";
  }
}

// Charts (--plot) and Markdown (--markdown) of `rows`, from a run or from files.
void write_report(const BenchFlags& f, const std::vector<bench::ResultRow>& rows) {
  std::vector<std::string> sections = f.sections;
  if (sections.empty()) {
    if (!f.plot_dir.empty()) sections.push_back("figures");
    sections.push_back("comparisons");
  }
  for (const std::string& s : sections)
    NOSA_CHECK(s == "figures" || s == "comparisons" || s == "targets" || s == "attention" ||
                   s == "capacity",
               "unknown report section '{}' (use figures, comparisons, targets, attention or "
               "capacity)",
               s);
  const bool want_figures =
      std::find(sections.begin(), sections.end(), "figures") != sections.end();
  NOSA_CHECK(f.markdown_out.empty() || !want_figures || !f.plot_dir.empty(),
             "--markdown with the figures section needs --plot DIR (where the images go)");
  std::vector<bench::Figure> figures;
  if (!f.plot_dir.empty()) {
    figures = bench::make_figures(rows);
    for (const std::string& path : bench::write_figures(figures, f.plot_dir, f.plot_prefix))
      logger("bench")->info("wrote {}", path);
    if (figures.empty())
      logger("bench")->warn("no chart: no series of the rows has two points or more");
  }
  if (f.markdown_out.empty()) return;
  std::string link = f.plot_link;
  if (link.empty() && !f.plot_dir.empty()) {
    namespace fs = std::filesystem;
    const fs::path md_dir = fs::absolute(f.markdown_out).parent_path();
    link = fs::absolute(f.plot_dir).lexically_relative(md_dir).generic_string();
    link = link.empty() || link == "." ? "" : link + "/";
  }
  for (auto& fig : figures) fig.name = f.plot_prefix + fig.name;
  std::string md;
  for (const std::string& s : sections) {
    if (s == "figures") md += bench::figures_markdown(figures, link);
    if (s == "comparisons") md += bench::comparisons_markdown(rows);
    if (s == "targets") md += bench::targets_markdown(rows);
    if (s == "attention") md += bench::attention_markdown(rows);
    if (s == "capacity") md += bench::capacity_markdown(rows);
    md += "\n";
  }
  std::ofstream out(f.markdown_out);
  NOSA_CHECK_CODE(out.good(), ErrorCode::io, "cannot write {}", f.markdown_out);
  out << md;
  logger("bench")->info("wrote {}", f.markdown_out);
}

// --report-from: charts and Markdown from result files, no benchmark run.
int run_report(const BenchFlags& f) {
  NOSA_CHECK(!f.plot_dir.empty() || !f.markdown_out.empty(),
             "--report-from needs --plot DIR and/or --markdown FILE");
  std::vector<bench::ResultRow> rows;
  for (const std::string& spec : f.report_from) {
    auto more = bench::load_results(spec);
    logger("bench")->info("{}: {} rows", spec, more.size());
    rows.insert(rows.end(), std::make_move_iterator(more.begin()),
                std::make_move_iterator(more.end()));
  }
  write_report(f, rows);
  return 0;
}

int run_bench(const BenchFlags& f) {
  if (!f.report_from.empty()) return run_report(f);
  if (f.threads > 0) ThreadPool::set_global_threads(f.threads);
  auto all = suites();
  auto it = all.find(f.suite);
  NOSA_CHECK(it != all.end(), "unknown suite '{}' (use decode, prefill, offload or smoke)",
             f.suite);
  NOSA_CHECK(f.tp == 1 || f.suite != "prefill", "the prefill suite runs with --tp 1");
  NOSA_CHECK(f.model.empty(), "--model is not supported yet: benchmarks use random weights of --shape");
  NOSA_CHECK(f.steps >= 1 && f.warmup >= 0, "--steps must be >= 1 and --warmup >= 0");
  NOSA_CHECK(!f.speculation_probe || f.suite == "decode",
             "--speculation-probe measures the decode suite, not '{}'", f.suite);
  runtime::force_cuda_select_path(f.select_path);
  NOSA_CHECK(f.cuda_graphs == "on" || f.cuda_graphs == "off",
             "--cuda-graphs takes on or off, not '{}'", f.cuda_graphs);
  runtime::set_cuda_graphs(f.cuda_graphs == "on");
  parallel::MpiContext& mpi = parallel::MpiContext::get();
  BenchRanks ranks;
  ranks.replica = parallel::make_replica(f.tp);
  NOSA_CHECK(ranks.replica.count == 1, "run the benchmark with mpirun -np {} (one replica)", f.tp);
  std::unique_ptr<runtime::Backend> be = make_backend(f.device);
  // Benchmarks have no --rank-timeout: a rank missing for two minutes ends the run.
  const auto timeout = std::chrono::milliseconds(120000);
  runtime::Backend* backend = be.get();
  ranks.make_comm = [&ranks, backend, timeout]() {
    return make_communicator(ranks.replica, *backend, timeout);
  };
  json meta;
  meta["suite"] = f.suite;
  meta["commit"] = commit_id(f.commit);
  meta["machine"] = machine_info(*be);
  meta["command"] = command_line(mpi.active() ? mpi.world_size() : 1);
  meta["hbm_bytes_per_s_for_floor"] = k_hbm_bytes_per_s;
  {
    const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    char buf[64];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    meta["date"] = buf;
  }
  meta["tp"] = f.tp;
  std::vector<json> rows;
  std::unique_ptr<bench::BenchProgress> progress;
  if (ranks.replica.leader())
    progress = std::make_unique<bench::BenchProgress>(stderr, ::isatty(2) != 0, config_count(f));
  SuiteContext ctx{f, *be, rows, ranks, progress.get()};
  it->second(ctx);
  if (!ctx.leader()) return 0;  // the leader reports
  progress->finish();
  meta["results"] = rows;
  if (!f.json_out.empty()) {
    std::ofstream out(f.json_out);
    NOSA_CHECK_CODE(out.good(), ErrorCode::io, "cannot write {}", f.json_out);
    out << meta.dump(1) << "\n";
  }
  if (!f.csv_out.empty()) write_csv(f.csv_out, rows, meta);
  if (!f.plot_dir.empty() || !f.markdown_out.empty())
    write_report(f, bench::rows_of_document(meta, f.json_out.empty() ? "(this run)" : f.json_out));
  fmt::print("{}\n", meta.dump());
  return 0;
}

}  // namespace

Runner add_bench_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "bench",
      "Throughput benchmarks (suites: decode, prefill, offload, smoke), their plots and "
      "reports");
  auto f = std::make_shared<BenchFlags>();
  cmd->add_option("--suite", f->suite,
                  "decode, prefill, offload or smoke (a quick fixed run of all three on the tiny "
                  "shape)")
      ->capture_default_str();
  cmd->add_option("--shape", f->shape, "Model shape: tiny, nosa-1b-like or nosa-8b-like")
      ->capture_default_str();
  cmd->add_option("--layers", f->layers, "Override the shape's layer count");
  cmd->add_option("--model", f->model, "(reserved) a checkpoint instead of random weights");
  cmd->add_option("--device", f->device, "cpu, cuda or auto")->capture_default_str();
  cmd->add_option("--mode", f->modes, "Attention modes: dense, infllmv2, nosa (repeatable)")
      ->delimiter(',');
  cmd->add_option("--batch", f->batch, "Decode: batch sizes (comma-separated)")->delimiter(',');
  cmd->add_option("--context", f->context, "Decode: context lengths in tokens (comma-separated)")
      ->delimiter(',');
  cmd->add_option("--steps", f->steps, "Decode: timed steps per configuration")
      ->capture_default_str();
  cmd->add_option("--warmup", f->warmup, "Decode: untimed steps first")->capture_default_str();
  cmd->add_option("--prompts", f->prompts, "Prefill: prompts")->capture_default_str();
  cmd->add_option("--prompt-len", f->prompt_len, "Prefill: tokens per prompt")
      ->capture_default_str();
  cmd->add_option("--max-batch-tokens", f->max_batch_tokens, "Prefill: tokens per engine step")
      ->capture_default_str();
  cmd->add_option("--seed", f->seed, "Seed of the random weights and inputs")
      ->capture_default_str();
  cmd->add_option("--threads", f->threads, "CPU threads (default: all cores)");
  cmd->add_option("--tp", f->tp,
                  "Tensor-parallel ranks (decode, offload): run under mpirun -np TP")
      ->capture_default_str();
  cmd->add_option("--select-path", f->select_path,
                  "CUDA block selection kernels: split, tiled or per-token (default: automatic; "
                  "a step a path cannot take falls back from split to tiled to per-token); "
                  "the tiled path screens (fast certified scores, the exact kernel only on the "
                  "tiles they cannot certify); tiled-exact: the exact kernel on every tile; "
                  "tiled-inline: the tiled path with its top-k inside the tile kernel (one warp "
                  "per token); tiled-exact-inline: both; "
                  "split-finish and split-spread force the split path's finish to one thread "
                  "block per (token, KV head) or to three kernels spread over the GPU");
  cmd->add_flag("--speculation-probe", f->speculation_probe,
                "Decode: also select each layer's blocks from the layer before's input, as a "
                "prefetch overlapping that layer would, and report how much of the real selection "
                "(and of its blocks new since the step before) it found (steps run without graphs)");
  cmd->add_option("--cuda-graphs", f->cuda_graphs,
                  "Decoding steps replayed from CUDA graphs (on) or queued kernel by kernel (off)")
      ->capture_default_str();
  cmd->add_option("--offload", f->offload, "Offload suite: host or host+disk")
      ->capture_default_str();
  cmd->add_option("--gpu-kv-gib", f->gpu_kv_gib,
                  "Offload suite: GPU block cache (default: twice the batch's selection)");
  cmd->add_option("--host-kv-gib", f->host_kv_gib,
                  "Offload suite: host KV budget (default: the whole KV)");
  cmd->add_option("--disk-kv-dir", f->disk_kv_dir, "Offload suite, host+disk: KV file directory");
  cmd->add_option("--miss-rate", f->miss_rates,
                  "Offload suite: controlled fractions of each selection replaced per step "
                  "(comma-separated; -1 = the model's own selection)")
      ->delimiter(',');
  cmd->add_option("--micro-batch-min-seqs", f->micro_min_seqs,
                  "Offload suite, residency on the host: decoding steps of at least this many "
                  "sequences run as two micro-batches (0: never; default: the engine's, 32). "
                  "Several values (comma-separated) alternate step by step on the same tiers, one "
                  "row each (labelled micro-N): an A/B within one process")
      ->delimiter(',');
  cmd->add_option("--residency", f->residency,
                  "Offload suite: where decoding steps decide which blocks to load: device "
                  "(each sequence's partition of the block cache, no read back; the default) or "
                  "host (each layer's selection read back and looked up). Both (comma-separated): "
                  "a row each, on tiers of their own")
      ->delimiter(',');
  cmd->add_option("--copy-overlap", f->copy_overlap,
                  "Offload suite, residency on the device: on = attention over the resident "
                  "blocks while the missing ones are copied (the default), off = the copies "
                  "first. Both (comma-separated) alternate step by step on the same tiers, a row "
                  "each (labelled overlap-on, overlap-off)")
      ->delimiter(',');
  cmd->add_option("--prefetch", f->prefetch,
                  "Offload suite, residency on the device: on = each layer's blocks (from layer 2 "
                  "on) selected from the layer before's input and the missing ones copied beside "
                  "it, off = not, auto = each step as the step before's traffic says it pays (on "
                  "a GPU; the default, or NOSA_PREFETCH=0/1/2 for off/on/auto). Several "
                  "(comma-separated) alternate step by step on the same tiers, a row each "
                  "(labelled prefetch-on, prefetch-off, prefetch-auto)")
      ->delimiter(',');
  cmd->add_option("--json", f->json_out,
                  "Write the results (with machine, commit and the command, the NOSA_ settings of "
                  "the environment in front) as JSON");
  cmd->add_option("--csv", f->csv_out, "Write the results as CSV");
  cmd->add_option("--label", f->label, "A free-form label stored with each result");
  cmd->add_option("--commit", f->commit, "Commit id to record (default: git rev-parse HEAD)");
  cmd->add_option("--plot", f->plot_dir,
                  "Write PNG charts of the results to this directory (tokens/s against batch, "
                  "context, the controlled miss rate and GPUs, per shape)");
  cmd->add_option("--plot-prefix", f->plot_prefix, "Prefix of the chart file names");
  cmd->add_option("--markdown", f->markdown_out,
                  "Write a Markdown report: the charts with their points and sources, "
                  "comparisons within each run, targets");
  cmd->add_option("--report-sections", f->sections,
                  "Sections of --markdown: figures, comparisons, targets, attention (against "
                  "PyTorch SDPA rows), capacity (KV on disk) (default: figures when --plot is "
                  "given, comparisons)")
      ->delimiter(',');
  cmd->add_option("--plot-link", f->plot_link,
                  "How --markdown links the charts (default: the --plot directory relative to "
                  "the Markdown file)");
  cmd->add_option("--report-from", f->report_from,
                  "Read results instead of running: JSON, JSONL or CSV files of nosa bench (or "
                  "the transformers and SDPA peers), each PATH[?run=NAME&commit=ID&machine=TEXT&"
                  "command=TEXT&commands=LOG]");
  return [f] { return run_bench(*f); };
}

}  // namespace nosa::launcher
