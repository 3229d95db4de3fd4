#include "runtime/engine_loop.h"

#include <utility>
#include <vector>

#include "runtime/core/logging.h"

namespace nosa::runtime {

namespace {
LoopEvent error_event(RequestId id, ErrorCode code, std::string message) {
  LoopEvent e;
  e.event.id = id;
  e.event.finish = FinishReason::error;
  e.event.error = std::move(message);
  e.error_code = code;
  return e;
}
}  // namespace

EngineLoop::EngineLoop(Engine& engine, EngineLoopOptions options)
    : engine_(engine), options_(std::move(options)) {
  stats_.engine = engine_.stats();
  thread_ = std::thread([this] { run(); });
}

EngineLoop::~EngineLoop() { shutdown(); }

RequestId EngineLoop::submit(GenerationRequest request, LoopCallback callback) {
  NOSA_ASSERT(callback != nullptr, "EngineLoop::submit needs a callback");
  std::lock_guard lock(mutex_);
  NOSA_CHECK_CODE(!stopping_ && !failed_, ErrorCode::unavailable, "{}",
                  stop_reason_.empty() ? "the engine loop has stopped" : stop_reason_);
  const RequestId id = next_id_++;
  active_.emplace(id, Active{std::move(callback), 0});
  pending_.push_back(Pending{id, std::move(request)});
  ++stats_.in_flight;
  wake_.notify_one();
  return id;
}

void EngineLoop::cancel(RequestId id) {
  std::lock_guard lock(mutex_);
  if (!active_.count(id)) return;
  cancels_.push_back(id);
  wake_.notify_one();
}

void EngineLoop::wait_idle() {
  std::unique_lock lock(mutex_);
  idle_.wait(lock, [&] { return active_.empty(); });
}

void EngineLoop::shutdown(const std::string& reason) {
  {
    std::lock_guard lock(mutex_);
    if (!stopping_) {
      stopping_ = true;
      if (stop_reason_.empty()) stop_reason_ = reason;
    }
    wake_.notify_one();
  }
  // From a callback (the loop's own thread) the loop ends the requests when the callback
  // returns; from anywhere else, wait for it.
  if (thread_.joinable() && std::this_thread::get_id() != thread_.get_id()) thread_.join();
}

EngineLoopStats EngineLoop::stats() const {
  std::lock_guard lock(mutex_);
  EngineLoopStats s = stats_;
  s.engine.waiting += int64_t(pending_.size());
  s.failed = failed_;
  return s;
}

void EngineLoop::deliver(const LoopCallback& cb, LoopEvent event) {
  try {
    cb(event);
  } catch (const std::exception& e) {
    logger("runtime")->error("a request callback threw: {}", e.what());
  }
}

// Ends every request in flight with an error; runs on the loop's thread.
void EngineLoop::fail_all(ErrorCode code, const std::string& message) {
  std::vector<std::pair<RequestId, LoopCallback>> doomed;
  {
    std::lock_guard lock(mutex_);
    for (auto& [id, a] : active_) doomed.emplace_back(id, std::move(a.callback));
    active_.clear();
    by_engine_id_.clear();
    pending_.clear();
    cancels_.clear();
    stats_.in_flight = 0;
  }
  for (auto& [id, cb] : doomed) deliver(cb, error_event(id, code, message));
  std::lock_guard lock(mutex_);
  idle_.notify_all();
}

void EngineLoop::run() {
  auto log = logger("runtime");
  bool engine_busy = false;
  while (true) {
    std::deque<Pending> fresh;
    std::vector<RequestId> cancels;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(
          lock, [&] { return stopping_ || engine_busy || !pending_.empty() || !cancels_.empty(); });
      if (stopping_) break;
      fresh.swap(pending_);
      cancels.swap(cancels_);
    }

    // Hand new requests to the engine; a refused one ends here with the engine's reason.
    std::vector<std::pair<RequestId, LoopEvent>> refused;
    std::vector<std::pair<RequestId, RequestId>> admitted;  // loop id, engine id
    for (auto& p : fresh) {
      try {
        admitted.emplace_back(p.id, engine_.submit(std::move(p.request)));
      } catch (const Error& e) {
        refused.emplace_back(p.id, error_event(p.id, e.code(), e.message()));
      } catch (const std::exception& e) {
        refused.emplace_back(p.id, error_event(p.id, ErrorCode::internal, e.what()));
      }
    }
    std::vector<std::pair<LoopCallback, LoopEvent>> deliveries;
    {
      std::lock_guard lock(mutex_);
      for (auto& [id, eid] : admitted) {
        active_.at(id).engine_id = eid;
        by_engine_id_[eid] = id;
      }
      for (auto& [id, ev] : refused) {
        deliveries.emplace_back(std::move(active_.at(id).callback), std::move(ev));
        active_.erase(id);
        --stats_.in_flight;
      }
      for (RequestId id : cancels) {
        auto it = active_.find(id);
        if (it != active_.end() && it->second.engine_id != 0) engine_.cancel(it->second.engine_id);
      }
    }
    for (auto& [cb, ev] : deliveries) deliver(cb, std::move(ev));
    deliveries.clear();

    engine_busy = engine_.has_work();
    if (!engine_busy) {
      std::lock_guard lock(mutex_);
      if (active_.empty()) idle_.notify_all();
      continue;
    }

    std::vector<TokenEvent> events;
    const auto t0 = std::chrono::steady_clock::now();
    try {
      events = engine_.step();
    } catch (const std::exception& e) {
      const Error* err = dynamic_cast<const Error*>(&e);
      std::string what = err ? err->message() : e.what();
      log->error("engine step failed, ending every request: {}", what);
      {
        std::lock_guard lock(mutex_);
        failed_ = true;
        stop_reason_ = "the engine failed: " + what;
      }
      fail_all(err ? err->code() : ErrorCode::internal, "the engine failed: " + what);
      return;
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (options_.on_step) options_.on_step(seconds);

    // Callbacks are only erased on this thread, and unordered_map keeps element addresses
    // across inserts, so they can be called outside the lock.
    std::vector<std::pair<LoopCallback*, LoopEvent>> out;
    std::vector<RequestId> finished;
    {
      std::lock_guard lock(mutex_);
      for (auto& e : events) {
        auto m = by_engine_id_.find(e.id);
        if (m == by_engine_id_.end()) continue;  // not ours (cannot happen) or already ended
        const RequestId id = m->second;
        LoopEvent le;
        le.event = std::move(e);
        le.event.id = id;
        if (le.event.finish == FinishReason::error) le.error_code = ErrorCode::resource_exhausted;
        if (le.event.finish != FinishReason::none) {
          finished.push_back(id);
          by_engine_id_.erase(m);
        }
        out.emplace_back(&active_.at(id).callback, std::move(le));
      }
      ++stats_.steps;
      stats_.step_seconds_total += seconds;
      stats_.engine = engine_.stats();
    }
    for (auto& [cb, ev] : out) deliver(*cb, std::move(ev));
    {
      std::lock_guard lock(mutex_);
      for (RequestId id : finished) {
        active_.erase(id);
        --stats_.in_flight;
      }
      if (active_.empty()) idle_.notify_all();
    }
    engine_busy = engine_.has_work();
  }

  std::string reason;
  {
    std::lock_guard lock(mutex_);
    reason = stop_reason_;
  }
  fail_all(ErrorCode::unavailable, reason);
}

}  // namespace nosa::runtime
