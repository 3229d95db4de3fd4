// The OpenAI-compatible HTTP API's request checking and response shapes, as pure functions (the
// coordinator does the I/O). Requests are checked strictly: a malformed body, a wrong type, an
// out-of-range value, a parameter this server does not implement (n > 1, echo, penalties,
// tools...) or an unknown field gets a 400 with OpenAI's error body, so that a typo is never
// silently ignored.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "nosa_rpc.pb.h"

namespace nosa::rpc {

// An error as the API reports it: {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int status = 400;
  std::string type = "invalid_request_error";
  std::string message;
  std::string param;  // empty: null
  std::string code;   // empty: null

  nlohmann::json body() const;
};

// Thrown by the parsers; the HTTP layer answers with it.
class ApiException : public std::exception {
 public:
  explicit ApiException(ApiError e) : error_(std::move(e)) {}
  const ApiError& error() const { return error_; }
  const char* what() const noexcept override { return error_.message.c_str(); }

 private:
  ApiError error_;
};

ApiError bad_request(std::string message, std::string param = {});
ApiError not_found_path(const std::string& method, const std::string& path);
ApiError model_not_found(const std::string& model);
ApiError server_error(int status, std::string message, std::string code = {});

enum class Endpoint { completions, chat_completions };

// A checked request, ready to be routed.
struct ApiRequest {
  Endpoint endpoint = Endpoint::completions;
  std::string model;  // empty: the client named none (the only served model is used)
  pb::Submit submit;  // everything the replica needs (request_id left 0)
  bool max_tokens_given = false;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool want_logprobs = false;  // completions: logprobs >= 0; chat: logprobs true
};

// Parses and checks a request body. Throws ApiException (400) for anything wrong.
ApiRequest parse_request(Endpoint endpoint, const std::string& body);

// Default max_tokens of /v1/completions when the client gives none (OpenAI's default).
inline constexpr int64_t k_default_completion_max_tokens = 16;

// What the replica produced for one request, accumulated from its events.
struct Completion {
  std::string text;
  std::vector<pb::Token> tokens;  // with logprobs when they were asked for
  std::string finish_reason;      // stop | length
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

// Response bodies. `id` is "cmpl-..." or "chatcmpl-..."; `created` in Unix seconds.
nlohmann::json completion_response(const ApiRequest& r, const std::string& id, int64_t created,
                                   const std::string& model, const Completion& c);
// One streamed chunk carrying `text` and `tokens` (their logprobs when asked for), and the
// finish reason on the last one (empty: none yet).
nlohmann::json stream_chunk(const ApiRequest& r, const std::string& id, int64_t created,
                            const std::string& model, const std::string& text,
                            const std::vector<pb::Token>& tokens, const std::string& finish_reason);
// The chat stream's first chunk (the assistant role, empty content).
nlohmann::json chat_role_chunk(const std::string& id, int64_t created, const std::string& model);
// The usage chunk sent at the end of a stream when stream_options.include_usage is set.
nlohmann::json usage_chunk(const ApiRequest& r, const std::string& id, int64_t created,
                           const std::string& model, int64_t prompt_tokens,
                           int64_t completion_tokens);

// GET /v1/models: one entry per served model name.
nlohmann::json models_response(const std::vector<std::pair<std::string, int64_t>>& models);

}  // namespace nosa::rpc
