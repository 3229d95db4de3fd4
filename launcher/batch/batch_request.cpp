#include "launcher/batch/batch_request.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "runtime/chat_template.h"
#include "runtime/core/error.h"

namespace nosa::launcher::batch {

namespace {

using nlohmann::json;

constexpr size_t k_max_stop_strings = 16;
constexpr int k_max_logprobs = 20;

// The request fields a line (or its "body") may carry.
const std::set<std::string>& request_fields() {
  static const std::set<std::string> fields = {
      "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
      "seed", "stop", "logprobs", "top_logprobs", "ignore_eos",
      // OpenAI fields that are accepted and ignored (or must hold their neutral value).
      "model", "user", "metadata", "n", "stream", "frequency_penalty", "presence_penalty"};
  return fields;
}

// Fields of the line around a request: its id and the OpenAI batch envelope.
bool is_envelope_field(const std::string& name) {
  return name == "id" || name == "custom_id" || name == "body" || name == "method" || name == "url";
}

// Thrown (and caught in parse_line) for a line that breaks a rule.
struct LineError {
  std::string message;
};

template <typename... Args>
[[noreturn]] void reject(fmt::format_string<Args...> format, Args&&... args) {
  throw LineError{fmt::format(format, std::forward<Args>(args)...)};
}

int64_t get_int(const json& v, const char* name, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) reject("\"{}\" must be an integer, got {}", name, v.dump());
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(hi))
    reject("\"{}\" must be between {} and {}, got {}", name, lo, hi, v.dump());
  int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) reject("\"{}\" must be between {} and {}, got {}", name, lo, hi, x);
  return x;
}

double get_number(const json& v, const char* name) {
  if (!v.is_number()) reject("\"{}\" must be a number, got {}", name, v.dump());
  double x = v.get<double>();
  if (!std::isfinite(x)) reject("\"{}\" must be finite", name);
  return x;
}

// 64-bit FNV-1a, then a splitmix64 finaliser: stable across platforms and runs.
uint64_t mix_seed(uint64_t seed, const std::string& key) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : key) h = (h ^ c) * 1099511628211ull;
  uint64_t z = h ^ (seed + 0x9e3779b97f4a7c15ull + (seed << 6) + (seed >> 2));
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::string message_content(const json& content, size_t index) {
  if (content.is_string()) return content.get<std::string>();
  if (content.is_null()) return "";
  if (content.is_array()) {  // OpenAI content parts: [{"type": "text", "text": "..."}]
    std::string out;
    for (const json& part : content) {
      if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
          !part["text"].is_string())
        reject("message {}: only text content parts are supported", index);
      out += part["text"].get<std::string>();
    }
    return out;
  }
  reject("message {}: \"content\" must be a string or a list of text parts", index);
}

std::vector<runtime::ChatMessage> parse_messages(const json& messages) {
  if (!messages.is_array() || messages.empty())
    reject("\"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects");
  std::vector<runtime::ChatMessage> chat;
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      reject("message {} must be an object with a string \"role\"", i);
    runtime::ChatMessage cm;
    cm.role = m["role"].get<std::string>();
    if (!runtime::is_chat_role(cm.role))
      reject("message {} has role \"{}\" (use system, user, assistant or tool)", i, cm.role);
    cm.content = message_content(m.contains("content") ? m["content"] : json(), i);
    chat.push_back(std::move(cm));
  }
  return chat;
}

