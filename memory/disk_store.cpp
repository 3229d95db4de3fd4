#include "memory/disk_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::memory {

namespace fs = std::filesystem;

DiskStore::DiskStore(const fs::path& dir, size_t slot_bytes, int64_t capacity_slots,
                     int io_threads, size_t file_bytes)
    : dir_(dir), slot_bytes_(slot_bytes), capacity_(capacity_slots) {
  NOSA_CHECK(slot_bytes % 4096 == 0 && slot_bytes > 0, "disk slots must be 4 KiB multiples");
  NOSA_CHECK(capacity_slots > 0, "the disk KV budget holds no block");
  std::error_code ec;
  fs::create_directories(dir, ec);
  NOSA_CHECK_CODE(fs::is_directory(dir), ErrorCode::io, "--disk-kv-dir {}: cannot create: {}",
                  dir.string(), ec.message());
  slots_per_file_ = std::max<int64_t>(1, int64_t(file_bytes / slot_bytes));
  const int64_t n_files = (capacity_ + slots_per_file_ - 1) / slots_per_file_;
  for (int64_t f = 0; f < n_files; ++f) {
    fs::path p = dir / fmt::format("nosa-kv-{}-{:04d}.bin", ::getpid(), f);
    int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0600);
    if (fd < 0 && errno == EINVAL) {  // the file system does not do O_DIRECT (tmpfs)
      direct_ = false;
      fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    }
    NOSA_CHECK_CODE(fd >= 0, ErrorCode::io, "{}: cannot create: {}", p.string(),
                    std::strerror(errno));
    fds_.push_back(fd);
  }
  if (!direct_) logger("memory")->warn("{}: no O_DIRECT on this file system; using plain I/O",
                                       dir.string());
  for (int i = 0; i < std::max(1, io_threads); ++i) threads_.emplace_back([this] { worker(); });
}

DiskStore::~DiskStore() {
  {
    std::unique_lock lock(mutex_);
    finished_.wait(lock, [&] { return pending_ == 0; });
    stop_ = true;
  }
  queued_.notify_all();
  for (auto& t : threads_) t.join();
  for (size_t f = 0; f < fds_.size(); ++f) {
    ::close(fds_[f]);
    std::error_code ec;
    fs::remove(dir_ / fmt::format("nosa-kv-{}-{:04d}.bin", ::getpid(), f), ec);
  }
}

void DiskStore::inject_faults(std::function<bool(bool, int64_t)> fail) {
  std::lock_guard lock(mutex_);
  fault_ = std::move(fail);
}

DiskStore::Ticket DiskStore::submit(bool write, int64_t slot, void* buffer) {
  NOSA_ASSERT(slot >= 0 && slot < capacity_, "disk slot {} out of range", slot);
  NOSA_ASSERT(reinterpret_cast<uintptr_t>(buffer) % 4096 == 0, "unaligned disk I/O buffer");
  std::lock_guard lock(mutex_);
  Ticket t = next_++;
  queue_.push_back({t, write, slot, buffer});
  ++pending_;
  queued_.notify_one();
  return t;
}

DiskStore::Ticket DiskStore::write(int64_t slot, const void* src) {
  return submit(true, slot, const_cast<void*>(src));
}

DiskStore::Ticket DiskStore::read(int64_t slot, void* dst) { return submit(false, slot, dst); }

int DiskStore::file_for(int64_t slot, int64_t& offset) {
  offset = (slot % slots_per_file_) * int64_t(slot_bytes_);
  return fds_[slot / slots_per_file_];
}

void DiskStore::run(const Op& op) {
  std::function<bool(bool, int64_t)> fault;
  {
    std::lock_guard lock(mutex_);
    fault = fault_;
  }
  const std::string file =
      (dir_ / fmt::format("nosa-kv-{}-{:04d}.bin", ::getpid(), op.slot / slots_per_file_))
          .string();
  if (fault && fault(op.write, op.slot))
    NOSA_FAIL(ErrorCode::io, "{}: injected {} error at block slot {}", file,
              op.write ? "write" : "read", op.slot);
  int64_t offset;
  int fd = file_for(op.slot, offset);
  size_t done = 0;
  char* buf = static_cast<char*>(op.buffer);
  while (done < slot_bytes_) {
    ssize_t n = op.write ? ::pwrite(fd, buf + done, slot_bytes_ - done, offset + off_t(done))
                         : ::pread(fd, buf + done, slot_bytes_ - done, offset + off_t(done));
    if (n < 0 && errno == EINTR) continue;
    NOSA_CHECK_CODE(n > 0, ErrorCode::io, "{}: {} of block slot {} failed: {}", file,
                    op.write ? "write" : "read", op.slot,
                    n < 0 ? std::strerror(errno) : "unexpected end of file");
    done += size_t(n);
  }
}

void DiskStore::worker() {
  for (;;) {
    Op op;
    {
      std::unique_lock lock(mutex_);
      queued_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      op = queue_.front();
      queue_.pop_front();
    }
    std::exception_ptr error;
    try {
      run(op);
    } catch (...) {
      error = std::current_exception();
    }
    {
      std::lock_guard lock(mutex_);
      if (!error) (op.write ? bytes_written_ : bytes_read_) += int64_t(slot_bytes_);
      done_[op.ticket] = error;
      --pending_;
    }
    finished_.notify_all();
  }
}

void DiskStore::wait(Ticket ticket) {
  std::unique_lock lock(mutex_);
  finished_.wait(lock, [&] { return done_.count(ticket) != 0; });
  std::exception_ptr error = done_[ticket];
  done_.erase(ticket);
  lock.unlock();
  if (error) std::rethrow_exception(error);
}

void DiskStore::wait_all() {
  std::unique_lock lock(mutex_);
  finished_.wait(lock, [&] { return pending_ == 0; });
}

}  // namespace nosa::memory
