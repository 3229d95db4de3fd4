#include "memory/disk_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#ifdef NOSA_HAVE_URING
#include <liburing.h>
#endif

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::memory {

namespace fs = std::filesystem;

#ifdef NOSA_HAVE_URING
struct DiskStore::Ring {
  static constexpr unsigned k_depth = 64;  // operations in flight (the completion queue holds 128)
  io_uring ring{};
  std::mutex mutex;  // the submission queue, `inflight` and `broken`
  std::condition_variable room;
  std::unordered_map<Ticket, Op> inflight;
  // Why the completion thread stopped (waiting for completions failed for good); empty while it
  // runs. Once set, every operation fails with it.
  std::string broken;
  std::thread completions;
};

// Whether a ring can be set up, knows plain reads and writes, and completes an operation: a
// kernel or sandbox may refuse io_uring at any of these steps, and the pool then does the I/O.
bool DiskStore::uring_available() {
  static const bool ok = [] {
    io_uring r;
    if (io_uring_queue_init(4, &r, 0) != 0) return false;
    bool good = false;
    if (io_uring_probe* probe = io_uring_get_probe_ring(&r)) {
      good = io_uring_opcode_supported(probe, IORING_OP_READ) &&
             io_uring_opcode_supported(probe, IORING_OP_WRITE);
      io_uring_free_probe(probe);
    }
    if (good) {
      io_uring_sqe* sqe = io_uring_get_sqe(&r);
      io_uring_prep_nop(sqe);
      io_uring_cqe* cqe = nullptr;
      __kernel_timespec wait{1, 0};
      good = io_uring_submit(&r) == 1 && io_uring_wait_cqe_timeout(&r, &cqe, &wait) == 0 &&
             cqe->res == 0;
      if (cqe) io_uring_cqe_seen(&r, cqe);
    }
    io_uring_queue_exit(&r);
    return good;
  }();
  return ok;
}
#else
struct DiskStore::Ring {};
bool DiskStore::uring_available() { return false; }
#endif

DiskStore::DiskStore(const fs::path& dir, size_t slot_bytes, int64_t capacity_slots,
                     int io_threads, size_t file_bytes, DiskIo io)
    : dir_(dir), slot_bytes_(slot_bytes), capacity_(capacity_slots) {
  NOSA_CHECK(slot_bytes % 4096 == 0 && slot_bytes > 0, "disk slots must be 4 KiB multiples");
  NOSA_CHECK(capacity_slots > 0, "the disk KV budget holds no block");
  // How to do the I/O is settled before any file exists, so that a refusal leaves nothing behind.
  if (const char* env = std::getenv("NOSA_DISK_IO")) {
    const std::string v = env;
    NOSA_CHECK(v == "auto" || v == "threads" || v == "uring",
               "NOSA_DISK_IO={}: use auto, threads or uring", v);
    // It chooses only where the caller left the choice open.
    if (io == DiskIo::automatic && v == "threads") io = DiskIo::threads;
    if (io == DiskIo::automatic && v == "uring") io = DiskIo::uring;
  }
  NOSA_CHECK_CODE(io != DiskIo::uring || uring_available(), ErrorCode::unavailable,
                  "io_uring is not usable here (this build has no liburing, or the kernel or "
                  "sandbox refuses it); use NOSA_DISK_IO=threads");
  std::error_code ec;
  fs::create_directories(dir, ec);
  NOSA_CHECK_CODE(fs::is_directory(dir), ErrorCode::io, "--disk-kv-dir {}: cannot create: {}",
                  dir.string(), ec.message());
  slots_per_file_ = std::max<int64_t>(1, int64_t(file_bytes / slot_bytes));
  const int64_t n_files = (capacity_ + slots_per_file_ - 1) / slots_per_file_;
  for (int64_t f = 0; f < n_files; ++f) {
    const fs::path p = file_path(f);
    int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0600);
    if (fd < 0 && errno == EINVAL) {  // the file system does not do O_DIRECT (tmpfs)
      direct_ = false;
      fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
      const std::string why = std::strerror(errno);
      for (size_t g = 0; g < fds_.size(); ++g) {  // the files made so far go again
        ::close(fds_[g]);
        fs::remove(file_path(int64_t(g)), ec);
      }
      NOSA_FAIL(ErrorCode::io, "{}: cannot create: {}", p.string(), why);
    }
    fds_.push_back(fd);
  }
  if (!direct_) logger("memory")->warn("{}: no O_DIRECT on this file system; using plain I/O",
                                       dir.string());
#ifdef NOSA_HAVE_URING
  if (io != DiskIo::threads) {
    auto ring = std::make_unique<Ring>();
    if (uring_available() && io_uring_queue_init(Ring::k_depth, &ring->ring, 0) == 0) {
      ring_ = std::move(ring);
      ring_->completions = std::thread([this] { reap(); });
    }
  }
#endif
  if (!ring_)
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
#ifdef NOSA_HAVE_URING
  if (ring_) {
    {  // a no-op with ticket 0 ends the completion thread, unless it has stopped on its own
      std::lock_guard lock(ring_->mutex);
      io_uring_sqe* sqe = ring_->broken.empty() ? io_uring_get_sqe(&ring_->ring) : nullptr;
      if (sqe) {
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data(sqe, nullptr);
        io_uring_submit(&ring_->ring);
      }
    }
    ring_->completions.join();
    io_uring_queue_exit(&ring_->ring);
  }
#endif
  for (size_t f = 0; f < fds_.size(); ++f) {
    ::close(fds_[f]);
    std::error_code ec;
    fs::remove(file_path(int64_t(f)), ec);
  }
}

