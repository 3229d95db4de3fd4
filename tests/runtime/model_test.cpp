// The forward pass on the CPU reference backend: decoding token by token gives the logits of a
// prefill over the same tokens, in every attention mode; chunking and batching do not change
// results.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "runtime/core/error.h"
#include "runtime/model.h"
#include "tests/common/test_util.h"

namespace nosa::runtime {
namespace {

struct Harness {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  std::unique_ptr<parallel::Communicator> comm = parallel::make_single_rank_communicator();
  std::unique_ptr<Model> model;
  std::unique_ptr<KvCache> cache;

  explicit Harness(attention::Mode mode, attention::Mode checkpoint = attention::Mode::nosa) {
    LoadOptions o;
    o.mode = mode;
    model = load_model(test::tiny_model(checkpoint), o, *backend, *comm);
    cache = std::make_unique<KvCache>(model->kv_layout(), 256, *backend);
  }

  std::vector<int32_t> blocks_for(int64_t n_tokens, std::vector<int32_t>& blocks) {
    int64_t need = (n_tokens + 15) / 16 - int64_t(blocks.size());
    if (need > 0) {
      EXPECT_TRUE(cache->pool().allocate(need, blocks));
    }
    return blocks;
  }
};

std::vector<int32_t> random_tokens(int64_t n, uint64_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = int32_t(3 + rng() % 1990);
  return t;
}

// Logits rows [n][V] as vectors.
std::vector<std::vector<float>> rows(const Tensor& logits) {
  std::vector<std::vector<float>> out;
  const int64_t v = logits.dim(1);
  for (int64_t i = 0; i < logits.dim(0); ++i)
    out.emplace_back(logits.data<float>() + i * v, logits.data<float>() + (i + 1) * v);
  return out;
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_FALSE(std::isnan(a[i]) || std::isnan(b[i]));
    num = std::max(num, double(std::fabs(a[i] - b[i])));
    den = std::max(den, double(std::fabs(b[i])));
  }
  return num / std::max(den, 1e-6);
}

std::vector<std::vector<float>> prefill_all(Harness& h, const std::vector<int32_t>& tokens,
                                            int64_t chunk) {
  std::vector<int32_t> blocks;
  std::vector<std::vector<float>> out;
  for (int64_t begin = 0; begin < int64_t(tokens.size()); begin += chunk) {
    int64_t end = std::min<int64_t>(begin + chunk, tokens.size());
    h.blocks_for(end, blocks);
    StepBatch step;
    step.add({tokens.begin() + begin, tokens.begin() + end}, begin, &blocks, true, true);
    for (auto& r : rows(h.model->forward(step, *h.cache))) out.push_back(std::move(r));
  }
  h.cache->pool().release(blocks);
  return out;
}

class DecodeEqualsPrefill : public ::testing::TestWithParam<attention::Mode> {};

TEST_P(DecodeEqualsPrefill, LogitsMatchAtEveryPosition) {
  // 300 tokens = 19 blocks of 16, more than topk = 16: sparse selection is active at the end.
  Harness h(GetParam());
  auto tokens = random_tokens(300, 1);
  auto whole = prefill_all(h, tokens, int64_t(tokens.size()));
  auto decoded = prefill_all(h, tokens, 1);
  auto chunked = prefill_all(h, tokens, 37);
  ASSERT_EQ(whole.size(), tokens.size());
  ASSERT_EQ(decoded.size(), tokens.size());
  for (size_t t = 0; t < tokens.size(); ++t) {
    EXPECT_LT(max_rel_diff(decoded[t], whole[t]), 1e-4) << "position " << t;
    EXPECT_LT(max_rel_diff(chunked[t], whole[t]), 1e-4) << "position " << t;
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, DecodeEqualsPrefill,
                         ::testing::Values(attention::Mode::dense, attention::Mode::infllmv2,
                                           attention::Mode::nosa),
                         [](const auto& info) { return attention::mode_name(info.param); });

TEST(Model, BatchingDoesNotChangeLogits) {
  Harness h(attention::Mode::nosa);
  auto a = random_tokens(290, 2), b = random_tokens(150, 3);
  auto alone_a = prefill_all(h, a, 1000), alone_b = prefill_all(h, b, 1000);
  // Both sequences in one step, then one decode step each, batched.
  std::vector<int32_t> ba, bb;
  h.blocks_for(int64_t(a.size()), ba);
  h.blocks_for(int64_t(b.size()), bb);
  StepBatch step;
  step.add({a.begin(), a.end() - 1}, 0, &ba, true);
  step.add({b.begin(), b.end() - 1}, 0, &bb, true);
  auto first = rows(h.model->forward(step, *h.cache));
  ASSERT_EQ(first.size(), 2u);
  EXPECT_LT(max_rel_diff(first[0], alone_a[a.size() - 2]), 1e-4);
  EXPECT_LT(max_rel_diff(first[1], alone_b[b.size() - 2]), 1e-4);
  StepBatch next;
  next.add({a.back()}, int64_t(a.size()) - 1, &ba, true);
  next.add({b.back()}, int64_t(b.size()) - 1, &bb, true);
  auto second = rows(h.model->forward(next, *h.cache));
  EXPECT_LT(max_rel_diff(second[0], alone_a.back()), 1e-4);
  EXPECT_LT(max_rel_diff(second[1], alone_b.back()), 1e-4);
}

TEST(Model, SparseModesEqualDenseUntilTopkBlocksAndDifferAfter) {
  Harness dense(attention::Mode::dense), infllm(attention::Mode::infllmv2);
  Harness nosa(attention::Mode::nosa);
  auto tokens = random_tokens(400, 4);
  auto d = prefill_all(dense, tokens, 400);
  auto i = prefill_all(infllm, tokens, 400);
  auto n = prefill_all(nosa, tokens, 400);
  // Up to 16 blocks (256 tokens) InfLLM-V2 selects everything: the same as dense.
  for (int t = 0; t < 256; ++t) EXPECT_LT(max_rel_diff(i[t], d[t]), 1e-5) << t;
  // After that, sparse selection changes the logits; NOSA's bias changes them from the start.
  EXPECT_GT(max_rel_diff(i[399], d[399]), 1e-4);
  EXPECT_GT(max_rel_diff(n[10], d[10]), 1e-4);
}

// The speculation probe measures without changing anything: decoding gives the same logits with
// it on, and it counts every block layer 1 (of the tiny model's 2) selected: at position p each
// of the 2 KV heads takes min(16, p / 16 + 1) blocks (4480 for positions 0..399, per head).
// Below 16 blocks both selections take every block, so those 2 x 2176 are predicted for sure.
TEST(Model, TheSpeculationProbeCountsWithoutChangingLogits) {
  Harness plain(attention::Mode::nosa), probed(attention::Mode::nosa);
  probed.model->set_speculation_probe(true);
  auto tokens = random_tokens(400, 5);
  auto a = prefill_all(plain, tokens, 1);
  auto b = prefill_all(probed, tokens, 1);
  ASSERT_EQ(a.size(), b.size());
  for (size_t t = 0; t < a.size(); ++t) EXPECT_EQ(max_rel_diff(b[t], a[t]), 0.0) << t;
  EXPECT_EQ(plain.model->speculation_stats().selected, 0);
  const Model::SpeculationStats& s = probed.model->speculation_stats();
  EXPECT_EQ(s.selected, 2 * 4480);
  EXPECT_GE(s.predicted, 2 * 2176);
  EXPECT_LE(s.predicted, s.selected);
  const int64_t fresh = Model::SpeculationStats::total(s.fresh);
  EXPECT_GE(fresh, 2 * 15);  // at least each new block of the first 16
  EXPECT_LE(Model::SpeculationStats::total(s.fresh_predicted), fresh);
  EXPECT_GE(s.wasted, 0);
}

// Refused by the model itself, before any backend work (or step graph recording) starts.
TEST(Model, OutOfVocabularyTokenIsAClearError) {
  Harness h(attention::Mode::dense);
  std::vector<int32_t> blocks;
  h.blocks_for(2, blocks);
  for (const int32_t bad : {int32_t(h.model->config().vocab_size), -1}) {
    StepBatch step;
    step.add({5, bad}, 0, &blocks, true);
    try {
      h.model->forward(step, *h.cache);
      ADD_FAILURE() << "token " << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find("token id " + std::to_string(bad) + " is outside the vocabulary"),
                std::string::npos)
          << e.message();
    }
  }
}

// A block table shorter than the step's positions is refused before any KV is written.
TEST(Model, ABlockTableTooShortIsAClearError) {
  Harness h(attention::Mode::nosa);
  std::vector<int32_t> blocks;
  h.blocks_for(16, blocks);  // one block of 16 tokens
  StepBatch step;
  step.add(random_tokens(20, 3), 0, &blocks, true);
  try {
    h.model->forward(step, *h.cache);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(e.message().find("needs 2 KV blocks"), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace nosa::runtime
