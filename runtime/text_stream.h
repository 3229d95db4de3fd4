// Turns a request's generated token ids into text as they arrive: incremental detokenization,
// stop strings (the text ends before the first stop string), and holding back text that could
// still become a stop string, so that streamed text never has to be taken back.
#pragma once

#include <string>
#include <vector>

#include "runtime/tokenizer.h"

namespace nosa::runtime {

class TextStream {
 public:
  TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop_strings);

  // Adds a token; returns the text that became final. After a stop string appears, stopped()
  // is true and further tokens add nothing.
  std::string push(int32_t id);
  // At the end of generation: the held-back text (nothing if a stop string ended the text).
  std::string finish();
  bool stopped() const { return stopped_; }
  // All text emitted so far.
  const std::string& text() const { return text_; }

 private:
  StreamDecoder decoder_;
  std::vector<std::string> stops_;
  std::string pending_;  // decoded but not yet emitted
  std::string text_;
  bool stopped_ = false;
};

}  // namespace nosa::runtime
