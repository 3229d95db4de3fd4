#include "runtime/chat_template.h"

#include "runtime/core/error.h"

namespace nosa::runtime {

bool is_chat_role(const std::string& role) {
  return role == "system" || role == "user" || role == "assistant" || role == "tool";
}

std::string apply_chat_template(const std::vector<ChatMessage>& messages) {
  NOSA_CHECK(!messages.empty(), "the chat has no messages");
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    NOSA_CHECK(is_chat_role(m.role),
               "message {} has role '{}' (use system, user, assistant or tool)", i, m.role);
    out += "<|" + m.role + "|>\n" + m.content + "\n";
  }
  out += "<|assistant|>\n";
  return out;
}

}  // namespace nosa::runtime
