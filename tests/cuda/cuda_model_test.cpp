// The whole tiny model on the CUDA backend against the CPU backend, in every attention mode: a
// prompt prefilled in two chunks (long enough for sparse selection) and teacher-forced decode
// steps, comparing logits; and `nosa generate --device cuda` end to end. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "parallel/communicator.h"
#include "runtime/core/error.h"
#include "runtime/model.h"
#include "runtime/sampling.h"
#include "tests/common/test_util.h"
#include "tests/cuda/cuda_test_util.h"

namespace nosa::test {
namespace {

using runtime::KvCache;
using runtime::Model;
using runtime::StepBatch;

struct Side {
  runtime::Backend* backend;
  std::unique_ptr<parallel::Communicator> comm;
  std::unique_ptr<Model> model;
  std::unique_ptr<KvCache> cache;
};

Side load(runtime::Backend& be, attention::Mode mode, int64_t n_blocks, int layers = 0) {
  Side s;
  s.backend = &be;
  s.comm = parallel::make_single_rank_communicator();
  runtime::LoadOptions lo;
  lo.mode = mode;
  s.model = runtime::load_model(tiny_model(mode, layers), lo, be, *s.comm);
  s.cache = std::make_unique<KvCache>(s.model->kv_layout(), n_blocks, be);
  return s;
}

struct Agreement {
  double worst_rel = 0;
  int argmax_same = 0, rows = 0;
};

void compare_logits(Backends& b, const Tensor& lc, const Tensor& lg, Agreement& a,
                    const std::string& what) {
  Comparison c = compare(b, lc, lg);
  EXPECT_EQ(c.non_finite, 0) << what;
  a.worst_rel = std::max(a.worst_rel, c.rel_error);
  Tensor hc = b.cpu->to_host(lc), hg = b.gpu->to_host(lg);
  const int64_t rows = hc.dim(0), vocab = hc.dim(1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = hc.data<float>() + r * vocab;
    const float* y = hg.data<float>() + r * vocab;
    a.argmax_same += std::max_element(x, x + vocab) - x == std::max_element(y, y + vocab) - y;
    ++a.rows;
  }
}

TEST(CudaModel, TinyModelMatchesTheCpuInEveryMode) {
  NOSA_REQUIRE_GPU();
  Backends b;
  for (attention::Mode mode :
       {attention::Mode::dense, attention::Mode::infllmv2, attention::Mode::nosa}) {
    const int64_t n_blocks = 200;
    Side cpu = load(*b.cpu, mode, n_blocks);
    Side gpu = load(*b.gpu, mode, n_blocks);
    const int bs = cpu.model->kv_layout().block_size;
    // Two sequences: a 700-token prompt in chunks of 450 and 250 (sparse selection starts past
    // topk * block_size = 256 tokens in the tiny shape), and a short one.
    std::vector<int32_t> blocks_a(64), blocks_b(8);
    for (int i = 0; i < 64; ++i) blocks_a[i] = 2 * i + 1;
    for (int i = 0; i < 8; ++i) blocks_b[i] = 2 * i + 150;
    ASSERT_GE(int64_t(blocks_a.size()) * bs, 720);
    std::vector<int32_t> prompt = StepFixture({{0, 700}}, bs, 64, 71, 1900).step.tokens;
    std::vector<int32_t> short_prompt(prompt.begin(), prompt.begin() + 30);
    Agreement agree;
    {
      StepBatch s1;
      s1.add(std::vector<int32_t>(prompt.begin(), prompt.begin() + 450), 0, &blocks_a, false);
      s1.add(short_prompt, 0, &blocks_b, true);
      Tensor lc = cpu.model->forward(s1, *cpu.cache), lg = gpu.model->forward(s1, *gpu.cache);
      compare_logits(b, lc, lg, agree, "chunk 1");
      StepBatch s2;
      s2.add(std::vector<int32_t>(prompt.begin() + 450, prompt.end()), 450, &blocks_a, true, true);
      lc = cpu.model->forward(s2, *cpu.cache);
      lg = gpu.model->forward(s2, *gpu.cache);
      compare_logits(b, lc, lg, agree, "chunk 2 (all logits)");
    }
    // Teacher-forced decode: both continue with the CPU's greedy tokens.
    int64_t pos_a = 700, pos_b = 30;
    int32_t tok_a = 5, tok_b = 6;
    for (int step = 0; step < 12; ++step) {
      StepBatch s;
      s.add({tok_a}, pos_a++, &blocks_a);
      s.add({tok_b}, pos_b++, &blocks_b);
      Tensor lc = cpu.model->forward(s, *cpu.cache), lg = gpu.model->forward(s, *gpu.cache);
      compare_logits(b, lc, lg, agree, "decode");
      std::vector<runtime::SamplingParams> greedy(2);
      auto tc = b.cpu->sample(lc, greedy);
      tok_a = tc[0].token;
      tok_b = tc[1].token;
    }
    std::printf("[ model    ] %-8s worst logits rel error %.3e, same argmax in %d of %d rows\n",
                attention::mode_name(mode), agree.worst_rel, agree.argmax_same, agree.rows);
    EXPECT_LT(agree.worst_rel, 5e-2) << attention::mode_name(mode);
    EXPECT_GE(agree.argmax_same, agree.rows * 8 / 10) << attention::mode_name(mode);
  }
}

// The worst step of `got` against `want` (per step: the largest absolute difference over the
// largest magnitude of `want`); infinity where the shapes differ or `got` is not finite.
double worst_step_error(const std::vector<Tensor>& want, const std::vector<Tensor>& got) {
  if (want.size() != got.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i].numel() != got[i].numel()) return INFINITY;
    const float* x = want[i].data<float>();
    const float* y = got[i].data<float>();
    double num = 0, den = 0;
    for (int64_t j = 0; j < want[i].numel(); ++j) {
      if (!std::isfinite(y[j])) return INFINITY;
      num = std::max(num, double(std::fabs(x[j] - y[j])));
      den = std::max(den, double(std::fabs(x[j])));
    }
    worst = std::max(worst, num / std::max(den, 1e-6));
  }
  return worst;
}

