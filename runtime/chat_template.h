// Chat messages -> one prompt string, for checkpoints that ship no chat template of their own
// (random test checkpoints; the loader does not run Jinja templates). The format is plain text:
//
//   <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}\n ... <|assistant|>\n
//
// one header line per message naming its role, the content, a newline; then the header of the
// assistant turn to generate. The BOS token is not part of the text: tokenize it the way a plain
// prompt is tokenized (BOS first).
#pragma once

#include <string>
#include <vector>

namespace nosa::runtime {

struct ChatMessage {
  std::string role;  // system, user, assistant or tool
  std::string content;
};

// The roles apply_chat_template accepts.
bool is_chat_role(const std::string& role);

// Renders the messages and the generation prompt. Throws invalid_argument for an empty list or
// an unknown role.
std::string apply_chat_template(const std::vector<ChatMessage>& messages);

}  // namespace nosa::runtime
