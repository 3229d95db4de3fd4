#include "runtime/text_stream.h"

#include <algorithm>

namespace nosa::runtime {

TextStream::TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop_strings)
    : decoder_(tokenizer), stops_(std::move(stop_strings)) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

std::string TextStream::push(int32_t id) {
  if (stopped_) return "";
  pending_ += decoder_.push(id);
  // A complete stop string ends the text before it.
  size_t cut = std::string::npos;
  for (auto& s : stops_) cut = std::min(cut, pending_.find(s));
  if (cut != std::string::npos) {
    std::string out = pending_.substr(0, cut);
    pending_.clear();
    stopped_ = true;
    text_ += out;
    return out;
  }
  // Hold back the longest suffix that is a prefix of a stop string.
  size_t hold = 0;
  for (auto& s : stops_)
    for (size_t n = std::min(s.size() - 1, pending_.size()); n > hold; --n)
      if (pending_.compare(pending_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  text_ += out;
  return out;
}

std::string TextStream::finish() {
  if (stopped_) return "";
  pending_ += decoder_.flush();
  std::string out = std::move(pending_);
  pending_.clear();
  text_ += out;
  return out;
}

}  // namespace nosa::runtime
