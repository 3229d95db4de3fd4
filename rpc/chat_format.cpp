#include "rpc/chat_format.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::rpc {

ChatFormat ChatFormat::named(const std::string& name) {
  ChatFormat f;
  f.name_ = name;
  if (name == "chatml") {
    f.stops_ = {"<|im_end|>"};
  } else if (name == "llama3") {
    f.stops_ = {"<|eot_id|>"};
  } else if (name == "default") {
    f.stops_ = {"<|user|>", "<|system|>", "<|tool|>"};
  } else {
    NOSA_FAIL(ErrorCode::invalid_argument,
              "unknown chat format '{}' (use default, chatml or llama3)", name);
  }
  return f;
}

ChatFormat ChatFormat::for_model(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "tokenizer_config.json";
  std::ifstream in(path);
  if (!in) return named("default");
  std::string tmpl;
  try {
    auto j = nlohmann::json::parse(in);
    if (j.contains("chat_template") && j["chat_template"].is_string())
      tmpl = j["chat_template"].get<std::string>();
  } catch (const std::exception& e) {
    logger("rpc")->warn("{}: not valid JSON ({}); using the default chat format", path.string(),
                        e.what());
  }
  if (tmpl.find("<|im_start|>") != std::string::npos) return named("chatml");
  if (tmpl.find("<|start_header_id|>") != std::string::npos) return named("llama3");
  if (!tmpl.empty())
    logger("rpc")->warn(
        "{}: chat_template not recognised (chatml and llama3 are); using the "
        "default chat format",
        path.string());
  return named("default");
}

std::string ChatFormat::render(const std::vector<runtime::ChatMessage>& messages) const {
  if (name_ == "default") return runtime::apply_chat_template(messages);
  NOSA_CHECK(!messages.empty(), "the chat has no messages");
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    NOSA_CHECK(runtime::is_chat_role(m.role),
               "message {} has role '{}' (use system, user, assistant or tool)", i, m.role);
    if (name_ == "chatml")
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    else
      out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + m.content + "<|eot_id|>";
  }
  out += name_ == "chatml" ? "<|im_start|>assistant\n"
                           : "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

}  // namespace nosa::rpc
