// One line of a `nosa batch` input file -> one generation request, with every rule a line must
// follow. A line is a JSON object:
//
//   {"id": "a1", "prompt": "text"}                       prompt text (BOS + tokens)
//   {"id": 7, "prompt": [1, 523, 88]}                    prompt token ids, used as given
//   {"custom_id": "a2", "messages": [{"role": "user", "content": "hi"}]}   chat (ChatPrompts)
//   {"custom_id": "a3", "method": "POST", "url": "/v1/chat/completions",
//    "body": {"model": "m", "messages": [...], "max_tokens": 32}}         OpenAI batch shape
//
// Optional per-line fields (also inside "body"): max_tokens (or max_completion_tokens),
// temperature, top_p, top_k, seed, stop (a string or a list), logprobs (true, false or the
// number of alternatives 0..20), top_logprobs, ignore_eos. Ignored when present: model, user,
// metadata, n (must be 1), stream (must be false), frequency_penalty and presence_penalty (must
// be 0). Any other field is an error, so that a misspelt parameter is never silently dropped.
//
// The id (a non-empty string or an integer) is the request's identity: a resumed job skips ids
// already in the output, and a second line with an id seen before is a duplicate.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/backend.h"
#include "runtime/chat_template.h"
#include "runtime/tokenizer.h"

namespace nosa::launcher::batch {

// Sampling defaults from the command line; a line's own fields override them.
struct RequestDefaults {
  int64_t max_tokens = 128;
  float temperature = 0.0f;
  float top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;  // mixed with each id when a line gives no seed (see BatchRequest::sampling)
  std::vector<std::string> stop;
  int logprobs = -1;  // -1: not reported; else alternatives per token
  bool ignore_eos = false;
};

// A valid line, before tokenization.
struct BatchRequest {
  nlohmann::json id;                           // as given (string or integer), echoed in the output
  std::string key;                             // id_key(id)
  int64_t line = 0;                            // 1-based line number in the input file
  std::optional<std::string> text;             // prompt text; empty for ids and messages
  std::vector<runtime::ChatMessage> messages;  // a chat, rendered by prepare_prompt
  std::vector<int32_t> prompt_ids;             // the prompt when given as token ids
  int64_t prompt_tokens = 0;  // set by prepare_prompt (prompt_ids may be moved out later)
  int64_t max_tokens = 0;
  // A line without "seed" samples with a seed derived from the --seed default and its id, so
  // that requests draw independent streams and a resumed job repeats the uninterrupted one.
  runtime::SamplingParams sampling;
  std::vector<std::string> stop;
  int logprobs = -1;  // -1: not reported
  bool ignore_eos = false;
};

// The outcome of reading one line. A line whose JSON object carries a valid id "claims" that id
// even when another field is wrong, so that duplicate detection depends on the JSON alone and
// every replica of a job agrees on it.
struct ParsedLine {
  bool has_id = false;
  nlohmann::json id;
  std::string key;
  std::string error;     // empty when `request` is valid
  BatchRequest request;  // valid when error is empty
};

// Parses one line (without its newline). Never throws.
ParsedLine parse_line(std::string_view text, int64_t line_no, const RequestDefaults& defaults);

// The identity of an id: its compact JSON ("\"a1\"", "7"), so that "7" and 7 differ.
std::string id_key(const nlohmann::json& id);

// The limits a prompt is checked against before it is queued.
struct PromptLimits {
  int64_t vocab_size = 0;
  int64_t max_context = 0;  // prompt tokens + 1 must fit
};

// How chat messages become prompt text, and the stop strings that end the assistant's turn (the
// service's format for the checkpoint, rpc::ChatFormat; by default runtime::apply_chat_template
// without stop strings).
struct ChatPrompts {
  std::function<std::string(const std::vector<runtime::ChatMessage>&)> render;
  std::vector<std::string> stop_strings;
};

// Fills request.prompt_ids (BOS + tokens) from the text or the rendered messages (then drops
// them; a chat also gets the format's stop strings) and request.prompt_tokens, and checks the
// prompt against the vocabulary and the context limit. Returns an error message, or "" when the
// request can be queued. `tokenizer` may be null (then text prompts, chats and stop strings are
// errors); `chat` may be null (the default format).
std::string prepare_prompt(BatchRequest& request, const runtime::Tokenizer* tokenizer,
                           const PromptLimits& limits, const ChatPrompts* chat = nullptr);

// A finished request as one output line (no newline):
//   {"id", "text", "token_ids", "finish_reason", "usage": {"prompt_tokens",
//    "completion_tokens"}, "logprobs": [{"token", "logprob", "top": [{"token", "logprob"}]}]}
// "text" is null without a tokenizer; "logprobs" only when the request asked for them. Invalid
// UTF-8 in the text is replaced (U+FFFD), so the line is always valid JSON.
std::string result_line(const BatchRequest& request, const std::optional<std::string>& text,
                        const std::vector<runtime::SampledToken>& tokens,
                        const std::string& finish_reason);

// A rejected line or failed request as one errors-file line (no newline):
//   {"line": N, "id": ID or null, "error": "message"}
std::string error_line(int64_t line_no, const nlohmann::json& id, const std::string& message);

}  // namespace nosa::launcher::batch
