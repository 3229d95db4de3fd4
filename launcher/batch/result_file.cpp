#include "launcher/batch/result_file.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "launcher/batch/batch_request.h"
#include "runtime/core/error.h"

namespace nosa::launcher::batch {

namespace fs = std::filesystem;

namespace {

std::string errno_text() { return std::strerror(errno); }

// Holds flock(LOCK_EX) on a descriptor for its lifetime.
class FileLock {
 public:
  FileLock(int fd, const fs::path& path) : fd_(fd) {
    while (::flock(fd_, LOCK_EX) != 0) {
      NOSA_CHECK_CODE(errno == EINTR, ErrorCode::io, "{}: cannot lock: {}", path.string(),
                      errno_text());
    }
  }
  ~FileLock() { ::flock(fd_, LOCK_UN); }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_;
};

// An owned descriptor.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

int open_or_throw(const fs::path& path, int flags) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
  NOSA_CHECK_CODE(fd >= 0, ErrorCode::io, "{}: cannot open: {}", path.string(), errno_text());
  return fd;
}

}  // namespace

AppendFile::AppendFile(const fs::path& path)
    : path_(path), fd_(open_or_throw(path, O_WRONLY | O_APPEND | O_CREAT)) {}

AppendFile::~AppendFile() {
  if (fd_ >= 0) ::close(fd_);
}

void AppendFile::append(std::string_view line) {
  NOSA_ASSERT(line.find('\n') == std::string_view::npos, "a result line contains a newline");
  std::string buf;
  buf.reserve(line.size() + 1);
  buf.append(line);
  buf.push_back('\n');
  FileLock lock(fd_, path_);
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::write(fd_, buf.data() + done, buf.size() - done);
    if (n < 0 && errno == EINTR) continue;
    NOSA_CHECK_CODE(n > 0, ErrorCode::io, "{}: write failed: {}", path_.string(),
                    n < 0 ? errno_text() : std::string("no progress"));
    done += size_t(n);  // a short write (disk full) continues; the lock keeps the line whole
  }
}

int64_t drop_partial_tail(const fs::path& path) {
  if (!fs::exists(path)) return 0;
  Fd f{open_or_throw(path, O_RDWR)};
  FileLock lock(f.fd, path);
  struct stat st {};
  NOSA_CHECK_CODE(::fstat(f.fd, &st) == 0, ErrorCode::io, "{}: stat failed: {}", path.string(),
                  errno_text());
  const off_t size = st.st_size;
  if (size == 0) return 0;
  // Scan backwards for the last newline.
  std::vector<char> buf(64 * 1024);
  off_t end = size;
  off_t keep = 0;  // bytes to keep: up to and including the last newline
  bool found = false;
  while (end > 0 && !found) {
    const off_t begin = end > off_t(buf.size()) ? end - off_t(buf.size()) : 0;
    const size_t len = size_t(end - begin);
    ssize_t n = ::pread(f.fd, buf.data(), len, begin);
    NOSA_CHECK_CODE(n == ssize_t(len), ErrorCode::io, "{}: read failed: {}", path.string(),
                    errno_text());
    for (size_t i = len; i-- > 0;)
      if (buf[i] == '\n') {
        keep = begin + off_t(i) + 1;
        found = true;
        break;
      }
    end = begin;
  }
  if (keep == size) return 0;
  NOSA_CHECK_CODE(::ftruncate(f.fd, keep) == 0, ErrorCode::io, "{}: truncate failed: {}",
                  path.string(), errno_text());
  return int64_t(size - keep);
}

void truncate_file(const fs::path& path) {
  Fd f{open_or_throw(path, O_WRONLY | O_CREAT)};
  FileLock lock(f.fd, path);
  NOSA_CHECK_CODE(::ftruncate(f.fd, 0) == 0, ErrorCode::io, "{}: truncate failed: {}",
                  path.string(), errno_text());
}

ExistingResults read_existing_results(const fs::path& path) {
  ExistingResults r;
  if (!fs::exists(path)) return r;
  std::ifstream in(path, std::ios::binary);
  NOSA_CHECK_CODE(in.good(), ErrorCode::io, "{}: cannot read", path.string());
  std::string line;
  while (std::getline(in, line)) {
    if (in.eof()) {  // no newline after it: a cut-short line
      r.partial_tail_bytes = int64_t(line.size());
      break;
    }
    if (line.empty()) continue;
    ++r.lines;
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("id") ||
        !(j["id"].is_string() || j["id"].is_number_integer())) {
      ++r.bad_lines;
      continue;
    }
    r.keys.insert(id_key(j["id"]));
  }
  NOSA_CHECK_CODE(!in.bad(), ErrorCode::io, "{}: read failed", path.string());
  return r;
}

}  // namespace nosa::launcher::batch
