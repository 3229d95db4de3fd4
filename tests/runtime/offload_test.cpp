// Generation with the KV cache offloaded to host memory and to disk gives exactly the tokens of
// the cache kept whole on the device, for several sequences at once; residency invariants hold
// over a real run; a disk error fails only the request whose blocks it touched.
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <random>

#include "runtime/backend.h"
#include "runtime/core/error.h"
#include "runtime/engine.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"
#include "runtime/step.h"
#include "tests/common/engine_rig.h"
#include "tests/common/test_util.h"

namespace nosa::runtime {
namespace {

// A rig over the tiny NOSA checkpoint with a KV cache of `blocks` and the given residency.
struct Rig : test::EngineRig {
  Rig(attention::Mode mode, const KvCacheOptions& kv, int64_t blocks, int64_t batch_tokens,
      int layers = 0)
      : EngineRig(blocks, options(batch_tokens), mode, kv, layers) {}
  static EngineOptions options(int64_t batch_tokens) {
    EngineOptions eo;
    eo.max_batch_tokens = batch_tokens;
    return eo;
  }
};

GenerationRequest request(int64_t prompt_len, uint64_t seed, int64_t max_tokens) {
  return test::random_request(prompt_len, seed, max_tokens);
}

// micro_min_seqs >= 0: Model::set_micro_batch_min_seqs; micro_steps: the steps it then ran as
// two micro-batches.
std::vector<std::vector<int32_t>> generate(attention::Mode mode, const KvCacheOptions& kv,
                                           memory::TierStats* stats = nullptr,
                                           int micro_min_seqs = -1,
                                           int64_t* micro_steps = nullptr,
                                           int64_t* device_steps = nullptr,
                                           memory::TierStats* unsynced = nullptr,
                                           int layers = 0, bool prefetch = false) {
  Rig rig(mode, kv, 400, 256, layers);
  if (micro_min_seqs >= 0) rig.model->set_micro_batch_min_seqs(micro_min_seqs);
  rig.model->set_prefetch(prefetch ? runtime::Model::Prefetch::on : runtime::Model::Prefetch::off);
  std::vector<RequestId> ids;
  const int64_t lengths[] = {900, 700, 1200, 300};
  for (int i = 0; i < 4; ++i) ids.push_back(rig.engine->submit(request(lengths[i], 10 + i, 24)));
  auto res = rig.run_all();
  std::vector<std::vector<int32_t>> out;
  for (RequestId id : ids) {
    EXPECT_EQ(res[id].last.finish, FinishReason::length) << res[id].last.error;
    out.push_back(res[id].tokens);
  }
  // As the engine reports them step by step (the device-side counters of every step but the
  // last), then all of them.
  if (unsynced) *unsynced = rig.engine->stats().tiers;
  rig.cache->sync_stats();
  if (stats) *stats = rig.engine->stats().tiers;
  if (micro_steps) *micro_steps = rig.model->micro_batch_steps();
  if (device_steps) *device_steps = rig.cache->device_steps();
  return out;
}

// The same block cache with a host tier of 120 blocks (of the ~200 written: the rest go to disk
// and come back) and the disk tier in `dir`.
KvCacheOptions with_disk(KvCacheOptions o, const std::filesystem::path& dir) {
  o.offload = memory::Offload::host_disk;
  o.host_blocks = 120;
  o.disk_dir = dir;
  return o;
}

class OffloadGivesTheSameTokens : public ::testing::TestWithParam<attention::Mode> {};

TEST_P(OffloadGivesTheSameTokens, HostAndHostPlusDisk) {
  auto expected = generate(GetParam(), {});
  KvCacheOptions host;
  host.offload = memory::Offload::host;
  host.device_slots = 600;  // of 400 blocks x 4 chunks: the cache must evict and reload
  memory::TierStats hs;
  EXPECT_EQ(generate(GetParam(), host, &hs), expected);
  EXPECT_GT(hs.evictions, 0);
  EXPECT_GT(hs.hits, hs.misses);  // NOSA's locality: most of each step's selection stays
  EXPECT_GT(hs.bytes_host_to_device, 0);

  test::TempDir dir;
  const KvCacheOptions disk = with_disk(host, dir / "kv");
  memory::TierStats ds;
  EXPECT_EQ(generate(GetParam(), disk, &ds), expected);
  EXPECT_GT(ds.bytes_disk_written, 0);
  EXPECT_GT(ds.bytes_disk_read, 0);
  // Overlap is measured: the fraction of each step's selection also selected the step before.
  EXPECT_GT(ds.overlap, 0);
  EXPECT_LE(ds.overlap, ds.selected);
}

// Decoding steps of the four sequences as two micro-batches of two (their layers interleaved,
// each half's loads as its own rounds, the previous round protected): the tokens of one batch
// with the KV kept whole, with the host tier and with host and disk.
TEST_P(OffloadGivesTheSameTokens, InTwoMicroBatches) {
  auto expected = generate(GetParam(), {});
  KvCacheOptions host;
  host.offload = memory::Offload::host;
  host.device_slots = 600;
  memory::TierStats hs;
  int64_t micro = 0;
  EXPECT_EQ(generate(GetParam(), host, &hs, 2, &micro), expected);
  EXPECT_GT(micro, 20);  // the decoding steps with all four sequences running
  EXPECT_GT(hs.evictions, 0);

  test::TempDir dir;
  const KvCacheOptions disk = with_disk(host, dir / "kv");
  memory::TierStats ds;
  micro = 0;
  EXPECT_EQ(generate(GetParam(), disk, &ds, 2, &micro), expected);
  EXPECT_GT(micro, 20);
  EXPECT_GT(ds.bytes_disk_read, 0);
}

// Decoding steps that decide residency on the device (each sequence's partition of the block
// cache; prompts still take the host path): the same tokens, in one batch and in two
// micro-batches, and with host and disk (steps whose blocks are on disk take the host path).
TEST_P(OffloadGivesTheSameTokens, WithResidencyOnTheDevice) {
  auto expected = generate(GetParam(), {});
  KvCacheOptions host;
  host.offload = memory::Offload::host;
  host.device_slots = 800;  // the host path keeps 480: a prompt step's rounds fit
  host.decode_partitions = 4;
  host.partition_slots = 20;  // of 4 chunks per block: 320 slots; the selection's width is 16
  host.min_partition_slots = 16;
  memory::TierStats hs, unsynced;
  int64_t device_steps = 0, micro = 0;
  EXPECT_EQ(generate(GetParam(), host, &hs, 0, nullptr, &device_steps, &unsynced), expected);
  EXPECT_GT(device_steps, 20);
  // Each step's device-side counters reach the engine's statistics at the next step's start.
  EXPECT_GE(unsynced.hits * 10, hs.hits * 9);
  EXPECT_LE(unsynced.hits, hs.hits);
  EXPECT_GT(hs.evictions, 0);
  EXPECT_GT(hs.hits, hs.misses);
  EXPECT_EQ(hs.device_slots, 800);

  // A cache with partitions does not split steps into micro-batches.
  device_steps = 0;
  EXPECT_EQ(generate(GetParam(), host, nullptr, 2, &micro, &device_steps), expected);
  EXPECT_EQ(micro, 0);
  EXPECT_GT(device_steps, 20);

  test::TempDir dir;
  const KvCacheOptions disk = with_disk(host, dir / "kv");
  memory::TierStats ds;
  EXPECT_EQ(generate(GetParam(), disk, &ds), expected);  // most steps: some blocks on disk
  EXPECT_GT(ds.bytes_disk_read, 0);

  // A block cache whose host path could not hold a prompt step's rounds beside the partitions:
  // the first prompt step hands the partitions back, and everything runs on the host path.
  KvCacheOptions tight = host;
  tight.device_slots = 600;
  memory::TierStats ts;
  device_steps = -1;
  EXPECT_EQ(generate(GetParam(), tight, &ts, 0, nullptr, &device_steps), expected);
  EXPECT_EQ(device_steps, 0);
  EXPECT_EQ(ts.device_slots, 600);
}

// Host offloading with residency on the device for a 5-layer tiny model: 1400 device slots, of
// them 4 x 5 x 2 x 20 in partitions, the rest a host path (as above).
KvCacheOptions partitioned_for_5_layers() {
  KvCacheOptions o;
  o.offload = memory::Offload::host;
  o.device_slots = 1400;
  o.decode_partitions = 4;
  o.partition_slots = 20;
  o.min_partition_slots = 16;
  return o;
}

// Decoding steps that prefetch layers 2 and on of a 5-layer model (each layer's blocks selected
// from the layer before's input and copied beside it): the tokens of the KV kept whole; the
// prefetch copied blocks and the layers' own rounds found some of them.
TEST_P(OffloadGivesTheSameTokens, WithPrefetchedBlocks) {
  constexpr int layers = 5;
  auto expected = generate(GetParam(), {}, nullptr, -1, nullptr, nullptr, nullptr, layers);
  const KvCacheOptions host = partitioned_for_5_layers();
  memory::TierStats on, off;
  int64_t device_steps = 0;
  EXPECT_EQ(generate(GetParam(), host, &on, 0, nullptr, &device_steps, nullptr, layers, true),
            expected);
  EXPECT_GT(device_steps, 20);
  EXPECT_GT(on.prefetched, 0);
  EXPECT_GT(on.prefetch_hits, 0);
  EXPECT_LE(on.prefetch_hits, on.prefetched);
  // Without it, the same tokens, nothing prefetched, and more misses.
  EXPECT_EQ(generate(GetParam(), host, &off, 0, nullptr, nullptr, nullptr, layers, false),
            expected);
  EXPECT_EQ(off.prefetched, 0);
  EXPECT_EQ(off.prefetch_hits, 0);
  EXPECT_GT(off.misses, on.misses);
  EXPECT_EQ(on.selected, off.selected);
}

// The default prefetching (automatic) never prefetches on the CPU, where the guesses would run
// in line with the layers and only add work; the tokens are those of the KV kept whole.
TEST_P(OffloadGivesTheSameTokens, WithAutomaticPrefetchingOnTheCpu) {
  constexpr int layers = 5;
  auto expected = generate(GetParam(), {}, nullptr, -1, nullptr, nullptr, nullptr, layers);
  const KvCacheOptions host = partitioned_for_5_layers();
  Rig rig(GetParam(), host, 400, 256, layers);
  ASSERT_EQ(rig.model->prefetch(), Model::Prefetch::automatic);
  std::vector<RequestId> ids;
  const int64_t lengths[] = {900, 700, 1200, 300};
  for (int i = 0; i < 4; ++i) ids.push_back(rig.engine->submit(request(lengths[i], 10 + i, 24)));
  auto res = rig.run_all();
  for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(res[ids[i]].tokens, expected[i]);
  rig.cache->sync_stats();
  EXPECT_GT(rig.cache->device_steps(), 20);
  EXPECT_EQ(rig.model->prefetch_steps(), 0);
  EXPECT_EQ(rig.cache->stats().prefetched, 0);
}

INSTANTIATE_TEST_SUITE_P(Modes, OffloadGivesTheSameTokens,
                         ::testing::Values(attention::Mode::infllmv2, attention::Mode::nosa),
                         [](const auto& info) { return attention::mode_name(info.param); });

// Each step that decides residency on the device leaves the next one its traffic
// (KvCache::last_step_traffic, folded in at the next step's start): the chunks it selected and
// those new to its partitions (misses and prefetch hits), as the statistics count them once
// folded in; prefetching layers 2-4 of a 5-layer model.
TEST(Offload, EachStepSeesTheTrafficOfTheStepBefore) {
  const KvCacheOptions host = partitioned_for_5_layers();
  Rig rig(attention::Mode::nosa, host, 400, 256, 5);
  rig.model->set_prefetch(Model::Prefetch::on);
  const int64_t lengths[] = {900, 700, 1200, 300};
  for (int i = 0; i < 4; ++i) rig.engine->submit(request(lengths[i], 30 + i, 24));
  EXPECT_EQ(rig.cache->last_step_traffic().selected, 0);  // nothing measured yet
  // The device-side rounds' counts as folded in so far (no sync: as the engine runs): the
  // statistics less the host path's, whose block cache also counts the slots of the blocks
  // being written as misses.
  auto device_counts = [&] {
    memory::TierStats d = rig.cache->stats();
    const memory::TierStats host_path = rig.cache->tiers()->stats();
    d.selected -= host_path.selected;
    d.misses -= host_path.misses;
    return d;
  };
  int folded = 0, with_prefetch_hits = 0;
  for (int guard = 0; rig.engine->has_work() && guard < 1000; ++guard) {
    const memory::TierStats before = device_counts();
    rig.engine->step();
    const memory::TierStats after = device_counts();
    if (after.selected == before.selected) continue;  // the step before decided on the host
    ++folded;
    const KvCache::StepTraffic t = rig.cache->last_step_traffic();
    EXPECT_EQ(t.selected, after.selected - before.selected) << "step " << guard;
    EXPECT_EQ(t.fresh, after.misses + after.prefetch_hits - before.misses - before.prefetch_hits)
        << "step " << guard;
    EXPECT_LT(t.fresh, t.selected) << "step " << guard;
    with_prefetch_hits += after.prefetch_hits > before.prefetch_hits;
  }
  EXPECT_GT(folded, 20);
  EXPECT_GT(with_prefetch_hits, 0);
}

KvLayout layout_of(int layers, int head_dim, int block_size, DType dtype) {
  KvLayout l;
  l.n_layers = layers;
  l.n_kv_heads = 2;
  l.head_dim = head_dim;
  l.block_size = block_size;
  l.keys_per_block = 4;
  l.dtype = dtype;
  return l;
}

// Prefetching pays while the blocks a step must move take the bus (51 GB/s) less than
// k_prefetch_bus_share times as long as its HBM reads (4.3 TB/s) take; nothing measured: no.
TEST(Offload, PrefetchingPaysWhileTheBusHasRoom) {
  const KvLayout l = layout_of(32, 128, 64, DType::bf16);  // nosa-8b-like
  const double chunk = double(l.kv_chunk_bytes() + l.bias_chunk_bytes());
  const double weights = 15e9;
  const int64_t selected = 1000000;
  const double hbm_s =
      (weights + double(selected) * double(l.kv_chunk_bytes())) / Model::k_hbm_bytes_per_s;
  // The fresh chunks whose bus time is `share` times the HBM time.
  auto fresh_at = [&](double share) {
    return int64_t(share * hbm_s * Model::k_bus_bytes_per_s / chunk);
  };
  const double k = Model::k_prefetch_bus_share;
  EXPECT_FALSE(Model::prefetch_pays({0, 0}, weights, l));
  EXPECT_TRUE(Model::prefetch_pays({selected, 0}, weights, l));
  EXPECT_TRUE(Model::prefetch_pays({selected, fresh_at(1.3)}, weights, l));
  EXPECT_TRUE(Model::prefetch_pays({selected, fresh_at(k * 0.99)}, weights, l));
  EXPECT_FALSE(Model::prefetch_pays({selected, fresh_at(k * 1.01)}, weights, l));
  EXPECT_FALSE(Model::prefetch_pays({selected, fresh_at(3.9)}, weights, l));
  // More weights to read leave more room.
  EXPECT_TRUE(Model::prefetch_pays({selected, fresh_at(k * 1.01)}, 2 * weights, l));
}

// Sets an environment variable for one scope.
struct ScopedEnv {
  const char* name;
  ScopedEnv(const char* n, const char* value) : name(n) { ::setenv(n, value, 1); }
  ~ScopedEnv() { ::unsetenv(name); }
};

// The residency switches in the environment are checked like flags: a value that is not an
// integer in range is an invalid_argument naming the variable, not a silent default.
TEST(Offload, BadResidencySwitchesInTheEnvironmentAreClearErrors) {
  auto backend = make_cpu_backend();
  const KvLayout layout = layout_of(2, 64, 16, DType::f32);
  KvCacheOptions host;
  host.offload = memory::Offload::host;
  host.device_slots = 64;
  for (const char* bad : {"0", "65", "four", "4x", ""}) {
    ScopedEnv env("NOSA_RESIDENCY_PIECES", bad);
    try {
      KvCache cache(layout, 16, *backend, host);
      ADD_FAILURE() << "NOSA_RESIDENCY_PIECES='" << bad << "' was taken";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find("NOSA_RESIDENCY_PIECES"), std::string::npos) << e.message();
    }
  }
  {
    ScopedEnv env("NOSA_RESIDENCY_PIECES", "2");
    EXPECT_NO_THROW(KvCache(layout, 16, *backend, host));
  }
  for (const char* bad : {"-1", "many"}) {
    ScopedEnv env("NOSA_MICRO_BATCH_MIN_SEQS", bad);
    EXPECT_THROW(Model::default_micro_batch_min_seqs(), Error) << bad;
  }
  ScopedEnv env("NOSA_MICRO_BATCH_MIN_SEQS", "8");
  EXPECT_EQ(Model::default_micro_batch_min_seqs(), 8);
}

// Automatic prefetching's threshold from the environment (NOSA_PREFETCH_BUS_SHARE), checked like
// a flag; a model reads it when made, and a share of 0 never prefetches.
TEST(Offload, ThePrefetchBusShareComesFromTheEnvironment) {
  for (const char* bad : {"-1", "three", "2.5x", ""}) {
    ScopedEnv env("NOSA_PREFETCH_BUS_SHARE", bad);
    try {
      Rig rig(attention::Mode::nosa, {}, 64, 256);
      ADD_FAILURE() << "NOSA_PREFETCH_BUS_SHARE='" << bad << "' was taken";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(e.message().find("NOSA_PREFETCH_BUS_SHARE"), std::string::npos) << e.message();
    }
  }
  {
    ScopedEnv env("NOSA_PREFETCH_BUS_SHARE", "1.5");
    Rig rig(attention::Mode::nosa, {}, 64, 256);
    EXPECT_EQ(rig.model->prefetch_bus_share(), 1.5);
  }
  Rig rig(attention::Mode::nosa, {}, 64, 256);
  EXPECT_EQ(rig.model->prefetch_bus_share(), Model::k_prefetch_bus_share);
  const KvLayout l = layout_of(32, 128, 64, DType::bf16);
  EXPECT_TRUE(Model::prefetch_pays({1000, 10}, 15e9, l, 1.0));
  EXPECT_FALSE(Model::prefetch_pays({1000, 10}, 15e9, l, 0.0));
}

// Tensor parallelism: the leader's cache records the blocks its engine frees (only when asked
// to), and they travel to the followers in the next step plan, whose tiers free them too.
TEST(Offload, ALeaderSendsTheBlocksItFreedToItsFollowers) {
  KvCacheOptions kv;
  kv.offload = memory::Offload::host;
  kv.device_slots = 600;
  kv.host_blocks = 400;
  Rig rig(attention::Mode::nosa, kv, 400, 128);
  KvCache& cache = *rig.cache;
  std::vector<int32_t> blocks;
  ASSERT_TRUE(cache.pool().allocate(3, blocks));
  cache.release(blocks);
  EXPECT_TRUE(cache.take_released().empty());  // not recorded unless asked: no growth
  cache.keep_released(true);
  ASSERT_TRUE(cache.pool().allocate(3, blocks));
  const std::vector<int32_t> freed = blocks;
  cache.release(blocks);
  EXPECT_EQ(cache.take_released(), freed);
  EXPECT_TRUE(cache.take_released().empty());
  StepPlan plan;
  decode_step(encode_step(StepBatch{}, StepPlan::Kind::run, freed), plan);
  EXPECT_EQ(plan.released, freed);
  cache.release_tiers(plan.released);  // a follower's side: freeing freed blocks is harmless
}

// With partitions for device-side residency too: the failed round (on the host path: the blocks
// are on disk) leaves slot-table entries naming slots that no longer hold their chunk, which are
// cleared; the other request then decodes on the device and gets the tokens it gets alone.
TEST(Offload, ADiskErrorFailsOnlyTheAffectedRequest) {
  std::vector<int32_t> alone;
  {
    Rig rig(attention::Mode::nosa, {}, 400, 128);
    RequestId b = rig.engine->submit(request(50, 2, 20));
    alone = rig.run_all()[b].tokens;
  }
  for (const bool partitions : {false, true}) {
    SCOPED_TRACE(partitions ? "with partitions" : "without partitions");
    test::TempDir dir;
    KvCacheOptions kv;
    kv.offload = memory::Offload::host_disk;
    kv.device_slots = partitions ? 760 : 600;  // the host path keeps 600 either way
    kv.host_blocks = 110;
    kv.disk_dir = dir / "kv";
    if (partitions) {
      kv.decode_partitions = 2;
      kv.partition_slots = 20;
      kv.min_partition_slots = 16;
    }
    Rig rig(attention::Mode::nosa, kv, 400, 128);
    // A long request fills the host; its oldest blocks go to disk. Then reads fail.
    RequestId a = rig.engine->submit(request(2500, 1, 40));
    std::map<RequestId, TokenEvent> ends;
    while (rig.engine->stats().tiers.disk_blocks_used == 0)
      for (auto& e : rig.engine->step())
        if (e.finish != FinishReason::none) ends[e.id] = e;
    EXPECT_EQ(rig.cache->has_partitions(), partitions);
    rig.cache->tiers()->disk()->inject_faults([](bool write, int64_t) { return !write; });
    RequestId b = rig.engine->submit(request(50, 2, 20));
    auto res = rig.run_all();
    for (auto& [id, r] : res) ends[id] = r.last;
    EXPECT_EQ(ends[a].finish, FinishReason::error);
    EXPECT_NE(ends[a].error.find("disk"), std::string::npos) << ends[a].error;
    EXPECT_EQ(ends[b].finish, FinishReason::length) << ends[b].error;
    EXPECT_EQ(res[b].tokens, alone);
    EXPECT_EQ(rig.cache->pool().used_blocks(), 0);
    EXPECT_EQ(rig.cache->has_partitions(), partitions);  // kept: the entries were cleared
    if (partitions) {
      EXPECT_GT(rig.cache->device_steps(), 0);
    }
  }
}

}  // namespace
}  // namespace nosa::runtime
