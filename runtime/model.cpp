#include "runtime/model.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/env.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::runtime {

RopeTable make_rope_table(const ModelConfig& c) {
  RopeTable r;
  const int half = c.head_dim / 2;
  r.inv_freq.resize(half);
  const auto& s = c.rope_scaling;
  for (int i = 0; i < half; ++i) {
    float exponent = float(2 * i) / float(c.head_dim);
    double f = 1.0 / std::pow(c.rope_theta, double(exponent));
    if (s.type == RopeScaling::Type::linear) {
      f /= s.factor;
    } else if (s.type == RopeScaling::Type::llama3) {
      const double old_len = double(s.original_max_position_embeddings);
      const double low_wavelen = old_len / s.low_freq_factor;
      const double high_wavelen = old_len / s.high_freq_factor;
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = f / s.factor;
      } else if (wavelen >= high_wavelen) {
        double smooth = (old_len / wavelen - s.low_freq_factor) /
                        (s.high_freq_factor - s.low_freq_factor);
        f = (1.0 - smooth) * f / s.factor + smooth * f;
      }
    }
    r.inv_freq[i] = float(f);
  }
  return r;
}

Model::Model(ModelConfig config, ModelWeights weights, parallel::Partition part,
             attention::Mode mode, Backend& backend, parallel::Communicator& comm)
    : config_(std::move(config)), w_(std::move(weights)), part_(part), mode_(mode),
      backend_(backend), comm_(comm), rope_(make_rope_table(config_)) {
  micro_min_seqs_ = default_micro_batch_min_seqs();
  set_prefetch(default_prefetch());
  prefetch_bus_share_ = env_double("NOSA_PREFETCH_BUS_SHARE", k_prefetch_bus_share, 0, 1e6);
  const Tensor& head = w_.lm_head.defined() ? w_.lm_head : w_.embed;
  weight_bytes_ = double(head.bytes());
  for (const LayerWeights& L : w_.layers)
    for (const Tensor* t : {&L.qkv, &L.o_proj, &L.gate_up, &L.down})
      weight_bytes_ += double(t->bytes());
  backend_.check_shapes(kv_layout(), part_.group_q_count / part_.kv_count);
  backend_.prepare_rope(rope_);
}

Model::~Model() { backend_.forget_graphs(this); }

int Model::default_micro_batch_min_seqs() {
  return int(env_int("NOSA_MICRO_BATCH_MIN_SEQS", 32, 0, 1000000));
}

int Model::default_prefetch_from_layer() {
  return int(env_int("NOSA_PREFETCH_FROM_LAYER", 2, 2, 1000000));
}

Model::Prefetch Model::default_prefetch() {
  return Prefetch(env_int("NOSA_PREFETCH", int(Prefetch::automatic), 0, 2));
}

Model::Prefetch Model::parse_prefetch(const std::string& name) {
  if (name == "on") return Prefetch::on;
  if (name == "off") return Prefetch::off;
  if (name == "auto") return Prefetch::automatic;
  NOSA_CHECK(false, "--prefetch takes on, off or auto, not '{}'", name);
  return Prefetch::off;
}

void Model::set_prefetch(Prefetch p, int from_layer) {
  NOSA_CHECK(from_layer >= 2,
             "prefetching starts at layer 2 or later (layer 1's guess would come before layer "
             "0's round), not {}",
             from_layer);
  prefetch_ = p;
  prefetch_from_ = from_layer;
}

bool Model::prefetch_pays(const KvCache::StepTraffic& last, double weight_bytes,
                          const KvLayout& layout, double share) {
  if (last.selected <= 0) return false;
  const double chunk = double(layout.kv_chunk_bytes() + layout.bias_chunk_bytes());
  const double bus_s = double(last.fresh) * chunk / k_bus_bytes_per_s;
  const double hbm_s =
      (weight_bytes + double(last.selected) * double(layout.kv_chunk_bytes())) / k_hbm_bytes_per_s;
  return bus_s < share * hbm_s;
}

