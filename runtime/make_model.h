// Random-weight checkpoints of named shapes, in the Hugging Face layout, for tests and
// benchmarks (`nosa make-model`). Throughput does not depend on the weights' values.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/model_config.h"

namespace nosa::runtime {

struct MakeModelOptions {
  std::string shape = "tiny";  // tiny | nosa-1b-like | nosa-8b-like
  attention::Mode mode = attention::Mode::nosa;
  uint64_t seed = 0;
  DType dtype = DType::bf16;
  int layers = 0;  // overrides the shape's layer count when > 0
  std::filesystem::path out;
};

// The names make_model accepts.
std::vector<std::string> model_shapes();
// The configuration of a named shape (throws invalid_argument for an unknown name). The tiny
// shape uses small sparse blocks (16 tokens, 16 selected) so that a prompt of a few thousand
// tokens exercises sparse selection.
ModelConfig shape_config(const std::string& shape, attention::Mode mode);

// Writes config.json, model.safetensors and tokenizer.model into options.out (created if
// needed). NOSA checkpoints carry self_attn.A and self_attn.delta.weight per layer.
void make_model(const MakeModelOptions& options);

}  // namespace nosa::runtime
