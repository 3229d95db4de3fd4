// A Llama-family model's configuration, read from a Hugging Face config.json, with NOSA's
// sparse parameters from its "sparse_config" (MiniCPM4's keys).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "attention/sparse_params.h"

namespace nosa::runtime {

struct RopeScaling {
  enum class Type { none, linear, llama3 } type = Type::none;
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct ModelConfig {
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  int bos_token_id = -1;
  std::vector<int> eos_token_ids;
  attention::SparseParams sparse;
  // The mode the checkpoint was made for: "attention_mode" in config.json if present, else nosa
  // when NOSA's tensors exist, infllmv2 when a sparse_config exists, else dense.
  attention::Mode default_mode = attention::Mode::dense;
  bool has_sparse_config = false;
  bool mode_in_config = false;  // "attention_mode" was given explicitly

  int group_size() const { return num_attention_heads / num_key_value_heads; }

  // Parses config.json's contents; `origin` names the file in errors. Throws bad_checkpoint.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& origin);
  // Reads DIR/config.json.
  static ModelConfig load(const std::filesystem::path& model_dir);
  nlohmann::json to_json() const;
};

}  // namespace nosa::runtime
