// The engine loop: continuous batching, chunked prefill and preemption give exactly the tokens of
// running each request alone; bad requests are refused with clear errors; cancel works.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "runtime/core/error.h"
#include "runtime/engine.h"
#include "tests/common/engine_rig.h"
#include "tests/common/test_util.h"

namespace nosa::runtime {
namespace {

using test::EngineRig;

GenerationRequest request(int64_t prompt_len, uint64_t seed, int64_t max_tokens) {
  return test::random_request(prompt_len, seed, max_tokens);
}

// A rig over the tiny NOSA checkpoint (KV blocks, engine options).
struct Rig : EngineRig {
  Rig(int64_t kv_blocks, EngineOptions options) : EngineRig(kv_blocks, options) {}
};

std::vector<GenerationRequest> mixed_requests() {
  std::vector<GenerationRequest> rs;
  const int64_t lengths[] = {5, 300, 40, 17, 260, 90};
  for (int i = 0; i < 6; ++i) {
    rs.push_back(request(lengths[i], 100 + i, 12 + i));
    if (i % 2) {  // some sampled, with seeds
      rs.back().sampling.temperature = 0.8f;
      rs.back().sampling.top_p = 0.9f;
      rs.back().sampling.top_k = 50;
      rs.back().sampling.seed = 1000 + i;
    }
  }
  return rs;
}

std::vector<std::vector<int32_t>> alone(const std::vector<GenerationRequest>& rs) {
  std::vector<std::vector<int32_t>> out;
  for (auto& r : rs) {
    Rig s(512, {});
    s.engine->submit(r);
    auto res = s.run_all();
    out.push_back(res.begin()->second.tokens);
  }
  return out;
}

TEST(Engine, ContinuousBatchingChunkingAndPreemptionKeepTheTokens) {
  auto rs = mixed_requests();
  auto expected = alone(rs);
  struct Variant {
    int64_t kv_blocks;
    EngineOptions options;
    bool expect_preemption;
  };
  // Big batch; small token budget (chunked prefill); a cache too small for all at once.
  std::vector<Variant> variants = {{512, {4096, 256, 0}, false},
                                   {512, {64, 256, 0}, false},
                                   {40, {2048, 256, 0}, false}};
  for (auto& v : variants) {
    Rig s(v.kv_blocks, v.options);
    std::vector<RequestId> ids;
    for (auto& r : rs) ids.push_back(s.engine->submit(r));
    auto res = s.run_all();
    for (size_t i = 0; i < rs.size(); ++i) {
      EXPECT_EQ(res[ids[i]].tokens, expected[i]) << "request " << i << " budget "
                                                 << v.options.max_batch_tokens;
      EXPECT_EQ(res[ids[i]].last.finish, FinishReason::length);
      EXPECT_EQ(int64_t(res[ids[i]].tokens.size()), rs[i].max_tokens);
    }
    if (v.expect_preemption) {
      EXPECT_GT(s.engine->stats().preemptions, 0);
    }
    EXPECT_EQ(s.cache->pool().used_blocks(), 0);  // everything released
  }
}

TEST(Engine, PreemptedSequencesResumeWithTheSameTokens) {
  // Six prompts of two blocks are admitted at once; as they grow, the 16-block cache runs out and
  // the newest are preempted, then recomputed.
  std::vector<GenerationRequest> rs;
  for (int i = 0; i < 6; ++i) rs.push_back(request(30, 200 + i, 40));
  rs[3].sampling.temperature = 1.0f;
  rs[3].sampling.seed = 5;
  auto expected = alone(rs);
  Rig s(16, {});
  std::vector<RequestId> ids;
  for (auto& r : rs) ids.push_back(s.engine->submit(r));
  auto res = s.run_all();
  for (size_t i = 0; i < rs.size(); ++i) EXPECT_EQ(res[ids[i]].tokens, expected[i]) << i;
  EXPECT_GT(s.engine->stats().preemptions, 0);
  EXPECT_EQ(s.cache->pool().used_blocks(), 0);
}

TEST(Engine, RequestsJoinTheRunningBatchBetweenSteps) {
  Rig s(512, {});
  auto r = request(20, 1, 30);
  RequestId a = s.engine->submit(r);
  for (int i = 0; i < 5; ++i) s.engine->step();
  RequestId b = s.engine->submit(request(20, 2, 5));
  auto events = s.engine->step();  // b's prefill runs together with a's decode
  bool saw_a = false, saw_b = false;
  for (auto& e : events) {
    saw_a |= e.id == a && e.has_token;
    saw_b |= e.id == b && e.has_token;
  }
  EXPECT_TRUE(saw_a);
  EXPECT_TRUE(saw_b);
  EXPECT_EQ(s.engine->stats().running, 2);
}

TEST(Engine, CancelEndsARequestAndFreesItsBlocks) {
  Rig s(512, {});
  RequestId a = s.engine->submit(request(50, 1, 1000));
  RequestId b = s.engine->submit(request(10, 2, 3));
  std::map<RequestId, FinishReason> early;
  for (int i = 0; i < 3; ++i)
    for (auto& e : s.engine->step())
      if (e.finish != FinishReason::none) early[e.id] = e.finish;
  s.engine->cancel(a);
  auto res = s.run_all();
  if (early.count(b)) res[b].last.finish = early[b];
  EXPECT_EQ(res[a].last.finish, FinishReason::cancelled);
  EXPECT_EQ(res[b].last.finish, FinishReason::length);
  EXPECT_EQ(s.cache->pool().used_blocks(), 0);
}

TEST(Engine, StopsAtEosOrStopTokenUnlessIgnored) {
  auto r = request(10, 3, 8);
  auto first = [&](GenerationRequest req) {
    Rig t(512, {});
    t.engine->submit(req);
    return t.run_all().begin()->second;
  };
  auto free_run = first(r);
  ASSERT_EQ(free_run.tokens.size(), 8u);
  r.stop_token_ids = {free_run.tokens[2]};
  auto stopped = first(r);
  EXPECT_EQ(stopped.last.finish, FinishReason::stop);
  EXPECT_LE(stopped.tokens.size(), 3u);
  EXPECT_EQ(stopped.tokens.back(), free_run.tokens[2]);
}

TEST(Engine, SeededSamplingIsReproducibleAndSeedsDiffer) {
  auto r = request(30, 9, 20);
  r.sampling.temperature = 1.5f;
  r.sampling.seed = 42;
  auto run = [&](GenerationRequest req) {
    Rig s(512, {});
    s.engine->submit(req);
    return s.run_all().begin()->second.tokens;
  };
  auto a = run(r), b = run(r);
  EXPECT_EQ(a, b);
  r.sampling.seed = 43;
  EXPECT_NE(run(r), a);
}

TEST(Engine, BadRequestsAreRefusedWithClearErrors) {
  Rig s(64, {2048, 256, 512});
  auto expect_error = [&](GenerationRequest r, const std::string& text, ErrorCode code) {
    try {
      s.engine->submit(r);
      FAIL() << "accepted: " << text;
    } catch (const Error& e) {
      EXPECT_NE(e.message().find(text), std::string::npos) << e.message();
      EXPECT_EQ(e.code(), code);
    }
  };
  expect_error(request(0, 1, 4), "empty", ErrorCode::invalid_argument);
  auto r = request(5, 1, 4);
  r.prompt[2] = 2000;
  expect_error(r, "outside the vocabulary", ErrorCode::invalid_argument);
  expect_error(request(512, 1, 4), "context limit is 512", ErrorCode::invalid_argument);
  expect_error(request(5, 1, 0), "max_tokens", ErrorCode::invalid_argument);
  r = request(5, 1, 4);
  r.sampling.top_p = 0;
  expect_error(r, "top_p", ErrorCode::invalid_argument);
  r.sampling.top_p = 1;
  r.sampling.temperature = -1;
  expect_error(r, "temperature", ErrorCode::invalid_argument);
  Rig tiny_cache(4, {});
  try {
    tiny_cache.engine->submit(request(100, 1, 4));
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::resource_exhausted);
  }
}

TEST(Engine, ASequenceLongerThanTheCacheEndsWithAnError) {
  Rig s(4, {});  // 64 tokens in all
  RequestId id = s.engine->submit(request(40, 1, 100));
  auto res = s.run_all();
  EXPECT_EQ(res[id].last.finish, FinishReason::error);
  EXPECT_EQ(s.cache->pool().used_blocks(), 0);
}

TEST(Engine, GenerationStopsAtTheContextLimit) {
  Rig s(512, {2048, 256, 64});
  RequestId id = s.engine->submit(request(60, 1, 100));
  auto res = s.run_all();
  EXPECT_EQ(res[id].last.finish, FinishReason::length);
  EXPECT_EQ(res[id].tokens.size(), 4u);
}

}  // namespace
}  // namespace nosa::runtime
