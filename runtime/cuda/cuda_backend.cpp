// The CUDA backend (host side): bf16 activations and KV cache, float32 accumulation; cuBLAS for
// the projections and the LM head; the kernels of runtime/cuda (dense ops, sampling) and
// attention/cuda (NOSA: compressed keys, eviction scores, selection, sparse attention).
//
// Everything runs on one stream. Activations come from a caching allocator (no cudaMalloc on the
// hot path); a step's metadata is uploaded once in begin_step from pinned memory; host-side
// decisions (grid sizes, which tokens decode and which prefill) come from the host copy of the
// step, so a step synchronizes only once, when sample() returns the tokens.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstring>
#include <deque>
#include <fstream>
#include <optional>

#include <sys/mman.h>

#include "attention/cuda/compress.cuh"
#include "attention/cuda/eviction.cuh"
#include "attention/cuda/select.cuh"
#include "attention/cuda/sparse_decode.cuh"
#include "attention/cuda/sparse_prefill.cuh"
#include "attention/reference/selection.h"
#include "memory/cuda/partitions.cuh"
#include "memory/cuda/transfer.cuh"
#include "runtime/backend.h"
#include "runtime/core/env.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"
#include "runtime/cuda/device_allocator.h"
#include "runtime/cuda/model_kernels.cuh"
#include "runtime/cuda/sampling.cuh"
#include "runtime/sampling.h"