void Model::decide_prefetch(const KvCache& cache) {
  // On the device path only (the host path reads each selection back, and its rounds are not
  // partitioned by layer), and some layer must prefetch (from prefetch_from_ on): otherwise the
  // step is the same, and a separate step-graph variant would only cost a recording.
  const bool possible = mode_ != attention::Mode::dense && cache.on_device() &&
                        config_.num_hidden_layers > prefetch_from_;
  switch (prefetch_) {
    case Prefetch::off: prefetching_ = false; break;
    case Prefetch::on: prefetching_ = possible; break;
    case Prefetch::automatic:
      // Only where the copies can run beside the compute (a GPU's streams); elsewhere the
      // guesses would only add work.
      prefetching_ = possible && backend_.device() == Device::cuda &&
                     prefetch_pays(cache.last_step_traffic(), weight_bytes_, cache.layout(),
                                   prefetch_bus_share_);
      break;
  }
  prefetch_steps_ += prefetching_;
}

KvLayout Model::kv_layout() const {
  KvLayout l;
  l.n_layers = config_.num_hidden_layers;
  l.n_kv_heads = part_.kv_count;
  l.head_dim = config_.head_dim;
  l.block_size = config_.sparse.block_size;
  l.keys_per_block = config_.sparse.keys_per_block();
  l.dtype = backend_.activation_dtype();
  return l;
}

Tensor Model::forward(const StepBatch& step, KvCache& cache) {
  // Every backend indexes block tables by position: a short table would read and write another
  // sequence's blocks.
  const int64_t bs = config_.sparse.block_size;
  for (size_t i = 0; i < step.seqs.size(); ++i) {
    const StepSequence& s = step.seqs[i];
    const int64_t need = s.n_new > 0 ? (s.n_past + s.n_new - 1) / bs + 1 : 0;
    NOSA_CHECK(s.blocks && int64_t(s.blocks->size()) >= need,
               "sequence {} of the step needs {} KV blocks for positions up to {}, its block "
               "table has {}",
               i, need, s.n_past + s.n_new - 1, s.blocks ? s.blocks->size() : 0);
  }
  // Checked here, before any step graph is recorded: an error while recording means the step
  // cannot be recorded (the backend stops trying for this model and cache), never a bad input.
  for (const int32_t id : step.tokens)
    NOSA_CHECK(id >= 0 && id < config_.vocab_size, "token id {} is outside the vocabulary [0, {})",
               id, config_.vocab_size);
  // Step graphs: collectives that only queue GPU work (one rank, or NCCL and the peer kernel),
  // no benchmark hook replacing selections, and the KV in HBM or a decoding step whose residency
  // the device decides (the host path decides it between layers). Under tensor parallelism each
  // rank records and replays its own graph; a rank that runs a step directly instead still
  // launches the same collectives in order.
  const bool graphs = comm_.graph_capturable() && !selection_override_ && !probe_;
  if (!graphs) return run_layers(step, cache);
  if (!cache.offloaded()) return run_maybe_recorded(step, cache, false);
  if (!cache.has_partitions() || !step.decode_only()) return run_layers(step, cache);
  // The step's tier work (blocks written, counters of the step before) and the decision, on the
  // host and outside any graph; then the layers, from a graph if the device decides.
  cache.begin_step(step);
  decide_prefetch(cache);
  Tensor logits = cache.on_device() ? run_maybe_recorded(step, cache, true)
                                    : run_layers(step, cache, true);
  cache.end_step(step);
  return logits;
}

Tensor Model::run_maybe_recorded(const StepBatch& step, KvCache& cache, bool cache_begun) {
  Tensor logits;
  // The ways run_layers can run a step: without prefetching, or prefetching from a layer.
  const int variant = cache_begun && prefetching_ ? prefetch_from_ : 0;
  if (backend_.replay_step(step, this, variant, cache, logits)) return logits;
  if (!backend_.begin_recording(step, this, variant, cache))
    return run_layers(step, cache, cache_begun);
  try {
    logits = run_layers(step, cache, cache_begun);
  } catch (const std::exception& e) {
    // Recording failed (an op that cannot be recorded, a group too large for the decode kernel):
    // this step runs as usual.
    backend_.abort_recording();
    logger("runtime")->warn("recording a step graph failed ({}); running the step directly",
                            e.what());
    return run_layers(step, cache, cache_begun);
  }
  if (!backend_.end_recording(logits)) return run_layers(step, cache, cache_begun);
  return logits;
}

