#include "launcher/bench/progress.h"

#include <fmt/format.h>

#include "launcher/batch/progress.h"

namespace nosa::launcher::bench {

BenchProgress::BenchProgress(std::FILE* out, bool tty, int total)
    : out_(out), tty_(tty), total_(total), start_(std::chrono::steady_clock::now()) {}

std::string BenchProgress::line(int i, const std::string& what, double elapsed_s) const {
  // Time left from the pace so far (configurations differ in cost: a rough guide).
  std::string left;
  if (i > 1 && total_ >= i)
    left =
        fmt::format(", ~{} left", batch::format_duration(elapsed_s / (i - 1) * (total_ - i + 1)));
  return fmt::format("[bench] {}/{} {} (elapsed {}{})", i, total_, what,
                     batch::format_duration(elapsed_s), left);
}

void BenchProgress::next(const std::string& what) {
  ++done_;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const std::string l = line(done_, what, elapsed);
  if (tty_) {
    std::fprintf(out_, "\r\033[K%s", l.c_str());
    drawn_ = true;
  } else {
    std::fprintf(out_, "%s\n", l.c_str());
  }
  std::fflush(out_);
}

void BenchProgress::clear() {
  if (!tty_ || !drawn_) return;
  std::fprintf(out_, "\r\033[K");
  std::fflush(out_);
  drawn_ = false;
}

void BenchProgress::finish() {
  clear();
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::fprintf(out_, "[bench] %d configuration%s in %s\n", done_, done_ == 1 ? "" : "s",
               batch::format_duration(elapsed).c_str());
  std::fflush(out_);
}

}  // namespace nosa::launcher::bench