// Decoding steps replayed from recorded CUDA graphs give the logits of the same steps run
// directly, also across a context bucket's end (a new graph) and with two batch sizes.
TEST(CudaModel, StepGraphsGiveTheLogitsOfDirectSteps) {
  NOSA_REQUIRE_GPU();
  Backends b;
  for (attention::Mode mode :
       {attention::Mode::dense, attention::Mode::infllmv2, attention::Mode::nosa}) {
    Side gpu = load(*b.gpu, mode, 400);
    const int bs = gpu.model->kv_layout().block_size;
    std::vector<int32_t> prompt = StepFixture({{0, 1000}}, bs, 80, 72, 1900).step.tokens;
    // Runs prefill + 48 decoding steps (one sequence for the first 24 steps, then two), the
    // decode tokens fixed in advance; returns every decoding step's logits on the host.
    auto run = [&](bool graphs) {
      runtime::set_cuda_graphs(graphs);
      gpu.cache = std::make_unique<KvCache>(gpu.model->kv_layout(), 400, *b.gpu);
      std::vector<int32_t> blocks_a(80), blocks_b(80);
      for (int i = 0; i < 80; ++i) blocks_a[i] = i, blocks_b[i] = 200 + i;
      StepBatch p1;
      p1.add(prompt, 0, &blocks_a, true);
      p1.add(std::vector<int32_t>(prompt.begin(), prompt.begin() + 990), 0, &blocks_b, true);
      gpu.model->forward(p1, *gpu.cache);
      std::vector<Tensor> out;
      for (int step = 0; step < 48; ++step) {
        StepBatch s;
        s.add({int32_t(7 + step * 13 % 1500)}, 1000 + step, &blocks_a);
        if (step >= 24) s.add({int32_t(9 + step * 17 % 1500)}, 990 + step - 24, &blocks_b);
        out.push_back(b.gpu->to_host(gpu.model->forward(s, *gpu.cache)));
      }
      return out;
    };
    std::vector<Tensor> direct = run(false);
    const int64_t before = runtime::cuda_graph_replays();
    std::vector<Tensor> replayed = run(true);
    runtime::set_cuda_graphs(true);
    // Replays: batch 1 crosses 1024 tokens (a new bucket) at step 24 exactly when batch 2 starts,
    // so each (batch, bucket) runs directly once, is recorded once, then replays.
    EXPECT_GE(runtime::cuda_graph_replays() - before, 40) << attention::mode_name(mode);
    const double worst = worst_step_error(direct, replayed);
    std::printf("[ graphs   ] %s: %lld replays, worst logits rel error vs direct %.3e\n",
                attention::mode_name(mode), (long long)(runtime::cuda_graph_replays() - before),
                worst);
    EXPECT_LT(worst, 1e-2) << attention::mode_name(mode);
  }
}