Model::Acts Model::alloc_acts(int64_t T) {
  Backend& be = backend_;
  const DType act = be.activation_dtype();
  const int64_t H = config_.hidden_size, d = config_.head_dim;
  // q holds every query head of the local KV heads' groups (selection needs them all); this rank
  // attends with and projects out the heads [q_off, q_off + hq) of them.
  const int hq_all = part_.group_q_count, hq = part_.q_count, hk = part_.kv_count;
  const int nkv = config_.num_key_value_heads;
  const int64_t F = part_.ffn_count;
  Acts a;
  a.x = be.alloc(act, {T, H});
  a.h = be.alloc(act, {T, H});
  a.qkv = be.alloc(act, {T, int64_t(hq_all + hk + nkv) * d});
  a.q = be.alloc(act, {T, hq_all, d});
  a.k = be.alloc(act, {T, hk, d});
  a.v_all = be.alloc(act, {T, nkv, d});
  if (mode_ == attention::Mode::nosa) a.c = be.alloc(DType::f32, {T, hk});
  a.attn = be.alloc(act, {T, hq, d});
  a.proj = be.alloc(act, {T, H});
  a.gate_up = be.alloc(act, {T, 2 * F});
  a.mlp = be.alloc(act, {T, F});
  return a;
}

void Model::embed(Acts& a) {
  backend_.embedding(w_.embed, a.x);
  // Each residual add is fused with the RMSNorm that follows it; the first layer's norm stands
  // alone, and the last add has none after it (the final norm runs on the logit rows only).
  backend_.rmsnorm(a.x, w_.layers[0].attn_norm, float(config_.rms_norm_eps), a.h);
}

void Model::layer_to_selection(int l, const StepBatch& step, Acts& a, KvCache& cache,
                               Selection& sel) {
  Backend& be = backend_;
  const LayerWeights& L = w_.layers[l];
  const bool nosa = mode_ == attention::Mode::nosa;
  const int hk = part_.kv_count;
  be.linear(a.h, L.qkv, L.qkv_bias.defined() ? &L.qkv_bias : nullptr, a.qkv);
  be.split_qkv_rope(a.qkv, rope_, a.q, a.k, a.v_all);
  if (nosa)
    be.eviction_scores(a.v_all, L.nosa_a, L.nosa_delta_w,
                       L.nosa_delta_b.defined() ? &L.nosa_delta_b : nullptr, part_.kv_begin,
                       part_.kv_begin + hk, a.c);
  be.append_kv(l, a.k, a.v_all, part_.kv_begin, nosa ? &a.c : nullptr, cache);
  if (mode_ == attention::Mode::dense) return;
  be.update_compressed(l, nosa, config_.sparse, cache);
  sel = be.select_blocks(l, mode_, a.q, config_.sparse, cache);
  if (selection_override_) selection_override_(l, step, sel);
  be.selection_ready(sel);
}

void Model::layer_from_attention(int l, Acts& a, const Selection* sel, KvCache& cache) {
  Backend& be = backend_;
  const LayerWeights& L = w_.layers[l];
  const float eps = float(config_.rms_norm_eps);
  const int64_t T = a.x.dim(0);
  const int hq = part_.q_count, q_off = part_.q_begin - part_.group_q_begin;
  be.attend(l, a.q, q_off, sel, mode_ == attention::Mode::nosa, cache, a.attn);
  Tensor attn2d = a.attn.reshape({T, int64_t(hq) * config_.head_dim});
  be.linear(attn2d, L.o_proj, L.o_bias.defined() ? &L.o_bias : nullptr, a.proj);
  if (comm_.size() > 1) comm_.all_reduce_sum(a.proj);
  be.add_rmsnorm(a.x, a.proj, L.mlp_norm, eps, a.h);

  be.linear(a.h, L.gate_up, L.gate_up_bias.defined() ? &L.gate_up_bias : nullptr, a.gate_up);
  be.silu_mul(a.gate_up, a.mlp);
  be.linear(a.mlp, L.down, L.down_bias.defined() ? &L.down_bias : nullptr, a.proj);
  if (comm_.size() > 1) comm_.all_reduce_sum(a.proj);
  if (l + 1 < config_.num_hidden_layers)
    be.add_rmsnorm(a.x, a.proj, w_.layers[l + 1].attn_norm, eps, a.h);
  else
    be.add(a.x, a.proj);
}

