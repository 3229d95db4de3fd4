// End to end through the `nosa` binary: make-model then generate in every attention mode, a
// NOSA prompt of several thousand tokens, and clear errors for bad command lines.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/common/test_util.h"

namespace nosa::test {
namespace {

using nlohmann::json;

class MakeModelThenGenerate : public ::testing::TestWithParam<std::string> {};

TEST_P(MakeModelThenGenerate, ProducesTextAndJson) {
  TempDir dir;
  const std::string model = (dir / "m").string();
  auto made = run_command(fmt::format("{} make-model --shape tiny --attention {} --seed 3 --out {}",
                                      nosa_binary(), GetParam(), model));
  ASSERT_EQ(made.exit_code, 0) << made.err;
  for (auto f : {"config.json", "model.safetensors", "tokenizer.model"})
    EXPECT_TRUE(std::filesystem::exists(dir / "m" / f)) << f;

  auto text = run_command(fmt::format(
      "{} generate --model {} --prompt 'The weather today is' --max-tokens 8 --ignore-eos",
      nosa_binary(), model));
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_FALSE(text.out.empty());

  auto js = run_command(fmt::format(
      "{} generate --model {} --prompt 'The weather today is' --max-tokens 8 --ignore-eos "
      "--json --logprobs 3 --log-level warn",
      nosa_binary(), model));
  ASSERT_EQ(js.exit_code, 0) << js.err;
  json j = json::parse(js.out);
  ASSERT_EQ(j["token_ids"].size(), 8u);
  EXPECT_EQ(j["finish_reason"], "length");
  ASSERT_EQ(j["logprobs"].size(), 8u);
  for (auto& lp : j["logprobs"]) {
    ASSERT_EQ(lp["top"].size(), 3u);
    // Greedy: the chosen token is the most likely, and logprobs are natural logs (<= 0).
    EXPECT_EQ(lp["token"], lp["top"][0]["token"]);
    EXPECT_LE(lp["logprob"].get<double>(), 0.0);
    EXPECT_GE(lp["top"][0]["logprob"].get<double>(), lp["top"][1]["logprob"].get<double>());
  }
  // Greedy generation is deterministic; the text matches what the plain run printed.
  auto again = run_command(fmt::format(
      "{} generate --model {} --prompt 'The weather today is' --max-tokens 8 --ignore-eos "
      "--json --log-level warn",
      nosa_binary(), model));
  EXPECT_EQ(json::parse(again.out)["token_ids"], j["token_ids"]);
  EXPECT_EQ(text.out, j["text"].get<std::string>() + "\n");
}

INSTANTIATE_TEST_SUITE_P(Modes, MakeModelThenGenerate,
                         ::testing::Values("dense", "infllmv2", "nosa"));

TEST(Cli, NosaGeneratesFromAPromptOfSeveralThousandTokens) {
  TempDir dir;
  std::string ids;
  for (int i = 0; i < 4000; ++i) ids += fmt::format("{}{}", i ? "," : "", 3 + (i * 7919) % 1990);
  std::ofstream(dir / "ids.txt") << ids;
  // 4000 tokens are 250 blocks of 16, of which 16 are selected per token and head.
  auto r = run_command(fmt::format(
      "{} generate --model {} --prompt-ids @{} --max-tokens 16 --ignore-eos --json "
      "--log-level warn",
      nosa_binary(), tiny_model(attention::Mode::nosa).string(), (dir / "ids.txt").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["prompt_tokens"], 4000);
  EXPECT_EQ(j["token_ids"].size(), 16u);
}

TEST(Cli, SeededSamplingFromTheCommandLine) {
  auto run = [&](int seed) {
    auto r = run_command(fmt::format(
        "{} generate --model {} --prompt-ids 1,50,60 --max-tokens 12 --temperature 1.2 "
        "--top-k 40 --top-p 0.95 --seed {} --ignore-eos --json --log-level warn",
        nosa_binary(), tiny_model(attention::Mode::dense).string(), seed));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return json::parse(r.out)["token_ids"];
  };
  EXPECT_EQ(run(1), run(1));
  EXPECT_NE(run(1), run(2));
}

TEST(Cli, BadInputGetsAClearErrorAndExitCode) {
  const std::string model = tiny_model(attention::Mode::dense).string();
  struct Case {
    std::string args, message;
  };
  std::vector<Case> cases = {
      {"generate --model /nonexistent --prompt hi", "does not exist"},
      {"generate --model " + model + " --prompt hi --attention fancy", "unknown attention mode"},
      {"generate --model " + model + " --prompt hi --attention nosa", "NOSA tensors"},
      {"generate --model " + model + " --prompt-ids 1,2,70000", "outside the vocabulary"},
      {"generate --model " + model + " --prompt-ids 1,x,3", "not a token id"},
      {"generate --model " + model + " --prompt-ids @/nonexistent/file", "cannot read"},
      {"generate --model " + model + " --prompt hi --prompt-ids 1", "exactly one"},
      {"generate --model " + model + " --prompt-ids 1,2,3,4,5 --max-context 4", "context limit"},
      {"generate --model " + model + " --prompt hi --device tpu", "unknown device"},
      {"make-model --shape huge --out /tmp/x", "unknown model shape"},
  };
  for (auto& c : cases) {
    auto r = run_command(nosa_binary() + " " + c.args);
    EXPECT_NE(r.exit_code, 0) << c.args;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.args << "\n" << r.err;
    EXPECT_EQ(r.err.find("terminate called"), std::string::npos) << c.args;
  }
  auto help = run_command(nosa_binary() + " generate --help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("--max-tokens"), std::string::npos);
}

}  // namespace
}  // namespace nosa::test
