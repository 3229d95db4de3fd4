#include "rpc/openai_api.h"

#include <fmt/format.h>

#include <cmath>
#include <set>

namespace nosa::rpc {

using json = nlohmann::json;

json ApiError::body() const {
  json e;
  e["message"] = message;
  e["type"] = type;
  e["param"] = param.empty() ? json(nullptr) : json(param);
  e["code"] = code.empty() ? json(nullptr) : json(code);
  return json{{"error", e}};
}

ApiError bad_request(std::string message, std::string param) {
  ApiError e;
  e.status = 400;
  e.message = std::move(message);
  e.param = std::move(param);
  return e;
}

ApiError not_found_path(const std::string& method, const std::string& path) {
  ApiError e;
  e.status = 404;
  e.message = fmt::format(
      "Invalid URL ({} {}): this server has POST /v1/completions, POST /v1/chat/completions, "
      "GET /v1/models, GET /health and GET /metrics",
      method, path);
  e.code = "unknown_url";
  return e;
}

ApiError model_not_found(const std::string& model) {
  ApiError e;
  e.status = 404;
  e.message =
      fmt::format("The model `{}` does not exist (GET /v1/models lists the served models)", model);
  e.param = "model";
  e.code = "model_not_found";
  return e;
}

ApiError server_error(int status, std::string message, std::string code) {
  ApiError e;
  e.status = status;
  e.type = status == 503   ? "service_unavailable"
           : status == 429 ? "rate_limit_error"
                           : "server_error";
  e.message = std::move(message);
  e.code = std::move(code);
  return e;
}

namespace {

[[noreturn]] void fail(std::string message, std::string param = {}) {
  throw ApiException(bad_request(std::move(message), std::move(param)));
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    case json::value_t::number_float:
      return "a number with a fraction";
    default:
      return "a number";
  }
}

// Integer fields accept JSON integers and integral numbers (16.0); anything else is a 400.
int64_t as_int(const json& v, const std::string& name) {
  if (v.is_number_integer()) {
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))
      fail(fmt::format("{} is too large", name), name);
    return v.get<int64_t>();
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e18) return int64_t(d);
  }
  fail(fmt::format("{} must be an integer, got {}", name, type_name(v)), name);
}

double as_number(const json& v, const std::string& name) {
  if (!v.is_number()) fail(fmt::format("{} must be a number, got {}", name, type_name(v)), name);
  const double d = v.get<double>();
  if (!std::isfinite(d)) fail(fmt::format("{} must be finite", name), name);
  return d;
}

bool as_bool(const json& v, const std::string& name) {
  if (!v.is_boolean()) fail(fmt::format("{} must be a boolean, got {}", name, type_name(v)), name);
  return v.get<bool>();
}

const std::string& as_string(const json& v, const std::string& name) {
  if (!v.is_string()) fail(fmt::format("{} must be a string, got {}", name, type_name(v)), name);
  return v.get_ref<const std::string&>();
}

std::vector<int32_t> as_token_ids(const json& v, const std::string& name) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < v.size(); ++i) {
    const json& x = v[i];
    const std::string item = fmt::format("{}[{}]", name, i);
    if (!x.is_number())
      fail(fmt::format("{} must be a token id (an integer), got {}", item, type_name(x)), name);
    const int64_t id = as_int(x, name);
    if (id < 0 || id > INT32_MAX) fail(fmt::format("{} = {} is not a token id", item, id), name);
    ids.push_back(int32_t(id));
  }
  return ids;
}