int64_t Model::SpeculationStats::total(const std::vector<int64_t>& v) {
  int64_t n = 0;
  for (const int64_t x : v) n += x;
  return n;
}

Tensor Model::guess_input(int l, const Tensor& x) {
  Tensor h = backend_.alloc(x.dtype(), x.shape());
  backend_.rmsnorm(x, w_.layers[l].attn_norm, float(config_.rms_norm_eps), h);
  return h;
}

Selection Model::guess_selection(int l, const Tensor& h, KvCache& cache) {
  Backend& be = backend_;
  const LayerWeights& L = w_.layers[l];
  const int64_t T = h.dim(0), d = config_.head_dim;
  const int hq_all = part_.group_q_count;
  const DType act = h.dtype();
  // The selection needs only the queries: the first hq_all * d rows of the fused projection (a
  // third less weight to read than the whole qkv), then RoPE with no key or value heads.
  const int64_t qd = int64_t(hq_all) * d;
  const Tensor wq = L.qkv.rows(0, qd);
  const Tensor bq = L.qkv_bias.defined() ? L.qkv_bias.rows(0, qd) : Tensor();
  Tensor q_flat = be.alloc(act, {T, qd});
  be.linear(h, wq, bq.defined() ? &bq : nullptr, q_flat);
  Tensor q = be.alloc(act, {T, hq_all, d}), no_k = be.alloc(act, {T, 0, d}),
         no_v = be.alloc(act, {T, 0, d});
  be.split_qkv_rope(q_flat, rope_, q, no_k, no_v);
  return be.select_blocks(l, mode_, q, config_.sparse, cache);
}

void Model::prefetch_layer(int l, const StepBatch& step, Acts& a, KvCache& cache) {
  Backend& be = backend_;
  const Tensor h = guess_input(l, a.x);
  // Side work is closed however the guess ends (begin_side_work leaves it open if it fails
  // after switching streams).
  struct Close {
    Backend& be;
    ~Close() {
      try {
        be.end_side_work();
      } catch (const std::exception& e) {
        logger("runtime")->error("closing a prefetch's side work failed: {}", e.what());
      }
    }
  };
  try {
    be.begin_side_work({h});
  } catch (...) {
    Close{be};
    throw;
  }
  Close close{be};
  cache.prefetch(l, guess_selection(l, h, cache), step);
}

std::vector<int32_t> Model::speculative_rows(int l, Acts& a, KvCache& cache) {
  const Selection s = guess_selection(l, guess_input(l, a.x), cache);
  const auto* rows = static_cast<const int32_t*>(backend_.read_back_selection(s));
  return std::vector<int32_t>(rows, rows + s.blocks.numel());
}

void Model::probe_compare(int l, const StepBatch& step, const Selection& sel,
                          const std::vector<int32_t>& spec) {
  const int H = part_.kv_count, k = sel.k_max;
  const int64_t T = step.n_tokens();
  NOSA_ASSERT(int64_t(spec.size()) == T * H * k, "speculation probe: {} entries for {} x {} x {}",
              spec.size(), T, H, k);
  const auto* real = static_cast<const int32_t*>(backend_.read_back_selection(sel));
  auto row_of = [k](const int32_t* r) {
    std::vector<int32_t> v;
    for (int i = 0; i < k && r[i] >= 0; ++i) v.push_back(r[i]);
    std::sort(v.begin(), v.end());
    return v;
  };
  auto has = [](const std::vector<int32_t>& v, int32_t b) {
    return std::binary_search(v.begin(), v.end(), b);
  };
  SpeculationStats& st = spec_stats_;
  st.fresh.resize(size_t(config_.num_hidden_layers), 0);
  st.fresh_predicted.resize(size_t(config_.num_hidden_layers), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h) {
      const std::vector<int32_t> now = row_of(real + (t * H + h) * k);
      const std::vector<int32_t> guess = row_of(spec.data() + (t * H + h) * k);
      auto& last = probe_last_[{step.seqs[step.token_seq[t]].blocks, l, h}];
      const bool known = !last.empty();
      for (const int32_t b : now) {
        ++st.selected;
        st.predicted += has(guess, b);
        if (known && !has(last, b)) {
          ++st.fresh[size_t(l)];
          st.fresh_predicted[size_t(l)] += has(guess, b);
        }
      }
      if (known)
        for (const int32_t b : guess) st.wasted += !has(now, b) && !has(last, b);
      last = now;
    }
}

