// The compute backend interface: the ops of the Llama forward pass and of NOSA attention, on
// tensors that live on the backend's device. The CPU reference backend implements every op in
// float32; the CUDA backend in bf16 with float32 accumulation. The forward pass (model.h) is
// written once against this interface.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attention/sparse_params.h"
#include "memory/kv_tiers.h"
#include "runtime/core/tensor.h"
#include "runtime/kv_cache.h"
#include "runtime/step.h"

namespace nosa::runtime {

// Inverse RoPE frequencies [head_dim / 2] after scaling (linear, llama3), computed on the host;
// `device` holds them on a backend that reads them there (Backend::prepare_rope, once per model).
struct RopeTable {
  std::vector<float> inv_freq;
  float attention_scaling = 1.0f;
  Tensor device;
};

// Blocks selected per (token, local KV head): [T][H][k_max] int32, ascending, -1 padded.
struct Selection {
  Tensor blocks;
  int k_max = 0;
};

// Per-sequence sampling parameters, resolved (no "unset" values).
struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;
  int top_k = 0;             // 0: no top-k filter
  uint64_t seed = 0;
  int64_t step = 0;          // the index of the sampled token, so that a seed gives one stream
  int logprobs = 0;          // alternatives to report (0: none, but the chosen one's logprob)
};

struct SampledToken {
  int32_t token = 0;
  float logprob = 0.0f;                               // natural log of the chosen token
  std::vector<std::pair<int32_t, float>> top;         // top alternatives with logprobs
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // Element type of activations and of the KV cache.
  virtual DType activation_dtype() const = 0;

