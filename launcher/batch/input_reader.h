// Streams a `nosa batch` input file line by line and sorts each line into: a request this
// process should run, a line to report in the errors file, or a line already answered in the
// output (resume). Replicas of an mpirun job each read the whole file and take the non-blank
// lines whose index modulo the replica count is their own, so the shares are disjoint and cover
// the input; duplicate ids are found from the JSON alone, so every replica agrees on them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "launcher/batch/batch_request.h"

namespace nosa::launcher::batch {

struct InputItem {
  enum class Kind { request, error, resumed };
  Kind kind = Kind::request;
  int64_t line = 0;
  nlohmann::json id;     // null when the line has no usable id
  std::string error;     // kind == error
  BatchRequest request;  // kind == request
};

// Which share of the input this process takes.
struct InputShare {
  int index = 0, count = 1;
  bool owns(int64_t nonblank_index) const { return nonblank_index % count == index; }
};

class InputReader {
 public:
  // Throws Error(io) when the file cannot be read. `done` holds the id keys already in the
  // output (moved in; lookups only).
  InputReader(const std::filesystem::path& path, InputShare share, RequestDefaults defaults,
              std::unordered_set<std::string> done);

  // The next line of this process's share, or nothing at the end of the file.
  std::optional<InputItem> next();
  bool at_end() const { return at_end_; }

 private:
  std::filesystem::path path_;
  std::ifstream in_;
  InputShare share_;
  RequestDefaults defaults_;
  std::unordered_set<std::string> done_;
  std::unordered_map<std::string, int64_t> seen_;  // id key -> first line
  int64_t line_no_ = 0, nonblank_ = 0;
  bool at_end_ = false;
};

// Non-blank lines of the file that the share owns (for progress totals). Throws Error(io).
int64_t count_owned_lines(const std::filesystem::path& path, InputShare share);

}  // namespace nosa::launcher::batch
