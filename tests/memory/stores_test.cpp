// Host arenas and the disk tier: exact byte round trips host <-> disk, errors that name the
// file and leave the store usable.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <mutex>
#include <random>
#include <thread>

#include "memory/disk_store.h"
#include "memory/host_store.h"
#include "runtime/core/error.h"
#include "tests/common/test_util.h"

namespace nosa::memory {
namespace {

TEST(HostStore, AllocatesArenasOnFirstUseWithAlignedSlots) {
  auto alloc = make_plain_host_allocator();
  HostStore store(10000, 100, *alloc, 64 * 1024);  // 12 KiB slots, 5 per arena
  EXPECT_EQ(store.slot_bytes(), 12288u);
  EXPECT_EQ(store.allocated_bytes(), 0u);
  char* a = store.slot(0);
  char* b = store.slot(4);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 4096, 0u);
  EXPECT_EQ(b - a, 4 * 12288);
  EXPECT_EQ(store.allocated_bytes(), 5u * 12288);
  store.slot(99);  // the last arena
  EXPECT_EQ(store.allocated_bytes(), 10u * 12288);
  std::memset(store.slot(99), 7, store.slot_bytes());  // all of it is usable
  EXPECT_EQ(store.device_slot(99), store.slot(99));
}

// A disk store in a temporary directory and host memory to read and write it from.
struct Stores {
  test::TempDir dir;
  std::unique_ptr<HostAllocator> alloc = make_plain_host_allocator();
  HostStore host;
  DiskStore disk;
  Stores(size_t slot_bytes, int64_t host_slots, int64_t disk_slots, int io_threads,
         size_t file_bytes, DiskIo io)
      : host(slot_bytes, host_slots, *alloc),
        disk(dir / "kv", slot_bytes, disk_slots, io_threads, file_bytes, io) {}
};

// Every disk test runs with io_uring (where this build and kernel have it) and the thread pool.
class DiskStoreIo : public ::testing::TestWithParam<DiskIo> {
 protected:
  void SetUp() override {
    if (GetParam() == DiskIo::uring && !DiskStore::uring_available())
      GTEST_SKIP() << "no io_uring in this build or kernel";
  }
};

INSTANTIATE_TEST_SUITE_P(Engines, DiskStoreIo, ::testing::Values(DiskIo::threads, DiskIo::uring),
                         [](const auto& info) {
                           return std::string(info.param == DiskIo::uring ? "io_uring" : "threads");
                         });

TEST_P(DiskStoreIo, RoundTripsBytesExactly) {
  Stores st(1 << 20, 8, 32, 3, 4 << 20, GetParam());  // several files
  HostStore& host = st.host;
  DiskStore& disk = st.disk;
  EXPECT_STREQ(disk.io_engine(), GetParam() == DiskIo::uring ? "io_uring" : "threads");
  std::mt19937_64 rng(1);
  std::vector<DiskStore::Ticket> writes;
  for (int s = 0; s < 8; ++s) {
    auto* p = reinterpret_cast<uint64_t*>(host.slot(s));
    for (size_t i = 0; i < (1 << 20) / 8; ++i) p[i] = rng();
    writes.push_back(disk.write(s * 4 + 1, host.slot(s)));  // scattered across files
  }
  for (auto t : writes) disk.wait(t);
  std::vector<char> expect(host.slot(0), host.slot(0) + (8 << 20));
  for (int s = 0; s < 8; ++s) std::memset(host.slot(s), 0, 1 << 20);
  for (int s = 7; s >= 0; --s) disk.wait(disk.read(s * 4 + 1, host.slot(s)));
  EXPECT_EQ(std::memcmp(expect.data(), host.slot(0), 8 << 20), 0);
  EXPECT_EQ(disk.bytes_written(), 8 << 20);
  EXPECT_EQ(disk.bytes_read(), 8 << 20);
}

// More operations than the ring holds at once, reads and writes interleaved, all exact.
TEST_P(DiskStoreIo, ManyOperationsInFlightAllComplete) {
  Stores st(8192, 300, 300, 4, 1 << 20, GetParam());
  HostStore& host = st.host;
  DiskStore& disk = st.disk;
  std::vector<DiskStore::Ticket> t;
  for (int s = 0; s < 150; ++s) {
    std::memset(host.slot(s), s + 1, 8192);
    t.push_back(disk.write(s, host.slot(s)));
  }
  for (auto x : t) disk.wait(x);
  t.clear();
  for (int s = 0; s < 150; ++s) t.push_back(disk.read(s, host.slot(150 + s)));
  disk.wait_all();
  for (auto x : t) disk.wait(x);
  for (int s = 0; s < 150; ++s)
    ASSERT_EQ(std::memcmp(host.slot(s), host.slot(150 + s), 8192), 0) << "slot " << s;
  EXPECT_EQ(disk.bytes_read(), 150 * 8192);
}

// Reading a slot that was never written is an error naming the file, not garbage.
TEST_P(DiskStoreIo, ReadingAnUnwrittenSlotIsAnError) {
  Stores st(4096, 2, 8, 2, 1 << 20, GetParam());
  HostStore& host = st.host;
  DiskStore& disk = st.disk;
  std::memset(host.slot(0), 3, 4096);
  disk.wait(disk.write(0, host.slot(0)));
  try {
    disk.wait(disk.read(5, host.slot(1)));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io);
    EXPECT_NE(e.message().find("slot 5"), std::string::npos) << e.message();
  }
  disk.wait(disk.read(0, host.slot(1)));  // the store goes on
  EXPECT_EQ(std::memcmp(host.slot(0), host.slot(1), 4096), 0);
}