  // Memory.
  virtual Tensor alloc(DType dtype, Shape shape) = 0;
  virtual Tensor zeros(DType dtype, Shape shape) = 0;
  // Copies a host tensor of any float dtype to the backend, converting to `dtype`.
  virtual Tensor upload(const Tensor& host, DType dtype) = 0;
  // Copies a backend tensor to the host as float32 (float tensors) or as is (integers).
  virtual Tensor to_host(const Tensor& t) = 0;
  // The bytes of a backend tensor in host memory the backend owns, valid until the next call;
  // waits only for the work queued before it (the residency path reads each layer's selection
  // this way: no allocation, no device-wide synchronisation). Host tensors: their own memory.
  virtual const void* read_back(const Tensor& t);
  // Queues a copy of a small tensor into `host` (memory from host_allocator()) behind the work
  // queued so far, without waiting; wait_host_copy() waits for the last one. A copy queued at
  // the end of a step is done by the time the step's results are back, so the wait is free then.
  // Host tensors: copied at once.
  virtual void queue_copy_to_host(const Tensor& t, void* host);
  virtual void wait_host_copy() {}
  // The NUMA node the device is attached to, or -1 (host backends, or unknown): diagnostics.
  virtual int numa_node() const { return -1; }
  // The device's PCI bus id ("0000:19:00.0"), or empty (host backends): benchmarks sample its
  // clocks and power by it.
  virtual std::string pci_bus_id() const { return {}; }
  // Bytes of device memory free for the KV cache (host backends: a policy limit).
  virtual size_t free_memory_bytes() const = 0;
  // Waits for queued work.
  virtual void synchronize() = 0;
  // The backend's CUDA stream (collectives queue on it); null for the CPU backend.
  virtual void* native_stream() { return nullptr; }
  // Host memory for the offloaded KV: pinned and device-mapped on GPUs, plain on the CPU.
  virtual std::unique_ptr<memory::HostAllocator> host_allocator();
  // Moves chunks between host memory and the KV cache's device slots (to_device: host -> slot,
  // and the slot table learns the new residents; else slot -> host). Offloaded caches only.
  virtual void copy_chunks(const std::vector<memory::ChunkCopy>& copies, bool to_device,
                           KvCache& cache);
  // Fills a float32 (or, on the GPU, bf16) tensor with uniform values in [lo, hi) that depend
  // only on (seed, index): random weights and KV contents for tests and benchmarks, made where
  // the tensor lives. The default handles host float32 tensors.
  virtual void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi);

  // Refuses, with a clear invalid_argument error, a model shape the backend's kernels do not
  // support (the KV layout of this rank, `group` query heads per KV head). Called once, when a
  // model is made; the CPU reference supports every shape.
  virtual void check_shapes(const KvLayout& layout, int group) const {}

  // Uploads a step's metadata (positions, sequence of each token, block tables); the ops below
  // refer to the current step. With `more`, the step is another part of the same forward pass
  // (a micro-batch, below), in the current slot: the other slots' steps stay valid.
  virtual void begin_step(const StepBatch& step, bool more = false) = 0;

  // Micro-batches (offloaded decoding): a backend that holds more than one step's metadata at
  // once lets the model run two halves of a batch layer by layer, interleaved, so that one
  // half's misses are gathered while the other half computes.
  virtual int step_slots() const { return 1; }
  // Makes `slot` current: begin_step fills it and the ops refer to its step.
  virtual void use_step_slot(int slot) {}
  // Overlapped gathers (on backends with more than one step slot): gather_selected queues on a
  // side stream, read_back_selection waits only for the selection's own kernels, and a slot's
  // attention waits for its slot's gathers. Off: everything in one queue, in order.
  virtual void set_gather_overlap(bool on) {}
  // Marks the point after which `s` is complete (after select_blocks, and after anything that
  // replaced its blocks): read_back_selection waits for that point only.
  virtual void selection_ready(const Selection& s) {}
  // A layer's selection in host memory (see read_back), for the residency path.
  virtual const void* read_back_selection(const Selection& s) { return read_back(s.blocks); }
  // The residency path's loads (host -> slot) for the current step slot's attention.
  virtual void gather_selected(const std::vector<memory::ChunkCopy>& loads, KvCache& cache) {
    copy_chunks(loads, true, cache);
  }
  // Device-side residency of one layer's selection for a decoding step (memory/partitions.h;
  // `seq_partition`: the step's sequences' partitions), queued before the layer's attention,
  // which then finds every selected chunk resident. Whole steps only (no micro-batches). The
  // default runs the reference on host tensors (the CPU backend).
  // `speculative`: a prefetch from a guess at the layer's selection (KvCache::prefetch), queued
  // as side work (below); the layer's own round comes after it, and waits for its copies.
  virtual void resident_partitions(int layer, const Selection& selection, const StepBatch& step,
                                   const std::vector<int32_t>& seq_partition, KvCache& cache,
                                   bool speculative);
  // Side work: the ops queued between begin_side_work and end_side_work run beside the work
  // queued after them (another stream), starting once the work queued before begin_side_work
  // is done. They must not read what the work queued after them writes (`inputs`, made before,
  // are kept until they are done, as are the tensors they allocate); nothing queued later may
  // read what they write, except a speculative round's slots, which the layer's own round waits
  // for. end_side_work closes it (and does nothing if it is not open, e.g. after a failed
  // begin_side_work). Backends with one queue run them in order.
  virtual void begin_side_work(const std::vector<Tensor>& inputs) {}
  virtual void end_side_work() {}
  // Whether resident_partitions' copies overlap the layer's attention over the chunks already
  // resident (attention then runs in two parts and merges them). Backends that copy in place
  // have nothing to overlap.
  virtual void set_partition_copy_overlap(bool on) {}
  virtual bool partition_copy_overlap() const { return false; }

  // Dense ops. Shapes: x [T, K], w [N, K], out [T, N].
  virtual void embedding(const Tensor& table, Tensor& out) = 0;  // rows of the step's tokens
  virtual void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) = 0;
  virtual void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) = 0;
  virtual void add(Tensor& x, const Tensor& y) = 0;  // x += y
  // x += y, then out = rmsnorm(x): a layer's residual add and the RMSNorm after it, which a
  // backend may do in one pass.
  virtual void add_rmsnorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                           Tensor& out) {
    add(x, y);
    rmsnorm(x, weight, eps, out);
  }
  // gate_up [T, 2F] (gate columns first): out [T, F] = silu(gate) * up.
  virtual void silu_mul(const Tensor& gate_up, Tensor& out) = 0;
  // Makes `rope` usable by split_qkv_rope on this backend (the CUDA backend uploads the table).
  virtual void prepare_rope(RopeTable& rope) {}
  // Splits qkv [T, Hq*d + Hk*d + Hv_all*d] into q [T, Hq, d] and k [T, Hk, d], both rotated at the
  // step's positions, and v_all [T, Hv_all, d].
  virtual void split_qkv_rope(const Tensor& qkv, const RopeTable& rope, Tensor& q, Tensor& k,
                              Tensor& v_all) = 0;
  // Gathers rows: out[i] = x[rows[i]] (rows = the step's logit_rows).
  virtual void gather_logit_rows(const Tensor& x, Tensor& out) = 0;

  // NOSA eviction scores c [T, head_end - head_begin] from v_all [T, n_kv, d] (float32 out).
  virtual void eviction_scores(const Tensor& v_all, const Tensor& a, const Tensor& delta_w,
                               const Tensor* delta_b, int head_begin, int head_end,
                               Tensor& c) = 0;
  // Writes the step's new tokens into the KV cache of `layer`: k [T, H, d], the local heads
  // [v_head_begin, v_head_begin + H) of v_all, and c [T, H] when given.
  virtual void append_kv(int layer, const Tensor& k, const Tensor& v_all, int v_head_begin,
                         const Tensor* c, KvCache& cache) = 0;
  // Computes the compressed keys (and, with scores, their mean eviction scores) of every window
  // that this step completed.
  virtual void update_compressed(int layer, bool scores, const attention::SparseParams& p,
                                 KvCache& cache) = 0;
  // Selects blocks for every token of the step and local KV head (docs/nosa.md, step 6).
  virtual Selection select_blocks(int layer, attention::Mode mode, const Tensor& q,
                                  const attention::SparseParams& p, KvCache& cache) = 0;
  // Attention over the selected blocks (all blocks <= the token's block when selection is null),
  // with the eviction-score bias when use_bias, for the query heads [q_head_begin, q_head_begin +
  // out.dim(1)) of q [T, Hq, d] (Hq = the local KV heads' whole groups). out [T, out heads, d].
  virtual void attend(int layer, const Tensor& q, int q_head_begin, const Selection* selection,
                      bool use_bias, KvCache& cache, Tensor& out) = 0;

  // Samples one token per row of logits [n, V] (float32 or activation dtype).
  virtual std::vector<SampledToken> sample(const Tensor& logits,
                                           const std::vector<SamplingParams>& params) = 0;

  // Step graphs (CUDA graphs; other backends keep these defaults). A decoding step's launches
  // depend on the step only through its batch size and a bucket of its context length, so the
  // backend records them once and replays them. `model` and `cache` tag what the recorded
  // launches also depend on (weights, KV tensors); forget_graphs(tag) drops the graphs of a model
  // or cache that goes away. `variant` tells apart steps the model runs in different ways (with
  // or without prefetching): a graph replays only steps of the variant it recorded.
  // Runs the step from a recorded graph when one fits; its logits then come back in `logits`.
  virtual bool replay_step(const StepBatch& step, const void* model, int variant,
                           const KvCache& cache, Tensor& logits);
  // Whether to record this step: then the model runs its forward pass as usual (the launches are
  // recorded, not run) and calls end_recording with the logits tensor, which runs the graph (false:
  // no graph could be made and nothing ran), or abort_recording after an error (the backend
  // then stops trying for this model and cache). The model checks the step's inputs first.
  virtual bool begin_recording(const StepBatch& step, const void* model, int variant,
                               const KvCache& cache);
  virtual bool end_recording(const Tensor& logits);
  virtual void abort_recording();
  virtual void forget_graphs(const void* tag);
};