#define NOSA_CUDA_CHECK(expr)                                                               \
  do {                                                                                      \
    cudaError_t nosa_err_ = (expr);                                                         \
    if (nosa_err_ != cudaSuccess) [[unlikely]]                                              \
      NOSA_FAIL(::nosa::ErrorCode::internal, "CUDA error '{}' ({}) in {}",                  \
                cudaGetErrorString(nosa_err_), int(nosa_err_), #expr);                      \
  } while (0)

#define NOSA_CUBLAS_CHECK(expr)                                                      \
  do {                                                                               \
    cublasStatus_t nosa_st_ = (expr);                                                \
    if (nosa_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                              \
      NOSA_FAIL(::nosa::ErrorCode::internal, "cuBLAS error {} in {}", int(nosa_st_), \
                #expr);                                                              \
  } while (0)

namespace nosa::runtime {

namespace {
std::string g_select_path;  // force_cuda_select_path()
int g_graphs = -1;          // set_cuda_graphs(); -1: the environment decides
std::atomic<int64_t> g_graph_replays{0};
std::atomic<int64_t> g_attention_in_parts{0};
std::atomic<bool> g_count_screening{false};
std::atomic<int64_t> g_screened_tiles{0}, g_redone_tiles{0};

bool graphs_enabled() {
  if (g_graphs >= 0) return g_graphs == 1;
  static const bool env_off = [] {
    const char* e = std::getenv("NOSA_CUDA_GRAPHS");
    return e && std::string(e) == "0";
  }();
  return !env_off;
}
}  // namespace

void set_cuda_graphs(bool enabled) { g_graphs = enabled ? 1 : 0; }
int64_t cuda_graph_replays() { return g_graph_replays.load(); }
int64_t cuda_attention_in_parts() { return g_attention_in_parts.load(); }
void count_cuda_select_screening(bool on) { g_count_screening = on; }
int64_t cuda_select_screened_tiles() { return g_screened_tiles.load(); }
int64_t cuda_select_redone_tiles() { return g_redone_tiles.load(); }

void force_cuda_select_path(const std::string& path) {
  check_select_path_name(path);
  g_select_path = path;
}

bool cuda_available() {
  int count = 0;  // left untouched when the driver is missing
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

namespace {

namespace acu = attention::cuda;
namespace rcu = cuda;
namespace mcu = memory::cuda;
namespace ref = attention::reference;

// Pinned host memory that grows on demand (used for uploads and small downloads).
class PinnedBuffer {
 public:
  ~PinnedBuffer() {
    if (data_) cudaFreeHost(data_);
  }
  // A buffer of at least `bytes`; the previous contents are lost when it grows.
  void* get(size_t bytes) {
    if (bytes > size_) {
      // At least double: a buffer that grows step by step is re-pinned only a few times.
      const size_t want = std::max({bytes, size_t(1) << 16, size_ * 2});
      if (data_) cudaFreeHost(data_);
      data_ = nullptr;
      size_ = 0;
      NOSA_CUDA_CHECK(cudaHostAlloc(&data_, want, cudaHostAllocDefault));
      size_ = want;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device_index) : device_index_(device_index) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) cudaGetLastError();
    NOSA_CHECK_CODE(err == cudaSuccess && count > 0, ErrorCode::unavailable,
                    "no CUDA device is available");
    NOSA_CHECK_CODE(device_index >= 0 && device_index < count, ErrorCode::invalid_argument,
                    "CUDA device {} does not exist ({} present)", device_index, count);
    NOSA_CUDA_CHECK(cudaSetDevice(device_index));
    NOSA_CUDA_CHECK(cudaGetDeviceProperties(&props_, device_index));
    NOSA_CHECK_CODE(props_.major >= 8, ErrorCode::unavailable,
                    "the CUDA backend needs compute capability 8.0 or newer (bf16 tensor cores); "
                    "{} has {}.{}",
                    props_.name, props_.major, props_.minor);
    NOSA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&staged_, cudaEventDisableTiming));
    NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&read_back_, cudaEventDisableTiming));
    NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&host_copied_, cudaEventDisableTiming));
    NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&decided_, cudaEventDisableTiming));
    NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming));
    NOSA_CUDA_CHECK(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
    NOSA_CUDA_CHECK(cudaStreamCreateWithFlags(&fetch_, cudaStreamNonBlocking));
    NOSA_CUDA_CHECK(cudaStreamCreateWithFlags(&ahead_, cudaStreamNonBlocking));
    NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    for (int i = 0; i < 2; ++i) {
      NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&selected_[i], cudaEventDisableTiming));
      NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&gathered_[i], cudaEventDisableTiming));
      NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&prefetched_[i], cudaEventDisableTiming));
    }
    NOSA_CUBLAS_CHECK(cublasCreate(&cublas_));
    NOSA_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    workspace_ = alloc(DType::u8, {int64_t(32) << 20});
    NOSA_CUBLAS_CHECK(cublasSetWorkspace(cublas_, workspace_.raw(), workspace_.bytes()));
    ahead_workspace_ = alloc(DType::u8, {int64_t(32) << 20});
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(ahead_);
    cudaStreamSynchronize(side_);
    cudaStreamSynchronize(fetch_);
    cudaStreamSynchronize(stream_);
    recording_.reset();
    graphs_.clear();
    step_keep_.clear();
    side_keep_.clear();
    workspace_ = Tensor();
    ahead_workspace_ = Tensor();
    if (cublas_) cublasDestroy(cublas_);
    cudaEventDestroy(staged_);
    cudaEventDestroy(read_back_);
    cudaEventDestroy(host_copied_);
    cudaEventDestroy(decided_);
    cudaEventDestroy(copied_);
    for (int i = 0; i < 2; ++i) {
      cudaEventDestroy(selected_[i]);
      cudaEventDestroy(gathered_[i]);
      cudaEventDestroy(prefetched_[i]);
    }
    cudaEventDestroy(fork_);
    cudaStreamDestroy(ahead_);
    cudaStreamDestroy(side_);
    cudaStreamDestroy(fetch_);
    cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::cuda; }
  std::string name() const override { return fmt::format("cuda:{} ({})", device_index_, props_.name); }
  DType activation_dtype() const override { return DType::bf16; }

  // ---- memory -------------------------------------------------------------------------------

  Tensor alloc(DType dtype, Shape shape) override {
    const size_t bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
    // While a step graph records, its tensors come from the graph's own pool: the addresses the
    // graph bakes in are then never handed to anyone else.
    std::shared_ptr<void> storage =
        recording_ ? recording_->pool.allocate(bytes) : allocator_.allocate(bytes);
    void* p = storage.get();
    Tensor t(std::move(storage), p, dtype, std::move(shape), Device::cuda);
    // Side work's tensors live until it is done: the allocator would hand a freed block to the
    // main stream's next op while the side stream may still use it.
    if (in_side_work_) side_keep_.push_back(t);
    return t;
  }

  Tensor zeros(DType dtype, Shape shape) override {
    Tensor t = alloc(dtype, std::move(shape));
    if (t.bytes()) NOSA_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, t.bytes(), stream_));
    return t;
  }

  Tensor upload(const Tensor& host, DType dtype) override {
    NOSA_ASSERT(host.device() == Device::cpu, "upload: the source must be a host tensor");
    Tensor out = alloc(dtype, host.shape());
    if (host.numel() == 0) return out;
    if (host.dtype() == dtype) {
      NOSA_CUDA_CHECK(
          cudaMemcpyAsync(out.raw(), host.raw(), host.bytes(), cudaMemcpyHostToDevice, stream_));
    } else {
      const bool float_in = host.dtype() == DType::f32 || host.dtype() == DType::f16 ||
                            host.dtype() == DType::bf16;
      const bool float_out = dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16;
      NOSA_ASSERT(float_in && float_out, "upload: cannot convert {} to {}",
                  dtype_name(host.dtype()), dtype_name(dtype));
      // Convert through float32 in pinned chunks.
      const size_t n = size_t(host.numel());
      const size_t chunk = size_t(1) << 22;
      const size_t in_size = dtype_size(host.dtype()), out_size = dtype_size(dtype);
      std::vector<float> tmp(std::min(n, chunk));
      for (size_t b = 0; b < n; b += chunk) {
        const size_t c = std::min(chunk, n - b);
        convert_to_f32(static_cast<const char*>(host.raw()) + b * in_size, host.dtype(),
                       tmp.data(), c);
        NOSA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the pinned buffer is free again
        void* pinned = upload_pinned_.get(c * out_size);
        convert_from_f32(tmp.data(), dtype, pinned, c);
        NOSA_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(out.raw()) + b * out_size, pinned,
                                        c * out_size, cudaMemcpyHostToDevice, stream_));
      }
    }
    NOSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return out;
  }

  Tensor to_host(const Tensor& t) override {
    if (t.device() == Device::cpu) return t;
    Tensor raw = Tensor::empty_host(t.dtype(), t.shape());
    if (t.bytes())
      NOSA_CUDA_CHECK(
          cudaMemcpyAsync(raw.raw(), t.raw(), t.bytes(), cudaMemcpyDeviceToHost, stream_));
    NOSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (t.dtype() != DType::bf16 && t.dtype() != DType::f16) return raw;
    Tensor out = Tensor::empty_host(DType::f32, t.shape());
    convert_to_f32(raw.raw(), t.dtype(), out.data<float>(), size_t(t.numel()));
    return out;
  }

  // Into a persistent pinned buffer; an event marks the copy's end, so the host waits for the
  // work queued before it and nothing else (no allocation, no pageable copy).
  const void* read_back(const Tensor& t) override { return copy_to_host(t, stream_, nullptr); }

  void queue_copy_to_host(const Tensor& t, void* host) override {
    if (t.device() == Device::cpu) return Backend::queue_copy_to_host(t, host);
    NOSA_CUDA_CHECK(cudaMemcpyAsync(host, t.raw(), t.bytes(), cudaMemcpyDeviceToHost, stream_));
    NOSA_CUDA_CHECK(cudaEventRecord(host_copied_, stream_));
  }

  void wait_host_copy() override { NOSA_CUDA_CHECK(cudaEventSynchronize(host_copied_)); }

  // t's bytes in the persistent pinned buffer, copied on `stream` after `after` (when given)
  // and waited for.
  const void* copy_to_host(const Tensor& t, cudaStream_t stream, cudaEvent_t after) {
    if (t.device() == Device::cpu) return t.raw();
    void* host = readback_pinned_.get(std::max<size_t>(t.bytes(), 1));
    if (t.bytes()) {
      if (after) NOSA_CUDA_CHECK(cudaStreamWaitEvent(stream, after, 0));
      NOSA_CUDA_CHECK(cudaMemcpyAsync(host, t.raw(), t.bytes(), cudaMemcpyDeviceToHost, stream));
      NOSA_CUDA_CHECK(cudaEventRecord(read_back_, stream));
      NOSA_CUDA_CHECK(cudaEventSynchronize(read_back_));
    }
    return host;
  }

  std::string pci_bus_id() const override {
    char bus[32] = {};
    if (cudaDeviceGetPCIBusId(bus, sizeof bus, device_index_) != cudaSuccess) {
      cudaGetLastError();
      return {};
    }
    return bus;
  }

  int numa_node() const override {
    std::string id = pci_bus_id();
    if (id.empty()) return -1;
    for (char& ch : id) ch = char(std::tolower(static_cast<unsigned char>(ch)));
    std::ifstream f("/sys/bus/pci/devices/" + id + "/numa_node");
    int node = -1;
    return f >> node ? node : -1;
  }

  size_t free_memory_bytes() const override {
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    // Keep room for activations, workspaces and the allocator's cache.
    const size_t reserve = std::max<size_t>(size_t(6) << 30, total / 16);
    return free_bytes > reserve ? free_bytes - reserve : 0;
  }

  void synchronize() override {
    NOSA_CUDA_CHECK(cudaStreamSynchronize(ahead_));
    NOSA_CUDA_CHECK(cudaStreamSynchronize(side_));
    NOSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void* native_stream() override { return stream_; }

  // Host memory for the offloaded KV: pinned and mapped, so that the transfer kernel reads it
  // directly over PCIe. Large allocations (the arenas) are asked for in 2 MiB pages (transparent
  // huge pages, where the kernel has them) and then registered: the gathers read scattered
  // 32 KiB chunks across many GiB, and with 4 KiB pages the device's address translation, not
  // PCIe, bounded them once host memory had been fragmented by earlier allocations.
  // NOSA_HOST_HUGE_PAGES=0 keeps cudaHostAlloc's pages.
  std::unique_ptr<memory::HostAllocator> host_allocator() override {
    struct Pinned final : memory::HostAllocator {
      bool huge = env_int("NOSA_HOST_HUGE_PAGES", 1, 0, 1) == 1;
      const size_t k_huge = size_t(2) << 20;
      void* allocate(size_t bytes) override {
        if (huge && bytes >= k_huge) {
          const size_t len = (bytes + k_huge - 1) / k_huge * k_huge;
          // Over-allocate by one page to align the start to 2 MiB, then trim.
          void* raw = mmap(nullptr, len + k_huge, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
          NOSA_CHECK_CODE(raw != MAP_FAILED, ErrorCode::resource_exhausted,
                          "cannot map {} bytes of host memory for the KV cache", bytes);
          const uintptr_t start = (uintptr_t(raw) + k_huge - 1) / k_huge * k_huge;
          if (start > uintptr_t(raw)) munmap(raw, start - uintptr_t(raw));
          const uintptr_t end = start + len, raw_end = uintptr_t(raw) + len + k_huge;
          if (raw_end > end) munmap(reinterpret_cast<void*>(end), raw_end - end);
          void* p = reinterpret_cast<void*>(start);
          madvise(p, len, MADV_HUGEPAGE);  // a hint: no error where THP is off
          const cudaError_t e =
              cudaHostRegister(p, len, cudaHostRegisterMapped | cudaHostRegisterPortable);
          if (e != cudaSuccess) {
            cudaGetLastError();
            munmap(p, len);
            NOSA_FAIL(ErrorCode::resource_exhausted,
                      "cannot pin {} bytes of host memory for the KV cache: {}", bytes,
                      cudaGetErrorString(e));
          }
          return p;
        }
        void* p = nullptr;
        NOSA_CHECK_CODE(
            cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable) == cudaSuccess,
            ErrorCode::resource_exhausted, "cannot pin {} bytes of host memory for the KV cache",
            bytes);
        return p;
      }
      void release(void* p, size_t bytes) override {
        if (huge && bytes >= k_huge) {
          cudaHostUnregister(p);
          munmap(p, (bytes + k_huge - 1) / k_huge * k_huge);
          return;
        }
        cudaFreeHost(p);
      }
      void* device_address(void* p) override {
        void* d = nullptr;
        NOSA_CUDA_CHECK(cudaHostGetDevicePointer(&d, p, 0));
        return d;
      }
    };
    return std::make_unique<Pinned>();
  }

  void copy_chunks(const std::vector<memory::ChunkCopy>& copies, bool to_device,
                   KvCache& cache) override {
    launch_transfers(copies, to_device, cache, stream_);
  }

  // One transfer kernel for these copies on `stream`, reading its list straight from pinned
  // staging memory (no upload to wait for, nothing allocated).
  void launch_transfers(const std::vector<memory::ChunkCopy>& copies, bool to_device,
                        KvCache& cache, cudaStream_t stream) {
    if (copies.empty()) return;
    // Staging memory is reused once every kernel reading it is done: the main stream's readers
    // are covered by staged_, the side stream's by a synchronisation (side_staged_).
    if (stream == side_) side_staged_ = true;
    auto* items = reinterpret_cast<mcu::ChunkTransfer*>(
        staging_space(copies.size() * sizeof(mcu::ChunkTransfer)));
    for (size_t i = 0; i < copies.size(); ++i) {
      const auto& c = copies[i];
      items[i] = {c.host, c.chunk, c.evicted, c.slot};
    }
    mcu::TransferArgs a;
    a.items = items;
    a.n = int(copies.size());
    a.kv = static_cast<char*>(cache.kv().raw());
    a.bias = static_cast<char*>(cache.bias().raw());
    a.slot_table = cache.slot_table().data<int32_t>();
    a.kv_bytes = int64_t(cache.layout().kv_chunk_bytes());
    a.bias_bytes = int64_t(cache.layout().bias_chunk_bytes());
    a.to_device = to_device;
    NOSA_CUDA_CHECK(mcu::launch_chunk_transfer(a, stream));
    if (stream == stream_) NOSA_CUDA_CHECK(cudaEventRecord(staged_, stream_));
  }

  void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi) override {
    if (t.device() == Device::cpu) return Backend::fill_uniform(t, seed, lo, hi);
    NOSA_ASSERT(t.dtype() == DType::bf16 || t.dtype() == DType::f32,
                "fill_uniform: bf16 or float32 tensors only, not {}", dtype_name(t.dtype()));
    NOSA_CUDA_CHECK(rcu::launch_fill_uniform(t.raw(), t.dtype() == DType::bf16, t.numel(), seed,
                                             lo, hi, stream_));
  }

  // ---- the step -----------------------------------------------------------------------------

  void begin_step(const StepBatch& step, bool more) override {
    NOSA_ASSERT(!more || !recording_, "a step graph records one step");
    join_partition_copies();
    join_prefetches();
    step_ = &step;
    plan_valid_ = false;
    bounds_.valid = false;
    gather_pending_[slot_] = false;
    const int T = int(step.n_tokens()), S = int(step.seqs.size());
    if (recording_) {
      // The graph's metadata buffer: a copy from pinned memory that each replay refills first.
      StepGraph& g = *recording_;
      int32_t* host = static_cast<int32_t*>(g.meta_host.get(g.meta_bytes));
      write_step_meta(step, g.key.cap_blocks, host);
      g.meta_dev = alloc(DType::u8, {int64_t(g.meta_bytes)});
      NOSA_CUDA_CHECK(cudaMemcpyAsync(g.meta_dev.raw(), host, g.meta_bytes,
                                      cudaMemcpyHostToDevice, stream_));
      set_view(static_cast<const int32_t*>(g.meta_dev.raw()), step, g.key.cap_blocks);
      graph_decode_list_ = view_.logit_rows + view_.n_logits;
      return;
    }
    if (!more) reset_staging();
    int stride = 1;
    for (const StepSequence& s : step.seqs)
      stride = std::max<int>(stride, int(s.blocks ? s.blocks->size() : 0));
    std::vector<int32_t> meta(step_meta_ints(T, S, stride, step.logit_rows.size()), 0);
    write_step_meta(step, stride, meta.data());
    set_view(static_cast<const int32_t*>(stage(meta.data(), meta.size() * 4)), step, stride);
  }

  // ---- micro-batches: two step slots, gathers on a side stream ----------------------------

  int step_slots() const override { return 2; }

  void use_step_slot(int slot) override {
    NOSA_ASSERT(slot == 0 || slot == 1, "step slot {} of 2", slot);
    if (slot == slot_) return;
    std::swap(step_, other_.step);
    std::swap(view_, other_.view);
    std::swap(plan_, other_.plan);
    std::swap(plan_valid_, other_.plan_valid);
    std::swap(bounds_, other_.bounds);
    slot_ = slot;
  }

  void set_gather_overlap(bool on) override {
    if (overlap_ && !on) {
      // Whatever comes next on the main stream comes after every gather.
      NOSA_CUDA_CHECK(cudaEventRecord(gathered_[0], side_));
      NOSA_CUDA_CHECK(cudaStreamWaitEvent(stream_, gathered_[0], 0));
      gather_pending_[0] = gather_pending_[1] = false;
    }
    overlap_ = on;
  }

  void selection_ready(const Selection& s) override {
    if (overlap_) NOSA_CUDA_CHECK(cudaEventRecord(selected_[slot_], stream_));
  }

  const void* read_back_selection(const Selection& s) override {
    if (!overlap_) return read_back(s.blocks);
    // Only the selection's own kernels are waited for (selection_ready), not the other slot's
    // work queued after them on the main stream, nor the gathers on the side stream.
    return copy_to_host(s.blocks, fetch_, selected_[slot_]);
  }

  void gather_selected(const std::vector<memory::ChunkCopy>& loads, KvCache& cache) override {
    if (!overlap_) return copy_chunks(loads, true, cache);
    if (loads.empty()) return;
    launch_transfers(loads, true, cache, side_);
    NOSA_CUDA_CHECK(cudaEventRecord(gathered_[slot_], side_));
    gather_pending_[slot_] = true;
  }

  void resident_partitions(int layer, const Selection& selection, const StepBatch& step,
                           const std::vector<int32_t>& seq_partition, KvCache& cache,
                           bool speculative) override {
    NOSA_ASSERT(step_ == &step && !overlap_,
                "resident_partitions: not the current step, or micro-batches (a cache with "
                "partitions runs whole steps)");
    NOSA_ASSERT(speculative == in_side_work_, "resident_partitions: a speculative round runs "
                "as side work, the layer's own round not");
    // The layer's own round after its prefetch: the slots and the slot table's entries the
    // prefetch filled, and its copies.
    if (!speculative && prefetch_pending_[layer & 1] == layer) {
      NOSA_CUDA_CHECK(cudaStreamWaitEvent(stream_, prefetched_[layer & 1], 0));
      prefetch_pending_[layer & 1] = -1;
    }
    memory::PartitionArgs a = cache.partition_args(layer);
    a.selection = selection.blocks.data<int32_t>();
    a.n_tokens = int(step.n_tokens());
    a.k = selection.k_max;
    a.token_seq = view_.token_seq;
    a.block_table = view_.block_table;
    a.bt_stride = view_.bt_stride;
    // The sequences' partitions: read straight from pinned staging memory (no upload to
    // queue), or, while a step graph records, from the graph's metadata, which each replay
    // refills (replay_step).
    if (recording_) {
      NOSA_ASSERT(seq_partition.size() == size_t(recording_->key.tokens),
                  "resident_partitions: {} partitions for a graph of {} sequences",
                  seq_partition.size(), recording_->key.tokens);
      a.seq_partition = recording_->meta_dev.data<int32_t>() + recording_->parts_at;
    } else {
      auto* parts_of_seqs = reinterpret_cast<int32_t*>(staging_space(seq_partition.size() * 4));
      std::copy(seq_partition.begin(), seq_partition.end(), parts_of_seqs);
      a.seq_partition = parts_of_seqs;
    }
    const int64_t rows = int64_t(a.n_tokens) * a.n_heads;
    const int64_t n = std::max<int64_t>(1, rows * a.k);
    const int64_t bytes = n * int64_t(sizeof(mcu::PartitionCopy)) + rows * 4;
    if (speculative) {
      // Decision and copies on the side stream, with a copy list of its own (kept by the side
      // work); reset_staging waits for the side stream before reusing the staging memory.
      NOSA_ASSERT(layer > 0 && prefetch_pending_[layer & 1] < 0,
                  "a prefetch of layer {} before layer 0's round, or beside another one",
                  layer);
      a.speculative = true;
      Tensor list = alloc(DType::u8, {bytes});
      auto* items = static_cast<mcu::PartitionCopy*>(list.raw());
      int* counts = reinterpret_cast<int*>(items + n);
      NOSA_CUDA_CHECK(mcu::launch_partition_decisions(a, items, counts, stream_));
      const int in_flight = prefetch_copy_row_blocks_ >= 0
                                ? prefetch_copy_row_blocks_
                                : int(std::max<int64_t>(3, (rows + 5) / 10));
      NOSA_CUDA_CHECK(mcu::launch_partition_copies(a, items, counts, stream_, in_flight));
      NOSA_CUDA_CHECK(cudaEventRecord(prefetched_[layer & 1], stream_));
      prefetch_pending_[layer & 1] = layer;
      return;
    }
    // The rows' copy lists, then their counts: one buffer for every round, grown
    // when a round needs more (a recording graph's own, whose addresses it keeps).
    Tensor& copies = recording_ ? recording_->partition_copies : partition_copies_;
    Tensor& split_rows = recording_ ? recording_->split_rows : split_rows_;
    join_partition_copies();  // the previous layer's (attend joins them; this is for safety)
    if (copies.numel() < bytes) {
      if (copies.defined()) step_keep_.push_back(copies);  // queued readers
      copies = alloc(DType::u8, {bytes});
    }
    auto* items = static_cast<mcu::PartitionCopy*>(copies.raw());
    int* counts = reinterpret_cast<int*>(items + n);
    if (!overlap_partition_copies_) {
      NOSA_CUDA_CHECK(mcu::launch_resident_partitions(a, items, counts, stream_));
      mark_staging_read();
      return;
    }
    // The rows split into hits and misses, for attention over the hits while the misses are
    // copied on the side stream (attend).
    if (split_rows.numel() < 2 * n) {
      if (split_rows.defined()) step_keep_.push_back(split_rows);
      split_rows = alloc(DType::i32, {2 * n});
    }
    a.hit_rows = split_rows.data<int32_t>();
    a.miss_rows = a.hit_rows + n;
    NOSA_CUDA_CHECK(mcu::launch_partition_decisions(a, items, counts, stream_));
    mark_staging_read();
    NOSA_CUDA_CHECK(cudaEventRecord(decided_, stream_));
    NOSA_CUDA_CHECK(cudaStreamWaitEvent(side_, decided_, 0));
    NOSA_CUDA_CHECK(mcu::launch_partition_copies(a, items, counts, side_));
    NOSA_CUDA_CHECK(cudaEventRecord(copied_, side_));
    pending_copies_ = {layer, a.k, a.hit_rows, a.miss_rows};
  }

  // ---- side work: another stream, forked from the main one and joined by a layer's round ----

  void begin_side_work(const std::vector<Tensor>& inputs) override {
    NOSA_ASSERT(!in_side_work_, "begin_side_work: side work is already open");
    NOSA_CUDA_CHECK(cudaEventRecord(fork_, stream_));
    NOSA_CUDA_CHECK(cudaStreamWaitEvent(ahead_, fork_, 0));
    side_keep_.insert(side_keep_.end(), inputs.begin(), inputs.end());
    main_stream_ = stream_;
    stream_ = ahead_;
    in_side_work_ = true;
    ahead_used_ = true;
    // cuBLAS on the side stream with a workspace of its own: GEMMs of both streams may run at
    // once (setting the stream resets the workspace). Side work is open from here: a failure
    // leaves it to the caller's end_side_work.
    NOSA_CUBLAS_CHECK(cublasSetStream(cublas_, ahead_));
    NOSA_CUBLAS_CHECK(
        cublasSetWorkspace(cublas_, ahead_workspace_.raw(), ahead_workspace_.bytes()));
  }

  void end_side_work() override {
    if (!in_side_work_) return;  // begin_side_work failed before opening it
    in_side_work_ = false;
    stream_ = main_stream_;
    NOSA_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    NOSA_CUBLAS_CHECK(cublasSetWorkspace(cublas_, workspace_.raw(), workspace_.bytes()));
  }

  // Makes the main stream wait for prefetches that no round joined (a step that failed between
  // a prefetch and its layer's round): the next prefetch of that layer parity may then start,
  // and nothing frees what they read while they run.
  void join_prefetches() {
    if (recording_) return;  // a capture joins its own (end_recording)
    for (int i = 0; i < 2; ++i)
      if (prefetch_pending_[i] >= 0) {
        NOSA_CUDA_CHECK(cudaStreamWaitEvent(stream_, prefetched_[i], 0));
        prefetch_pending_[i] = -1;
      }
  }

  // After a direct step's kernel that reads staging memory (reset_staging waits for it). A
  // recording step reads its graph's metadata instead, and an event recorded in a capture
  // cannot be waited for outside it.
  void mark_staging_read() {
    if (!recording_) NOSA_CUDA_CHECK(cudaEventRecord(staged_, stream_));
  }

  void set_partition_copy_overlap(bool on) override { overlap_partition_copies_ = on; }
  bool partition_copy_overlap() const override { return overlap_partition_copies_; }

  // Makes the main stream wait for device-side residency's copies on the side stream, if any
  // are pending.
  void join_partition_copies() {
    if (pending_copies_.layer < 0) return;
    NOSA_CUDA_CHECK(cudaStreamWaitEvent(stream_, copied_, 0));
    pending_copies_.layer = -1;
  }

  // ---- step graphs --------------------------------------------------------------------------

  bool replay_step(const StepBatch& step, const void* model, int variant, const KvCache& cache,
                   Tensor& logits) override {
    const std::optional<GraphKey> key = graph_key(step, model, variant, cache);
    if (!key) return false;
    StepGraph* g = nullptr;
    for (auto& x : graphs_)
      if (x->key == *key) g = x.get();
    if (!g) return false;
    // The token ids were checked by the model (Model::forward) before any replay.
    // The last replay has read the metadata buffer, and the last direct step its uploads.
    NOSA_CUDA_CHECK(cudaEventSynchronize(g->done));
    join_prefetches();
    reset_staging();
    int32_t* host = static_cast<int32_t*>(g->meta_host.get(g->meta_bytes));
    write_step_meta(step, key->cap_blocks, host);
    write_partitions(cache, int(step.n_tokens()), host + g->parts_at);
    step_ = &step;
    plan_valid_ = false;
    bounds_.valid = false;
    NOSA_CUDA_CHECK(cudaGraphLaunch(g->exec, stream_));
    NOSA_CUDA_CHECK(cudaEventRecord(g->done, stream_));
    g->last_use = ++graph_clock_;
    ++g_graph_replays;
    logits = g->logits;
    return true;
  }

  bool begin_recording(const StepBatch& step, const void* model, int variant,
                       const KvCache& cache) override {
    const std::optional<GraphKey> key = graph_key(step, model, variant, cache);
    if (!key) return false;
    // A failed recording has a cause in the model or the cache (an op that cannot be recorded, a
    // group too large for the decode kernel), not in the batch size: no other key of the same
    // pair is tried again.
    for (const GraphKey& k : unrecordable_)
      if (k.model == key->model && k.variant == key->variant && k.cache == key->cache)
        return false;
    // Record at the second step with this key (not necessarily the next one: batch sizes come
    // and go while serving): the first ran directly, so lazy set-ups (uploads, kernel
    // attributes, cuBLAS heuristics) are done, and a one-off shape costs no recording.
    auto seen = std::find_if(sightings_.begin(), sightings_.end(),
                             [&](const GraphKey& k) { return k == *key; });
    if (seen == sightings_.end()) {
      if (sightings_.size() >= k_max_sightings) sightings_.pop_front();
      sightings_.push_back(*key);
      return false;
    }
    sightings_.erase(seen);
    reset_staging();
    auto g = std::make_unique<StepGraph>();
    g->key = *key;
    const int T = int(step.n_tokens());
    // The step's metadata, then the decode kernel's token list [0, T), then the sequences'
    // partitions (device-side residency; replay_step rewrites them).
    const size_t step_ints = step_meta_ints(T, T, key->cap_blocks, size_t(T));
    g->meta_bytes = (step_ints + 2 * size_t(T)) * 4;
    g->parts_at = step_ints + size_t(T);
    int32_t* host = static_cast<int32_t*>(g->meta_host.get(g->meta_bytes));
    std::fill_n(host, g->meta_bytes / 4, 0);
    for (int i = 0; i < T; ++i) host[step_ints + size_t(i)] = i;
    write_partitions(cache, T, host + g->parts_at);
    NOSA_CUDA_CHECK(cudaEventCreateWithFlags(&g->done, cudaEventDisableTiming));
    NOSA_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
    recording_ = std::move(g);
    return true;
  }

  bool end_recording(const Tensor& logits) override {
    NOSA_ASSERT(recording_ != nullptr, "end_recording without begin_recording");
    // Each layer's own round joins its prefetch (the prefetches' tensors came from the graph's
    // pool, which nothing else allocates from); a capture with a fork left open cannot end.
    if (prefetch_pending_[0] >= 0 || prefetch_pending_[1] >= 0 || in_side_work_) {
      logger("runtime")->warn("a step graph recorded a prefetch that no round joined; such "
                              "steps run directly");
      abort_recording();
      return false;
    }
    std::unique_ptr<StepGraph> g = std::move(recording_);
    graph_decode_list_ = nullptr;
    pending_copies_.layer = -1;  // attend joined every layer's copies inside the capture
    cudaGraph_t graph = nullptr;
    cudaError_t err = cudaStreamEndCapture(stream_, &graph);
    if (err == cudaSuccess) err = cudaGraphInstantiate(&g->exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (err != cudaSuccess) {
      cudaGetLastError();
      logger("runtime")->warn("a step graph could not be made ({}); such steps run directly",
                              cudaGetErrorString(err));
      unrecordable_.push_back(g->key);
      return false;
    }
    g->logits = logits;
    NOSA_CUDA_CHECK(cudaGraphLaunch(g->exec, stream_));
    NOSA_CUDA_CHECK(cudaEventRecord(g->done, stream_));
    g->last_use = ++graph_clock_;
    // Each graph keeps one step's activations: hold a few, dropping the least recently used.
    if (graphs_.size() >= k_max_graphs) {
      auto oldest = std::min_element(graphs_.begin(), graphs_.end(), [](auto& a, auto& b) {
        return a->last_use < b->last_use;
      });
      NOSA_CUDA_CHECK(cudaEventSynchronize((*oldest)->done));
      graphs_.erase(oldest);
    }
    graphs_.push_back(std::move(g));
    return true;
  }

  // The sequences' partitions of a step that decides residency on the device (zeros otherwise).
  static void write_partitions(const KvCache& cache, int T, int32_t* out) {
    if (!cache.on_device()) {
      std::fill_n(out, T, 0);
      return;
    }
    const std::vector<int32_t>& parts = cache.step_partitions();
    NOSA_ASSERT(parts.size() == size_t(T), "a step graph of {} sequences, {} partitions", T,
                parts.size());
    std::copy(parts.begin(), parts.end(), out);
  }

  void abort_recording() override {
    if (!recording_) return;
    // Copies the capture queued on the side streams never ran: nothing to wait for.
    pending_copies_.layer = -1;
    prefetch_pending_[0] = prefetch_pending_[1] = -1;
    if (in_side_work_) end_side_work();
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    unrecordable_.push_back(recording_->key);
    recording_.reset();
    graph_decode_list_ = nullptr;
  }

  void forget_graphs(const void* tag) override {
    auto uses = [tag](const GraphKey& k) { return k.model == tag || k.cache == tag; };
    if (std::any_of(graphs_.begin(), graphs_.end(), [&](auto& g) { return uses(g->key); }))
      cudaStreamSynchronize(stream_);
    std::erase_if(graphs_, [&](auto& g) { return uses(g->key); });
    std::erase_if(unrecordable_, uses);
    std::erase_if(sightings_, uses);
  }

  void check_shapes(const KvLayout& L, int group) const override {
    NOSA_CHECK_CODE(L.head_dim == 64 || L.head_dim == 128, ErrorCode::invalid_argument,
                    "the CUDA kernels support head_dim 64 and 128, not {}", L.head_dim);
    NOSA_CHECK_CODE(L.block_size % 16 == 0 && (64 % L.block_size == 0 || L.block_size % 64 == 0),
                    ErrorCode::invalid_argument,
                    "the CUDA attention kernels support block sizes 16, 32, 64 and multiples of "
                    "64, not {}",
                    L.block_size);
    NOSA_CHECK_CODE(group >= 1 && group <= 64, ErrorCode::invalid_argument,
                    "the CUDA attention kernels support 1 to 64 query heads per KV head, not {}",
                    group);
    // The eviction-score kernel gives each local KV head one warp of a thread block.
    NOSA_CHECK_CODE(L.n_kv_heads <= 32, ErrorCode::invalid_argument,
                    "the CUDA backend supports up to 32 KV heads per rank, not {} (use --tp)",
                    L.n_kv_heads);
  }

  // ---- dense ops ----------------------------------------------------------------------------

  void embedding(const Tensor& table, Tensor& out) override {
    require(table, DType::bf16, "embedding table");
    const int64_t vocab = table.dim(0);
    for (int32_t id : step_->tokens)
      NOSA_CHECK(id >= 0 && id < vocab, "token id {} is outside the vocabulary [0, {})", id, vocab);
    NOSA_CUDA_CHECK(rcu::launch_embedding(table.raw(), view_.tokens, view_.n_tokens,
                                          int(table.dim(1)), out.raw(), stream_));
  }

  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    norm(x, nullptr, weight, eps, out);
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) override {
    require(x, DType::bf16, "linear x");
    require(w, DType::bf16, "linear w");
    const int64_t rows = x.dim(0), k = x.dim(1), n = w.dim(0);
    NOSA_ASSERT(w.dim(1) == k && out.dim(0) == rows && out.dim(1) == n,
                "linear: shapes {} x {}^T -> {}", shape_string(x.shape()),
                shape_string(w.shape()), shape_string(out.shape()));
    NOSA_ASSERT(out.device() == Device::cuda &&
                    (out.dtype() == DType::bf16 || out.dtype() == DType::f32),
                "linear: the output must be a cuda bf16 or float32 tensor");
    if (rows == 0) return;
    const bool out_f32 = out.dtype() == DType::f32;
    const float alpha = 1.0f, beta = 0.0f;
    NOSA_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(rows), int(k),
                                   &alpha, w.raw(), CUDA_R_16BF, int(k), x.raw(), CUDA_R_16BF,
                                   int(k), &beta, out.raw(), out_f32 ? CUDA_R_32F : CUDA_R_16BF,
                                   int(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (bias) {
      require(*bias, DType::bf16, "linear bias");
      NOSA_CUDA_CHECK(
          rcu::launch_bias_add(out.raw(), out_f32, bias->raw(), int(rows), int(n), stream_));
    }
  }

  void add_rmsnorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                   Tensor& out) override {
    require(y, DType::bf16, "add_rmsnorm y");
    NOSA_ASSERT(x.shape() == y.shape(), "add_rmsnorm: shapes {} + {}", shape_string(x.shape()),
                shape_string(y.shape()));
    norm(x, &y, weight, eps, out);
  }

  // out = rmsnorm(x), after x += *residual when one is given (one kernel either way).
  void norm(const Tensor& x, const Tensor* residual, const Tensor& weight, float eps,
            Tensor& out) {
    require(x, DType::bf16, "rmsnorm x");
    require(weight, DType::bf16, "rmsnorm weight");
    NOSA_ASSERT(x.shape() == out.shape(), "rmsnorm: shapes {} -> {}", shape_string(x.shape()),
                shape_string(out.shape()));
    rcu::RmsNormArgs a;
    a.x = x.raw();
    a.residual = residual ? residual->raw() : nullptr;
    a.w = weight.raw();
    a.out = out.raw();
    a.rows = int(x.dim(0));
    a.n = int(x.dim(1));
    a.eps = eps;
    NOSA_CUDA_CHECK(rcu::launch_rmsnorm(a, stream_));
  }

  void add(Tensor& x, const Tensor& y) override {
    require(x, DType::bf16, "add x");
    require(y, DType::bf16, "add y");
    NOSA_CUDA_CHECK(rcu::launch_add(x.raw(), y.raw(), x.numel(), stream_));
  }

  void silu_mul(const Tensor& gate_up, Tensor& out) override {
    require(gate_up, DType::bf16, "silu_mul");
    NOSA_CUDA_CHECK(
        rcu::launch_silu_mul(gate_up.raw(), out.raw(), int(gate_up.dim(0)), int(out.dim(1)), stream_));
  }

  void prepare_rope(RopeTable& rope) override {
    Tensor host = Tensor::borrow(rope.inv_freq.data(), DType::f32, {int64_t(rope.inv_freq.size())});
    rope.device = upload(host, DType::f32);
  }

  void split_qkv_rope(const Tensor& qkv, const RopeTable& rope, Tensor& q, Tensor& k,
                      Tensor& v_all) override {
    require(qkv, DType::bf16, "split_qkv_rope");
    const int hq = int(q.dim(1)), hk = int(k.dim(1)), hv = int(v_all.dim(1)), d = int(q.dim(2));
    NOSA_ASSERT(qkv.dim(1) == int64_t(hq + hk + hv) * d, "split_qkv_rope: width {} != ({}+{}+{})*{}",
                qkv.dim(1), hq, hk, hv, d);
    NOSA_ASSERT(rope.device.defined() && rope.device.numel() == d / 2,
                "split_qkv_rope: the RoPE table was not prepared for this backend");
    rcu::RopeArgs a;
    a.qkv = qkv.raw();
    a.q = q.raw();
    a.k = k.raw();
    a.v = v_all.raw();
    a.positions = view_.positions;
    a.inv_freq = rope.device.data<float>();
    a.attention_scaling = rope.attention_scaling;
    a.n_tokens = int(qkv.dim(0));
    a.hq = hq;
    a.hk = hk;
    a.hv = hv;
    a.head_dim = d;
    NOSA_CUDA_CHECK(rcu::launch_split_qkv_rope(a, stream_));
  }

  void gather_logit_rows(const Tensor& x, Tensor& out) override {
    NOSA_CUDA_CHECK(rcu::launch_gather_rows(x.raw(), view_.logit_rows, view_.n_logits,
                                            int(x.dim(1)), out.raw(), stream_));
  }

  // ---- NOSA ---------------------------------------------------------------------------------

  void eviction_scores(const Tensor& v_all, const Tensor& a, const Tensor& delta_w,
                       const Tensor* delta_b, int head_begin, int head_end, Tensor& c) override {
    require(v_all, DType::bf16, "eviction_scores v");
    require(a, DType::f32, "eviction_scores A");
    require(delta_w, DType::f32, "eviction_scores delta");
    acu::EvictionArgs args;
    args.v_all = v_all.raw();
    args.a = a.data<float>();
    args.delta_w = delta_w.data<float>();
    args.delta_b = delta_b ? delta_b->data<float>() : nullptr;
    args.c = c.data<float>();
    args.n_tokens = int(v_all.dim(0));
    args.n_kv = int(v_all.dim(1));
    args.head_dim = int(v_all.dim(2));
    args.head_begin = head_begin;
    args.head_end = head_end;
    NOSA_CUDA_CHECK(acu::launch_eviction_scores(args, stream_));
  }

  void append_kv(int layer, const Tensor& k, const Tensor& v_all, int v_head_begin,
                 const Tensor* c, KvCache& cache) override {
    require(k, DType::bf16, "append_kv k");
    acu::AppendKvArgs a;
    a.kv = kv_view(cache);
    a.step = view_;
    a.layer = layer;
    a.k = k.raw();
    a.v_all = v_all.raw();
    a.hv = int(v_all.dim(1));
    a.v_head_begin = v_head_begin;
    a.c = c ? c->data<float>() : nullptr;
    NOSA_CUDA_CHECK(acu::launch_append_kv(a, stream_));
  }

  void update_compressed(int layer, bool scores, const attention::SparseParams& p,
                         KvCache& cache) override {
    acu::UpdateCompressedArgs a;
    a.kv = kv_view(cache);
    a.step = view_;
    a.layer = layer;
    a.kernel_size = p.kernel_size;
    a.kernel_stride = p.kernel_stride;
    a.scores = scores;
    a.max_new_windows = step_bounds(p).max_new_windows;
    NOSA_CUDA_CHECK(acu::launch_update_compressed(a, stream_));
  }

  Selection select_blocks(int layer, attention::Mode mode, const Tensor& q,
                          const attention::SparseParams& p, KvCache& cache) override {
    require(q, DType::bf16, "select_blocks q");
    const KvLayout& L = cache.layout();
    const int H = L.n_kv_heads, hq = int(q.dim(1)), group = hq / H;
    const int64_t T = step_->n_tokens();
    const StepBounds& b = step_bounds(p);
    const int k_max = b.k_max[int(mode)], n_max = b.n_max, nb_max = b.nb_max;
    Selection sel;
    sel.k_max = k_max;
    sel.blocks = alloc(DType::i32, {T, H, k_max});
    acu::SelectArgs a;
    a.kv = kv_view(cache);
    a.step = view_;
    a.p = sparse_view(p);
    a.mode = mode == attention::Mode::nosa       ? acu::SelectMode::nosa
             : mode == attention::Mode::infllmv2 ? acu::SelectMode::infllmv2
                                                 : acu::SelectMode::dense;
    a.layer = layer;
    a.q = q.raw();
    a.group = group;
    a.scale = 1.0f / std::sqrt(float(L.head_dim));
    a.out = sel.blocks.data<int32_t>();
    a.k_max = k_max;
    a.n_max = n_max;
    a.nb_max = nb_max;
    // Automatic unless force_cuda_select_path() asked for one (tests, comparisons).
    acu::SelectPath requested = acu::SelectPath::automatic;
    if (g_select_path == "per-token") requested = acu::SelectPath::per_token;
    if (g_select_path.starts_with("split")) requested = acu::SelectPath::split;
    if (g_select_path == "split-finish") a.split_finish = 1;
    if (g_select_path == "split-spread") a.split_finish = 0;
    if (g_select_path.starts_with("tiled")) requested = acu::SelectPath::tiled;
    a.screen = !g_select_path.starts_with("tiled-exact");
    a.pooled_topk = !g_select_path.ends_with("inline");
    a.path = acu::select_path(requested, H, group, L.head_dim, L.keys_per_block, n_max, nb_max,
                              int(T));
    NOSA_CHECK_CODE(a.path != acu::SelectPath::per_token ||
                        acu::per_token_fits(group, L.head_dim, n_max, nb_max),
                    ErrorCode::invalid_argument,
                    "block selection over {} compressed keys ({} blocks) needs more shared memory "
                    "than this GPU allows a thread block; the context is too long for the CUDA "
                    "selection kernels",
                    n_max, nb_max);
    a.scratch_floats = acu::select_scratch_floats(a.path, H, group, L.head_dim,
                                                  L.keys_per_block, n_max, nb_max, int(T),
                                                  a.screen && a.mode != acu::SelectMode::dense,
                                                  a.pooled_topk);
    Tensor scratch;
    if (a.scratch_floats > 0) {
      scratch = alloc(DType::f32, {int64_t(a.scratch_floats)});
      a.scratch = scratch.data<float>();
    }
    NOSA_CUDA_CHECK(acu::launch_block_select(a, stream_));
    // Tests only: counting waits for the step, which a stream being captured (a step graph)
    // cannot do; nothing is asked of the driver unless counting is on.
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    if (g_count_screening) NOSA_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capturing));
    if (g_count_screening && capturing == cudaStreamCaptureStatusNone) {
      if (const int screened = acu::screened_tiles(a); screened > 0) {
        int redone = 0;
        NOSA_CUDA_CHECK(cudaMemcpyAsync(&redone, a.scratch, sizeof(int), cudaMemcpyDeviceToHost,
                                        stream_));
        NOSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
        g_screened_tiles += screened;
        g_redone_tiles += redone;
      }
    }
    return sel;
  }

  void attend(int layer, const Tensor& q, int q_head_begin, const Selection* selection,
              bool use_bias, KvCache& cache, Tensor& out_heads) override {
    require(q, DType::bf16, "attend q");
    if (gather_pending_[slot_]) {  // this slot's misses, gathered on the side stream
      NOSA_CUDA_CHECK(cudaStreamWaitEvent(stream_, gathered_[slot_], 0));
      gather_pending_[slot_] = false;
    }
    const KvLayout& L = cache.layout();
    const int H = L.n_kv_heads, hq = int(q.dim(1)), group = hq / H;
    // The kernels write every query head of the local groups; a rank that owns only some of
    // them (tensor parallelism within a group) gets its slice copied out.
    const bool slice = q_head_begin != 0 || out_heads.dim(1) != hq;
    Tensor out = slice ? alloc(DType::bf16, q.shape()) : out_heads;
    const Plan& plan = attend_plan(group, L.block_size);
    // Device-side residency copying this layer's misses on the side stream: the hits first,
    // then the misses once copied (a decoding step, so no prefill tiles).
    const PendingCopies parts = pending_copies_;
    const bool in_parts = parts.layer == layer && selection && parts.k == selection->k_max &&
                          plan.n_tiles == 0;
    if (!in_parts) join_partition_copies();
    const acu::KvView kv = kv_view(cache);
    const float scale = 1.0f / std::sqrt(float(L.head_dim));
    // The fields the decode and prefill kernels share.
    auto fill_common = [&](auto& a) {
      a.kv = kv;
      a.step = view_;
      a.layer = layer;
      a.q = q.raw();
      a.group = group;
      a.scale = scale;
      a.use_bias = use_bias;
      a.selection = selection ? selection->blocks.data<int32_t>() : nullptr;
      a.k_max = selection ? selection->k_max : 0;
    };
    if (plan.n_decode > 0) {
      acu::DecodeArgs a;
      fill_common(a);
      a.max_blocks = selection ? std::min(selection->k_max, plan.decode_max_blocks)
                               : plan.decode_max_blocks;
      a.token_list = plan.decode_tokens;
      a.n_list = plan.n_decode;
      a.splits = acu::decode_splits(a.n_list, H, a.max_blocks, L.block_size,
                                    props_.multiProcessorCount);
      // In parts, the misses get as many splits as the hits: a split's share comes from the
      // row's own count, so the few misses spread over the whole GPU, which has nothing else to
      // run once they are copied (with the fewest splits, 2 KV heads x 16 rows ran one thread
      // block each over all of a row's misses).
      a.split_total = in_parts ? 2 * a.splits : a.splits;
      Tensor partial = alloc(DType::f32, {int64_t(acu::decode_partial_floats(
                                              a.n_list, H, a.split_total, L.head_dim))});
      a.partial = partial.data<float>();
      a.out = out.raw();
      if (in_parts) {
        a.selection = parts.hits;
        NOSA_CUDA_CHECK(acu::launch_sparse_decode_part(a, stream_));
        join_partition_copies();
        a.selection = parts.misses;
        a.split_begin = a.splits;
        NOSA_CUDA_CHECK(acu::launch_sparse_decode_part(a, stream_));
        NOSA_CUDA_CHECK(acu::launch_sparse_decode_merge(a, stream_));
        ++g_attention_in_parts;
      } else {
        NOSA_CUDA_CHECK(acu::launch_sparse_decode(a, stream_));
      }
    }
    if (plan.n_tiles > 0) {
      acu::PrefillArgs a;
      fill_common(a);
      a.tiles = plan.tiles;
      a.n_tiles = plan.n_tiles;
      a.nb_max = plan.prefill_nb_max;
      a.out = out.raw();
      a.wgmma = prefill_wgmma_;
      const size_t need = acu::prefill_shared_bytes(L.head_dim, a.nb_max),
                   limit = acu::prefill_shared_limit();
      NOSA_CHECK_CODE(need <= limit, ErrorCode::invalid_argument,
                      "prefill attention over {} blocks needs {} KiB of shared memory per thread "
                      "block; this GPU allows {} KiB: use shorter contexts or larger KV blocks",
                      a.nb_max, need >> 10, limit >> 10);
      NOSA_CUDA_CHECK(acu::launch_sparse_prefill(a, stream_));
    }
    if (slice) {
      const size_t d_bytes = size_t(L.head_dim) * 2;
      NOSA_CUDA_CHECK(cudaMemcpy2DAsync(
          out_heads.raw(), size_t(out_heads.dim(1)) * d_bytes,
          static_cast<const char*>(out.raw()) + size_t(q_head_begin) * d_bytes, size_t(hq) * d_bytes,
          size_t(out_heads.dim(1)) * d_bytes, size_t(q.dim(0)), cudaMemcpyDeviceToDevice, stream_));
    }
  }

  // ---- sampling -----------------------------------------------------------------------------

  std::vector<SampledToken> sample(const Tensor& logits,
                                   const std::vector<SamplingParams>& params) override {
    const int64_t n = logits.dim(0), vocab = logits.dim(1);
    NOSA_ASSERT(int64_t(params.size()) == n, "sample: {} rows but {} parameter sets", n,
                params.size());
    if (n == 0) return {};
    if (logits.device() == Device::cpu) {
      std::vector<SampledToken> out(n);
      for (int64_t i = 0; i < n; ++i)
        out[i] = sample_row(logits.data<float>() + i * vocab, vocab, params[i]);
      return out;
    }
    NOSA_ASSERT(logits.dtype() == DType::f32 || logits.dtype() == DType::bf16,
                "sample: float32 or bf16 logits, not {}", dtype_name(logits.dtype()));
    std::vector<rcu::SampleRowParams> rows(n);
    for (int64_t i = 0; i < n; ++i) {
      const SamplingParams& p = params[i];
      rows[i].temperature = p.temperature;
      rows[i].top_p = p.top_p;
      rows[i].top_k = p.top_k;
      rows[i].n_top = std::min(p.logprobs, rcu::k_max_top_logprobs);
      rows[i].u = p.temperature > 0.0f ? sampling_uniform(p.seed, p.step) : 0.0;
    }
    rcu::SampleArgs a;
    a.logits = logits.raw();
    a.logits_f32 = logits.dtype() == DType::f32;
    a.rows = int(n);
    a.vocab = int(vocab);
    a.params = static_cast<const rcu::SampleRowParams*>(
        stage(rows.data(), rows.size() * sizeof(rcu::SampleRowParams)));
    Tensor results = alloc(DType::u8, {int64_t(n * sizeof(rcu::SampleRowResult))});
    a.out = static_cast<rcu::SampleRowResult*>(results.raw());
    NOSA_CUDA_CHECK(rcu::launch_sample(a, stream_));
    auto* host = static_cast<rcu::SampleRowResult*>(
        result_pinned_.get(size_t(n) * sizeof(rcu::SampleRowResult)));
    NOSA_CUDA_CHECK(cudaMemcpyAsync(host, results.raw(), results.bytes(), cudaMemcpyDeviceToHost,
                                    stream_));
    NOSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<SampledToken> out(n);
    for (int64_t i = 0; i < n; ++i) {
      NOSA_CHECK_CODE(!host[i].nan, ErrorCode::internal, "NaN in the logits of row {}", i);
      out[i].token = host[i].token;
      out[i].logprob = host[i].logprob;
      for (int j = 0; j < host[i].n_top; ++j)
        out[i].top.emplace_back(host[i].top_ids[j], host[i].top_logprobs[j]);
    }
    return out;
  }

 private:
  // Which tokens take the decode kernel (single new tokens) and which the prefill tiles.
  struct Plan {
    int group = 0, block_size = 0;
    const int32_t* decode_tokens = nullptr;
    int n_decode = 0;
    int decode_max_blocks = 0;
    const acu::PrefillTile* tiles = nullptr;
    int n_tiles = 0;
    int prefill_nb_max = 1;
  };


  const Plan& attend_plan(int group, int block_size) {
    if (plan_valid_ && plan_.group == group && plan_.block_size == block_size) return plan_;
    Plan plan;
    plan.group = group;
    plan.block_size = block_size;
    if (recording_) {
      // Every token decodes; the token list and the block bound come from the graph.
      NOSA_CHECK(group <= 16, "step graphs take the decode kernel (at most 16 query heads per KV "
                              "head), not {}", group);
      plan.decode_tokens = graph_decode_list_;
      plan.n_decode = int(step_->n_tokens());
      plan.decode_max_blocks = recording_->key.cap_blocks;
      plan_ = plan;
      plan_valid_ = true;
      return plan_;
    }
    std::vector<int32_t> decode;
    std::vector<acu::PrefillTile> tiles;
    const int tile_tokens = acu::prefill_tile_tokens(group);
    for (size_t si = 0; si < step_->seqs.size(); ++si) {
      const StepSequence& s = step_->seqs[si];
      if (s.n_new == 1 && group <= 16) {
        decode.push_back(int32_t(s.token_begin));
        plan.decode_max_blocks =
            std::max<int>(plan.decode_max_blocks, int(s.n_past / block_size + 1));
        continue;
      }
      for (int64_t t0 = 0; t0 < s.n_new; t0 += tile_tokens) {
        acu::PrefillTile tile;
        tile.seq = int32_t(si);
        tile.first = int32_t(s.token_begin + t0);
        tile.count = int32_t(std::min<int64_t>(tile_tokens, s.n_new - t0));
        tiles.push_back(tile);
      }
      if (s.n_new > 0)
        plan.prefill_nb_max =
            std::max<int>(plan.prefill_nb_max, int((s.n_past + s.n_new - 1) / block_size + 1));
    }
    plan.n_decode = int(decode.size());
    plan.n_tiles = int(tiles.size());
    if (!decode.empty())
      plan.decode_tokens = static_cast<const int32_t*>(stage(decode.data(), decode.size() * 4));
    if (!tiles.empty())
      plan.tiles = static_cast<const acu::PrefillTile*>(
          stage(tiles.data(), tiles.size() * sizeof(acu::PrefillTile)));
    plan_ = plan;
    plan_valid_ = true;
    return plan_;
  }

  // The sizes the selection and compressed-key launches take: the same for every layer of a
  // step, so worked out once per step. A recorded step takes them at the end of its context
  // bucket, so that its launches serve every step of the bucket (per-token bounds come from the
  // metadata, -1 padded, as in any mixed batch).
  struct StepBounds {
    bool valid = false;
    attention::SparseParams p;
    int k_max[3] = {1, 1, 1};  // by attention::Mode
    int n_max = 1, nb_max = 1, max_new_windows = 0;
  };

  const StepBounds& step_bounds(const attention::SparseParams& p) {
    using attention::Mode;
    constexpr Mode k_modes[3] = {Mode::dense, Mode::infllmv2, Mode::nosa};
    StepBounds& b = bounds_;
    if (b.valid && b.p == p) return b;
    b = StepBounds{true, p};
    if (recording_) {
      // A decoding step: one new token completes at most one window per sequence.
      const int cap = recording_->key.cap_blocks;
      const int64_t pos_cap = int64_t(cap) * p.block_size - 1;
      // selected_count peaks at the bucket's end or at the last position that attends densely.
      for (Mode m : k_modes) {
        int64_t k = ref::selected_count(m, pos_cap, p);
        if (p.dense_len >= 2)
          k = std::max(k, ref::selected_count(m, std::min<int64_t>(pos_cap, p.dense_len - 2), p));
        b.k_max[int(m)] = int(k);
      }
      b.n_max = std::max<int>(1, int(ref::compressed_count(pos_cap, p)));
      b.nb_max = cap;
      b.max_new_windows = 1;
      return b;
    }
    for (int32_t pos : step_->positions) {
      for (Mode m : k_modes)
        b.k_max[int(m)] = std::max(b.k_max[int(m)], int(ref::selected_count(m, pos, p)));
      b.n_max = std::max(b.n_max, int(ref::compressed_count(pos, p)));
      b.nb_max = std::max(b.nb_max, int(pos / p.block_size + 1));
    }
    for (const StepSequence& s : step_->seqs)
      b.max_new_windows = std::max<int>(
          b.max_new_windows, int(ref::compressed_count(s.n_past + s.n_new - 1, p) -
                                 ref::compressed_count(s.n_past - 1, p)));
    return b;
  }

  // ---- step metadata and graphs -----------------------------------------------------------

  // Layout of a step's metadata (int32): tokens, positions and sequence of each token [T] x 3;
  // n_past, n_new, first token of each sequence [S] x 3; block tables [S][stride]; logit rows.
  static size_t step_meta_ints(int T, int S, int stride, size_t n_logits) {
    return size_t(3) * T + size_t(3) * S + size_t(S) * stride + n_logits;
  }

  static void write_step_meta(const StepBatch& step, int stride, int32_t* p) {
    const int T = int(step.n_tokens()), S = int(step.seqs.size());
    std::copy(step.tokens.begin(), step.tokens.end(), p);
    std::copy(step.positions.begin(), step.positions.end(), p + T);
    std::copy(step.token_seq.begin(), step.token_seq.end(), p + 2 * T);
    int32_t* sp = p + 3 * T;
    for (int i = 0; i < S; ++i) {
      const StepSequence& s = step.seqs[i];
      sp[i] = int32_t(s.n_past);
      sp[S + i] = int32_t(s.n_new);
      sp[2 * S + i] = int32_t(s.token_begin);
      int32_t* row = sp + 3 * S + size_t(i) * stride;
      const size_t n = s.blocks ? std::min(s.blocks->size(), size_t(stride)) : 0;
      if (n) std::copy_n(s.blocks->begin(), n, row);
      std::fill(row + n, row + stride, 0);
    }
    std::copy(step.logit_rows.begin(), step.logit_rows.end(), sp + 3 * S + size_t(S) * stride);
  }

  void set_view(const int32_t* d, const StepBatch& step, int stride) {
    const int T = int(step.n_tokens()), S = int(step.seqs.size());
    view_ = acu::StepView{};
    view_.tokens = d;
    view_.positions = d + T;
    view_.token_seq = d + 2 * T;
    view_.seq_n_past = d + 3 * T;
    view_.seq_n_new = d + 3 * T + S;
    view_.seq_token_begin = d + 3 * T + 2 * S;
    view_.block_table = d + 3 * T + 3 * S;
    view_.logit_rows = d + 3 * T + 3 * S + size_t(S) * stride;
    view_.bt_stride = stride;
    view_.n_tokens = T;
    view_.n_seqs = S;
    view_.n_logits = int(step.logit_rows.size());
  }

  // What a recorded step depends on besides the metadata: the model and KV cache (their
  // tensors' addresses), the batch size, and the context bucket that bounds every launch size.
  struct GraphKey {
    const void* model = nullptr;
    int variant = 0;  // the model's (Backend::replay_step)
    const void* cache = nullptr;
    int tokens = 0;
    int cap_blocks = 0;  // block tables hold this many blocks; contexts up to cap * block size
    std::string select_path;  // force_cuda_select_path() when recorded: replays keep it
    bool copy_overlap = false;  // set_partition_copy_overlap() when recorded
    bool operator==(const GraphKey&) const = default;
  };

  struct StepGraph {
    GraphKey key;
    rcu::DeviceAllocator pool;  // every tensor the recorded launches touch, besides model and KV
    PinnedBuffer meta_host;
    size_t meta_bytes = 0;
    size_t parts_at = 0;  // in ints: the sequences' partitions within the metadata
    Tensor meta_dev, logits;
    Tensor partition_copies, split_rows;  // device-side residency's lists, recorded steps'
    cudaGraphExec_t exec = nullptr;
    cudaEvent_t done = nullptr;
    uint64_t last_use = 0;
    ~StepGraph() {
      if (exec) cudaGraphExecDestroy(exec);
      if (done) cudaEventDestroy(done);
    }
  };

  static constexpr size_t k_max_graphs = 32;
  static constexpr size_t k_max_sightings = 256;
  // Contexts are bucketed by this many tokens: a graph serves 1024 decoding steps of a batch.
  static constexpr int64_t k_bucket_tokens = 1024;

  // The key of a step a graph can run: one new token per sequence, token i of sequence i, one
  // logit row each, contexts within the block tables.
  std::optional<GraphKey> graph_key(const StepBatch& step, const void* model, int variant,
                                    const KvCache& cache) const {
    if (!graphs_enabled()) return std::nullopt;
    const int64_t T = step.n_tokens();
    if (T == 0 || int64_t(step.seqs.size()) != T || int64_t(step.logit_rows.size()) != T)
      return std::nullopt;
    const int64_t bs = cache.layout().block_size;
    int64_t need = 1;
    for (int64_t i = 0; i < T; ++i) {
      const StepSequence& s = step.seqs[size_t(i)];
      if (s.n_new != 1 || s.token_begin != i || step.logit_rows[size_t(i)] != i || !s.blocks ||
          int64_t(s.blocks->size()) < s.n_past / bs + 1)
        return std::nullopt;
      need = std::max<int64_t>(need, s.n_past / bs + 1);
    }
    const int64_t bucket = std::max<int64_t>(1, k_bucket_tokens / bs);
    GraphKey k;
    k.model = model;
    k.variant = variant;
    k.cache = &cache;
    k.tokens = int(T);
    k.cap_blocks = int((need + bucket - 1) / bucket * bucket);
    k.select_path = g_select_path;
    k.copy_overlap = overlap_partition_copies_;
    return k;
  }

  // Room for `bytes` in this step's pinned staging memory (kept until the next step begins).
  char* staging_space(size_t bytes) {
    const size_t offset = (staging_used_ + 255) / 256 * 256;
    if (offset + bytes > staging_capacity_) {
      // Growing: wait until earlier copies out of the old buffer, and side-stream kernels reading
      // it, are done.
      NOSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
      if (in_side_work_) NOSA_CUDA_CHECK(cudaStreamSynchronize(main_stream_));
      if (ahead_used_) NOSA_CUDA_CHECK(cudaStreamSynchronize(ahead_));
      if (side_staged_) NOSA_CUDA_CHECK(cudaStreamSynchronize(side_));
      staging_capacity_ = std::max(staging_capacity_ * 2, offset + bytes + (size_t(1) << 20));
      staging_host_ = std::make_unique<PinnedBuffer>();
      staging_host_->get(staging_capacity_);
    }
    staging_used_ = offset + bytes;
    return static_cast<char*>(staging_host_->get(staging_capacity_)) + offset;
  }

  // `data` in device memory kept until the next step begins, uploaded through staging memory.
  const void* stage(const void* data, size_t bytes) {
    if (bytes == 0) return nullptr;
    char* host = staging_space(bytes);
    std::memcpy(host, data, bytes);
    Tensor dev = alloc(DType::u8, {int64_t(bytes)});
    NOSA_CUDA_CHECK(cudaMemcpyAsync(dev.raw(), host, bytes, cudaMemcpyHostToDevice, stream_));
    NOSA_CUDA_CHECK(cudaEventRecord(staged_, stream_));
    step_keep_.push_back(dev);
    return dev.raw();
  }

  // A new step: once every reader of the previous step's staging memory is done (its uploads,
  // marked by staged_, and side-stream kernels), the memory and its uploads' buffers are reused.
  void reset_staging() {
    NOSA_CUDA_CHECK(cudaEventSynchronize(staged_));
    if (side_staged_) NOSA_CUDA_CHECK(cudaStreamSynchronize(side_));
    side_staged_ = false;
    if (ahead_used_) {
      NOSA_CUDA_CHECK(cudaStreamSynchronize(ahead_));
      ahead_used_ = false;
      side_keep_.clear();
    }
    step_keep_.clear();
    staging_used_ = 0;
  }

  static void require(const Tensor& t, DType dtype, const char* what) {
    NOSA_ASSERT(t.device() == Device::cuda && t.dtype() == dtype,
                "{}: expected a cuda {} tensor, got {} {}", what, dtype_name(dtype),
                device_name(t.device()), dtype_name(t.dtype()));
  }

  static acu::KvView kv_view(KvCache& cache) {
    const KvLayout& L = cache.layout();
    NOSA_ASSERT(cache.kv().device() == Device::cuda && cache.kv().dtype() == DType::bf16,
                "the KV cache must be a cuda bf16 tensor");
    acu::KvView v;
    v.kv = cache.kv().raw();
    v.bias = cache.bias().data<float>();
    v.ck = cache.ck().raw();
    v.ck_scores = cache.ck_scores().data<float>();
    v.n_layers = L.n_layers;
    v.n_kv_heads = L.n_kv_heads;
    v.head_dim = L.head_dim;
    v.block_size = L.block_size;
    v.keys_per_block = L.keys_per_block;
    v.slot_table = cache.offloaded() ? cache.slot_table().data<int32_t>() : nullptr;
    return v;
  }

  static acu::SparseView sparse_view(const attention::SparseParams& p) {
    acu::SparseView v;
    v.block_size = p.block_size;
    v.kernel_size = p.kernel_size;
    v.kernel_stride = p.kernel_stride;
    v.init_blocks = p.init_blocks;
    v.local_blocks = p.local_blocks();
    v.topk = p.topk;
    v.q_select = p.q_select();
    v.dense_len = p.dense_len;
    return v;
  }

  int device_index_;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  cudaEvent_t staged_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  rcu::DeviceAllocator allocator_;
  Tensor workspace_;

  const StepBatch* step_ = nullptr;
  acu::StepView view_;
  Plan plan_;
  bool plan_valid_ = false;
  StepBounds bounds_;

  std::unique_ptr<PinnedBuffer> staging_host_;
  size_t staging_capacity_ = 0, staging_used_ = 0;
  std::vector<Tensor> step_keep_;
  PinnedBuffer upload_pinned_, result_pinned_, readback_pinned_;
  cudaEvent_t read_back_ = nullptr;
  cudaEvent_t host_copied_ = nullptr;  // after the last queue_copy_to_host
  // Device-side residency's copy list and its length, reused by every layer's round (they run
  // in order on the main stream).
  Tensor partition_copies_;
  // Overlapping the copies with attention over the hits (NOSA_RESIDENCY_OVERLAP=0: the copies
  // first, on the main stream): the rows split into hits and misses ([2][T][H][k]), and the
  // layer whose copies run on the side stream until copied_ (-1: none).
  bool overlap_partition_copies_ = env_int("NOSA_RESIDENCY_OVERLAP", 1, 0, 1) != 0;
  Tensor split_rows_;
  struct PendingCopies {
    int layer = -1, k = 0;
    const int32_t* hits = nullptr;
    const int32_t* misses = nullptr;
  } pending_copies_;
  cudaEvent_t decided_ = nullptr, copied_ = nullptr;

  // Micro-batches: the step slot that is not current (use_step_slot swaps it in), the side
  // stream of the overlapped gathers and their pinned transfer lists, and per slot the events
  // after its selection and after its last gather.
  struct OtherSlot {
    const StepBatch* step = nullptr;
    acu::StepView view;
    Plan plan;
    bool plan_valid = false;
    StepBounds bounds;
  } other_;
  int slot_ = 0;
  bool overlap_ = false;
  cudaStream_t side_ = nullptr;
  cudaStream_t fetch_ = nullptr;  // the selections' copies to the host
  cudaEvent_t selected_[2] = {nullptr, nullptr}, gathered_[2] = {nullptr, nullptr};
  bool gather_pending_[2] = {false, false};
  bool side_staged_ = false;  // side-stream kernels read this step's staging memory

  // Side work (prefetches): its stream and cuBLAS workspace, the main stream while it is open,
  // its tensors (until reset_staging has waited for it), and per layer parity the event after
  // a prefetch's copies and the layer it was for (-1: none pending).
  cudaStream_t ahead_ = nullptr, main_stream_ = nullptr;
  cudaEvent_t fork_ = nullptr;
  Tensor ahead_workspace_;
  bool in_side_work_ = false, ahead_used_ = false;
  std::vector<Tensor> side_keep_;
  cudaEvent_t prefetched_[2] = {nullptr, nullptr};
  int prefetch_pending_[2] = {-1, -1};
  // The prefetch's copies, which run beside the layer's kernels: at most this many rows' copies
  // in flight (NOSA_PREFETCH_COPY_ROWS; 0: a thread block per row, as for the misses; unset: a
  // tenth of the rows, rounded, at least 3). A block per row made prefetching cost more than it
  // saved: the copies slowed the layer's kernels down (docs/memory.md). Too few finish late. Measured
  // (nosa-8b-like, 16K, two processes each): at 32 rows (B = 16) 3 was fastest of 2, 3, 4, 6, 8;
  // at 64 rows 8 was faster than 3.
  int prefetch_copy_row_blocks_ = int(env_int("NOSA_PREFETCH_COPY_ROWS", -1, -1, 1 << 20));
  // Prefill attention (dense and sparse) through the wgmma kernel's variant 1, 2 or 3 where it
  // runs (attention/cuda/prefill_wgmma.cuh), 0: the mma.sync kernel. The default, 3 (pipelined),
  // was the fastest on an H200: dense prefill 16 x 16K, 8b-like 26227 (0) -> 27501 tok/s,
  // 1b-like 98329 -> 104622 (bench/results/2026-11-29-h200-session14); NOSA prefill 1b-like
  // 79325 -> 83261, 8b-like 25571 -> 25612 (bench/results/2026-11-29-h200-session15).
  int prefill_wgmma_ = int(env_int("NOSA_PREFILL_WGMMA", 3, 0, 3));


  // Step graphs (the destructor drops them first).
  std::vector<std::unique_ptr<StepGraph>> graphs_;
  std::unique_ptr<StepGraph> recording_;
  std::vector<GraphKey> unrecordable_;
  std::deque<GraphKey> sightings_;  // keys of steps that ran directly, not recorded yet
  const int32_t* graph_decode_list_ = nullptr;
  uint64_t graph_clock_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  NOSA_CHECK_CODE(cuda_available(), ErrorCode::unavailable, "no CUDA device is available");
  return std::make_unique<CudaBackend>(device_index);
}

}  // namespace nosa::runtime