// Prefill of one sequence per length (one step each, so that a round fits a small block cache),
// then 24 decoding steps of all of them; every decoding step's logits. Offloaded (`slots` chunks
// in the block cache) with micro-batches from `micro` sequences on (0: never) and, with
// `partition_slots`, residency decided on the device; else the KV whole in HBM and one batch.
std::vector<Tensor> run_for_micro_batches(Backends& b, Side& gpu,
                                          const std::vector<int64_t>& lengths, bool offload,
                                          int64_t slots, int micro = 2, int partition_slots = 0,
                                          const std::function<void(int)>& before_step = {}) {
  const int n = int(lengths.size()), bs = gpu.model->kv_layout().block_size;
  std::vector<int32_t> prompt = StepFixture({{0, 1000}}, bs, 80, 74, 1900).step.tokens;
  runtime::KvCacheOptions o;
  if (offload) {
    o.offload = memory::Offload::host;
    o.device_slots = slots;
    if (partition_slots > 0) {
      o.decode_partitions = n;
      o.partition_slots = partition_slots;
      o.min_partition_slots = gpu.model->config().sparse.topk;
    }
  }
  gpu.cache = std::make_unique<KvCache>(gpu.model->kv_layout(), int64_t(n) * 80, *b.gpu, o);
  gpu.model->set_micro_batch_min_seqs(offload ? micro : 0);
  std::vector<std::vector<int32_t>> blocks(n, std::vector<int32_t>(80));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < 80; ++j) blocks[i][j] = i * 80 + j;
  for (int i = 0; i < n; ++i) {
    StepBatch p;
    p.add(std::vector<int32_t>(prompt.begin(), prompt.begin() + lengths[i]), 0, &blocks[i]);
    gpu.model->forward(p, *gpu.cache);
  }
  std::vector<Tensor> out;
  for (int step = 0; step < 24; ++step) {
    if (before_step) before_step(step);
    StepBatch s;
    for (int i = 0; i < n; ++i)
      s.add({int32_t(7 + (step * 13 + i * 5) % 1500)}, lengths[i] + step, &blocks[i]);
    out.push_back(b.gpu->to_host(gpu.model->forward(s, *gpu.cache)));
  }
  return out;
}

// Micro-batched offloaded decoding against one batch with the KV whole in HBM, both modes.
void check_micro_batches(const std::vector<int64_t>& lengths, int64_t slots, const char* what) {
  Backends b;
  for (attention::Mode mode : {attention::Mode::infllmv2, attention::Mode::nosa}) {
    Side gpu = load(*b.gpu, mode, 400);
    const std::vector<Tensor> whole = run_for_micro_batches(b, gpu, lengths, false, slots);
    const int64_t before = gpu.model->micro_batch_steps();
    const std::vector<Tensor> halves = run_for_micro_batches(b, gpu, lengths, true, slots);
    EXPECT_EQ(gpu.model->micro_batch_steps() - before, 24) << attention::mode_name(mode);
    EXPECT_GT(gpu.cache->tiers()->stats().evictions, 0) << attention::mode_name(mode);
    const double worst = worst_step_error(whole, halves);
    std::printf("[ micro    ] %s, %s: worst logits rel error vs one batch in HBM %.3e\n", what,
                attention::mode_name(mode), worst);
    EXPECT_LT(worst, 1e-2) << attention::mode_name(mode);
  }
}

