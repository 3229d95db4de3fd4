#include "runtime/model_config.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"

namespace nosa::runtime {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

template <typename T>
T get_or(const json& j, const char* key, T fallback, const std::string& origin) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    NOSA_FAIL(ErrorCode::bad_checkpoint, "{}: key '{}' has the wrong type ({})", origin, key,
              it->type_name());
  }
}

template <typename T>
T require(const json& j, const char* key, const std::string& origin) {
  NOSA_CHECK_CODE(j.contains(key) && !j.at(key).is_null(), ErrorCode::bad_checkpoint,
                  "{}: missing required key '{}'", origin, key);
  return get_or<T>(j, key, T{}, origin);
}

RopeScaling parse_rope_scaling(const json& j, const std::string& origin) {
  RopeScaling r;
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) return r;
  NOSA_CHECK_CODE(it->is_object(), ErrorCode::bad_checkpoint, "{}: rope_scaling must be an object",
                  origin);
  std::string type = get_or<std::string>(*it, "rope_type", "", origin);
  if (type.empty()) type = get_or<std::string>(*it, "type", "default", origin);
  if (type == "default") return r;
  r.factor = get_or<double>(*it, "factor", 1.0, origin);
  NOSA_CHECK_CODE(r.factor > 0, ErrorCode::bad_checkpoint,
                  "{}: rope_scaling.factor must be positive", origin);
  if (type == "linear") {
    r.type = RopeScaling::Type::linear;
  } else if (type == "llama3") {
    r.type = RopeScaling::Type::llama3;
    r.low_freq_factor = get_or<double>(*it, "low_freq_factor", 1.0, origin);
    r.high_freq_factor = get_or<double>(*it, "high_freq_factor", 4.0, origin);
    r.original_max_position_embeddings =
        get_or<int64_t>(*it, "original_max_position_embeddings", 8192, origin);
    NOSA_CHECK_CODE(r.high_freq_factor > r.low_freq_factor, ErrorCode::bad_checkpoint,
                    "{}: rope_scaling.high_freq_factor must exceed low_freq_factor", origin);
  } else {
    NOSA_FAIL(ErrorCode::bad_checkpoint,
              "{}: unsupported rope_scaling type '{}' (supported: default, linear, llama3)",
              origin, type);
  }
  return r;
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& origin) {
  NOSA_CHECK_CODE(j.is_object(), ErrorCode::bad_checkpoint, "{}: not a JSON object", origin);
  ModelConfig c;
  c.hidden_size = require<int64_t>(j, "hidden_size", origin);
  c.intermediate_size = require<int64_t>(j, "intermediate_size", origin);
  c.num_hidden_layers = require<int>(j, "num_hidden_layers", origin);
  c.num_attention_heads = require<int>(j, "num_attention_heads", origin);
  c.num_key_value_heads = get_or<int>(j, "num_key_value_heads", c.num_attention_heads, origin);
  c.vocab_size = require<int64_t>(j, "vocab_size", origin);
  NOSA_CHECK_CODE(c.hidden_size > 0 && c.intermediate_size > 0 && c.num_hidden_layers > 0 &&
                      c.num_attention_heads > 0 && c.num_key_value_heads > 0 && c.vocab_size > 0,
                  ErrorCode::bad_checkpoint, "{}: sizes must be positive", origin);
  NOSA_CHECK_CODE(c.num_attention_heads % c.num_key_value_heads == 0, ErrorCode::bad_checkpoint,
                  "{}: num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                  origin, c.num_attention_heads, c.num_key_value_heads);
  int default_head_dim = int(c.hidden_size / c.num_attention_heads);
  c.head_dim = get_or<int>(j, "head_dim", default_head_dim, origin);
  NOSA_CHECK_CODE(c.head_dim > 0 && c.head_dim % 2 == 0, ErrorCode::bad_checkpoint,
                  "{}: head_dim must be positive and even, got {}", origin, c.head_dim);
  c.rms_norm_eps = get_or<double>(j, "rms_norm_eps", 1e-6, origin);
  c.rope_theta = get_or<double>(j, "rope_theta", 10000.0, origin);
  c.rope_scaling = parse_rope_scaling(j, origin);
  c.tie_word_embeddings = get_or<bool>(j, "tie_word_embeddings", false, origin);
  c.attention_bias = get_or<bool>(j, "attention_bias", false, origin);
  c.mlp_bias = get_or<bool>(j, "mlp_bias", false, origin);
  c.max_position_embeddings = get_or<int64_t>(j, "max_position_embeddings", 131072, origin);
  c.bos_token_id = get_or<int>(j, "bos_token_id", -1, origin);
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    if (it->is_array()) {
      for (auto& e : *it) {
        NOSA_CHECK_CODE(e.is_number_integer(), ErrorCode::bad_checkpoint,
                        "{}: eos_token_id entries must be integers", origin);
        c.eos_token_ids.push_back(e.get<int>());
      }
    } else {
      NOSA_CHECK_CODE(it->is_number_integer(), ErrorCode::bad_checkpoint,
                      "{}: eos_token_id must be an integer or a list", origin);
      c.eos_token_ids.push_back(it->get<int>());
    }
  }

  if (auto it = j.find("sparse_config"); it != j.end() && !it->is_null()) {
    NOSA_CHECK_CODE(it->is_object(), ErrorCode::bad_checkpoint,
                    "{}: sparse_config must be an object", origin);
    c.has_sparse_config = true;
    auto& s = *it;
    auto& p = c.sparse;
    p.block_size = get_or<int>(s, "block_size", p.block_size, origin);
    p.kernel_size = get_or<int>(s, "kernel_size", p.kernel_size, origin);
    p.kernel_stride = get_or<int>(s, "kernel_stride", p.kernel_stride, origin);
    p.init_blocks = get_or<int>(s, "init_blocks", p.init_blocks, origin);
    p.window_size = get_or<int>(s, "window_size", p.window_size, origin);
    p.topk = get_or<int>(s, "topk", p.topk, origin);
    p.select_blocks = get_or<int>(s, "select_blocks", p.select_blocks, origin);
    p.dense_len = get_or<int>(s, "dense_len", p.dense_len, origin);
  }
  try {
    c.sparse.validate();
  } catch (const Error& e) {
    NOSA_FAIL(ErrorCode::bad_checkpoint, "{}: {}", origin, e.message());
  }

  std::string mode = get_or<std::string>(j, "attention_mode", "", origin);
  if (!mode.empty()) {
    c.mode_in_config = true;
    try {
      c.default_mode = attention::parse_mode(mode);
    } catch (const Error& e) {
      NOSA_FAIL(ErrorCode::bad_checkpoint, "{}: {}", origin, e.message());
    }
  } else {
    c.default_mode = c.has_sparse_config ? attention::Mode::infllmv2 : attention::Mode::dense;
  }
  return c;
}

