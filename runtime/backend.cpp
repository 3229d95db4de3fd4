#include "runtime/backend.h"

#include <algorithm>
#include <cstring>

#include "memory/partitions.h"
#include "runtime/core/error.h"
#include "runtime/core/thread_pool.h"

namespace nosa::runtime {

namespace {
// The same hash as runtime/cuda/elementwise.cu's fill kernel, so that both backends agree.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

void Backend::fill_uniform(Tensor& t, uint64_t seed, float lo, float hi) {
  NOSA_ASSERT(t.device() == Device::cpu && t.dtype() == DType::f32,
              "fill_uniform: this backend fills host float32 tensors only (got {} {})",
              device_name(t.device()), dtype_name(t.dtype()));
  const uint64_t key = mix64(seed);
  float* d = t.data<float>();
  ThreadPool::global().parallel_for(
      t.numel(),
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const float u = float(mix64(key ^ uint64_t(i)) >> 40) * (1.0f / 16777216.0f);
          d[i] = lo + (hi - lo) * u;
        }
      },
      1 << 16);
}

void Backend::copy_chunks(const std::vector<memory::ChunkCopy>&, bool, KvCache&) {
  NOSA_FAIL(ErrorCode::invalid_argument, "the {} backend cannot offload the KV cache yet", name());
}

void Backend::resident_partitions(int layer, const Selection& selection, const StepBatch& step,
                                  const std::vector<int32_t>& seq_partition, KvCache& cache,
                                  bool speculative) {
  NOSA_ASSERT(cache.kv().device() == Device::cpu,
              "resident_partitions: the {} backend runs the reference on host tensors only",
              name());
  int stride = 1;
  for (const StepSequence& s : step.seqs) stride = std::max(stride, int(s.blocks->size()));
  std::vector<int32_t> table(step.seqs.size() * size_t(stride), 0);
  for (size_t i = 0; i < step.seqs.size(); ++i)
    std::copy(step.seqs[i].blocks->begin(), step.seqs[i].blocks->end(),
              table.begin() + int64_t(i) * stride);
  memory::PartitionArgs a = cache.partition_args(layer);
  a.selection = selection.blocks.data<int32_t>();
  a.n_tokens = int(step.n_tokens());
  a.k = selection.k_max;
  a.token_seq = step.token_seq.data();
  a.block_table = table.data();
  a.bt_stride = stride;
  a.seq_partition = seq_partition.data();
  a.speculative = speculative;
  memory::resident_partitions_reference(a);
}

void Backend::queue_copy_to_host(const Tensor& t, void* host) {
  NOSA_ASSERT(t.device() == Device::cpu, "queue_copy_to_host: the {} backend has no device "
              "tensors", name());
  std::memcpy(host, t.raw(), t.bytes());
}

const void* Backend::read_back(const Tensor& t) {
  NOSA_ASSERT(t.device() == Device::cpu, "read_back: the {} backend has no device tensors",
              name());
  return t.raw();
}

std::unique_ptr<memory::HostAllocator> Backend::host_allocator() {
  return memory::make_plain_host_allocator();
}

void check_select_path_name(const std::string& path) {
  NOSA_CHECK_CODE(path.empty() || path == "split" || path == "split-finish" ||
                      path == "split-spread" || path == "tiled" || path == "tiled-inline" ||
                      path == "tiled-exact" || path == "tiled-exact-inline" ||
                      path == "per-token",
                  ErrorCode::invalid_argument,
                  "unknown selection path '{}' (use split, split-finish, split-spread, tiled, "
                  "tiled-inline, tiled-exact, tiled-exact-inline, per-token or empty)",
                  path);
}

bool Backend::replay_step(const StepBatch&, const void*, int, const KvCache&, Tensor&) {
  return false;
}
bool Backend::begin_recording(const StepBatch&, const void*, int, const KvCache&) {
  return false;
}
bool Backend::end_recording(const Tensor&) { return false; }
void Backend::abort_recording() {}
void Backend::forget_graphs(const void*) {}

}  // namespace nosa::runtime
