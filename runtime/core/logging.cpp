#include "runtime/core/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <mutex>
#include <unordered_map>

#include "runtime/core/error.h"

namespace nosa {
namespace {
std::mutex g_mutex;
std::unordered_map<std::string, std::shared_ptr<spdlog::logger>> g_loggers;
spdlog::level::level_enum g_level = spdlog::level::info;
int g_rank = -1;

std::string pattern_for(const std::string& subsystem) {
  std::string prefix = g_rank >= 0 ? fmt::format("[rank {}]", g_rank) : "";
  return fmt::format("[%H:%M:%S.%e] %^%l%$ {}[{}] %v", prefix, subsystem);
}
}  // namespace

std::shared_ptr<spdlog::logger> logger(const std::string& subsystem) {
  std::lock_guard lock(g_mutex);
  auto it = g_loggers.find(subsystem);
  if (it != g_loggers.end()) return it->second;
  // Logs go to stderr so that stdout stays clean for results (--json, generated text).
  auto log = std::make_shared<spdlog::logger>(
      subsystem, std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  log->set_pattern(pattern_for(subsystem));
  log->set_level(g_level);
  g_loggers.emplace(subsystem, log);
  return log;
}

void set_log_level(const std::string& level) {
  auto parsed = spdlog::level::from_str(level);
  NOSA_CHECK(parsed != spdlog::level::off || level == "off",
             "unknown log level '{}' (use trace, debug, info, warn, error or off)", level);
  std::lock_guard lock(g_mutex);
  g_level = parsed;
  for (auto& [name, log] : g_loggers) log->set_level(parsed);
}

void set_log_rank(int rank) {
  std::lock_guard lock(g_mutex);
  g_rank = rank;
  for (auto& [name, log] : g_loggers) log->set_pattern(pattern_for(name));
}

}  // namespace nosa