void DiskStore::inject_faults(std::function<bool(bool, int64_t)> fail) {
  std::lock_guard lock(mutex_);
  fault_ = std::move(fail);
}

void DiskStore::inject_wait_faults(std::function<int(int)> result) {
  std::lock_guard lock(mutex_);
  wait_fault_ = std::move(result);
}

DiskStore::Ticket DiskStore::submit(bool write, int64_t slot, void* buffer) {
  NOSA_ASSERT(slot >= 0 && slot < capacity_, "disk slot {} out of range", slot);
  NOSA_ASSERT(reinterpret_cast<uintptr_t>(buffer) % 4096 == 0, "unaligned disk I/O buffer");
  Op op;
  {
    std::lock_guard lock(mutex_);
    op = Op{next_++, write, slot, buffer};
    ++pending_;
    if (!ring_) {
      queue_.push_back(op);
      queued_.notify_one();
      return op.ticket;
    }
  }
  if (!injected(op)) ring_submit(op);
  return op.ticket;
}

fs::path DiskStore::file_path(int64_t file) const {
  return dir_ / fmt::format("nosa-kv-{}-{:04d}.bin", ::getpid(), file);
}

std::string DiskStore::file_name(int64_t slot) const {
  return file_path(slot / slots_per_file_).string();
}

bool DiskStore::injected(const Op& op) {
  std::function<bool(bool, int64_t)> fault;
  {
    std::lock_guard lock(mutex_);
    fault = fault_;
  }
  if (!fault || !fault(op.write, op.slot)) return false;
  finish(op, std::make_exception_ptr(Error(
                 ErrorCode::io, fmt::format("{}: injected {} error at block slot {}",
                                            file_name(op.slot), op.write ? "write" : "read",
                                            op.slot))));
  return true;
}

void DiskStore::finish(const Op& op, std::exception_ptr error) {
  {
    std::lock_guard lock(mutex_);
    if (!error) (op.write ? bytes_written_ : bytes_read_) += int64_t(slot_bytes_);
    done_[op.ticket] = error;
    --pending_;
  }
  finished_.notify_all();
}

#ifdef NOSA_HAVE_URING
void DiskStore::ring_submit(const Op& op) {
  std::unique_lock lock(ring_->mutex);
  ring_->room.wait(lock, [&] {
    return !ring_->broken.empty() || ring_->inflight.size() < Ring::k_depth;
  });
  if (!ring_->broken.empty()) {  // nothing would complete it
    const std::string why = ring_->broken;
    lock.unlock();
    finish(op, std::make_exception_ptr(Error(
                   ErrorCode::io, fmt::format("{}: the {} of block slot {} cannot run: {}",
                                              file_name(op.slot), op.write ? "write" : "read",
                                              op.slot, why))));
    return;
  }
  int64_t offset;
  const int fd = file_for(op.slot, offset);
  // Each operation is submitted at once, so a free entry exists while fewer than k_depth fly.
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_->ring);
  if (op.write)
    io_uring_prep_write(sqe, fd, op.buffer, unsigned(slot_bytes_), uint64_t(offset));
  else
    io_uring_prep_read(sqe, fd, op.buffer, unsigned(slot_bytes_), uint64_t(offset));
  io_uring_sqe_set_data(sqe, reinterpret_cast<void*>(uintptr_t(op.ticket)));
  ring_->inflight.emplace(op.ticket, op);
  int rc = io_uring_submit(&ring_->ring);
  for (int retry = 0; retry < 100 && (rc == -EAGAIN || rc == -EBUSY || rc == -EINTR); ++retry) {
    lock.unlock();  // the kernel is short of resources for a moment: let completions drain
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    lock.lock();
    rc = io_uring_submit(&ring_->ring);
  }
  if (rc >= 0) return;
  // The entry stays queued in the ring and a later submit would send it: it becomes a no-op
  // whose completion nobody waits for (reap skips unknown tickets), so the failed operation's
  // buffer and slot are never touched after its error is reported.
  io_uring_prep_nop(sqe);
  io_uring_sqe_set_data(sqe, reinterpret_cast<void*>(~uintptr_t(0)));
  // While the lock was let go between retries, a completion thread that stopped may have
  // failed the operation already: it is finished once.
  const bool still_ours = ring_->inflight.erase(op.ticket) != 0;
  lock.unlock();
  if (!still_ours) return;
  finish(op, std::make_exception_ptr(Error(
                 ErrorCode::io, fmt::format("{}: submitting the {} of block slot {} failed: {}",
                                            file_name(op.slot), op.write ? "write" : "read",
                                            op.slot, std::strerror(-rc)))));
}

