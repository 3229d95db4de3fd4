// The progress line of `nosa bench` on stderr while a suite runs: which configuration of how
// many, its name, the time elapsed and a rough time left. Redrawn in place on a terminal; one
// plain line per configuration otherwise (logs, CI, mpirun).
#pragma once

#include <chrono>
#include <cstdio>
#include <string>

namespace nosa::launcher::bench {

class BenchProgress {
 public:
  // `total`: configurations the run will measure; `tty`: redraw in place.
  BenchProgress(std::FILE* out, bool tty, int total);

  // Configuration `what` starts (the next of `total`).
  void next(const std::string& what);
  // Erases the line on a terminal, so that other output starts clean (no-op otherwise).
  void clear();
  // The closing line: "[bench] 28 configurations in 4.2s".
  void finish();

  // The line next() prints for configuration i (1-based), for tests.
  std::string line(int i, const std::string& what, double elapsed_s) const;

 private:
  std::FILE* out_;
  bool tty_;
  int total_, done_ = 0;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace nosa::launcher::bench
