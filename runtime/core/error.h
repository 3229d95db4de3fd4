// Typed errors with file and line. Library code throws; the edges (CLI main, HTTP and RPC
// handlers) turn an Error into an exit code or a status code.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace nosa {

// What went wrong, in terms a caller can act on (the HTTP layer maps these to status codes).
enum class ErrorCode {
  invalid_argument,    // the caller's input is wrong (bad flag, bad request, bad token id)
  bad_checkpoint,      // a model directory is missing, malformed or inconsistent
  not_found,           // a named thing does not exist
  resource_exhausted,  // out of KV blocks, memory, queue space
  io,                  // a file or socket operation failed
  unavailable,         // a peer (worker, rank) is gone or not answering
  cancelled,           // the request was cancelled
  internal,            // a bug: an invariant did not hold
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, std::string message, const char* file = nullptr, int line = 0);
  ErrorCode code() const { return code_; }
  // The message without the source location, for users.
  const std::string& message() const { return message_; }

 private:
  ErrorCode code_;
  std::string message_;
};

namespace detail {
[[noreturn]] void throw_error(ErrorCode code, const char* file, int line, std::string message);

// Formats without fmt's compile-time check, which nvcc cannot evaluate.
template <typename... Args>
std::string format_unchecked(fmt::string_view format, Args&&... args) {
  return fmt::vformat(format, fmt::make_format_args(args...));
}
}  // namespace detail

}  // namespace nosa

#if defined(__CUDACC__)
#define NOSA_FORMAT(...) ::nosa::detail::format_unchecked(__VA_ARGS__)
#else
#define NOSA_FORMAT(...) ::fmt::format(__VA_ARGS__)
#endif

// NOSA_CHECK(cond, "format {}", args...): the caller's input broke a rule (invalid_argument).
#define NOSA_CHECK(cond, ...)                                                         \
  do {                                                                                \
    if (!(cond)) [[unlikely]]                                                         \
      ::nosa::detail::throw_error(::nosa::ErrorCode::invalid_argument, __FILE__,       \
                                  __LINE__, NOSA_FORMAT(__VA_ARGS__));              \
  } while (0)

// NOSA_CHECK_CODE(cond, ErrorCode::x, "format {}", args...): same, with an explicit code.
#define NOSA_CHECK_CODE(cond, code, ...)                                              \
  do {                                                                                \
    if (!(cond)) [[unlikely]]                                                         \
      ::nosa::detail::throw_error(code, __FILE__, __LINE__, NOSA_FORMAT(__VA_ARGS__)); \
  } while (0)

// NOSA_ASSERT(cond, ...): an internal invariant (a bug when it fails).
#define NOSA_ASSERT(cond, ...)                                                        \
  do {                                                                                \
    if (!(cond)) [[unlikely]]                                                         \
      ::nosa::detail::throw_error(::nosa::ErrorCode::internal, __FILE__, __LINE__,     \
                                  NOSA_FORMAT(__VA_ARGS__));                        \
  } while (0)

#define NOSA_FAIL(code, ...) \
  ::nosa::detail::throw_error(code, __FILE__, __LINE__, NOSA_FORMAT(__VA_ARGS__))
