#include "runtime/engine.h"

#include <algorithm>

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::runtime {

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::none: return "none";
    case FinishReason::stop: return "stop";
    case FinishReason::length: return "length";
    case FinishReason::cancelled: return "cancelled";
    case FinishReason::error: return "error";
  }
  return "?";
}

int64_t kv_blocks_for(const KvLayout& layout, int64_t explicit_blocks, int64_t tokens_wanted,
                      size_t memory_bytes) {
  if (explicit_blocks > 0) return explicit_blocks;
  const int64_t per_block = int64_t(layout.bytes_per_block());
  const int64_t wanted = (tokens_wanted + layout.block_size - 1) / layout.block_size;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(memory_bytes) / per_block));
}

Engine::Engine(Model& model, KvCache& cache, EngineOptions options, ForwardFn forward)
    : model_(model), cache_(cache), options_(options), forward_(std::move(forward)) {
  if (!forward_) forward_ = [this](const StepBatch& step) { return model_.forward(step, cache_); };
  const auto& c = model.config();
  max_context_ = options.max_context > 0
                     ? std::min<int64_t>(options.max_context, c.max_position_embeddings)
                     : c.max_position_embeddings;
  NOSA_CHECK(options_.max_batch_tokens > 0, "max batch tokens must be positive");
  NOSA_CHECK(options_.max_running > 0, "max running sequences must be positive");
}

RequestId Engine::submit(GenerationRequest r) {
  const int64_t vocab = model_.config().vocab_size;
  NOSA_CHECK(!r.prompt.empty(), "the prompt is empty");
  for (size_t i = 0; i < r.prompt.size(); ++i)
    NOSA_CHECK(r.prompt[i] >= 0 && r.prompt[i] < vocab,
               "prompt token {} (at index {}) is outside the vocabulary [0, {})", r.prompt[i], i,
               vocab);
  NOSA_CHECK(int64_t(r.prompt.size()) < max_context_,
             "the prompt has {} tokens; the context limit is {} (prompt plus at least one "
             "generated token)",
             r.prompt.size(), max_context_);
  NOSA_CHECK(r.max_tokens >= 1, "max_tokens must be at least 1, got {}", r.max_tokens);
  NOSA_CHECK(r.sampling.temperature >= 0.0f, "temperature must be >= 0, got {}",
             r.sampling.temperature);
  NOSA_CHECK(r.sampling.top_p > 0.0f && r.sampling.top_p <= 1.0f, "top_p must be in (0, 1], got {}",
             r.sampling.top_p);
  NOSA_CHECK(r.sampling.top_k >= 0, "top_k must be >= 0, got {}", r.sampling.top_k);
  NOSA_CHECK(r.sampling.logprobs >= 0 && r.sampling.logprobs <= 20,
             "logprobs must be between 0 and 20, got {}", r.sampling.logprobs);
  const int64_t bs = cache_.layout().block_size;
  const int64_t blocks_needed = (int64_t(r.prompt.size()) + 1 + bs - 1) / bs;
  NOSA_CHECK_CODE(blocks_needed <= cache_.pool().capacity(), ErrorCode::resource_exhausted,
                  "the prompt needs {} KV blocks but the cache has {} in all", blocks_needed,
                  cache_.pool().capacity());
  for (int32_t t : r.stop_token_ids)
    NOSA_CHECK(t >= 0 && t < vocab, "stop token {} is outside the vocabulary", t);

  auto seq = std::make_unique<Sequence>();
  seq->id = next_id_++;
  seq->tokens = r.prompt;
  seq->prompt_len = int64_t(r.prompt.size());
  seq->request = std::move(r);
  const RequestId id = seq->id;
  waiting_.push_back(std::move(seq));
  return id;
}

void Engine::cancel(RequestId id) {
  for (auto& s : waiting_)
    if (s->id == id) s->cancelled = true;
  for (auto& s : running_)
    if (s->id == id) s->cancelled = true;
}

