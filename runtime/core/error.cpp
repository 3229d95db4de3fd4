#include "runtime/core/error.h"

#include <cstring>

namespace nosa {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::invalid_argument: return "invalid_argument";
    case ErrorCode::bad_checkpoint: return "bad_checkpoint";
    case ErrorCode::not_found: return "not_found";
    case ErrorCode::resource_exhausted: return "resource_exhausted";
    case ErrorCode::io: return "io";
    case ErrorCode::unavailable: return "unavailable";
    case ErrorCode::cancelled: return "cancelled";
    case ErrorCode::internal: return "internal";
  }
  return "unknown";
}

static std::string with_location(const std::string& message, const char* file, int line) {
  if (!file) return message;
  const char* base = std::strrchr(file, '/');
  return fmt::format("{} [{}:{}]", message, base ? base + 1 : file, line);
}

Error::Error(ErrorCode code, std::string message, const char* file, int line)
    : std::runtime_error(with_location(message, file, line)),
      code_(code),
      message_(std::move(message)) {}

namespace detail {
void throw_error(ErrorCode code, const char* file, int line, std::string message) {
  throw Error(code, std::move(message), file, line);
}
}  // namespace detail

}  // namespace nosa
