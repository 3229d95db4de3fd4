#include <nlohmann/json.hpp>

#include "launcher/commands.h"
#include "launcher/engine_setup.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"
#include "runtime/text_stream.h"

namespace nosa::launcher {

namespace {
struct GenerateFlags {
  EngineFlags engine;
  std::string prompt, prompt_ids;
  int64_t max_tokens = 32;
  float temperature = 0.0f, top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  int logprobs = -1;
  bool json = false;
  bool ignore_eos = false;
};

int run_generate(const GenerateFlags& f) {
  NOSA_CHECK(f.prompt.empty() != f.prompt_ids.empty(),
             "give exactly one of --prompt TEXT or --prompt-ids IDS");
  std::vector<int32_t> ids;
  if (!f.prompt_ids.empty()) ids = parse_token_ids(f.prompt_ids);
  if (!f.prompt.empty()) {
    auto tokenizer = EngineSetup::load_tokenizer(f.engine.model);
    NOSA_CHECK(tokenizer != nullptr, "{} has no tokenizer.model: give the prompt as --prompt-ids",
               f.engine.model);
    ids = tokenizer->encode(f.prompt);
    if (tokenizer->bos_id() >= 0) ids.insert(ids.begin(), tokenizer->bos_id());
  }
  NOSA_CHECK(f.max_tokens >= 1, "--max-tokens must be at least 1");
  EngineSetup s = EngineSetup::create(f.engine, int64_t(ids.size()) + f.max_tokens);
  if (!s.leader()) {
    s.run_follower();
    return 0;
  }
  // Under mpirun with several replicas, the first one answers; the others only stop their ranks.
  if (s.replica.index != 0) return 0;
  NOSA_CHECK(f.stop.empty() || s.tokenizer, "--stop needs a tokenizer");
  NOSA_CHECK(f.logprobs <= 20, "--logprobs must be at most 20");
  runtime::GenerationRequest req;
  req.prompt = ids;
  req.max_tokens = f.max_tokens;
  req.sampling.temperature = f.temperature;
  req.sampling.top_p = f.top_p;
  req.sampling.top_k = f.top_k;
  req.sampling.seed = f.seed;
  req.sampling.logprobs = std::max(0, f.logprobs);
  req.ignore_eos = f.ignore_eos;
  s.engine->submit(req);

  std::optional<runtime::TextStream> text;
  if (s.tokenizer) text.emplace(*s.tokenizer, f.stop);
  std::vector<runtime::SampledToken> out;
  runtime::FinishReason reason = runtime::FinishReason::none;
  std::string error;
  while (s.engine->has_work() && reason == runtime::FinishReason::none) {
    for (auto& e : s.engine->step()) {
      if (e.has_token) {
        out.push_back(e.token);
        if (text) {
          std::string piece = text->push(e.token.token);
          if (!f.json) {
            fmt::print("{}", piece);
            std::fflush(stdout);
          }
          if (text->stopped() && e.finish == runtime::FinishReason::none) {
            s.engine->cancel(e.id);
            reason = runtime::FinishReason::stop;
          }
        }
      }
      if (e.finish != runtime::FinishReason::none && reason == runtime::FinishReason::none) {
        reason = e.finish;
        error = e.error;
      }
    }
  }
  NOSA_CHECK_CODE(reason != runtime::FinishReason::error, ErrorCode::resource_exhausted, "{}",
                  error);
  if (s.cache->tiers()) {
    s.cache->sync_stats();
    const auto t = s.cache->stats();
    logger("memory")->info(
        "KV tiers: {} chunks selected, {:.1f}% also selected the step before; device hits {} "
        "misses {} evictions {}; host->device {:.1f} MiB, device->host {:.1f} MiB, disk read "
        "{:.1f} MiB, written {:.1f} MiB; {} steps decided residency on the device, {} prefetched "
        "({} chunks copied, {} then selected)",
        t.selected, t.selected ? 100.0 * double(t.overlap) / double(t.selected) : 0.0, t.hits,
        t.misses, t.evictions, double(t.bytes_host_to_device) / (1 << 20),
        double(t.bytes_device_to_host) / (1 << 20), double(t.bytes_disk_read) / (1 << 20),
        double(t.bytes_disk_written) / (1 << 20), s.cache->device_steps(),
        s.model->prefetch_steps(), t.prefetched, t.prefetch_hits);
  }
  std::string tail = text ? text->finish() : "";
  if (!f.json) {
    fmt::print("{}\n", tail);
    return 0;
  }
  nlohmann::json j;
  j["prompt_tokens"] = ids.size();
  std::vector<int32_t> token_ids;
  for (auto& t : out) token_ids.push_back(t.token);
  j["token_ids"] = token_ids;
  j["text"] = text ? text->text() : "";
  j["finish_reason"] = runtime::finish_reason_name(reason);
  if (f.logprobs >= 0) {
    nlohmann::json lp = nlohmann::json::array();
    for (auto& t : out) {
      nlohmann::json top = nlohmann::json::array();
      for (auto& [id, p] : t.top) top.push_back({{"token", id}, {"logprob", p}});
      lp.push_back({{"token", t.token}, {"logprob", t.logprob}, {"top", top}});
    }
    j["logprobs"] = lp;
  }
  fmt::print("{}\n", j.dump());
  return 0;
}
}  // namespace

Runner add_generate_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt with one model");
  auto f = std::make_shared<GenerateFlags>();
  f->engine.add_to(*cmd);
  cmd->add_option("--prompt", f->prompt, "Prompt text (tokenized with the model's tokenizer)");
  cmd->add_option("--prompt-ids", f->prompt_ids,
                  "Prompt token ids: 1,2,3 or @FILE (ids separated by commas or spaces)");
  cmd->add_option("--max-tokens", f->max_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", f->temperature, "Sampling temperature (0: greedy)")
      ->capture_default_str();
  cmd->add_option("--top-p", f->top_p, "Nucleus sampling mass")->capture_default_str();
  cmd->add_option("--top-k", f->top_k, "Sample among the k most likely tokens (0: all)")
      ->capture_default_str();
  cmd->add_option("--seed", f->seed, "Random seed for sampling")->capture_default_str();
  cmd->add_option("--stop", f->stop, "Stop string (repeatable); the text ends before it");
  cmd->add_option("--logprobs", f->logprobs,
                  "With --json: report each token's logprob and the top K alternatives");
  cmd->add_flag("--ignore-eos", f->ignore_eos, "Keep generating after the end-of-sequence token");
  cmd->add_flag("--json", f->json,
                "Print one JSON object: token ids, text, finish reason and logprobs");
  return [f] { return run_generate(*f); };
}

}  // namespace nosa::launcher
