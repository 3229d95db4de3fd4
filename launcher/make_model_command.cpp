#include "launcher/commands.h"
#include "runtime/core/error.h"
#include "runtime/make_model.h"

namespace nosa::launcher {

Runner add_make_model_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "make-model",
      "Write a random-weight checkpoint (config.json, model.safetensors, tokenizer.model)");
  auto opts = std::make_shared<runtime::MakeModelOptions>();
  auto shape = std::make_shared<std::string>("tiny");
  auto mode = std::make_shared<std::string>("nosa");
  auto dtype = std::make_shared<std::string>("bf16");
  auto out = std::make_shared<std::string>();
  cmd->add_option("--shape", *shape, "tiny, nosa-1b-like or nosa-8b-like")->capture_default_str();
  cmd->add_option("--attention", *mode, "dense, infllmv2 or nosa (nosa adds A and delta tensors)")
      ->capture_default_str();
  cmd->add_option("--seed", opts->seed, "Random seed of the weights")->capture_default_str();
  cmd->add_option("--dtype", *dtype, "Weight dtype: bf16, f16 or f32")->capture_default_str();
  cmd->add_option("--layers", opts->layers, "Override the shape's number of layers");
  cmd->add_option("--out", *out, "Output directory")->required();
  return [=] {
    opts->shape = *shape;
    opts->mode = attention::parse_mode(*mode);
    if (*dtype == "bf16") opts->dtype = DType::bf16;
    else if (*dtype == "f16") opts->dtype = DType::f16;
    else if (*dtype == "f32") opts->dtype = DType::f32;
    else NOSA_FAIL(ErrorCode::invalid_argument, "unknown dtype '{}' (use bf16, f16 or f32)", *dtype);
    opts->out = *out;
    runtime::make_model(*opts);
    fmt::print("wrote {} ({} attention) to {}\n", opts->shape, *mode, *out);
    return 0;
  };
}

}  // namespace nosa::launcher
