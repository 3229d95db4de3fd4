// `nosa batch`: offline inference over a JSONL file (launcher/batch/batch_job.h).
#include <cstdio>

#include "launcher/batch/batch_job.h"
#include "launcher/commands.h"
#include "parallel/mpi.h"
#include "runtime/core/error.h"

namespace nosa::launcher {

namespace {

int run_batch_command(const batch::BatchOptions& o) {
  try {
    return batch::run_batch(o);
  } catch (const std::exception& e) {
    // Under mpirun the other ranks would wait for this one in a collective: end them all.
    parallel::MpiContext& mpi = parallel::MpiContext::get();
    if (mpi.active() && mpi.world_size() > 1) {
      const auto* err = dynamic_cast<const Error*>(&e);
      std::fprintf(stderr, "nosa: error: [rank %d] %s\n", mpi.world_rank(),
                   err ? err->message().c_str() : e.what());
      std::fflush(stderr);
      mpi.abort(1);
    }
    throw;
  }
}

}  // namespace

Runner add_batch_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "batch",
      "Offline inference over a JSONL file: one result line per input line, appended as each "
      "finishes; rerun the same command to resume");
  auto o = std::make_shared<batch::BatchOptions>();
  cmd->footer(
      "Input lines: {\"id\" or \"custom_id\": ID, \"prompt\": TEXT or [token ids] | \"messages\": "
      "[{\"role\", \"content\"}], optional max_tokens, temperature, top_p, top_k, seed, stop, "
      "logprobs}; or the OpenAI batch shape {\"custom_id\", \"method\", \"url\", \"body\": "
      "{...}}.\nOutput lines: {\"id\", \"text\", \"token_ids\", \"finish_reason\", \"usage\": "
      "{\"prompt_tokens\", \"completion_tokens\"}[, \"logprobs\"]}.\nBad lines go to the errors "
      "file as {\"line\", \"id\", \"error\"}. Under mpirun, replicas of --tp ranks split the "
      "input and append to the same files.");
  o->engine.add_to(*cmd);
  cmd->add_option("--input", o->input, "Input JSONL file (one request per line)")->required();
  cmd->add_option("--output", o->output, "Results JSONL file (appended; existing ids skipped)")
      ->required();
  cmd->add_option("--errors", o->errors,
                  "Errors JSONL file, rewritten each run (default: OUTPUT.errors.jsonl)");
  auto& d = o->defaults;
  cmd->add_option("--max-tokens", d.max_tokens, "Default tokens to generate per request")
      ->capture_default_str();
  cmd->add_option("--temperature", d.temperature, "Default sampling temperature (0: greedy)")
      ->capture_default_str();
  cmd->add_option("--top-p", d.top_p, "Default nucleus sampling mass")->capture_default_str();
  cmd->add_option("--top-k", d.top_k, "Default top-k filter (0: none)")->capture_default_str();
  cmd->add_option("--seed", d.seed,
                  "Base seed: a line without \"seed\" samples with this mixed with its id")
      ->capture_default_str();
  cmd->add_option("--stop", d.stop, "Default stop string (repeatable); the text ends before it");
  cmd->add_option("--logprobs", d.logprobs,
                  "Report each token's logprob and this many alternatives (default: off)");
  cmd->add_flag("--ignore-eos", d.ignore_eos, "Keep generating after the end-of-sequence token");
  cmd->add_option("--lookahead", o->lookahead,
                  "Requests read ahead and sorted by length (default: 4 x --max-running, at "
                  "least 1024)");
  cmd->add_option("--kv-overcommit", o->kv_overcommit,
                  "Admit requests while their worst-case KV blocks (prompt + max_tokens) stay "
                  "under this multiple of the cache (above 1 relies on early stops, and on "
                  "preemption when they do not come)")
      ->capture_default_str();
  cmd->add_option("--progress", o->progress,
                  "auto (a bar on a terminal, else lines), bar, lines or off")
      ->capture_default_str();
  cmd->add_option("--progress-interval", o->progress_interval_s,
                  "Seconds between progress lines (not for the bar)")
      ->capture_default_str();
  return [o] { return run_batch_command(*o); };
}

}  // namespace nosa::launcher
