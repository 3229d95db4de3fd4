#include "memory/host_store.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>

#include "runtime/core/error.h"

namespace nosa::memory {

namespace {
constexpr size_t k_align = 4096;

class PlainHostAllocator final : public HostAllocator {
 public:
  void* allocate(size_t bytes) override {
    void* p = std::aligned_alloc(k_align, (bytes + k_align - 1) / k_align * k_align);
    NOSA_CHECK_CODE(p, ErrorCode::resource_exhausted, "out of host memory ({} bytes)", bytes);
    return p;
  }
  void release(void* p, size_t) override { std::free(p); }
};
}  // namespace

std::unique_ptr<HostAllocator> make_plain_host_allocator() {
  return std::make_unique<PlainHostAllocator>();
}

HostStore::HostStore(size_t slot_bytes, int64_t capacity_slots, HostAllocator& allocator,
                     size_t arena_bytes)
    : slot_bytes_((slot_bytes + k_align - 1) / k_align * k_align),
      capacity_(capacity_slots),
      allocator_(allocator) {
  NOSA_CHECK(slot_bytes > 0 && capacity_slots > 0, "empty host store");
  slots_per_arena_ = std::max<int64_t>(1, int64_t(arena_bytes / slot_bytes_));
  const int64_t n_arenas = (capacity_ + slots_per_arena_ - 1) / slots_per_arena_;
  arenas_.assign(n_arenas, nullptr);
  device_arenas_ = std::make_unique<std::atomic<char*>[]>(size_t(n_arenas));
  for (int64_t a = 0; a < n_arenas; ++a) device_arenas_[a].store(nullptr);
}

size_t HostStore::arena_bytes(int64_t a) const {
  return size_t(std::min(slots_per_arena_, capacity_ - a * slots_per_arena_)) * slot_bytes_;
}

HostStore::~HostStore() {
  for (size_t a = 0; a < arenas_.size(); ++a)
    if (arenas_[a]) allocator_.release(arenas_[a], arena_bytes(int64_t(a)));
}

char* HostStore::slot(int64_t index) {
  NOSA_ASSERT(index >= 0 && index < capacity_, "host slot {} out of range", index);
  const int64_t a = index / slots_per_arena_;
  std::lock_guard lock(mutex_);
  if (!arenas_[a]) {
    arenas_[a] = static_cast<char*>(allocator_.allocate(arena_bytes(a)));
    device_arenas_[a].store(static_cast<char*>(allocator_.device_address(arenas_[a])),
                            std::memory_order_release);
  }
  return arenas_[a] + size_t(index % slots_per_arena_) * slot_bytes_;
}

char* HostStore::device_slot(int64_t index) const {
  const int64_t a = index / slots_per_arena_;
  char* base = device_arenas_[a].load(std::memory_order_acquire);
  NOSA_ASSERT(base, "host slot {} was never touched", index);
  return base + size_t(index % slots_per_arena_) * slot_bytes_;
}

// The NUMA node holding the page at p (get_mempolicy with MPOL_F_NODE | MPOL_F_ADDR), or -1.
static int numa_node_of(const void* p) {
#ifdef SYS_get_mempolicy
  constexpr unsigned long k_node = 1, k_addr = 2;  // MPOL_F_NODE, MPOL_F_ADDR
  int node = -1;
  if (::syscall(SYS_get_mempolicy, &node, nullptr, 0UL, p, k_node | k_addr) == 0) return node;
#endif
  return -1;
}

std::map<int, int64_t> HostStore::numa_pages(int per_arena) const {
  std::lock_guard lock(mutex_);
  std::map<int, int64_t> pages;
  for (size_t a = 0; a < arenas_.size(); ++a) {
    if (!arenas_[a]) continue;
    const size_t bytes = arena_bytes(int64_t(a));
    for (int i = 0; i < per_arena; ++i) ++pages[numa_node_of(arenas_[a] + bytes / per_arena * i)];
  }
  return pages;
}

size_t HostStore::allocated_bytes() const {
  std::lock_guard lock(mutex_);
  size_t n = 0;
  for (size_t a = 0; a < arenas_.size(); ++a) n += arenas_[a] ? arena_bytes(int64_t(a)) : 0;
  return n;
}

}  // namespace nosa::memory