EngineStats Engine::stats() const {
  EngineStats s = stats_;
  s.waiting = int64_t(waiting_.size());
  s.running = int64_t(running_.size());
  s.kv_blocks_used = cache_.pool().used_blocks();
  s.kv_blocks_total = cache_.pool().capacity();
  if (cache_.tiers()) s.tiers = cache_.stats();
  return s;
}

bool Engine::ensure_blocks(Sequence& seq, int64_t n_tokens) {
  const int64_t bs = cache_.layout().block_size;
  const int64_t need = (n_tokens + bs - 1) / bs - int64_t(seq.blocks.size());
  if (need <= 0) return true;
  return cache_.pool().allocate(need, seq.blocks);
}

void Engine::release(Sequence& seq) { cache_.release(seq.blocks); }

void Engine::preempt_last() {
  auto seq = std::move(running_.back());
  running_.pop_back();
  release(*seq);
  seq->n_computed = 0;  // recomputed on readmission (prompt + tokens generated so far)
  ++stats_.preemptions;
  logger("runtime")->debug("preempted request {} ({} tokens) for lack of KV blocks", seq->id,
                           seq->tokens.size());
  waiting_.push_front(std::move(seq));
}

std::optional<FinishReason> Engine::finished(const Sequence& seq, int32_t token) const {
  const auto& r = seq.request;
  if (!r.ignore_eos) {
    const auto& eos = model_.config().eos_token_ids;
    if (std::find(eos.begin(), eos.end(), token) != eos.end()) return FinishReason::stop;
  }
  if (std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), token) !=
      r.stop_token_ids.end())
    return FinishReason::stop;
  if (seq.n_generated >= r.max_tokens) return FinishReason::length;
  if (int64_t(seq.tokens.size()) >= max_context_) return FinishReason::length;
  return std::nullopt;
}

bool Engine::fail_lost_blocks(std::vector<TokenEvent>& events, const std::string& why) {
  memory::KvTiers* tiers = cache_.tiers();
  if (!tiers) return false;
  std::vector<int32_t> lost = tiers->take_failed_blocks();
  if (lost.empty()) return false;
  std::sort(lost.begin(), lost.end());
  running_.remove_if([&](std::unique_ptr<Sequence>& seq) {
    bool hit = false;
    for (int32_t b : seq->blocks) hit |= std::binary_search(lost.begin(), lost.end(), b);
    if (!hit) return false;
    release(*seq);
    TokenEvent e;
    e.id = seq->id;
    e.finish = FinishReason::error;
    e.error = fmt::format("the KV cache lost this request's data: {}", why);
    events.push_back(std::move(e));
    return true;
  });
  return true;
}

