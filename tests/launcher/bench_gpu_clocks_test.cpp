// The benchmark's GPU clock and power sampling (launcher/bench/gpu_clocks.h): the statistics of
// samples, the fields they add to a result row, and a sampler without a device (CPU backends,
// machines without the driver's NVML), which must sample nothing rather than fail.
#include <gtest/gtest.h>

#include "launcher/bench/gpu_clocks.h"

namespace nosa::launcher::bench {
namespace {

TEST(GpuClocks, NoSamplesGiveNoStatistics) { EXPECT_FALSE(summarize_gpu_samples({}).has_value()); }

TEST(GpuClocks, StatisticsOfSamples) {
  const auto s = summarize_gpu_samples(
      {{1980, 650, false}, {1755, 700, true}, {1830, 690, true}, {1980, 640, false}});
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->samples, 4);
  EXPECT_DOUBLE_EQ(s->sm_mhz_mean, (1980 + 1755 + 1830 + 1980) / 4.0);
  EXPECT_DOUBLE_EQ(s->sm_mhz_min, 1755);
  EXPECT_DOUBLE_EQ(s->power_w_mean, (650 + 700 + 690 + 640) / 4.0);
  EXPECT_DOUBLE_EQ(s->power_capped_share, 0.5);
}

TEST(GpuClocks, StatisticsGoIntoTheRow) {
  nlohmann::json row = {{"suite", "prefill"}};
  add_gpu_clock_stats(*summarize_gpu_samples({{1500, 400, true}}), row);
  EXPECT_EQ(row["gpu_clock_samples"], 1);
  EXPECT_DOUBLE_EQ(row["gpu_sm_mhz_mean"].get<double>(), 1500);
  EXPECT_DOUBLE_EQ(row["gpu_sm_mhz_min"].get<double>(), 1500);
  EXPECT_DOUBLE_EQ(row["gpu_power_w_mean"].get<double>(), 400);
  EXPECT_DOUBLE_EQ(row["gpu_power_capped_share"].get<double>(), 1.0);
  EXPECT_EQ(row["suite"], "prefill");
}

TEST(GpuClocks, ASamplerWithoutADeviceSamplesNothing) {
  for (const char* bus : {"", "0000:ff:1f.7"}) {
    GpuSampler sampler(bus, 1);
    EXPECT_FALSE(sampler.available()) << bus;
    sampler.start();
    EXPECT_FALSE(sampler.stop().has_value()) << bus;
    EXPECT_FALSE(sampler.stop().has_value()) << bus;  // stopping twice is harmless
  }
}

}  // namespace
}  // namespace nosa::launcher::bench