// Offloaded decoding steps as two micro-batches (their gathers on the side stream while the
// other half computes, the previous round protected from eviction) give the logits of the same
// steps with the KV kept whole in HBM, with a block cache small enough to evict every step.
TEST(CudaModel, TwoMicroBatchesGiveTheLogitsOfOneBatch) {
  NOSA_REQUIRE_GPU();
  check_micro_batches({1000, 990, 700, 430}, 300, "4 sequences");  // of ~840 chunks written
}

// Residency decided on the device (each sequence's partition of the block cache, no selection
// read back): the logits of the KV kept whole in HBM, with partitions small enough to evict
// (micro-batches asked for are not used with partitions). Every way: attention over the hits
// while the misses are copied on the side stream, then over the misses (the default), or the
// copies first on the main stream (NOSA_RESIDENCY_OVERLAP=0); the steps run directly, or from
// graphs (recorded at a key's second step, then replayed: the partitions and the step's stamp
// come from the replay's metadata and the device).
TEST(CudaModel, ResidencyOnTheDeviceGivesTheLogitsOfKvInHbm) {
  NOSA_REQUIRE_GPU();
  for (const char* overlap : {"1", "0"}) {
    setenv("NOSA_RESIDENCY_OVERLAP", overlap, 1);
    Backends b;  // reads the switch
    unsetenv("NOSA_RESIDENCY_OVERLAP");
    const std::vector<int64_t> lengths = {1000, 990, 700, 430};
    for (attention::Mode mode : {attention::Mode::infllmv2, attention::Mode::nosa})
      for (bool graphs : {true, false}) {
        const std::string what = fmt::format("{}, overlap {}, graphs {}",
                                             attention::mode_name(mode), overlap, graphs);
        Side gpu = load(*b.gpu, mode, 400);
        runtime::set_cuda_graphs(false);
        const std::vector<Tensor> whole = run_for_micro_batches(b, gpu, lengths, false, 0);
        runtime::set_cuda_graphs(graphs);
        const int64_t replays = runtime::cuda_graph_replays();
        const int64_t in_parts = runtime::cuda_attention_in_parts();
        // 4 sequences x 2 layers x 2 heads x 20 slots = 320 partition slots, 400 for the
        // prompts; micro-batches from 2 sequences asked for.
        const std::vector<Tensor> dev = run_for_micro_batches(b, gpu, lengths, true, 720, 2, 20);
        runtime::set_cuda_graphs(true);
        // 24 steps of one key (a bucket of 1024 tokens holds them): one direct, one recorded.
        EXPECT_EQ(runtime::cuda_graph_replays() - replays, graphs ? 22 : 0) << what;
        // Attention in two parts in every layer of the steps run directly or recorded (with
        // graphs, two steps), never with the copies first.
        const int64_t layers = gpu.model->config().num_hidden_layers;
        EXPECT_EQ(runtime::cuda_attention_in_parts() - in_parts,
                  std::string(overlap) == "1" ? (graphs ? 2 : 24) * layers : 0)
            << what;
        // Every step's counters but the last's, copied at each step's end and folded in at the
        // next one's start (Backend::queue_copy_to_host), then all of them.
        const memory::TierStats folded = gpu.cache->stats();
        gpu.cache->sync_stats();
        const memory::TierStats st = gpu.cache->stats();
        EXPECT_GE(folded.hits * 10, st.hits * 9) << what;
        EXPECT_LE(folded.hits, st.hits) << what;
        EXPECT_EQ(gpu.cache->device_steps(), 24) << what;
        EXPECT_EQ(gpu.model->micro_batch_steps(), 0) << what;
        EXPECT_GT(st.evictions, 0) << what;
        EXPECT_GT(st.misses, 0) << what;
        const double worst = worst_step_error(whole, dev);
        std::printf("[ device   ] %s: %lld device steps, %lld hits, %lld misses, worst logits "
                    "rel error vs HBM %.3e\n",
                    what.c_str(), (long long)gpu.cache->device_steps(), (long long)st.hits,
                    (long long)st.misses, worst);
        EXPECT_LT(worst, 1e-2) << what;
      }
  }
}