ModelConfig ModelConfig::load(const fs::path& model_dir) {
  fs::path path = model_dir / "config.json";
  NOSA_CHECK_CODE(fs::is_directory(model_dir), ErrorCode::bad_checkpoint,
                  "model directory '{}' does not exist", model_dir.string());
  std::ifstream in(path);
  NOSA_CHECK_CODE(in.good(), ErrorCode::bad_checkpoint, "{}: cannot open (missing config.json?)",
                  path.string());
  json j;
  try {
    in >> j;
  } catch (const json::exception& e) {
    NOSA_FAIL(ErrorCode::bad_checkpoint, "{}: malformed JSON: {}", path.string(), e.what());
  }
  return from_json(j, path.string());
}

json ModelConfig::to_json() const {
  json j = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"head_dim", head_dim},
      {"rms_norm_eps", rms_norm_eps},
      {"rope_theta", rope_theta},
      {"tie_word_embeddings", tie_word_embeddings},
      {"attention_bias", attention_bias},
      {"mlp_bias", mlp_bias},
      {"vocab_size", vocab_size},
      {"max_position_embeddings", max_position_embeddings},
      {"hidden_act", "silu"},
      {"torch_dtype", "bfloat16"},
      {"attention_mode", attention::mode_name(default_mode)},
  };
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
  if (eos_token_ids.size() > 1) j["eos_token_id"] = eos_token_ids;
  if (rope_scaling.type == RopeScaling::Type::linear) {
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", rope_scaling.factor}};
  } else if (rope_scaling.type == RopeScaling::Type::llama3) {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", rope_scaling.factor},
                         {"low_freq_factor", rope_scaling.low_freq_factor},
                         {"high_freq_factor", rope_scaling.high_freq_factor},
                         {"original_max_position_embeddings",
                          rope_scaling.original_max_position_embeddings}};
  }
  if (has_sparse_config) {
    j["sparse_config"] = {{"block_size", sparse.block_size},
                          {"kernel_size", sparse.kernel_size},
                          {"kernel_stride", sparse.kernel_stride},
                          {"init_blocks", sparse.init_blocks},
                          {"window_size", sparse.window_size},
                          {"topk", sparse.topk},
                          {"select_blocks", sparse.select_blocks},
                          {"dense_len", sparse.dense_len}};
  }
  return j;
}

}  // namespace nosa::runtime
