// The NVMe tier: KV block slots in files under a directory, written and read with O_DIRECT
// (plain I/O where the file system refuses it), in units of one block of every layer and head
// (about 1 MiB or more for real models), through io_uring where the build has liburing and the
// kernel allows it (one ring, many operations in flight, one completion thread), else by a small
// pool of I/O threads. Errors come back to the caller of wait() as io errors naming the file;
// the store stays usable, unless waiting for io_uring completions fails for good: then every
// operation in flight and every later one fails (no waiter is left hanging).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace nosa::memory {

// How the store does its I/O: io_uring when it can (automatic), or the thread pool. The
// environment chooses with NOSA_DISK_IO=auto|threads|uring where the caller asks for automatic.
enum class DiskIo { automatic, threads, uring };

class DiskStore {
 public:
  // slot_bytes must be a multiple of 4096; buffers given to read/write must be 4096-aligned.
  DiskStore(const std::filesystem::path& dir, size_t slot_bytes, int64_t capacity_slots,
            int io_threads = 4, size_t file_bytes = size_t(1) << 30,
            DiskIo io = DiskIo::automatic);
  ~DiskStore();  // waits for queued I/O, removes its files

  using Ticket = uint64_t;
  Ticket write(int64_t slot, const void* src);
  Ticket read(int64_t slot, void* dst);
  // Waits for an operation; throws io (naming the file) if it failed.
  void wait(Ticket ticket);
  void wait_all();

  size_t slot_bytes() const { return slot_bytes_; }
  int64_t capacity() const { return capacity_; }
  int64_t bytes_read() const { return bytes_read_; }
  int64_t bytes_written() const { return bytes_written_; }
  bool direct_io() const { return direct_; }
  // "io_uring" or "threads".
  const char* io_engine() const { return ring_ ? "io_uring" : "threads"; }
  // Whether this build and kernel can use io_uring.
  static bool uring_available();

  // Tests: make operations fail when the predicate says so (write = true for writes).
  void inject_faults(std::function<bool(bool write, int64_t slot)> fail);
  // Tests (io_uring): the completion thread's waits return what `result` makes of what they got
  // (0 or -errno). It runs on that thread and may block there, holding completions back.
  void inject_wait_faults(std::function<int(int rc)> result);

 private:
  struct Op {
    Ticket ticket;
    bool write;
    int64_t slot;
    void* buffer;
  };
  struct Ring;
  void worker();
  void reap();  // io_uring completions
  void ring_submit(const Op& op);
  void run(const Op& op, size_t from = 0);
  void finish(const Op& op, std::exception_ptr error);
  std::filesystem::path file_path(int64_t file) const;
  std::string file_name(int64_t slot) const;  // the file holding a slot
  // Whether an injected fault fails this operation (then it is finished already).
  bool injected(const Op& op);
  int file_for(int64_t slot, int64_t& offset);
  Ticket submit(bool write, int64_t slot, void* buffer);

  std::filesystem::path dir_;
  size_t slot_bytes_;
  int64_t capacity_, slots_per_file_;
  bool direct_ = true;
  std::vector<int> fds_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable queued_, finished_;
  std::deque<Op> queue_;
  std::unordered_map<Ticket, std::exception_ptr> done_;
  Ticket next_ = 1;
  int64_t pending_ = 0;
  bool stop_ = false;
  int64_t bytes_read_ = 0, bytes_written_ = 0;
  std::function<bool(bool, int64_t)> fault_;
  std::function<int(int)> wait_fault_;
  std::unique_ptr<Ring> ring_;  // null: the thread pool does the I/O
};

}  // namespace nosa::memory