// Prefetching layers 2 to 4 of a 5-layer model (each guessed from the layer before's input and
// copied on a stream of its own beside it): the logits of the KV whole in HBM, from graphs and
// from steps run directly; the prefetch copied blocks that the layers' own rounds then found.
TEST(CudaModel, PrefetchedResidencyGivesTheLogitsOfKvInHbm) {
  NOSA_REQUIRE_GPU();
  Backends b;
  const std::vector<int64_t> lengths = {1000, 990, 700, 430};
  for (attention::Mode mode : {attention::Mode::infllmv2, attention::Mode::nosa}) {
    int64_t prefetched_with_graphs = -1;
    for (bool graphs : {true, false}) {
      const std::string what =
          fmt::format("{}, graphs {}", attention::mode_name(mode), graphs);
      Side gpu = load(*b.gpu, mode, 400, 5);
      runtime::set_cuda_graphs(false);
      const std::vector<Tensor> whole = run_for_micro_batches(b, gpu, lengths, false, 0);
      runtime::set_cuda_graphs(graphs);
      gpu.model->set_prefetch(runtime::Model::Prefetch::on, 2);
      const int64_t replays = runtime::cuda_graph_replays();
      // 4 sequences x 5 layers x 2 heads x 20 slots = 800 partition slots, and 800 for the
      // prompts' rounds (one of 1000 tokens may need 766).
      const std::vector<Tensor> dev = run_for_micro_batches(b, gpu, lengths, true, 1600, 2, 20);
      runtime::set_cuda_graphs(true);
      EXPECT_EQ(runtime::cuda_graph_replays() - replays, graphs ? 22 : 0) << what;
      gpu.cache->sync_stats();
      const memory::TierStats st = gpu.cache->stats();
      EXPECT_EQ(gpu.cache->device_steps(), 24) << what;
      EXPECT_GT(st.prefetched, 0) << what;
      EXPECT_GT(st.prefetch_hits, 0) << what;
      EXPECT_LE(st.prefetch_hits, st.prefetched) << what;
      // Replayed steps prefetch as the steps run directly do (a graph that left the prefetch
      // out would copy less).
      if (graphs) prefetched_with_graphs = st.prefetched;
      else EXPECT_EQ(st.prefetched, prefetched_with_graphs) << what;
      const double worst = worst_step_error(whole, dev);
      std::printf("[ prefetch ] %s: %lld prefetched, %lld of them selected, %lld misses left, "
                  "worst logits rel error vs HBM %.3e\n",
                  what.c_str(), (long long)st.prefetched, (long long)st.prefetch_hits,
                  (long long)st.misses, worst);
      EXPECT_LT(worst, 1e-2) << what;
    }
  }
}