// The sampling and stopping fields both endpoints share. Returns false for a field it does not
// know.
bool parse_common(const std::string& key, const json& v, ApiRequest& r) {
  pb::Submit& s = r.submit;
  if (key == "model") {
    if (!v.is_null()) r.model = as_string(v, key);
  } else if (key == "temperature") {
    if (v.is_null()) return true;
    const double t = as_number(v, key);
    if (t < 0 || t > 2) fail(fmt::format("temperature must be between 0 and 2, got {}", t), key);
    s.set_temperature(float(t));
  } else if (key == "top_p") {
    if (v.is_null()) return true;
    const double p = as_number(v, key);
    if (!(p > 0 && p <= 1)) fail(fmt::format("top_p must be in (0, 1], got {}", p), key);
    s.set_top_p(float(p));
  } else if (key == "top_k") {
    if (v.is_null()) return true;
    const int64_t k = as_int(v, key);
    if (k < -1 || k > INT32_MAX)
      fail(fmt::format("top_k must be -1, 0 (all) or positive, got {}", k), key);
    s.set_top_k(int32_t(std::max<int64_t>(0, k)));
  } else if (key == "seed") {
    if (v.is_null()) return true;
    s.set_seed(uint64_t(as_int(v, key)));
  } else if (key == "stop") {
    if (v.is_null()) return true;
    if (v.is_string()) {
      if (!v.get_ref<const std::string&>().empty()) s.add_stop(v.get<std::string>());
    } else if (v.is_array()) {
      if (v.size() > 16) fail("stop takes at most 16 strings", key);
      for (size_t i = 0; i < v.size(); ++i) {
        const std::string stop = as_string(v[i], fmt::format("stop[{}]", i));
        if (!stop.empty()) s.add_stop(stop);
      }
    } else {
      fail(fmt::format("stop must be a string or an array of strings, got {}", type_name(v)), key);
    }
  } else if (key == "stop_token_ids") {
    if (v.is_null()) return true;
    if (!v.is_array()) fail("stop_token_ids must be an array of token ids", key);
    for (int32_t id : as_token_ids(v, key)) s.add_stop_token_ids(id);
  } else if (key == "ignore_eos") {
    if (!v.is_null()) s.set_ignore_eos(as_bool(v, key));
  } else if (key == "stream") {
    if (!v.is_null()) r.stream = as_bool(v, key);
  } else if (key == "stream_options") {
    if (v.is_null()) return true;
    if (!v.is_object()) fail("stream_options must be an object", key);
    for (auto& [k, x] : v.items()) {
      if (k != "include_usage")
        fail(fmt::format("Unrecognized request argument supplied: stream_options.{}", k), key);
      if (!x.is_null()) r.include_usage = as_bool(x, "stream_options.include_usage");
    }
  } else if (key == "n") {
    if (!v.is_null() && as_int(v, key) != 1) fail("only n = 1 is supported", key);
  } else if (key == "presence_penalty" || key == "frequency_penalty") {
    if (!v.is_null() && as_number(v, key) != 0.0)
      fail(fmt::format("{} is not supported (only 0)", key), key);
  } else if (key == "logit_bias") {
    if (v.is_null()) return true;
    if (!v.is_object()) fail("logit_bias must be an object", key);
    if (!v.empty()) fail("logit_bias is not supported", key);
  } else if (key == "user") {
    if (!v.is_null()) as_string(v, key);
  } else {
    return false;
  }
  return true;
}

void parse_prompt(const json& v, ApiRequest& r) {
  pb::Submit& s = r.submit;
  const std::string key = "prompt";
  if (v.is_string()) {
    s.set_text(v.get<std::string>());
    return;
  }
  if (!v.is_array())
    fail(fmt::format("prompt must be a string, an array of token ids, or a list of one of "
                     "those; got {}",
                     type_name(v)),
         key);
  if (v.empty()) fail("prompt is empty", key);
  if (v[0].is_string() || v[0].is_array()) {
    if (v.size() != 1)
      fail(fmt::format("prompt holds {} prompts; this server takes one prompt per request",
                       v.size()),
           key);
    parse_prompt(v[0], r);
    return;
  }
  std::vector<int32_t> ids = as_token_ids(v, key);
  auto* t = s.mutable_token_ids();
  for (int32_t id : ids) t->add_ids(id);
}

