// `nosa batch`: offline inference over a JSONL file (see batch_request.h for the line format).
//
// Guarantees:
// - Every result is appended to the output as soon as its request finishes, as one line in one
//   write under flock (result_file.h). A rerun of the same command first drops a cut-short last
//   line, then skips every id already in the output, so a crash or Ctrl-C loses only the
//   requests that were in flight.
// - A bad line (malformed JSON, no id or prompt, duplicate id, bad parameter, prompt too long,
//   token outside the vocabulary) and a request the engine fails go to the errors file as
//   {"line", "id", "error"}, and the job goes on. The errors file holds the errors of the latest
//   run: it is emptied when a run starts (bad lines are found again, failed requests retried).
// - Under mpirun, replicas of --tp ranks split the input by non-blank line index modulo the
//   replica count and append to the same output and errors files; the union is complete and
//   free of duplicates.
// - SIGINT / SIGTERM: stop after the current engine step (results already written stay; the
//   requests in flight are redone on resume); a second signal exits at once.
//
// Scheduling for throughput: requests are read ahead (a bounded window, so memory stays bounded
// for any input size), sorted by KV need, and admitted largest-first while their worst-case KV
// blocks (prompt + max_tokens) fit the cache, up to --max-running sequences; the engine then
// runs the largest batch the KV cache holds, without preemption.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "launcher/batch/batch_request.h"
#include "launcher/engine_setup.h"

namespace nosa::launcher::batch {

struct BatchOptions {
  EngineFlags engine;  // also --tp: ranks per replica under mpirun
  std::filesystem::path input, output;
  std::filesystem::path errors;  // empty: OUTPUT.errors.jsonl
  RequestDefaults defaults;
  int64_t lookahead = 0;          // requests read ahead and sorted (0: 4 x max running, >= 1024)
  double kv_overcommit = 1.0;     // admit while reserved blocks <= capacity x this
  std::string progress = "auto";  // auto (bar on a terminal, else lines), bar, lines, off
  double progress_interval_s = 10;
};

// Runs the job; returns the process exit code (0 done, 130 / 143 interrupted by SIGINT /
// SIGTERM). Bad lines do not change the exit code (they are in the errors file). Throws Error
// for what stops the job as a whole (unreadable input, bad flags, checkpoint, engine failure).
int run_batch(const BatchOptions& options);

// The errors file for an output file: OUTPUT.errors.jsonl.
std::filesystem::path default_errors_path(const std::filesystem::path& output);

}  // namespace nosa::launcher::batch