// Automatic prefetching that changes its mind from step to step (its threshold switched every two
// steps, prefetching never on the first, which has nothing measured): the steps that prefetch
// and those that do not run from graphs of their own, and the logits are those of the KV whole
// in HBM.
TEST(CudaModel, AutomaticPrefetchingThatSwitchesGivesTheLogitsOfKvInHbm) {
  NOSA_REQUIRE_GPU();
  Backends b;
  const std::vector<int64_t> lengths = {1000, 990, 700, 430};
  Side gpu = load(*b.gpu, attention::Mode::nosa, 400, 5);
  runtime::set_cuda_graphs(false);
  const std::vector<Tensor> whole = run_for_micro_batches(b, gpu, lengths, false, 0);
  runtime::set_cuda_graphs(true);
  gpu.model->set_prefetch(runtime::Model::Prefetch::automatic, 2);
  const int64_t replays = runtime::cuda_graph_replays(), before = gpu.model->prefetch_steps();
  auto switching = [&](int step) {
    gpu.model->set_prefetch_bus_share(step % 4 < 2 ? 1e6 : 0.0);
  };
  const std::vector<Tensor> dev =
      run_for_micro_batches(b, gpu, lengths, true, 1600, 2, 20, switching);
  // Steps 1, 4, 5, 8, 9, ..., 20, 21 prefetch.
  EXPECT_EQ(gpu.model->prefetch_steps() - before, 11);
  // Each variant runs directly at its first step, is recorded at its second and replayed after.
  EXPECT_EQ(runtime::cuda_graph_replays() - replays, 20);
  gpu.cache->sync_stats();
  const memory::TierStats st = gpu.cache->stats();
  EXPECT_GT(st.prefetched, 0);
  EXPECT_GT(st.prefetch_hits, 0);
  const double worst = worst_step_error(whole, dev);
  std::printf("[ prefetch ] automatic, switching: %lld steps prefetched, %lld chunks, worst logits "
              "rel error vs HBM %.3e\n",
              (long long)(gpu.model->prefetch_steps() - before), (long long)st.prefetched, worst);
  EXPECT_LT(worst, 1e-2);
}

// The same with 64 sequences: each half's selection (32 tokens x 2 KV heads x 16 blocks) goes to
// the tiers in two pieces, each piece's gather on the side stream before the next is looked up.
TEST(CudaModel, TwoMicroBatchesInPiecesGiveTheLogitsOfOneBatch) {
  NOSA_REQUIRE_GPU();
  std::vector<int64_t> lengths;
  for (int i = 0; i < 64; ++i) lengths.push_back(300 + (i * 37) % 400);
  check_micro_batches(lengths, 3000, "64 sequences");  // of ~8000 chunks written
}

// A step whose input is wrong (a token id outside the vocabulary) fails with a clear error also
// when it would be the step recorded, and steps with the same key still run from graphs after it.
TEST(CudaModel, ABadTokenInARecordedStepLeavesGraphsOn) {
  NOSA_REQUIRE_GPU();
  Backends b;
  runtime::set_cuda_graphs(true);
  Side gpu = load(*b.gpu, attention::Mode::nosa, 100);
  const int bs = gpu.model->kv_layout().block_size;
  std::vector<int32_t> blocks(40);
  for (int i = 0; i < 40; ++i) blocks[i] = i;
  StepBatch prefill;
  prefill.add(StepFixture({{0, 300}}, bs, 40, 73, 1900).step.tokens, 0, &blocks, true);
  gpu.model->forward(prefill, *gpu.cache);
  const int64_t vocab = gpu.model->config().vocab_size;
  auto decode = [&](int pos, int32_t token) {
    StepBatch s;
    s.add({token}, pos, &blocks);
    return gpu.model->forward(s, *gpu.cache);
  };
  decode(300, 5);  // the key's first step runs directly; its second would be recorded
  try {
    decode(301, int32_t(vocab + 7));
    ADD_FAILURE() << "a token id outside the vocabulary was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find("vocabulary"), std::string::npos) << e.what();
  }
  const int64_t before = runtime::cuda_graph_replays();
  for (int pos = 301; pos < 311; ++pos) {
    Tensor logits = b.gpu->to_host(decode(pos, 11 + pos % 50));
    for (int64_t j = 0; j < logits.numel(); ++j)
      ASSERT_TRUE(std::isfinite(logits.data<float>()[j])) << "position " << pos;
  }
  // The bad step never reached the step graphs: 301 is the key's second step (recorded), 302 to
  // 310 replay. (When a bad step was the one recorded, its failure turned graphs off: none.)
  EXPECT_GE(runtime::cuda_graph_replays() - before, 8);
}

