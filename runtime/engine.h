// The engine step loop with continuous batching: requests join the running batch between steps,
// long prompts are prefilled in chunks so that running sequences keep decoding, and when KV
// blocks run short the newest sequence is preempted (its blocks freed, its tokens kept, and its
// KV recomputed when it is readmitted): no accepted request is dropped.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"

namespace nosa::runtime {

using RequestId = uint64_t;

struct GenerationRequest {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 16;
  SamplingParams sampling;          // step is filled in by the engine
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;
};

enum class FinishReason { none, stop, length, cancelled, error };
const char* finish_reason_name(FinishReason reason);

// One sampled token of a request, or its end.
struct TokenEvent {
  RequestId id = 0;
  bool has_token = false;
  SampledToken token;
  FinishReason finish = FinishReason::none;  // set on the request's last event
  std::string error;                         // when finish == error
};

struct EngineOptions {
  int64_t max_batch_tokens = 2048;  // tokens computed per step (decode tokens + prefill chunks)
  int max_running = 256;            // sequences in the running batch
  int64_t max_context = 0;          // tokens per sequence; 0: the model's max positions
};

struct EngineStats {
  int64_t waiting = 0, running = 0;
  int64_t kv_blocks_used = 0, kv_blocks_total = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;  // totals since start
  int64_t steps = 0, preemptions = 0;
  memory::TierStats tiers;  // residency and traffic of an offloaded KV cache (zeros otherwise)
};

// Runs the forward pass of one step and returns its logits. By default the model's forward on the
// cache; on a tensor-parallel replica, the leader's ReplicaRunner::forward.
using ForwardFn = std::function<Tensor(const StepBatch&)>;

class Engine {
 public:
  Engine(Model& model, KvCache& cache, EngineOptions options, ForwardFn forward = {});

  // Validates and queues a request. Throws invalid_argument (empty prompt, token id outside the
  // vocabulary, prompt at or over the context limit, bad sampling values) or
  // resource_exhausted (the prompt alone needs more KV blocks than the cache has).
  RequestId submit(GenerationRequest request);
  // Ends a request at the next step with finish reason cancelled (unknown ids are ignored).
  void cancel(RequestId id);
  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  // Runs one step and returns the tokens sampled and requests finished in it.
  std::vector<TokenEvent> step();
  EngineStats stats() const;
  int64_t max_context() const { return max_context_; }
  Model& model() { return model_; }

 private:
  struct Sequence {
    RequestId id;
    GenerationRequest request;
    std::vector<int32_t> tokens;   // prompt + generated
    int64_t prompt_len = 0;
    int64_t n_generated = 0;
    int64_t n_computed = 0;        // tokens whose KV is in the cache
    std::vector<int32_t> blocks;
    bool cancelled = false;
  };

  bool ensure_blocks(Sequence& seq, int64_t n_tokens);
  void release(Sequence& seq);
  void preempt_last();
  std::optional<FinishReason> finished(const Sequence& seq, int32_t token) const;
  // Ends the requests whose KV blocks a disk error lost; false when none were lost.
  bool fail_lost_blocks(std::vector<TokenEvent>& events, const std::string& why);

  Model& model_;
  KvCache& cache_;
  EngineOptions options_;
  ForwardFn forward_;
  int64_t max_context_;
  RequestId next_id_ = 1;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::list<std::unique_ptr<Sequence>> running_;
  std::vector<TokenEvent> pending_events_;
  EngineStats stats_;
};

// Sizes a KV cache for the backend: explicit blocks when > 0, else enough for max_tokens of
// context across the batch, capped by the backend's free memory.
int64_t kv_blocks_for(const KvLayout& layout, int64_t explicit_blocks, int64_t tokens_wanted,
                      size_t memory_bytes);

}  // namespace nosa::runtime
