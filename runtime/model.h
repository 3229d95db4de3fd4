// The Llama forward pass with dense, InfLLM-V2 or NOSA attention, written once against the
// Backend interface, for one tensor-parallel rank.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/sharding.h"
#include "runtime/backend.h"
#include "runtime/kv_cache.h"
#include "runtime/model_config.h"
#include "runtime/step.h"
#include "runtime/weights.h"

namespace nosa::runtime {

RopeTable make_rope_table(const ModelConfig& config);

class Model {
 public:
  Model(ModelConfig config, ModelWeights weights, parallel::Partition part, attention::Mode mode,
        Backend& backend, parallel::Communicator& comm);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }
  attention::Mode mode() const { return mode_; }
  const parallel::Partition& partition() const { return part_; }
  Backend& backend() { return backend_; }
  // The layout of this rank's KV cache.
  KvLayout kv_layout() const;

  // Runs one step: appends the step's tokens to the KV cache (the blocks of every sequence must
  // already cover its new positions) and returns the logits [logit_rows, vocab] on rank 0 (an
  // undefined tensor on other ranks). Decoding steps run from recorded step graphs where the
  // backend has them (Backend::replay_step), under tensor parallelism too where the communicator
  // can be recorded (Communicator::graph_capturable).
  Tensor forward(const StepBatch& step, KvCache& cache);

  // Benchmarks: replaces each layer's selection after it is computed (its cost stays in the
  // step), e.g. to sweep a controlled step-to-step miss rate. Null: no override.
  using SelectionOverride = std::function<void(int layer, const StepBatch&, Selection&)>;
  void set_selection_override(SelectionOverride fn) { selection_override_ = std::move(fn); }
  // Offloaded decoding steps of at least `min_seqs` sequences run as two micro-batches (halves
  // of the sequences), layer by layer interleaved, so that one half's misses are gathered while
  // the other half computes; the weights are read twice. 0: never. Needs a backend with two
  // step slots.
  void set_micro_batch_min_seqs(int min_seqs) { micro_min_seqs_ = min_seqs; }
  int micro_batch_min_seqs() const { return micro_min_seqs_; }
  // The default: NOSA_MICRO_BATCH_MIN_SEQS from the environment, else 32 (at 16 sequences of an
  // 8b-like model reading the weights twice costs what the overlap gains).
  static int default_micro_batch_min_seqs();
  // Steps run as two micro-batches so far (tests, benchmarks).
  int64_t micro_batch_steps() const { return micro_steps_; }

  // Speculative prefetch (offloaded decoding steps whose residency the device decides): at the
  // start of layer l, beside its compute, layer l + 1's blocks are selected from layer l's input
  // (as the probe below does) and the missing ones copied into layer l + 1's partitions
  // (KvCache::prefetch), so that layer l + 1's own round finds most of its new blocks resident.
  // Only for layers from `from_layer` on (>= 2: layer 1's guess is made before layer 0's round,
  // and finds little). Results are unchanged: attention reads exactly its own selection.
  // off, on, or automatic: on a GPU, each step prefetches when the step before's traffic says it
  // pays (prefetch_pays).
  enum class Prefetch { off, on, automatic };
  void set_prefetch(Prefetch p, int from_layer = default_prefetch_from_layer());
  Prefetch prefetch() const { return prefetch_; }
  // The weights a decoding step reads: the LM head (or the tied embedding) and every layer's
  // projections (the benchmarks' floors, prefetch_pays).
  double weight_bytes() const { return weight_bytes_; }
  // Steps that prefetched so far (tests, benchmarks).
  int64_t prefetch_steps() const { return prefetch_steps_; }
  // NOSA_PREFETCH_FROM_LAYER from the environment, else 2.
  static int default_prefetch_from_layer();
  // The default of set_prefetch: NOSA_PREFETCH from the environment (0 off, 1 on, 2 automatic),
  // else automatic.
  static Prefetch default_prefetch();
  // Whether prefetching pays for a step that moves and reads what `last` did: the prefetch's
  // copies run beside the layers' compute, so they gain while the blocks the step must move
  // take the bus (at the gathers' 51 GB/s) less than k_prefetch_bus_share times as long as the
  // step's HBM reads (weights and selected KV at 4.3 TB/s) take. Nothing measured yet: no.
  static bool prefetch_pays(const KvCache::StepTraffic& last, double weight_bytes,
                            const KvLayout& layout, double share = k_prefetch_bus_share);
  // The lent H200's ceilings (docs/performance.md); only their ratio matters, and the rule was
  // calibrated there: another GPU's PCIe and HBM would move the threshold below.
  static constexpr double k_bus_bytes_per_s = 51e9, k_hbm_bytes_per_s = 4.3e12;
  // Measured on one H200 (nosa-8b-like, 16K): prefetching gained at a share of 1.3 and 2.3
  // (NOSA, B = 16 and 32) and lost at 3.7 (NOSA, B = 64) and 3.9 (InfLLM-V2, B = 16), where
  // its wrong guesses' bytes made the bus the bottleneck.
  static constexpr double k_prefetch_bus_share = 3.0;
  // The share automatic prefetching uses: NOSA_PREFETCH_BUS_SHARE from the environment (for
  // GPUs whose PCIe and HBM differ from the H200's), else k_prefetch_bus_share. 0: never.
  double prefetch_bus_share() const { return prefetch_bus_share_; }
  void set_prefetch_bus_share(double share) { prefetch_bus_share_ = share; }
  // "on", "off" or "auto"; anything else is an Error (ErrorCode::invalid_argument).
  static Prefetch parse_prefetch(const std::string& name);

