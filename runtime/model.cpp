#include "runtime/model.h"

#include <cmath>

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
  backend_.check_shapes(kv_layout(), part_.group_q_count / part_.kv_count);
  backend_.prepare_rope(rope_);
}

Model::~Model() { backend_.forget_graphs(this); }

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
  // the KV in HBM (offloading decides residency on the host between layers), no benchmark hook
  // replacing selections. Under tensor parallelism each rank records and replays its own graph;
  // a rank that runs a step directly instead still launches the same collectives in order.
  const bool graphs = comm_.graph_capturable() && !cache.offloaded() && !selection_override_;
  if (!graphs) return run_layers(step, cache);
  Tensor logits;
  if (backend_.replay_step(step, this, cache, logits)) return logits;
  if (!backend_.begin_recording(step, this, cache)) return run_layers(step, cache);
  try {
    logits = run_layers(step, cache);
  } catch (const std::exception& e) {
    // Recording failed (an op that cannot be recorded, a group too large for the decode kernel):
    // this step runs as usual.
    backend_.abort_recording();
    logger("runtime")->warn("recording a step graph failed ({}); running the step directly",
                            e.what());
    return run_layers(step, cache);
  }
  if (!backend_.end_recording(logits)) return run_layers(step, cache);
  return logits;
}

Tensor Model::run_layers(const StepBatch& step, KvCache& cache) {
  Backend& be = backend_;
  const DType act = be.activation_dtype();
  const int64_t T = step.n_tokens(), H = config_.hidden_size, d = config_.head_dim;
  // q holds every query head of the local KV heads' groups (selection needs them all); this rank
  // attends with and projects out the heads [q_off, q_off + hq) of them.
  const int hq_all = part_.group_q_count, hq = part_.q_count, hk = part_.kv_count;
  const int q_off = part_.q_begin - part_.group_q_begin, nkv = config_.num_key_value_heads;
  const int64_t F = part_.ffn_count;
  const bool sparse = mode_ != attention::Mode::dense;
  const bool nosa = mode_ == attention::Mode::nosa;
  NOSA_ASSERT(T > 0, "empty step");

  be.begin_step(step);
  Tensor x = be.alloc(act, {T, H});
  Tensor h = be.alloc(act, {T, H});
  Tensor qkv = be.alloc(act, {T, int64_t(hq_all + hk + nkv) * d});
  Tensor q = be.alloc(act, {T, hq_all, d});
  Tensor k = be.alloc(act, {T, hk, d});
  Tensor v_all = be.alloc(act, {T, nkv, d});
  Tensor c = nosa ? be.alloc(DType::f32, {T, hk}) : Tensor();
  Tensor attn = be.alloc(act, {T, hq, d});
  Tensor proj = be.alloc(act, {T, H});
  Tensor gate_up = be.alloc(act, {T, 2 * F});
  Tensor mlp = be.alloc(act, {T, F});

  be.embedding(w_.embed, x);
  cache.begin_step(step);
  const float eps = float(config_.rms_norm_eps);
  const int n_layers = config_.num_hidden_layers;
  // Each residual add is fused with the RMSNorm that follows it; the first layer's norm stands
  // alone, and the last add has none after it (the final norm runs on the logit rows only).
  be.rmsnorm(x, w_.layers[0].attn_norm, eps, h);
  for (int l = 0; l < n_layers; ++l) {
    const LayerWeights& L = w_.layers[l];
    be.linear(h, L.qkv, L.qkv_bias.defined() ? &L.qkv_bias : nullptr, qkv);
    be.split_qkv_rope(qkv, rope_, q, k, v_all);
    if (nosa)
      be.eviction_scores(v_all, L.nosa_a, L.nosa_delta_w,
                         L.nosa_delta_b.defined() ? &L.nosa_delta_b : nullptr, part_.kv_begin,
                         part_.kv_begin + hk, c);
    be.append_kv(l, k, v_all, part_.kv_begin, nosa ? &c : nullptr, cache);
    if (sparse) {
      be.update_compressed(l, nosa, config_.sparse, cache);
      Selection sel = be.select_blocks(l, mode_, q, config_.sparse, cache);
      if (selection_override_) selection_override_(l, step, sel);
      cache.make_resident(l, sel, step);
      be.attend(l, q, q_off, &sel, nosa, cache, attn);
    } else {
      be.attend(l, q, q_off, nullptr, false, cache, attn);
    }
    Tensor attn2d = attn.reshape({T, int64_t(hq) * d});
    be.linear(attn2d, L.o_proj, L.o_bias.defined() ? &L.o_bias : nullptr, proj);
    if (comm_.size() > 1) comm_.all_reduce_sum(proj);
    be.add_rmsnorm(x, proj, L.mlp_norm, eps, h);

    be.linear(h, L.gate_up, L.gate_up_bias.defined() ? &L.gate_up_bias : nullptr, gate_up);
    be.silu_mul(gate_up, mlp);
    be.linear(mlp, L.down, L.down_bias.defined() ? &L.down_bias : nullptr, proj);
    if (comm_.size() > 1) comm_.all_reduce_sum(proj);
    if (l + 1 < n_layers) be.add_rmsnorm(x, proj, w_.layers[l + 1].attn_norm, eps, h);
    else be.add(x, proj);
  }
  cache.end_step(step);
  if (part_.rank != 0 || step.logit_rows.empty()) return Tensor();
  const int64_t n = int64_t(step.logit_rows.size());
  Tensor rows = be.alloc(act, {n, H});
  be.gather_logit_rows(x, rows);
  Tensor normed = be.alloc(act, {n, H});
  be.rmsnorm(rows, w_.final_norm, eps, normed);
  // Logits in float32 on every backend: bf16 logits would tie far more often under greedy.
  Tensor logits = be.alloc(DType::f32, {n, config_.vocab_size});
  be.linear(normed, w_.lm_head, nullptr, logits);
  return logits;
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