void parse_request(const json& r, const RequestDefaults& d, BatchRequest& out) {
  for (auto it = r.begin(); it != r.end(); ++it)
    if (!request_fields().count(it.key()) && !is_envelope_field(it.key()))
      reject("unknown field \"{}\"", it.key());
  const bool has_prompt = r.contains("prompt"), has_messages = r.contains("messages");
  if (has_prompt == has_messages) reject("give exactly one of \"prompt\" or \"messages\"");
  if (has_prompt) {
    const json& p = r["prompt"];
    if (p.is_string()) {
      out.text = p.get<std::string>();
      if (out.text->empty()) reject("\"prompt\" is empty");
    } else if (p.is_array() && !p.empty() && p[0].is_number()) {
      for (const json& t : p) {
        if (!t.is_number_integer()) reject("\"prompt\" token ids must be integers");
        if (t.is_number_unsigned() ? t.get<uint64_t>() > uint64_t(INT32_MAX)
                                   : t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
          reject("prompt token id {} is outside the vocabulary", t.dump());
        out.prompt_ids.push_back(int32_t(t.get<int64_t>()));
      }
    } else if (p.is_array() && p.empty()) {
      reject("\"prompt\" is empty");
    } else {
      reject("\"prompt\" must be a string or a list of token ids (one prompt per line)");
    }
  } else {
    out.messages = parse_messages(r["messages"]);
  }

  out.max_tokens = d.max_tokens;
  if (r.contains("max_tokens") && r.contains("max_completion_tokens"))
    reject("give one of \"max_tokens\" or \"max_completion_tokens\"");
  for (const char* name : {"max_tokens", "max_completion_tokens"})
    if (r.contains(name)) out.max_tokens = get_int(r[name], name, 1, INT32_MAX);

  out.sampling.temperature = d.temperature;
  out.sampling.top_p = d.top_p;
  out.sampling.top_k = d.top_k;
  if (r.contains("temperature")) {
    double t = get_number(r["temperature"], "temperature");
    if (t < 0) reject("\"temperature\" must be >= 0, got {}", t);
    out.sampling.temperature = float(t);
  }
  if (r.contains("top_p")) {
    double p = get_number(r["top_p"], "top_p");
    if (!(p > 0 && p <= 1)) reject("\"top_p\" must be in (0, 1], got {}", p);
    out.sampling.top_p = float(p);
  }
  if (r.contains("top_k")) out.sampling.top_k = int(get_int(r["top_k"], "top_k", 0, INT32_MAX));
  if (r.contains("seed")) {
    const json& s = r["seed"];
    if (!s.is_number_integer()) reject("\"seed\" must be an integer, got {}", s.dump());
    out.sampling.seed = s.is_number_unsigned() ? s.get<uint64_t>() : uint64_t(s.get<int64_t>());
  } else {
    out.sampling.seed = mix_seed(d.seed, out.key);
  }

  out.stop = d.stop;
  if (r.contains("stop")) {
    const json& s = r["stop"];
    out.stop.clear();
    if (s.is_string()) {
      out.stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      for (const json& x : s) {
        if (!x.is_string()) reject("\"stop\" must be a string or a list of strings");
        out.stop.push_back(x.get<std::string>());
      }
    } else if (!s.is_null()) {
      reject("\"stop\" must be a string or a list of strings");
    }
    if (out.stop.size() > k_max_stop_strings)
      reject("\"stop\" has {} strings (at most {})", out.stop.size(), k_max_stop_strings);
    for (const auto& x : out.stop)
      if (x.empty()) reject("\"stop\" strings must not be empty");
  }

  out.logprobs = d.logprobs;
  if (r.contains("logprobs")) {
    const json& l = r["logprobs"];
    if (l.is_boolean()) {
      out.logprobs = l.get<bool>() ? 0 : -1;
    } else if (l.is_null()) {
      out.logprobs = -1;
    } else {
      out.logprobs = int(get_int(l, "logprobs", 0, k_max_logprobs));
    }
  }
  if (r.contains("top_logprobs")) {
    int n = int(get_int(r["top_logprobs"], "top_logprobs", 0, k_max_logprobs));
    if (out.logprobs < 0) reject("\"top_logprobs\" needs \"logprobs\": true");
    out.logprobs = n;
  }
  out.sampling.logprobs = std::max(0, out.logprobs);

  out.ignore_eos = d.ignore_eos;
  if (r.contains("ignore_eos")) {
    if (!r["ignore_eos"].is_boolean()) reject("\"ignore_eos\" must be true or false");
    out.ignore_eos = r["ignore_eos"].get<bool>();
  }

  if (r.contains("n") && !(r["n"].is_number_integer() && r["n"].get<int64_t>() == 1))
    reject("\"n\" must be 1 (one completion per line)");
  if (r.contains("stream") && !(r["stream"].is_boolean() && !r["stream"].get<bool>()))
    reject("\"stream\" must be false in a batch");
  for (const char* name : {"frequency_penalty", "presence_penalty"})
    if (r.contains(name) && !(r[name].is_number() && r[name].get<double>() == 0.0))
      reject("\"{}\" is not supported (it must be 0)", name);
}

}  // namespace

std::string id_key(const json& id) { return id.dump(); }