std::string message_content(const json& v, const std::string& where) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return {};
  if (!v.is_array())
    fail(fmt::format("{}.content must be a string or an array of text parts, got {}", where,
                     type_name(v)),
         "messages");
  std::string text;
  for (size_t i = 0; i < v.size(); ++i) {
    const json& part = v[i];
    const std::string pw = fmt::format("{}.content[{}]", where, i);
    if (!part.is_object() || !part.contains("type"))
      fail(fmt::format("{} must be an object with a \"type\"", pw), "messages");
    const std::string type = as_string(part["type"], pw + ".type");
    if (type != "text")
      fail(fmt::format("{}: content parts of type '{}' are not supported (only text)", pw, type),
           "messages");
    if (!part.contains("text")) fail(fmt::format("{} has no \"text\"", pw), "messages");
    text += as_string(part["text"], pw + ".text");
  }
  return text;
}

void parse_messages(const json& v, ApiRequest& r) {
  if (!v.is_array())
    fail(fmt::format("messages must be an array, got {}", type_name(v)), "messages");
  if (v.empty()) fail("messages is empty", "messages");
  auto* chat = r.submit.mutable_chat();
  for (size_t i = 0; i < v.size(); ++i) {
    const json& m = v[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!m.is_object()) fail(fmt::format("{} must be an object", where), "messages");
    if (!m.contains("role")) fail(fmt::format("{} has no role", where), "messages");
    std::string role = as_string(m["role"], where + ".role");
    if (role == "developer") role = "system";
    static const std::set<std::string> roles = {"system", "user", "assistant", "tool"};
    if (!roles.count(role))
      fail(fmt::format("{}.role '{}' is not one of system, developer, user, assistant, tool", where,
                       role),
           "messages");
    for (auto& [k, x] : m.items()) {
      if (k == "role" || k == "content" || k == "name" || k == "tool_call_id") continue;
      if (k == "tool_calls" || k == "function_call") {
        if (x.is_null() || (x.is_array() && x.empty())) continue;
        fail(fmt::format("{}.{}: tool calls are not supported", where, k), "messages");
      }
      if (k == "refusal" && x.is_null()) continue;
      fail(fmt::format("Unrecognized field in {}: {}", where, k), "messages");
    }
    if (!m.contains("content") && role != "assistant")
      fail(fmt::format("{} has no content", where), "messages");
    auto* out = chat->add_messages();
    out->set_role(role);
    out->set_content(m.contains("content") ? message_content(m["content"], where) : "");
  }
}

}  // namespace

