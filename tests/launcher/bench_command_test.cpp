// `nosa bench` on the CPU backend with the tiny shape: both suites run and write JSON and CSV
// results that carry the machine, the commit and the configuration.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tests/common/test_util.h"

namespace nosa::test {
namespace {

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(BenchCommand, DecodeSuiteWritesResultsWithMachineCommitAndFloor) {
  TempDir dir;
  auto r = run_command(fmt::format(
      "{} bench --suite decode --shape tiny --device cpu --mode dense,nosa --batch 1,3 "
      "--context 300 --steps 2 --warmup 1 --json {} --csv {}",
      nosa_binary(), (dir / "d.json").string(), (dir / "d.csv").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(slurp(dir / "d.json"));
  EXPECT_EQ(j["suite"], "decode");
  EXPECT_FALSE(j["commit"].get<std::string>().empty());
  EXPECT_EQ(j["machine"]["backend"], "cpu");
  ASSERT_EQ(j["results"].size(), 4u);
  for (auto& row : j["results"]) {
    EXPECT_GT(row["tokens_per_s"].get<double>(), 0.0);
    EXPECT_GT(row["floor_ms"].get<double>(), 0.0);
    EXPECT_GT(row["ratio_to_floor"].get<double>(), 0.0);
  }
  const std::string csv = slurp(dir / "d.csv");
  EXPECT_NE(csv.find("tokens_per_s"), std::string::npos);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 5);
}

TEST(BenchCommand, PrefillSuiteRunsPromptsThroughTheEngine) {
  TempDir dir;
  auto r = run_command(fmt::format(
      "{} bench --suite prefill --shape tiny --device cpu --mode nosa --prompts 2 "
      "--prompt-len 200 --max-batch-tokens 128 --json {}",
      nosa_binary(), (dir / "p.json").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(slurp(dir / "p.json"));
  ASSERT_EQ(j["results"].size(), 1u);
  EXPECT_GT(j["results"][0]["tokens_per_s"].get<double>(), 0.0);
  EXPECT_GE(j["results"][0]["steps"].get<int>(), 4);
}

TEST(BenchCommand, UnknownSuiteIsAClearError) {
  auto r = run_command(fmt::format("{} bench --suite nope --device cpu", nosa_binary()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("unknown suite"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace nosa::test