ParsedLine parse_line(std::string_view text, int64_t line_no, const RequestDefaults& d) {
  ParsedLine p;
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Say where the JSON breaks.
    try {
      json unused = json::parse(text.begin(), text.end());
      (void)unused;
      p.error = "malformed JSON";
    } catch (const json::parse_error& e) {
      p.error = fmt::format("malformed JSON: {}", e.what());
    }
    return p;
  }
  if (!j.is_object()) {
    p.error = "the line must be a JSON object";
    return p;
  }
  try {
    const bool has_id = j.contains("id"), has_custom = j.contains("custom_id");
    if (!has_id && !has_custom) reject("the line has no \"id\" (or \"custom_id\")");
    if (has_id && has_custom && j["id"] != j["custom_id"])
      reject("\"id\" and \"custom_id\" differ: give one of them");
    const json& id = has_custom ? j["custom_id"] : j["id"];
    if (!(id.is_string() && !id.get<std::string>().empty()) && !id.is_number_integer())
      reject("the id must be a non-empty string or an integer, got {}", id.dump());
    p.has_id = true;
    p.id = id;
    p.key = id_key(id);
    p.request.id = id;
    p.request.key = p.key;
    p.request.line = line_no;

    if (j.contains("body")) {
      const json& body = j["body"];
      if (!body.is_object()) reject("\"body\" must be an object");
      for (auto it = j.begin(); it != j.end(); ++it)
        if (!is_envelope_field(it.key()))
          reject("field \"{}\" must be inside \"body\" (or drop \"body\")", it.key());
      if (j.contains("url")) {
        const json& url = j["url"];
        if (!url.is_string() || (url != "/v1/completions" && url != "/v1/chat/completions"))
          reject("\"url\" must be \"/v1/completions\" or \"/v1/chat/completions\"");
      }
      for (auto it = body.begin(); it != body.end(); ++it)
        if (is_envelope_field(it.key())) reject("\"body\" must not contain \"{}\"", it.key());
      parse_request(body, d, p.request);
    } else {
      for (const char* name : {"method", "url"})
        if (j.contains(name)) reject("\"{}\" belongs with \"body\" (the OpenAI batch shape)", name);
      parse_request(j, d, p.request);
    }
  } catch (const LineError& e) {
    p.error = e.message;
  } catch (const Error& e) {
    p.error = e.message();
  } catch (const std::exception& e) {
    p.error = e.what();
  }
  return p;
}

std::string prepare_prompt(BatchRequest& r, const runtime::Tokenizer* tok,
                           const PromptLimits& limits, const ChatPrompts* chat) {
  if (tok == nullptr) {
    if (r.text || !r.messages.empty())
      return "the model has no tokenizer.model: give the prompt as token ids";
    if (!r.stop.empty()) return "stop strings need a tokenizer, and the model has none";
  }
  if (!r.messages.empty()) {
    try {
      r.text = chat && chat->render ? chat->render(r.messages)
                                    : runtime::apply_chat_template(r.messages);
    } catch (const Error& e) {
      return e.message();
    }
    r.messages.clear();
    if (chat)
      for (const auto& s : chat->stop_strings)
        if (std::find(r.stop.begin(), r.stop.end(), s) == r.stop.end()) r.stop.push_back(s);
  }
  if (r.text) {
    r.prompt_ids = tok->encode(*r.text);
    if (tok->bos_id() >= 0) r.prompt_ids.insert(r.prompt_ids.begin(), tok->bos_id());
    r.text.reset();
    if (r.prompt_ids.empty()) return "the prompt tokenizes to nothing";
  }
  r.prompt_tokens = int64_t(r.prompt_ids.size());
  for (size_t i = 0; i < r.prompt_ids.size(); ++i)
    if (r.prompt_ids[i] < 0 || r.prompt_ids[i] >= limits.vocab_size)
      return fmt::format("prompt token {} (at index {}) is outside the vocabulary [0, {})",
                         r.prompt_ids[i], i, limits.vocab_size);
  if (int64_t(r.prompt_ids.size()) >= limits.max_context)
    return fmt::format(
        "the prompt has {} tokens; the context limit is {} (prompt plus at least one generated "
        "token)",
        r.prompt_ids.size(), limits.max_context);
  return "";
}

std::string result_line(const BatchRequest& r, const std::optional<std::string>& text,
                        const std::vector<runtime::SampledToken>& tokens,
                        const std::string& finish_reason) {
  json j;
  j["id"] = r.id;
  j["text"] = text ? json(*text) : json(nullptr);
  std::vector<int32_t> ids;
  ids.reserve(tokens.size());
  for (const auto& t : tokens) ids.push_back(t.token);
  j["token_ids"] = ids;
  j["finish_reason"] = finish_reason;
  j["usage"] = {{"prompt_tokens", r.prompt_tokens}, {"completion_tokens", tokens.size()}};
  if (r.logprobs >= 0) {
    json lp = json::array();
    for (const auto& t : tokens) {
      json top = json::array();
      for (const auto& [id, p] : t.top) top.push_back({{"token", id}, {"logprob", p}});
      lp.push_back({{"token", t.token}, {"logprob", t.logprob}, {"top", top}});
    }
    j["logprobs"] = std::move(lp);
  }
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string error_line(int64_t line_no, const json& id, const std::string& message) {
  json j;
  j["line"] = line_no;
  j["id"] = id;
  j["error"] = message;
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace nosa::launcher::batch