ApiRequest parse_request(Endpoint endpoint, const std::string& body) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) {
    fail(
        fmt::format("We could not parse the JSON body of your request: {}. (The body must be a "
                    "JSON object with Content-Type: application/json.)",
                    e.what()));
  }
  if (!j.is_object())
    fail(fmt::format("The request body must be a JSON object, got {}", type_name(j)));

  ApiRequest r;
  r.endpoint = endpoint;
  pb::Submit& s = r.submit;
  s.set_temperature(1.0f);  // OpenAI's default
  s.set_top_p(1.0f);
  s.set_logprobs(-1);
  bool have_prompt = false;
  int64_t max_tokens = -1;
  bool chat_logprobs = false;
  int64_t top_logprobs = -1;

  for (auto& [key, v] : j.items()) {
    if (parse_common(key, v, r)) continue;
    if (endpoint == Endpoint::completions) {
      if (key == "prompt") {
        parse_prompt(v, r);
        have_prompt = true;
      } else if (key == "max_tokens") {
        if (!v.is_null()) max_tokens = as_int(v, key), r.max_tokens_given = true;
      } else if (key == "logprobs") {
        if (v.is_null()) continue;
        const int64_t n = as_int(v, key);
        if (n < 0 || n > 20) fail(fmt::format("logprobs must be between 0 and 20, got {}", n), key);
        s.set_logprobs(int32_t(n));
      } else if (key == "echo") {
        if (!v.is_null() && as_bool(v, key)) fail("echo is not supported", key);
      } else if (key == "best_of") {
        if (!v.is_null() && as_int(v, key) != 1) fail("only best_of = 1 is supported", key);
      } else if (key == "suffix") {
        if (!v.is_null()) fail("suffix is not supported", key);
      } else {
        fail(fmt::format("Unrecognized request argument supplied: {}", key), key);
      }
    } else {
      if (key == "messages") {
        parse_messages(v, r);
        have_prompt = true;
      } else if (key == "max_tokens" || key == "max_completion_tokens") {
        if (!v.is_null()) max_tokens = as_int(v, key), r.max_tokens_given = true;
      } else if (key == "logprobs") {
        if (!v.is_null()) chat_logprobs = as_bool(v, key);
      } else if (key == "top_logprobs") {
        if (v.is_null()) continue;
        top_logprobs = as_int(v, key);
        if (top_logprobs < 0 || top_logprobs > 20)
          fail(fmt::format("top_logprobs must be between 0 and 20, got {}", top_logprobs), key);
      } else if (key == "response_format") {
        if (v.is_null()) continue;
        if (!v.is_object() || !v.contains("type") || v["type"] != "text")
          fail("response_format: only {\"type\": \"text\"} is supported", key);
      } else if (key == "tools" || key == "functions") {
        if (!v.is_null() && !(v.is_array() && v.empty()))
          fail(fmt::format("{} (tool calling) is not supported", key), key);
      } else if (key == "tool_choice" || key == "function_call") {
        if (!v.is_null() && v != "none" && v != "auto")
          fail(fmt::format("{} is not supported", key), key);
      } else if (key == "parallel_tool_calls" || key == "store" || key == "metadata") {
        continue;  // meaningless without tools or storage; accepted as OpenAI's clients send them
      } else {
        fail(fmt::format("Unrecognized request argument supplied: {}", key), key);
      }
    }
  }

  if (!have_prompt) {
    if (endpoint == Endpoint::completions) fail("you must provide a prompt", "prompt");
    fail("you must provide messages", "messages");
  }
  if (r.max_tokens_given) {
    if (max_tokens < 1)
      fail(fmt::format("max_tokens must be at least 1, got {}", max_tokens), "max_tokens");
    s.set_max_tokens(max_tokens);
  } else if (endpoint == Endpoint::completions) {
    s.set_max_tokens(k_default_completion_max_tokens);
  } else {
    s.set_max_tokens(0);  // up to the context limit
  }
  if (endpoint == Endpoint::chat_completions) {
    if (top_logprobs >= 0 && !chat_logprobs)
      fail("top_logprobs needs logprobs set to true", "top_logprobs");
    if (chat_logprobs) s.set_logprobs(int32_t(std::max<int64_t>(0, top_logprobs)));
  }
  if (r.include_usage && !r.stream)
    fail("stream_options is only allowed when stream is true", "stream_options");
  r.want_logprobs = s.logprobs() >= 0;
  return r;
}

namespace {

json bytes_array(const std::string& s) {
  json a = json::array();
  for (unsigned char c : s) a.push_back(int(c));
  return a;
}

json completion_logprobs(const std::vector<pb::Token>& tokens, size_t text_offset) {
  json l;
  json toks = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  size_t off = text_offset;
  for (const auto& t : tokens) {
    toks.push_back(t.text());
    lps.push_back(t.logprob());
    json top = json::object();
    for (const auto& a : t.top()) top[a.text()] = a.logprob();
    tops.push_back(top);
    offs.push_back(off);
    off += t.text().size();
  }
  l["tokens"] = toks;
  l["token_logprobs"] = lps;
  l["top_logprobs"] = tops;
  l["text_offset"] = offs;
  return l;
}

json chat_logprobs(const std::vector<pb::Token>& tokens) {
  json content = json::array();
  for (const auto& t : tokens) {
    json top = json::array();
    for (const auto& a : t.top())
      top.push_back(
          {{"token", a.text()}, {"logprob", a.logprob()}, {"bytes", bytes_array(a.text())}});
    content.push_back({{"token", t.text()},
                       {"logprob", t.logprob()},
                       {"bytes", bytes_array(t.text())},
                       {"top_logprobs", top}});
  }
  return json{{"content", content}, {"refusal", nullptr}};
}

json usage(int64_t prompt, int64_t completion) {
  return json{{"prompt_tokens", prompt},
              {"completion_tokens", completion},
              {"total_tokens", prompt + completion}};
}

}  // namespace