TEST_P(DiskStoreIo, AnInjectedErrorFailsOnlyThatOperation) {
  Stores st(4096, 4, 4, 2, 1 << 20, GetParam());
  HostStore& host = st.host;
  DiskStore& disk = st.disk;
  std::memset(host.slot(0), 1, 4096);
  disk.inject_faults([](bool write, int64_t slot) { return write && slot == 2; });
  auto ok = disk.write(1, host.slot(0));
  auto bad = disk.write(2, host.slot(0));
  disk.wait(ok);
  try {
    disk.wait(bad);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io);
    EXPECT_NE(e.message().find("nosa-kv-"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("slot 2"), std::string::npos) << e.message();
  }
  disk.inject_faults({});
  disk.wait(disk.write(2, host.slot(0)));  // the store goes on
  disk.wait(disk.read(2, host.slot(1)));
  EXPECT_EQ(std::memcmp(host.slot(0), host.slot(1), 4096), 0);
}

// The error an operation ends with (an internal one saying so when it succeeded).
Error error_of(DiskStore& disk, DiskStore::Ticket ticket) {
  try {
    disk.wait(ticket);
  } catch (const Error& e) {
    return e;
  }
  return Error(ErrorCode::internal, "no error");
}

// A test whose failure is a hang ends the process with a message instead (the hang would also
// keep the store's destructor waiting). It never delays a test that passes.
class HangGuard {
 public:
  explicit HangGuard(const char* what) {
    guard_ = std::thread([this, what] {
      std::unique_lock lock(mutex_);
      if (!done_cv_.wait_for(lock, std::chrono::seconds(60), [&] { return done_; })) {
        std::fprintf(stderr, "hung: %s\n", what);
        std::abort();
      }
    });
  }
  ~HangGuard() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    done_cv_.notify_all();
    guard_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable done_cv_;
  bool done_ = false;
  std::thread guard_;
};

// The io_uring wait tests: skipped where the build or the kernel has no io_uring; a test that
// hangs aborts (HangGuard); store(slots) opens an io_uring disk store of `slots` 4 KiB block
// slots, with host memory for as many blocks.
class UringWait : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!DiskStore::uring_available()) GTEST_SKIP() << "no io_uring in this build or kernel";
    guard_ = std::make_unique<HangGuard>(
        ::testing::UnitTest::GetInstance()->current_test_info()->name());
  }
  Stores& store(int slots) {
    store_ = std::make_unique<Stores>(4096, slots, slots, 2, 1 << 20, DiskIo::uring);
    return *store_;
  }

 private:
  std::unique_ptr<HangGuard> guard_;  // declared first: outlives the store's closing
  std::unique_ptr<Stores> store_;
};