std::vector<TokenEvent> Engine::step() {
  std::vector<TokenEvent> events = std::move(pending_events_);
  pending_events_.clear();
  auto end_request = [&](Sequence& seq, FinishReason reason, std::string error = {}) {
    TokenEvent e;
    e.id = seq.id;
    e.finish = reason;
    e.error = std::move(error);
    events.push_back(std::move(e));
  };

  // Cancelled requests end first.
  for (auto it = running_.begin(); it != running_.end();) {
    if ((*it)->cancelled) {
      release(**it);
      end_request(**it, FinishReason::cancelled);
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    if ((*it)->cancelled) {
      end_request(**it, FinishReason::cancelled);
      it = waiting_.erase(it);
    } else {
      ++it;
    }
  }

  // Plan: every running sequence gets its pending tokens (1 when decoding, a chunk when
  // prefilling) within the token budget, oldest first; then waiting requests are admitted.
  struct Planned {
    Sequence* seq;
    int64_t n;
  };
  std::vector<Planned> plan;
  int64_t budget = options_.max_batch_tokens;
  for (auto it = running_.begin(); it != running_.end() && budget > 0;) {
    Sequence& seq = **it;
    const int64_t n = std::min<int64_t>(int64_t(seq.tokens.size()) - seq.n_computed, budget);
    bool ok = ensure_blocks(seq, seq.n_computed + n);
    while (!ok && running_.back().get() != &seq) {
      // Free the newest sequence's blocks; it must not be in the plan yet (the plan is built
      // oldest first, so a newer one has not been planned).
      preempt_last();
      ok = ensure_blocks(seq, seq.n_computed + n);
    }
    if (!ok) {
      if (running_.size() == 1 && waiting_.empty()) {
        auto doomed = std::move(running_.back());
        running_.pop_back();
        release(*doomed);
        end_request(*doomed, FinishReason::error,
                    fmt::format("the KV cache ({} blocks of {} tokens) cannot hold a sequence of "
                                "{} tokens",
                                cache_.pool().capacity(), cache_.layout().block_size,
                                doomed->tokens.size()));
      } else {
        preempt_last();  // this sequence itself is the newest
      }
      break;
    }
    plan.push_back({&seq, n});
    budget -= n;
    ++it;
  }
  while (budget > 0 && !waiting_.empty() && int(running_.size()) < options_.max_running) {
    Sequence& seq = *waiting_.front();
    const int64_t n = std::min<int64_t>(int64_t(seq.tokens.size()) - seq.n_computed, budget);
    if (!ensure_blocks(seq, seq.n_computed + n)) {
      if (running_.empty()) {
        auto doomed = std::move(waiting_.front());
        waiting_.pop_front();
        release(*doomed);
        end_request(*doomed, FinishReason::error,
                    fmt::format("the KV cache ({} blocks) cannot hold this request",
                                cache_.pool().capacity()));
        continue;
      }
      break;
    }
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    plan.push_back({running_.back().get(), n});
    budget -= n;
  }
  if (plan.empty()) return events;

  StepBatch batch;
  std::vector<Sequence*> sampled;
  for (auto& p : plan) {
    Sequence& seq = *p.seq;
    const bool completes = seq.n_computed + p.n == int64_t(seq.tokens.size());
    std::vector<int32_t> chunk(seq.tokens.begin() + seq.n_computed,
                               seq.tokens.begin() + seq.n_computed + p.n);
    batch.add(chunk, seq.n_computed, &seq.blocks, completes);
    if (completes) sampled.push_back(&seq);
    if (seq.n_computed < seq.prompt_len)
      stats_.prompt_tokens += std::min(seq.prompt_len, seq.n_computed + p.n) - seq.n_computed;
  }
  Tensor logits;
  try {
    logits = forward_(batch);
  } catch (const Error& e) {
    if (cache_.tiers()) cache_.tiers()->abort_step();
    // A disk error fails only the requests whose blocks it touched; the others run again next
    // step (their KV for this step is rewritten in place).
    if (e.code() != ErrorCode::io || !fail_lost_blocks(events, e.message())) throw;
    return events;
  }
  ++stats_.steps;
  for (auto& p : plan) p.seq->n_computed += p.n;
  fail_lost_blocks(events, "a KV block could not be moved to disk");

  if (!sampled.empty()) {
    std::vector<SamplingParams> params;
    for (Sequence* seq : sampled) {
      SamplingParams sp = seq->request.sampling;
      sp.step = seq->n_generated;
      params.push_back(sp);
    }
    std::vector<SampledToken> tokens = model_.backend().sample(logits, params);
    std::vector<const Sequence*> done;
    for (size_t i = 0; i < sampled.size(); ++i) {
      Sequence& seq = *sampled[i];
      seq.tokens.push_back(tokens[i].token);
      ++seq.n_generated;
      ++stats_.generated_tokens;
      TokenEvent e;
      e.id = seq.id;
      e.has_token = true;
      e.token = std::move(tokens[i]);
      if (auto reason = finished(seq, e.token.token)) {
        e.finish = *reason;
        done.push_back(&seq);
      }
      events.push_back(std::move(e));
    }
    // Finished sequences leave the running batch and free their blocks.
    running_.remove_if([&](std::unique_ptr<Sequence>& seq) {
      if (std::find(done.begin(), done.end(), seq.get()) == done.end()) return false;
      release(*seq);
      return true;
    });
  }
  return events;
}

}  // namespace nosa::runtime
