#include "tests/common/engine_rig.h"

#include <gtest/gtest.h>

#include <random>

#include "tests/common/test_util.h"

namespace nosa::test {

EngineRig::EngineRig(int64_t kv_blocks, runtime::EngineOptions options, attention::Mode mode,
                     const runtime::KvCacheOptions& kv, int layers)
    : backend(runtime::make_cpu_backend()), comm(parallel::make_single_rank_communicator()) {
  runtime::LoadOptions o;
  o.mode = mode;
  model = runtime::load_model(tiny_model(attention::Mode::nosa, layers), o, *backend, *comm);
  cache = std::make_unique<runtime::KvCache>(model->kv_layout(), kv_blocks, *backend, kv);
  engine = std::make_unique<runtime::Engine>(*model, *cache, options);
}

std::map<runtime::RequestId, EngineRig::Outcome> EngineRig::run_all() {
  std::map<runtime::RequestId, Outcome> out;
  int guard = 0;
  while (engine->has_work()) {
    for (auto& e : engine->step()) {
      if (e.has_token) out[e.id].tokens.push_back(e.token.token);
      if (e.finish != runtime::FinishReason::none) out[e.id].last = e;
    }
    EXPECT_LT(++guard, 100000) << "the engine does not finish";
    if (guard >= 100000) break;
  }
  return out;
}

runtime::GenerationRequest random_request(int64_t prompt_len, uint64_t seed, int64_t max_tokens) {
  std::mt19937 rng{uint32_t(seed)};
  runtime::GenerationRequest r;
  for (int64_t i = 0; i < prompt_len; ++i) r.prompt.push_back(int32_t(3 + rng() % 1990));
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  return r;
}

}  // namespace nosa::test
