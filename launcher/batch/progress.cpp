#include "launcher/batch/progress.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace nosa::launcher::batch {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 60) return fmt::format("{:.1f}s", s);
  const int64_t t = int64_t(s + 0.5);
  if (t < 3600) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}h{:02}m", t / 3600, (t % 3600) / 60);
}

Progress::Progress(std::FILE* out, bool bar, std::chrono::duration<double> interval,
                   std::string prefix)
    : out_(out),
      bar_(bar),
      interval_(interval),
      prefix_(std::move(prefix)),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

double Progress::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string Progress::status_line(const BatchCounts& c) const {
  const double elapsed = std::max(elapsed_seconds(), 1e-9);
  const int64_t done = c.finished();
  const double frac = c.total > 0 ? std::min(1.0, double(done) / double(c.total)) : 0.0;
  const double tok_s = double(std::max(c.generated_tokens, c.completion_tokens)) / elapsed;
  // ETA from this run's pace (requests that needed the engine).
  const int64_t remaining = std::max<int64_t>(0, c.total - done);
  const double rate = double(c.written + c.errors) / elapsed;
  const std::string eta = remaining == 0 ? "0s"
                          : rate > 0     ? format_duration(remaining / rate)
                                         : "?";
  std::string head;
  if (bar_) {
    constexpr int k_width = 24;
    const int fill = int(frac * k_width);
    head.reserve(k_width + 3);
    head.push_back('[');
    head.append(size_t(fill), '#');
    head.append(size_t(k_width - fill), '.');
    head.append("] ");
  }
  std::string extra;
  if (c.resumed > 0) extra += fmt::format(", {} resumed", c.resumed);
  if (c.errors > 0) extra += fmt::format(", {} errors", c.errors);
  return fmt::format(
      "{}{}{}/{} requests ({:.0f}%{}) | {} running | {:.1f} tok/s | elapsed {} | ETA {}", prefix_,
      head, done, c.total, frac * 100, extra, c.in_flight, tok_s, format_duration(elapsed), eta);
}

void Progress::update(const BatchCounts& counts, bool force) {
  const auto now = std::chrono::steady_clock::now();
  const auto min_gap = bar_ ? std::chrono::duration<double>(0.2) : interval_;
  if (!force && now - last_ < min_gap) return;
  last_ = now;
  std::string line = status_line(counts);
  if (bar_) {
    // Pad over the previous, longer line.
    const size_t width = line.size();
    if (width < last_width_) line.append(last_width_ - width, ' ');
    last_width_ = width;
    fmt::print(out_, "\r{}", line);
    drawn_ = true;
  } else {
    fmt::print(out_, "{}\n", line);
  }
  std::fflush(out_);
}

void Progress::finish() {
  if (bar_ && drawn_) {
    fmt::print(out_, "\n");
    std::fflush(out_);
  }
  drawn_ = false;
}

std::string format_summary(const BatchSummary& s, const std::string& prefix) {
  const auto& c = s.counts;
  const double wall = std::max(s.wall_seconds, 1e-9);
  std::string out;
  auto line = [&](const std::string& key, const std::string& value) {
    out += fmt::format("{}{:<22}{}\n", prefix, key + ":", value);
  };
  line("batch", s.interrupted ? "interrupted (rerun the same command to resume)" : "done");
  line("requests", fmt::format("{} of {} finished: {} written, {} resumed, {} errors", c.finished(),
                               c.total, c.written, c.resumed, c.errors));
  if (s.abandoned > 0)
    line("not finished", fmt::format("{} in flight when stopped (redone on resume)", s.abandoned));
  line("prompt tokens", fmt::format("{}", c.prompt_tokens));
  line("completion tokens", fmt::format("{}", c.completion_tokens));
  line("wall time", format_duration(s.wall_seconds));
  line("throughput", fmt::format("{:.2f} requests/s, {:.1f} completion tok/s, {:.1f} total tok/s",
                                 double(c.written) / wall, double(c.completion_tokens) / wall,
                                 double(c.prompt_tokens + c.completion_tokens) / wall));
  if (s.engine_steps > 0)
    line("engine", fmt::format("{} steps, {} preemptions", s.engine_steps, s.preemptions));
  for (const auto& [k, v] : s.extra) line(k, v);
  return out;
}

}  // namespace nosa::launcher::batch

namespace nosa::launcher::batch {

namespace {
std::string gib(int64_t bytes) {
  return fmt::format("{:.2f} GiB", double(bytes) / double(1ull << 30));
}
std::string percent(int64_t part, int64_t whole) {
  return whole > 0 ? fmt::format("{:.1f}%", 100.0 * double(part) / double(whole)) : "-";
}
}  // namespace

std::vector<std::pair<std::string, std::string>> kv_tier_lines(const memory::TierStats& t) {
  std::vector<std::pair<std::string, std::string>> out;
  out.emplace_back("kv device cache",
                   fmt::format("{} hits, {} misses ({} hit rate), {} evictions", t.hits, t.misses,
                               percent(t.hits, t.hits + t.misses), t.evictions));
  out.emplace_back("kv selection overlap",
                   fmt::format("{} of {} selected chunks kept from the step before",
                               percent(t.overlap, t.selected), t.selected));
  out.emplace_back("kv prefetch",
                   fmt::format("{} chunks copied on a guess of the next layer's selection, {} "
                               "of them then selected",
                               t.prefetched, percent(t.prefetch_hits, t.prefetched)));
  out.emplace_back("kv traffic",
                   fmt::format("host->device {}, device->host {}, disk read {}, "
                               "disk written {}",
                               gib(t.bytes_host_to_device), gib(t.bytes_device_to_host),
                               gib(t.bytes_disk_read), gib(t.bytes_disk_written)));
  out.emplace_back("kv tiers in use",
                   fmt::format("device {}/{} chunks, host {}/{} blocks, disk {}/{} blocks",
                               t.device_slots_used, t.device_slots, t.host_blocks_used,
                               t.host_blocks, t.disk_blocks_used, t.disk_blocks));
  return out;
}

}  // namespace nosa::launcher::batch
