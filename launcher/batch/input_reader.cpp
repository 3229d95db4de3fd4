#include "launcher/batch/input_reader.h"

#include <fmt/format.h>

#include "runtime/core/error.h"

namespace nosa::launcher::batch {

namespace {

bool is_blank(const std::string& s) { return s.find_first_not_of(" \t\r\n") == std::string::npos; }

void strip_cr(std::string& s) {
  if (!s.empty() && s.back() == '\r') s.pop_back();
}

}  // namespace

InputReader::InputReader(const std::filesystem::path& path, InputShare share,
                         RequestDefaults defaults, std::unordered_set<std::string> done)
    : path_(path),
      in_(path, std::ios::binary),
      share_(share),
      defaults_(std::move(defaults)),
      done_(std::move(done)) {
  NOSA_CHECK_CODE(in_.good(), ErrorCode::io, "{}: cannot read the input file", path.string());
}

std::optional<InputItem> InputReader::next() {
  std::string text;
  while (!at_end_) {
    if (!std::getline(in_, text)) {
      NOSA_CHECK_CODE(!in_.bad(), ErrorCode::io, "{}: read failed", path_.string());
      at_end_ = true;
      break;
    }
    ++line_no_;
    strip_cr(text);
    if (is_blank(text)) continue;
    const bool owned = share_.owns(nonblank_++);
    ParsedLine p = parse_line(text, line_no_, defaults_);

    InputItem item;
    item.line = line_no_;
    if (p.has_id) {
      item.id = p.id;
      auto [it, fresh] = seen_.try_emplace(p.key, line_no_);
      if (!fresh) {
        if (!owned) continue;
        item.kind = InputItem::Kind::error;
        item.error =
            fmt::format("duplicate id {} (first on line {}): line skipped", p.key, it->second);
        return item;
      }
    }
    if (!owned) continue;
    if (!p.error.empty()) {
      item.kind = InputItem::Kind::error;
      item.error = std::move(p.error);
      return item;
    }
    if (done_.count(p.key)) {
      item.kind = InputItem::Kind::resumed;
      return item;
    }
    item.kind = InputItem::Kind::request;
    item.request = std::move(p.request);
    return item;
  }
  return std::nullopt;
}

int64_t count_owned_lines(const std::filesystem::path& path, InputShare share) {
  std::ifstream in(path, std::ios::binary);
  NOSA_CHECK_CODE(in.good(), ErrorCode::io, "{}: cannot read the input file", path.string());
  std::string text;
  int64_t nonblank = 0, owned = 0;
  while (std::getline(in, text)) {
    if (is_blank(text)) continue;
    if (share.owns(nonblank++)) ++owned;
  }
  NOSA_CHECK_CODE(!in.bad(), ErrorCode::io, "{}: read failed", path.string());
  return owned;
}

}  // namespace nosa::launcher::batch