json completion_response(const ApiRequest& r, const std::string& id, int64_t created,
                         const std::string& model, const Completion& c) {
  json choice;
  choice["index"] = 0;
  if (r.endpoint == Endpoint::completions) {
    choice["text"] = c.text;
    choice["logprobs"] = r.want_logprobs ? completion_logprobs(c.tokens, 0) : json(nullptr);
  } else {
    choice["message"] = {{"role", "assistant"}, {"content", c.text}, {"refusal", nullptr}};
    choice["logprobs"] = r.want_logprobs ? chat_logprobs(c.tokens) : json(nullptr);
  }
  choice["finish_reason"] = c.finish_reason;
  json out;
  out["id"] = id;
  out["object"] = r.endpoint == Endpoint::completions ? "text_completion" : "chat.completion";
  out["created"] = created;
  out["model"] = model;
  out["choices"] = json::array({choice});
  out["usage"] = usage(c.prompt_tokens, c.completion_tokens);
  out["system_fingerprint"] = nullptr;
  return out;
}

json stream_chunk(const ApiRequest& r, const std::string& id, int64_t created,
                  const std::string& model, const std::string& text,
                  const std::vector<pb::Token>& tokens, const std::string& finish_reason) {
  json choice;
  choice["index"] = 0;
  const bool with_lp = r.want_logprobs && !tokens.empty();
  if (r.endpoint == Endpoint::completions) {
    choice["text"] = text;
    choice["logprobs"] = with_lp ? completion_logprobs(tokens, 0) : json(nullptr);
  } else {
    choice["delta"] =
        finish_reason.empty() || !text.empty() ? json{{"content", text}} : json::object();
    choice["logprobs"] = with_lp ? chat_logprobs(tokens) : json(nullptr);
  }
  choice["finish_reason"] = finish_reason.empty() ? json(nullptr) : json(finish_reason);
  json out;
  out["id"] = id;
  out["object"] = r.endpoint == Endpoint::completions ? "text_completion" : "chat.completion.chunk";
  out["created"] = created;
  out["model"] = model;
  out["choices"] = json::array({choice});
  if (r.include_usage) out["usage"] = nullptr;
  return out;
}

json chat_role_chunk(const std::string& id, int64_t created, const std::string& model) {
  json choice = {{"index", 0},
                 {"delta", {{"role", "assistant"}, {"content", ""}}},
                 {"logprobs", nullptr},
                 {"finish_reason", nullptr}};
  return json{{"id", id},
              {"object", "chat.completion.chunk"},
              {"created", created},
              {"model", model},
              {"choices", json::array({choice})}};
}

json usage_chunk(const ApiRequest& r, const std::string& id, int64_t created,
                 const std::string& model, int64_t prompt_tokens, int64_t completion_tokens) {
  return json{
      {"id", id},
      {"object", r.endpoint == Endpoint::completions ? "text_completion" : "chat.completion.chunk"},
      {"created", created},
      {"model", model},
      {"choices", json::array()},
      {"usage", usage(prompt_tokens, completion_tokens)}};
}

json models_response(const std::vector<std::pair<std::string, int64_t>>& models) {
  json data = json::array();
  for (auto& [name, created] : models)
    data.push_back({{"id", name}, {"object", "model"}, {"created", created}, {"owned_by", "nosa"}});
  return json{{"object", "list"}, {"data", data}};
}

}  // namespace nosa::rpc
