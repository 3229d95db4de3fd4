// The files a `nosa batch` job appends to (results, errors), shared by every process of the job.
// Each line is written with one write() on an O_APPEND descriptor while holding an exclusive
// flock(), so lines of concurrent writers never interleave and a crash leaves at most the last
// line cut short; drop_partial_tail() removes such a line before a resumed job reads the file.
// The lock is advisory and local: every writer must go through AppendFile, and the file should
// live on a local file system (flock over NFS depends on the mount).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <unordered_set>

namespace nosa::launcher::batch {

class AppendFile {
 public:
  // Opens (creating it when missing) for appending; throws Error(io).
  explicit AppendFile(const std::filesystem::path& path);
  ~AppendFile();
  AppendFile(const AppendFile&) = delete;
  AppendFile& operator=(const AppendFile&) = delete;

  // Appends `line` and a newline as one write under the lock. The line must not contain a
  // newline. When this returns, the line is in the kernel's page cache: it survives the process
  // being killed (not a power loss). Throws Error(io).
  void append(std::string_view line);
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
};

// Under the file's lock, truncates a last line that has no newline (a writer died in the middle
// of it). Returns the bytes removed (0 when the file is whole or missing). Throws Error(io).
int64_t drop_partial_tail(const std::filesystem::path& path);

// Under the file's lock, empties the file (creating it when missing). Throws Error(io).
void truncate_file(const std::filesystem::path& path);

// The ids already in a results file (id_key of each line's "id").
struct ExistingResults {
  std::unordered_set<std::string> keys;
  int64_t lines = 0;               // complete lines read
  int64_t bad_lines = 0;           // lines that are not a JSON object with an id (ignored)
  int64_t partial_tail_bytes = 0;  // a last line without newline (ignored; see drop_partial_tail)
};
// Reads a results file (a missing file has no results). Throws Error(io).
ExistingResults read_existing_results(const std::filesystem::path& path);

}  // namespace nosa::launcher::batch
