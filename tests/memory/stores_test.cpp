// Host arenas and the disk tier: exact byte round trips host <-> disk, errors that name the
// file and leave the store usable.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

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

TEST(DiskStore, RoundTripsBytesExactly) {
  test::TempDir dir;
  auto alloc = make_plain_host_allocator();
  HostStore host(1 << 20, 8, *alloc);
  DiskStore disk(dir / "kv", 1 << 20, 32, 3, 4 << 20);  // several files
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

TEST(DiskStore, AnInjectedErrorFailsOnlyThatOperation) {
  test::TempDir dir;
  auto alloc = make_plain_host_allocator();
  HostStore host(4096, 4, *alloc);
  DiskStore disk(dir / "kv", 4096, 4, 2);
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