Tensor Model::logits_of(const Tensor& rows) {
  Backend& be = backend_;
  Tensor normed = be.alloc(be.activation_dtype(), rows.shape());
  be.rmsnorm(rows, w_.final_norm, float(config_.rms_norm_eps), normed);
  // Logits in float32 on every backend: bf16 logits would tie far more often under greedy.
  Tensor logits = be.alloc(DType::f32, {rows.dim(0), config_.vocab_size});
  be.linear(normed, w_.lm_head, nullptr, logits);
  return logits;
}

Tensor Model::run_layers(const StepBatch& step, KvCache& cache, bool cache_begun) {
  Backend& be = backend_;
  const int64_t T = step.n_tokens();
  NOSA_ASSERT(T > 0, "empty step");
  // Not with device-side residency (a cache made with partitions): its decoding steps have no
  // host work to hide, and two micro-batches measured slower than one batch there
  // (docs/memory.md). The test is static (partitions asked for, whether or not a rank made or
  // kept them), so that every rank of a replica splits the same steps.
  if (cache.offloaded() && mode_ != attention::Mode::dense && be.step_slots() >= 2 &&
      micro_min_seqs_ > 0 && int(step.seqs.size()) >= std::max(2, micro_min_seqs_) &&
      step.decode_only() && !cache.partitioned())
    return run_micro_batches(step, cache);

  be.begin_step(step);
  Acts a = alloc_acts(T);
  embed(a);
  if (!cache_begun) {
    cache.begin_step(step);
    decide_prefetch(cache);
  }
  const bool sparse = mode_ != attention::Mode::dense;
  const bool probe = probe_ && sparse && step.decode_only();
  std::vector<int32_t> spec;  // the probe's selection of the next layer
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    if (prefetching_ && l + 1 >= prefetch_from_ && l + 1 < config_.num_hidden_layers)
      prefetch_layer(l + 1, step, a, cache);
    std::vector<int32_t> next_spec;
    if (probe && l + 1 < config_.num_hidden_layers) next_spec = speculative_rows(l + 1, a, cache);
    Selection sel;
    layer_to_selection(l, step, a, cache, sel);
    if (probe && l > 0) probe_compare(l, step, sel, spec);
    spec = std::move(next_spec);
    if (sparse) cache.make_resident(l, sel, step);
    layer_from_attention(l, a, sparse ? &sel : nullptr, cache);
  }
  if (!cache_begun) cache.end_step(step);
  if (part_.rank != 0 || step.logit_rows.empty()) return Tensor();
  Tensor rows = be.alloc(be.activation_dtype(), {int64_t(step.logit_rows.size()),
                                                  int64_t(config_.hidden_size)});
  be.gather_logit_rows(a.x, rows);
  return logits_of(rows);
}

