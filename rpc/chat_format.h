// How a replica turns chat messages into a prompt. The loader does not run Jinja, so the
// checkpoint's tokenizer_config.json "chat_template" is recognised by its markers:
//   chatml  (<|im_start|>: MiniCPM4, the NOSA models, Qwen)  stop string <|im_end|>
//   llama3  (<|start_header_id|>)                            stop string <|eot_id|>
// and anything else (or no template) uses the documented plain default of
// runtime/chat_template.h (<|role|> header lines), whose role headers are stop strings.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "runtime/chat_template.h"

namespace nosa::rpc {

class ChatFormat {
 public:
  // The format for a checkpoint directory (see above).
  static ChatFormat for_model(const std::filesystem::path& model_dir);
  // A format by name: default, chatml or llama3 (throws invalid_argument otherwise).
  static ChatFormat named(const std::string& name);

  const std::string& name() const { return name_; }
  // The prompt text: every message, then the header of the assistant's turn. BOS is not part of
  // it (tokenize it as a plain prompt: BOS first). Throws invalid_argument for no messages or an
  // unknown role.
  std::string render(const std::vector<runtime::ChatMessage>& messages) const;
  // Strings that end the assistant's turn (added to the request's own stop strings).
  const std::vector<std::string>& stop_strings() const { return stops_; }

 private:
  std::string name_ = "default";
  std::vector<std::string> stops_;
};

}  // namespace nosa::rpc
