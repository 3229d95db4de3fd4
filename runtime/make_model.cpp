#include "runtime/make_model.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"
#include "runtime/core/logging.h"
#include "runtime/core/thread_pool.h"
#include "runtime/safetensors.h"
#include "runtime/tokenizer.h"

namespace nosa::runtime {

namespace fs = std::filesystem;

namespace {

// Pieces of the tokenizer trained for random checkpoints.
constexpr int k_tokenizer_vocab = 2000;

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// What fills a tensor: uniform(-scale, scale) noise, or a constant.
struct Init {
  enum { uniform, constant } kind;
  float value;
};

struct Planned {
  TensorSpec spec;
  Init init;
};

}  // namespace

std::vector<std::string> model_shapes() { return {"tiny", "nosa-1b-like", "nosa-8b-like"}; }

ModelConfig shape_config(const std::string& shape, attention::Mode mode) {
  ModelConfig c;
  c.num_key_value_heads = 2;
  c.head_dim = 128;
  c.rope_theta = 10000.0;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 131072;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  if (shape == "tiny") {
    c.num_hidden_layers = 2;
    c.hidden_size = 256;
    c.num_attention_heads = 4;
    c.head_dim = 64;
    c.intermediate_size = 512;
    c.vocab_size = k_tokenizer_vocab;
    c.max_position_embeddings = 32768;
    c.sparse.block_size = 16;
    c.sparse.kernel_size = 8;
    c.sparse.kernel_stride = 4;
    c.sparse.init_blocks = 1;
    c.sparse.window_size = 64;
    c.sparse.topk = 16;
    c.sparse.select_blocks = 4;
  } else if (shape == "nosa-1b-like") {
    c.num_hidden_layers = 28;
    c.hidden_size = 2048;
    c.num_attention_heads = 16;
    c.intermediate_size = 6144;
    c.vocab_size = 73448;
  } else if (shape == "nosa-8b-like") {
    c.num_hidden_layers = 32;
    c.hidden_size = 4096;
    c.num_attention_heads = 32;
    c.intermediate_size = 16384;
    c.vocab_size = 73448;
  } else {
    NOSA_FAIL(ErrorCode::invalid_argument,
              "unknown model shape '{}' (use tiny, nosa-1b-like or nosa-8b-like)", shape);
  }
  c.default_mode = mode;
  c.mode_in_config = true;
  c.has_sparse_config = mode != attention::Mode::dense;
  return c;
}

void make_model(const MakeModelOptions& o) {
  NOSA_CHECK(!o.out.empty(), "make-model needs an output directory (--out)");
  NOSA_CHECK(o.dtype == DType::bf16 || o.dtype == DType::f16 || o.dtype == DType::f32,
             "make-model writes bf16, f16 or f32 weights, not {}", dtype_name(o.dtype));
  ModelConfig c = shape_config(o.shape, o.mode);
  if (o.layers > 0) c.num_hidden_layers = o.layers;
  fs::create_directories(o.out);

  const int64_t H = c.hidden_size, d = c.head_dim, V = c.vocab_size, F = c.intermediate_size;
  const int64_t nq = c.num_attention_heads, nkv = c.num_key_value_heads;
  const float std_linear = 0.02f * std::sqrt(3.0f);  // uniform with std 0.02
  std::vector<Planned> plan;
  auto add = [&](std::string name, Shape shape, Init init, DType dtype) {
    plan.push_back({{std::move(name), dtype, std::move(shape)}, init});
  };
  const Init noise{Init::uniform, std_linear};
  const Init ones{Init::constant, 1.0f};
  add("model.embed_tokens.weight", {V, H}, {Init::uniform, 1.0f}, o.dtype);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    add(p + "input_layernorm.weight", {H}, ones, o.dtype);
    add(p + "self_attn.q_proj.weight", {nq * d, H}, {Init::uniform, 0.1f}, o.dtype);
    add(p + "self_attn.k_proj.weight", {nkv * d, H}, {Init::uniform, 0.1f}, o.dtype);
    add(p + "self_attn.v_proj.weight", {nkv * d, H}, noise, o.dtype);
    add(p + "self_attn.o_proj.weight", {H, nq * d}, noise, o.dtype);
    if (o.mode == attention::Mode::nosa) {
      add(p + "self_attn.A", {nkv}, {Init::uniform, 1.0f}, DType::f32);
      add(p + "self_attn.delta.weight", {nkv, nkv * d}, {Init::uniform, 0.5f}, DType::f32);
    }
    add(p + "post_attention_layernorm.weight", {H}, ones, o.dtype);
    add(p + "mlp.gate_proj.weight", {F, H}, noise, o.dtype);
    add(p + "mlp.up_proj.weight", {F, H}, noise, o.dtype);
    add(p + "mlp.down_proj.weight", {H, F}, noise, o.dtype);
  }
  add("model.norm.weight", {H}, ones, o.dtype);
  add("lm_head.weight", {V, H}, noise, o.dtype);

  std::vector<TensorSpec> specs;
  for (auto& p : plan) specs.push_back(p.spec);
  auto log = logger("runtime");
  log->info("writing a random {} checkpoint ({} attention, {}) to {}", o.shape,
            attention::mode_name(o.mode), dtype_name(o.dtype), o.out.string());
  write_safetensors(
      o.out / "model.safetensors", specs,
      [&](size_t i, void* bytes) {
        const Planned& p = plan[i];
        const int64_t n = shape_numel(p.spec.shape);
        const uint64_t tensor_seed = mix(o.seed ^ mix(i + 1));
        ThreadPool::global().parallel_for(
            n,
            [&](int64_t b, int64_t e) {
              std::vector<float> tmp(size_t(e - b));
              for (int64_t x = b; x < e; ++x) {
                float v = p.init.value;
                if (p.init.kind == Init::uniform) {
                  double u = double(mix(tensor_seed + uint64_t(x)) >> 11) / 9007199254740992.0;
                  v = float((2.0 * u - 1.0) * p.init.value);
                }
                tmp[x - b] = v;
              }
              convert_from_f32(tmp.data(), p.spec.dtype,
                               static_cast<char*>(bytes) + b * dtype_size(p.spec.dtype),
                               size_t(e - b));
            },
            1 << 16);
      },
      {{"format", "pt"}});
  {
    std::ofstream out(o.out / "config.json");
    out << c.to_json().dump(2) << "\n";
    NOSA_CHECK_CODE(out.good(), ErrorCode::io, "{}: cannot write config.json", o.out.string());
  }
  train_tokenizer(o.out / "tokenizer.model", k_tokenizer_vocab);
}

}  // namespace nosa::runtime
