// One spdlog logger per subsystem, prefixed with the rank when running under MPI:
// "[rank 1][memory] ...". Levels come from --log-level (or NOSA_LOG, read once in main).
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

namespace nosa {

// The logger of a subsystem ("runtime", "memory", "rpc", ...), created on first use.
std::shared_ptr<spdlog::logger> logger(const std::string& subsystem);

// Sets the level of every logger (trace, debug, info, warn, error, off). Throws on a bad name.
void set_log_level(const std::string& level);

// Adds "[rank N]" to every logger's prefix (call once after MPI is up, when size > 1).
void set_log_rank(int rank);

}  // namespace nosa
