// Progress of a `nosa batch` job on stderr: a live bar redrawn in place when stderr is a
// terminal, plain lines at a fixed interval otherwise (logs, mpirun), and the closing summary.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "memory/kv_tiers.h"

namespace nosa::launcher::batch {

struct BatchCounts {
  int64_t total = 0;              // input lines this process owns (blank lines excluded)
  int64_t written = 0;            // results written by this run
  int64_t resumed = 0;            // skipped: already in the output
  int64_t errors = 0;             // bad lines and failed requests (in the errors file)
  int64_t in_flight = 0;          // queued in the engine
  int64_t prompt_tokens = 0;      // of the results written by this run
  int64_t completion_tokens = 0;  // of the results written by this run
  int64_t generated_tokens = 0;   // sampled so far, finished or not (the live tok/s)

  int64_t finished() const { return written + resumed + errors; }
};

// "1h02m", "3m07s", "12.4s".
std::string format_duration(double seconds);

class Progress {
 public:
  // `bar`: redraw one line in place (a terminal); else print a line every `interval`.
  // `prefix` starts every line ("[replica 1/2] " under mpirun, else empty).
  Progress(std::FILE* out, bool bar, std::chrono::duration<double> interval, std::string prefix);

  // Shows the counts if the last update is old enough (or `force`).
  void update(const BatchCounts& counts, bool force = false);
  // Ends the bar's line so that later output starts on a fresh line.
  void finish();
  double elapsed_seconds() const;

  // The line update() prints, for tests.
  std::string status_line(const BatchCounts& counts) const;

 private:
  std::FILE* out_;
  bool bar_;
  std::chrono::duration<double> interval_;
  std::string prefix_;
  std::chrono::steady_clock::time_point start_, last_;
  bool drawn_ = false;
  size_t last_width_ = 0;
};

// The closing summary: one "key: value" line each, printed with the prefix.
struct BatchSummary {
  BatchCounts counts;
  double wall_seconds = 0;
  int64_t engine_steps = 0, preemptions = 0;
  int64_t abandoned = 0;  // in flight when the job was interrupted (redone on resume)
  bool interrupted = false;
  // Extra "name: value" lines (KV tier traffic, from kv_tier_summary()).
  std::vector<std::pair<std::string, std::string>> extra;
};
std::string format_summary(const BatchSummary& s, const std::string& prefix);

// The KV tiers' counters as summary lines: device cache hits and misses, NOSA selection overlap,
// bytes moved between device, host and disk, and each tier's occupancy.
std::vector<std::pair<std::string, std::string>> kv_tier_lines(const memory::TierStats& t);

}  // namespace nosa::launcher::batch