  // A probe of speculative prefetching, for measurement (steps run without graphs while it is on).
  // A prefetch of layer l + 1's blocks that overlaps layer l's compute must select them from layer
  // l's input: the residual stream before layer l, through layer l + 1's norm, projections and
  // RoPE, against layer l + 1's compressed keys as they stand. At every decoding step the probe
  // makes that selection too and compares it with layer l + 1's own, per (token, KV head):
  struct SpeculationStats {
    int64_t selected = 0;   // blocks the selections of layers 1.. took
    int64_t predicted = 0;  // of those, blocks the speculative selection took too
    int64_t wasted = 0;     // predicted blocks neither selected now nor the step before
    // Per layer (index l: layer l, predicted from layer l - 1's input): selected blocks the same
    // (sequence, layer, head) did not select the step before (what a cache holding the last
    // selection misses), and of those the predicted ones.
    std::vector<int64_t> fresh, fresh_predicted;
    static int64_t total(const std::vector<int64_t>& v);
  };
  void set_speculation_probe(bool on) { probe_ = on; }
  const SpeculationStats& speculation_stats() const { return spec_stats_; }
  // Zeroes the counts; each (sequence, layer, head)'s last selection stays, so that the next
  // step's new blocks are known.
  void reset_speculation_stats() { spec_stats_ = {}; }

 private:
  ModelConfig config_;
  ModelWeights w_;
  parallel::Partition part_;
  attention::Mode mode_;
  Backend& backend_;
  parallel::Communicator& comm_;
  RopeTable rope_;
  SelectionOverride selection_override_;

  int micro_min_seqs_;
  int64_t micro_steps_ = 0;
  bool probe_ = false;
  Prefetch prefetch_ = Prefetch::off;
  int prefetch_from_ = 2;
  bool prefetching_ = false;  // this step's choice (decide_prefetch)
  int64_t prefetch_steps_ = 0;
  double weight_bytes_ = 0;  // weight_bytes()
  double prefetch_bus_share_ = k_prefetch_bus_share;
  // Once the cache has begun the step: whether it prefetches.
  void decide_prefetch(const KvCache& cache);
  SpeculationStats spec_stats_;
  // The probe's last selection of each (block table, layer, KV head).
  std::map<std::tuple<const std::vector<int32_t>*, int, int>, std::vector<int32_t>> probe_last_;
  // The step's layers; with cache_begun, the caller has run cache.begin_step and runs
  // cache.end_step after (steps whose residency the device decides, which may run from graphs).
  Tensor run_layers(const StepBatch& step, KvCache& cache, bool cache_begun = false);
  // The step from a recorded graph where the backend has one, else directly (recording it when
  // the backend asks).
  Tensor run_maybe_recorded(const StepBatch& step, KvCache& cache, bool cache_begun);
  Tensor run_micro_batches(const StepBatch& step, KvCache& cache);
  // One (micro-)batch's activations through the layers.
  struct Acts {
    Tensor x, h, qkv, q, k, v_all, c, attn, proj, gate_up, mlp;
  };
  Acts alloc_acts(int64_t T);
  // The embedding and the first layer's norm.
  void embed(Acts& a);
  // Layer l up to its block selection (sparse modes; the selection is then complete, see
  // Backend::selection_ready).
  void layer_to_selection(int l, const StepBatch& step, Acts& a, KvCache& cache, Selection& sel);
  // Layer l from its attention on (sel: null in dense mode): x gets the layer's output, h the
  // next layer's normed input.
  void layer_from_attention(int l, Acts& a, const Selection* sel, KvCache& cache);
  // Logits of the rows of x (all of them the step's logit rows, in order) on rank 0.
  Tensor logits_of(const Tensor& rows);
  // Layer l's selection guessed from the residual stream x as it stands (the input of layer
  // l - 1): through layer l's norm, projections and RoPE, against layer l's compressed keys.
  // The norm is queued before side work (which must not read x: layer l - 1 writes it).
  Tensor guess_input(int l, const Tensor& x);
  Selection guess_selection(int l, const Tensor& h, KvCache& cache);
  // Queues layer l's prefetch as side work (set_prefetch).
  void prefetch_layer(int l, const StepBatch& step, Acts& a, KvCache& cache);
  // The probe: the guess read back as [T][kv heads][k_max] rows; then its comparison with the
  // selection layer l made itself.
  std::vector<int32_t> speculative_rows(int l, Acts& a, KvCache& cache);
  void probe_compare(int l, const StepBatch& step, const Selection& sel,
                     const std::vector<int32_t>& spec);
};

struct LoadOptions {
  // Overrides the checkpoint's attention mode when set.
  std::optional<attention::Mode> mode;
};

// Loads DIR as this rank's part of a model (config, weights). Throws bad_checkpoint or
// invalid_argument (e.g. NOSA mode on a checkpoint without NOSA tensors) with a clear message.
std::unique_ptr<Model> load_model(const std::filesystem::path& dir, const LoadOptions& options,
                                  Backend& backend, parallel::Communicator& comm);

}  // namespace nosa::runtime