TEST(CudaModel, GenerateRunsOnTheGpuFromTheCommandLine) {
  NOSA_REQUIRE_GPU();
  for (const char* mode : {"dense", "nosa"}) {
    const std::string base = nosa_binary() + " generate --model " +
                             tiny_model(attention::parse_mode(mode)).string() +
                             " --prompt-ids 1,17,99,250,3,8,9,10 --max-tokens 8 --ignore-eos "
                             "--json --logprobs 2 --attention " + mode;
    CommandResult g = run_command(base + " --device cuda");
    ASSERT_EQ(g.exit_code, 0) << g.err;
    CommandResult c = run_command(base + " --device cpu");
    ASSERT_EQ(c.exit_code, 0) << c.err;
    auto jg = nlohmann::json::parse(g.out), jc = nlohmann::json::parse(c.out);
    ASSERT_EQ(jg["token_ids"].size(), 8u);
    int same = 0;
    for (size_t i = 0; i < 8; ++i) same += jg["token_ids"][i] == jc["token_ids"][i];
    // Greedy decoding of a random model meets near-ties; the logits test above is the check.
    std::printf("[ generate ] %s: %d of 8 greedy tokens as on the CPU\n", mode, same);
  }
}

// The KV cache offloaded to pinned host memory (and to disk), gathered by the transfer kernel,
// gives exactly the tokens of the cache kept whole on the GPU: the same kernels read the same
// bytes, only through the slot table.
TEST(CudaModel, OffloadedKvGivesTheSameTokensAsKvInHbm) {
  NOSA_REQUIRE_GPU();
  TempDir dir;
  std::string ids;
  for (int i = 0; i < 3000; ++i) {
    if (i) ids += ',';
    ids += std::to_string(3 + (i * 7919) % 1990);
  }
  std::ofstream(dir / "ids.txt") << ids;
  for (const char* mode : {"infllmv2", "nosa"}) {
    const std::string base = nosa_binary() + " generate --model " +
                             tiny_model(attention::Mode::nosa).string() + " --prompt-ids @" +
                             (dir / "ids.txt").string() +
                             " --max-tokens 24 --ignore-eos --json --device cuda "
                             "--max-batch-tokens 64 --log-level warn --attention " + mode;
    CommandResult hbm = run_command(base + " --kv-blocks 400");
    ASSERT_EQ(hbm.exit_code, 0) << hbm.err;
    // About 390 chunk slots for 3024 tokens (189 blocks x 4 chunks): blocks come and go; the
    // host tier holds about half of the blocks in the second run.
    CommandResult host = run_command(base + " --offload host --gpu-kv-gib 0.002");
    ASSERT_EQ(host.exit_code, 0) << host.err;
    CommandResult disk = run_command(base + " --offload host+disk --gpu-kv-gib 0.002 "
                                     "--host-kv-gib 0.0016 --disk-kv-gib 0.002 --disk-kv-dir " +
                                     (dir / "kv").string());
    ASSERT_EQ(disk.exit_code, 0) << disk.err;
    auto a = nlohmann::json::parse(hbm.out), b = nlohmann::json::parse(host.out),
         c = nlohmann::json::parse(disk.out);
    EXPECT_EQ(b["token_ids"], a["token_ids"]) << mode;
    EXPECT_EQ(c["token_ids"], a["token_ids"]) << mode;
    std::printf("[ offload  ] %s: host and host+disk give the HBM tokens: %s\n", mode,
                b["token_ids"] == a["token_ids"] && c["token_ids"] == a["token_ids"] ? "yes"
                                                                                    : "NO");
  }
}

}  // namespace
}  // namespace nosa::test
