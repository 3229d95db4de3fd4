// The thread-safe engine loop: requests submitted from many threads all end exactly once with
// the tokens the engine gives alone; refused requests, cancels, shutdown and a failing callback
// end requests with clear reasons; nothing hangs.
#include "runtime/engine_loop.h"

#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <map>
#include <random>

#include "tests/common/engine_rig.h"
#include "tests/common/test_util.h"

namespace nosa::runtime {
namespace {

// The tiny NOSA checkpoint's engine with a 256-token step budget.
struct Rig : test::EngineRig {
  explicit Rig(int64_t kv_blocks = 256) : EngineRig(kv_blocks, options()) {}
  static EngineOptions options() {
    EngineOptions o;
    o.max_batch_tokens = 256;
    return o;
  }
};

GenerationRequest request(int64_t prompt_len, uint64_t seed, int64_t max_tokens) {
  return test::random_request(prompt_len, seed, max_tokens);
}

// Collects one request's events; the future is ready when its last event arrives.
struct Collector {
  std::vector<int32_t> tokens;
  std::promise<LoopEvent> done;
  int finishes = 0;
  LoopCallback callback() {
    return [this](const LoopEvent& e) {
      if (e.event.has_token) tokens.push_back(e.event.token.token);
      if (e.event.finish != FinishReason::none) {
        if (++finishes == 1) done.set_value(e);
      }
    };
  }
};

std::vector<int32_t> alone(const GenerationRequest& r) {
  Rig rig;
  rig.engine->submit(r);
  std::vector<int32_t> out;
  while (rig.engine->has_work())
    for (auto& e : rig.engine->step())
      if (e.has_token) out.push_back(e.token.token);
  return out;
}

TEST(EngineLoop, RequestsFromManyThreadsEachEndOnceWithTheirOwnTokens) {
  Rig rig;
  EngineLoop loop(*rig.engine);
  constexpr int k_threads = 8, k_per_thread = 6;
  std::vector<std::unique_ptr<Collector>> collectors(k_threads * k_per_thread);
  for (auto& c : collectors) c = std::make_unique<Collector>();
  std::vector<std::thread> threads;
  for (int t = 0; t < k_threads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < k_per_thread; ++i) {
        const int k = t * k_per_thread + i;
        loop.submit(request(5 + k % 37, k, 4 + k % 5), collectors[k]->callback());
      }
    });
  for (auto& th : threads) th.join();
  for (int k = 0; k < k_threads * k_per_thread; ++k) {
    auto fut = collectors[k]->done.get_future();
    ASSERT_EQ(fut.wait_for(std::chrono::seconds(60)), std::future_status::ready) << k;
    EXPECT_EQ(fut.get().event.finish, FinishReason::length);
    EXPECT_EQ(collectors[k]->tokens.size(), size_t(4 + k % 5));
  }
  loop.wait_idle();
  EXPECT_EQ(loop.stats().in_flight, 0);
  EXPECT_GT(loop.stats().steps, 0);
  for (auto& c : collectors) EXPECT_EQ(c->finishes, 1);
  // Batching does not change greedy tokens.
  EXPECT_EQ(collectors[7]->tokens, alone(request(5 + 7 % 37, 7, 4 + 7 % 5)));
}

TEST(EngineLoop, RefusedRequestEndsWithTheEnginesReason) {
  Rig rig;
  EngineLoop loop(*rig.engine);
  Collector c;
  GenerationRequest r = request(4, 1, 4);
  r.prompt[2] = 999999;  // outside the vocabulary
  loop.submit(r, c.callback());
  auto e = c.done.get_future().get();
  EXPECT_EQ(e.event.finish, FinishReason::error);
  EXPECT_EQ(e.error_code, ErrorCode::invalid_argument);
  EXPECT_NE(e.event.error.find("vocabulary"), std::string::npos) << e.event.error;
  // The loop keeps serving.
  Collector ok;
  loop.submit(request(4, 2, 3), ok.callback());
  EXPECT_EQ(ok.done.get_future().get().event.finish, FinishReason::length);
}

TEST(EngineLoop, CancelEndsARunningRequest) {
  Rig rig;
  EngineLoop loop(*rig.engine);
  Collector c;
  std::atomic<RequestId> id{0};
  std::atomic<bool> cancelled{false};
  // Cancel from inside the callback after the first token: callbacks may call the loop.
  EngineLoop* lp = &loop;
  auto inner = c.callback();
  id = loop.submit(request(8, 3, 10000), [&, inner](const LoopEvent& e) {
    inner(e);
    if (e.event.has_token && id != 0 && !cancelled.exchange(true)) lp->cancel(id);
  });
  auto e = c.done.get_future().get();
  EXPECT_EQ(e.event.finish, FinishReason::cancelled);
  EXPECT_LT(c.tokens.size(), 100u);
  loop.cancel(id);  // a late cancel is ignored
  loop.cancel(424242);
}

TEST(EngineLoop, ShutdownEndsOutstandingRequestsWithAClearError) {
  Rig rig;
  std::vector<std::unique_ptr<Collector>> cs(5);
  {
    EngineLoop loop(*rig.engine);
    for (int i = 0; i < 5; ++i) {
      cs[i] = std::make_unique<Collector>();
      loop.submit(request(6, i, 100000), cs[i]->callback());
    }
    loop.shutdown("the worker is stopping");
    EXPECT_THROW(loop.submit(request(6, 9, 2), [](const LoopEvent&) {}), Error);
  }
  for (auto& c : cs) {
    auto e = c->done.get_future().get();
    EXPECT_EQ(e.event.finish, FinishReason::error);
    EXPECT_EQ(e.error_code, ErrorCode::unavailable);
    EXPECT_EQ(e.event.error, "the worker is stopping");
    EXPECT_EQ(c->finishes, 1);
  }
}

TEST(EngineLoop, ACallbackThatThrowsDoesNotStopTheLoop) {
  Rig rig;
  EngineLoop loop(*rig.engine);
  loop.submit(request(4, 5, 3), [](const LoopEvent&) { throw std::runtime_error("boom"); });
  Collector c;
  loop.submit(request(4, 6, 3), c.callback());
  EXPECT_EQ(c.done.get_future().get().event.finish, FinishReason::length);
  loop.wait_idle();
}

TEST(EngineLoop, StatsCountWaitingAndInFlight) {
  Rig rig;
  EngineLoop loop(*rig.engine);
  EXPECT_EQ(loop.stats().in_flight, 0);
  EXPECT_EQ(loop.stats().engine.kv_blocks_total, 256);
  Collector c;
  loop.submit(request(4, 7, 2), c.callback());
  c.done.get_future().get();
  loop.wait_idle();
  auto s = loop.stats();
  EXPECT_EQ(s.in_flight, 0);
  EXPECT_EQ(s.engine.generated_tokens, 2);
  EXPECT_GE(s.step_seconds_total, 0.0);
}

}  // namespace
}  // namespace nosa::runtime