// The CPU reference backend (threads from the global pool).
std::unique_ptr<Backend> make_cpu_backend();
// The CUDA backend on the given device; throws unavailable where CUDA or the device is missing.
std::unique_ptr<Backend> make_cuda_backend(int device_index);
// Whether a CUDA device can be used by this build.
bool cuda_available();
// Tests and comparisons: forces the CUDA block-selection path ("split", "tiled" or "per-token";
// a step the path cannot take falls back as select_path() says; "tiled-exact" the tiled path
// without its screening, "tiled-inline" with its top-k inside the tile kernel,
// "tiled-exact-inline" both); empty restores the automatic choice.
void force_cuda_select_path(const std::string& path);
// Tests: the tiled selection's screening (attention/cuda/select.cu) counted from now on (each
// count waits for its step's selection) or no more; and the (tile, KV head) pairs screened and
// redone exactly while counting, in this process.
void count_cuda_select_screening(bool on);
int64_t cuda_select_screened_tiles();
int64_t cuda_select_redone_tiles();
// Throws invalid_argument unless `path` is a name force_cuda_select_path() takes.
void check_select_path_name(const std::string& path);
// Whether the CUDA backend records and replays decoding steps as CUDA graphs (default: on, unless
// the environment sets NOSA_CUDA_GRAPHS=0). For comparisons and tests.
void set_cuda_graphs(bool enabled);
// Decoding steps run from recorded graphs so far, in this process (tests, benchmarks).
int64_t cuda_graph_replays();
// Decode attention run in two parts (device-side residency: the hits beside the misses' copies,
// then the misses) so far, in this process, not counting graph replays (tests).
int64_t cuda_attention_in_parts();

}  // namespace nosa::runtime