// When waiting for io_uring completions fails for good, no completion will ever come: the
// operations in flight fail with an error instead of leaving their waiters hanging, later ones
// fail at once, and the store still closes.
TEST_F(UringWait, AFailingCompletionWaitFailsEveryOperationInsteadOfHanging) {
  Stores& s = store(8);
  HostStore& host = s.host;
  DiskStore& disk = s.disk;
  // The first wait is held until all eight writes fly, then it and every later one fail.
  std::promise<void> submitted;
  std::shared_future<void> all_submitted = submitted.get_future().share();
  disk.inject_wait_faults([all_submitted](int) {
    all_submitted.wait();
    return -EIO;
  });
  std::vector<DiskStore::Ticket> writes;
  for (int s = 0; s < 8; ++s) {
    std::memset(host.slot(s), s + 1, 4096);
    writes.push_back(disk.write(s, host.slot(s)));
  }
  submitted.set_value();
  for (int s = 0; s < 8; ++s) {
    const Error e = error_of(disk, writes[size_t(s)]);
    EXPECT_EQ(e.code(), ErrorCode::io) << e.message();
    EXPECT_NE(e.message().find("nosa-kv-"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("slot " + std::to_string(s)), std::string::npos) << e.message();
    EXPECT_NE(e.message().find(std::strerror(EIO)), std::string::npos) << e.message();
  }
  // Later operations, reads and writes, fail cleanly too.
  const Error read = error_of(disk, disk.read(3, host.slot(0)));
  EXPECT_EQ(read.code(), ErrorCode::io) << read.message();
  EXPECT_NE(read.message().find("read of block slot 3"), std::string::npos) << read.message();
  EXPECT_NE(read.message().find(std::strerror(EIO)), std::string::npos) << read.message();
  const Error write = error_of(disk, disk.write(5, host.slot(1)));
  EXPECT_EQ(write.code(), ErrorCode::io) << write.message();
  EXPECT_NE(write.message().find("write of block slot 5"), std::string::npos) << write.message();
  disk.wait_all();
  EXPECT_EQ(disk.bytes_written(), 0);
  EXPECT_EQ(disk.bytes_read(), 0);
}

// A wait that a signal interrupts is only waited again: nothing fails.
TEST_F(UringWait, AnInterruptedCompletionWaitIsWaitedAgain) {
  Stores& s = store(2);
  HostStore& host = s.host;
  DiskStore& disk = s.disk;
  std::atomic<int> interrupted{0};
  disk.inject_wait_faults([&interrupted](int rc) { return interrupted++ < 3 ? -EINTR : rc; });
  std::memset(host.slot(0), 9, 4096);
  disk.wait(disk.write(1, host.slot(0)));
  disk.wait(disk.read(1, host.slot(1)));
  EXPECT_EQ(std::memcmp(host.slot(0), host.slot(1), 4096), 0);
  EXPECT_GE(interrupted.load(), 3);
}

TEST(DiskStore, AnUnknownIoChoiceIsAClearErrorThatLeavesNoFile) {
  test::TempDir dir;
  struct Unset {
    ~Unset() { ::unsetenv("NOSA_DISK_IO"); }  // on every exit: later stores must not see it
  } unset;
  ::setenv("NOSA_DISK_IO", "threadz", 1);
  try {
    DiskStore disk(dir / "kv", 4096, 4);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(e.message().find("NOSA_DISK_IO=threadz"), std::string::npos) << e.message();
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "kv"));
}

TEST(DiskStore, AnUnwritableDirectoryIsAClearError) {
  try {
    DiskStore disk("/proc/nosa-cannot-exist", 4096, 4);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io);
    EXPECT_NE(e.message().find("/proc/nosa-cannot-exist"), std::string::npos);
  }
}

}  // namespace
}  // namespace nosa::memory