void DiskStore::reap() {
  for (;;) {
    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_wait_cqe(&ring_->ring, &cqe);
    std::function<int(int)> wait_fault;
    {
      std::lock_guard lock(mutex_);
      wait_fault = wait_fault_;
    }
    if (wait_fault) rc = wait_fault(rc);
    if (rc == -EINTR) continue;  // a signal: wait again
    if (rc < 0) {
      // Any other failure is taken as final: retrying could spin forever while the operations
      // in flight never complete. They fail now (their waiters get the error instead of hanging),
      // later ones fail at submission, and the thread stops. The kernel may still finish what it
      // was given, but with the completion queue unreadable nothing can tell when.
      const std::string why =
          fmt::format("waiting for io_uring completions failed: {}", std::strerror(-rc));
      logger("memory")->error("{}; the disk tier does no more I/O", why);
      std::vector<Op> lost;
      {
        std::lock_guard lock(ring_->mutex);
        ring_->broken = why;
        for (const auto& [ticket, op] : ring_->inflight) lost.push_back(op);
        ring_->inflight.clear();
      }
      ring_->room.notify_all();  // submitters waiting for room fail instead
      for (const Op& op : lost)
        finish(op, std::make_exception_ptr(Error(
                       ErrorCode::io, fmt::format("{}: the {} of block slot {} is lost: {}",
                                                  file_name(op.slot),
                                                  op.write ? "write" : "read", op.slot, why))));
      return;
    }
    const Ticket ticket = Ticket(reinterpret_cast<uintptr_t>(io_uring_cqe_get_data(cqe)));
    const int res = cqe->res;
    io_uring_cqe_seen(&ring_->ring, cqe);
    if (ticket == 0) return;  // the destructor's no-op
    Op op;
    {
      std::lock_guard lock(ring_->mutex);
      auto it = ring_->inflight.find(ticket);
      if (it == ring_->inflight.end()) continue;
      op = it->second;
      ring_->inflight.erase(it);
    }
    ring_->room.notify_one();
    std::exception_ptr error;
    try {
      NOSA_CHECK_CODE(res >= 0, ErrorCode::io, "{}: {} of block slot {} failed: {}",
                      file_name(op.slot), op.write ? "write" : "read", op.slot,
                      std::strerror(-res));
      // A short transfer (rare with whole aligned slots) is finished directly.
      if (size_t(res) < slot_bytes_) run(op, size_t(res));
    } catch (...) {
      error = std::current_exception();
    }
    finish(op, error);
  }
}
#else
void DiskStore::ring_submit(const Op&) {}
void DiskStore::reap() {}
#endif

DiskStore::Ticket DiskStore::write(int64_t slot, const void* src) {
  return submit(true, slot, const_cast<void*>(src));
}

DiskStore::Ticket DiskStore::read(int64_t slot, void* dst) { return submit(false, slot, dst); }

int DiskStore::file_for(int64_t slot, int64_t& offset) {
  offset = (slot % slots_per_file_) * int64_t(slot_bytes_);
  return fds_[slot / slots_per_file_];
}

void DiskStore::run(const Op& op, size_t from) {
  int64_t offset;
  int fd = file_for(op.slot, offset);
  size_t done = from;
  char* buf = static_cast<char*>(op.buffer);
  while (done < slot_bytes_) {
    ssize_t n = op.write ? ::pwrite(fd, buf + done, slot_bytes_ - done, offset + off_t(done))
                         : ::pread(fd, buf + done, slot_bytes_ - done, offset + off_t(done));
    if (n < 0 && errno == EINTR) continue;
    NOSA_CHECK_CODE(n > 0, ErrorCode::io, "{}: {} of block slot {} failed: {}",
                    file_name(op.slot), op.write ? "write" : "read", op.slot,
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
    if (injected(op)) continue;
    std::exception_ptr error;
    try {
      run(op);
    } catch (...) {
      error = std::current_exception();
    }
    finish(op, error);
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
