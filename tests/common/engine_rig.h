// An engine on the CPU backend over the tiny test checkpoint, for tests that drive requests
// through it, and a random request of a given length.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "runtime/engine.h"

namespace nosa::test {

struct EngineRig {
  std::unique_ptr<runtime::Backend> backend;
  std::unique_ptr<parallel::Communicator> comm;
  std::unique_ptr<runtime::Model> model;
  std::unique_ptr<runtime::KvCache> cache;
  std::unique_ptr<runtime::Engine> engine;

  // layers > 0: a tiny checkpoint of that many layers instead of the shape's.
  EngineRig(int64_t kv_blocks, runtime::EngineOptions options = {},
            attention::Mode mode = attention::Mode::nosa,
            const runtime::KvCacheOptions& kv = {}, int layers = 0);

  // What a request produced: its tokens and its last event (finish reason, error).
  struct Outcome {
    std::vector<int32_t> tokens;
    runtime::TokenEvent last;
  };
  // Steps until no work is left.
  std::map<runtime::RequestId, Outcome> run_all();
};

// A prompt of random ids of the tiny vocabulary, generating max_tokens with EOS ignored.
runtime::GenerationRequest random_request(int64_t prompt_len, uint64_t seed, int64_t max_tokens);

}  // namespace nosa::test