// Two micro-batches, each in its own step slot of the backend, interleaved so that one half's
// gather runs while the other half computes. Per layer, in the order the device runs them:
//   A up to its selection | B from its attention (previous layer) | B up to its selection |
//   A from its attention
// while the host does A's residency (after A's selection) and then B's; the side stream
// gathers B's misses of the previous layer, then A's, then B's. Each half is the same
// computation as in one batch: the tokens are those of the whole step.
Tensor Model::run_micro_batches(const StepBatch& step, KvCache& cache) {
  Backend& be = backend_;
  const int S = int(step.seqs.size()), n_layers = config_.num_hidden_layers;
  if (micro_steps_ == 0)
    logger("runtime")->debug("offloaded decoding: a step of {} sequences runs as two micro-batches "
                             "(from {} sequences on)", S, micro_min_seqs_);
  StepBatch half[2];
  for (int i = 0; i < S; ++i) {
    const StepSequence& s = step.seqs[i];
    half[i < S / 2 ? 0 : 1].add({step.tokens[s.token_begin]}, s.n_past, s.blocks, s.want_logits,
                                s.all_logits);
  }
  NOSA_ASSERT(half[0].logit_rows.size() + half[1].logit_rows.size() == step.logit_rows.size(),
              "micro-batches: {} + {} logit rows for {}", half[0].logit_rows.size(),
              half[1].logit_rows.size(), step.logit_rows.size());
  struct Restore {
    Backend& be;
    KvCache& cache;
    ~Restore() {
      cache.set_micro_batches(false);
      try {
        be.use_step_slot(0);
        be.set_gather_overlap(false);
      } catch (const std::exception& e) {
        // Unwinding from the step's own error (a device error is sticky): that one is reported.
        logger("runtime")->error("micro-batches: restoring the backend failed: {}", e.what());
      }
    }
  } restore{be, cache};
  be.use_step_slot(0);
  be.begin_step(half[0]);
  be.use_step_slot(1);
  be.begin_step(half[1], true);
  be.set_gather_overlap(true);
  cache.set_micro_batches(true);
  cache.begin_step(step);
  Acts a[2];
  for (int i = 0; i < 2; ++i) {
    be.use_step_slot(i);
    a[i] = alloc_acts(half[i].n_tokens());
    embed(a[i]);
  }
  Selection sel[2];
  for (int l = 0; l < n_layers; ++l) {
    be.use_step_slot(0);
    layer_to_selection(l, half[0], a[0], cache, sel[0]);
    if (l > 0) {
      be.use_step_slot(1);
      layer_from_attention(l - 1, a[1], &sel[1], cache);
    }
    be.use_step_slot(0);
    cache.make_resident(l, sel[0], half[0]);
    be.use_step_slot(1);
    layer_to_selection(l, half[1], a[1], cache, sel[1]);
    be.use_step_slot(0);
    layer_from_attention(l, a[0], &sel[0], cache);
    be.use_step_slot(1);
    cache.make_resident(l, sel[1], half[1]);
  }
  be.use_step_slot(1);
  layer_from_attention(n_layers - 1, a[1], &sel[1], cache);
  cache.end_step(step);
  ++micro_steps_;
  if (part_.rank != 0 || step.logit_rows.empty()) return Tensor();
  const int64_t n0 = int64_t(half[0].logit_rows.size()), n = int64_t(step.logit_rows.size());
  Tensor rows = be.alloc(be.activation_dtype(), {n, int64_t(config_.hidden_size)});
  for (int i = 0; i < 2; ++i) {
    be.use_step_slot(i);
    Tensor part = i == 0 ? rows.rows(0, n0) : rows.rows(n0, n);
    if (part.dim(0) > 0) be.gather_logit_rows(a[i].x, part);
  }
  return logits_of(rows);
}

std::unique_ptr<Model> load_model(const std::filesystem::path& dir, const LoadOptions& options,
                                  Backend& backend, parallel::Communicator& comm) {
  ModelConfig config = ModelConfig::load(dir);
  Checkpoint ckpt = Checkpoint::open(dir);
  const bool nosa_tensors = has_nosa_tensors(ckpt, config);
  attention::Mode mode = config.default_mode;
  if (!options.mode && !config.mode_in_config && nosa_tensors) mode = attention::Mode::nosa;
  if (options.mode) mode = *options.mode;
  NOSA_CHECK(mode != attention::Mode::nosa || nosa_tensors,
             "attention mode nosa needs the checkpoint's NOSA tensors "
             "(model.layers.N.self_attn.A and .delta.weight), which {} does not have; use "
             "--attention dense or infllmv2",
             dir.string());
  parallel::Partition part =
      parallel::make_partition(config.num_attention_heads, config.num_key_value_heads,
                               config.intermediate_size, config.vocab_size, comm.rank(),
                               comm.size());
  ModelWeights weights =
      load_weights(ckpt, config, part, mode == attention::Mode::nosa, backend);
  logger("runtime")->info("loaded {} ({} layers, hidden {}, {} attention) on {}", dir.string(),
                          config.num_hidden_layers, config.hidden_size,
                          attention::mode_name(mode), backend.name());
  return std::make_unique<Model>(std::move(config), std::move(weights), part, mode, backend,
                                 comm);
}

}  // namespace nosa::runtime
