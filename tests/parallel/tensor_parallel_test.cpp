// Tensor parallelism on the CPU backend under mpirun: 2 and 4 ranks give the tokens of one rank
// (4 ranks on a model of 2 KV heads replicate each KV head and split its query heads), and a
// rank that dies or hangs ends the job with an error within a bounded time.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "tests/common/test_util.h"

namespace nosa::test {
namespace {

using nlohmann::json;

std::string mpirun(int np) {
  return fmt::format("mpirun --allow-run-as-root --oversubscribe -np {} ", np);
}

std::string prompt_file(const TempDir& dir) {
  std::string ids;
  for (int i = 0; i < 700; ++i) ids += fmt::format("{}{}", i ? "," : "", 3 + (i * 7919) % 1990);
  std::ofstream(dir / "ids.txt") << ids;
  return (dir / "ids.txt").string();
}

json generate(int np, attention::Mode mode, const std::string& prompt) {
  auto r = run_command(fmt::format(
      "{}{} generate --model {} --tp {} --prompt-ids @{} --max-tokens 10 --ignore-eos --json "
      "--logprobs 2 --threads 1 --log-level warn",
      np > 1 ? mpirun(np) : "", nosa_binary(), tiny_model(mode).string(), np, prompt));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return json::parse(r.out);
}

class SameTokensAsOneRank : public ::testing::TestWithParam<attention::Mode> {};

TEST_P(SameTokensAsOneRank, TwoAndFourRanks) {
  TempDir dir;
  std::string prompt = prompt_file(dir);  // 700 tokens: 44 blocks, sparse in the NOSA case
  json one = generate(1, GetParam(), prompt);
  for (int np : {2, 4}) {
    json many = generate(np, GetParam(), prompt);
    EXPECT_EQ(many["token_ids"], one["token_ids"]) << np << " ranks";
    for (size_t i = 0; i < one["logprobs"].size(); ++i)
      EXPECT_NEAR(many["logprobs"][i]["logprob"].get<double>(),
                  one["logprobs"][i]["logprob"].get<double>(), 1e-4)
          << np << " ranks, token " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, SameTokensAsOneRank,
                         ::testing::Values(attention::Mode::dense, attention::Mode::nosa),
                         [](const auto& info) { return attention::mode_name(info.param); });

// Starts a long 2-rank generation in the background, waits until rank 1 runs, signals it, and
// returns the job's exit code, stderr and how long the job took after the signal.
struct Outcome {
  int exit_code;
  std::string err;
  double seconds_after_signal;
};

Outcome signal_rank_one(int signal, const std::string& extra) {
  TempDir dir;
  std::string err = (dir / "err").string(), rc = (dir / "rc").string();
  std::string pid_file = (dir / "pid").string();
  const std::string model = tiny_model(attention::Mode::nosa).string();
  // The job runs in the background with every stream redirected (so that ctest does not wait
  // for it); its mpirun's pid is kept to clean up.
  std::string cmd = fmt::format(
      "({}{} generate --model {} --tp 2 --prompt-ids 1,2,3 --max-tokens 100000 --ignore-eos "
      "--max-context 30000 --threads 1 --log-level warn {} >/dev/null 2>{} </dev/null & "
      "echo $! >{}; wait $!; echo $? >{}) >/dev/null 2>&1 </dev/null &",
      mpirun(2), nosa_binary(), model, extra, err, pid_file, rc);
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  auto cleanup = [&] {
    std::ifstream in(pid_file);
    long pid = 0;
    if (in >> pid && pid > 0) ::kill(pid_t(pid), SIGKILL);
  };
  // Find rank 1 by its environment (startup can be slow on a loaded machine).
  pid_t target = 0;
  for (int attempt = 0; attempt < 1200 && !target; ++attempt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    for (auto& entry : std::filesystem::directory_iterator("/proc")) {
      std::ifstream env(entry.path() / "environ");
      std::ifstream cmdline(entry.path() / "cmdline");
      std::string c((std::istreambuf_iterator<char>(cmdline)), {});
      // This test's job: its command line names this process's own model directory.
      if (c.find("generate") == std::string::npos || c.find(model) == std::string::npos)
        continue;
      std::string e((std::istreambuf_iterator<char>(env)), {});
      if (e.find(std::string("OMPI_COMM_WORLD_RANK=1") + '\0') != std::string::npos) {
        target = pid_t(std::stol(entry.path().filename()));
        break;
      }
    }
  }
  if (target <= 0) {
    cleanup();
    ADD_FAILURE() << "rank 1 never started";
    return {-1, "", 0};
  }
  std::this_thread::sleep_for(std::chrono::seconds(1));  // let it decode for a while
  auto start = std::chrono::steady_clock::now();
  ::kill(target, signal);
  Outcome o{-1, "", 0};
  for (int i = 0; i < 1200 && o.exit_code < 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::ifstream in(rc);
    int code;
    if (in >> code) o.exit_code = code;
  }
  o.seconds_after_signal =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (signal == SIGSTOP) ::kill(target, SIGKILL);
  if (o.exit_code < 0) cleanup();
  std::ifstream in(err);
  o.err.assign(std::istreambuf_iterator<char>(in), {});
  return o;
}

TEST(TensorParallel, AKilledRankEndsTheJobNamingTheRank) {
  Outcome o = signal_rank_one(SIGKILL, "");
  EXPECT_NE(o.exit_code, 0);
  EXPECT_GE(o.exit_code, 0) << "the job did not end";
  EXPECT_LT(o.seconds_after_signal, 30);
  EXPECT_NE(o.err.find("rank 1"), std::string::npos) << o.err;
}

TEST(TensorParallel, AHungRankEndsTheJobAfterTheRankTimeout) {
  Outcome o = signal_rank_one(SIGSTOP, "--rank-timeout 2");
  EXPECT_NE(o.exit_code, 0);
  EXPECT_GE(o.exit_code, 0) << "the job did not end";
  EXPECT_LT(o.seconds_after_signal, 30);
  EXPECT_NE(o.err.find("did not complete within 2000 ms"), std::string::npos) << o.err;
}

TEST(TensorParallel, ATpThatDoesNotDivideTheRanksIsRefused) {
  auto r = run_command(fmt::format("{}{} generate --model {} --tp 2 --prompt-ids 1,2 --threads 1",
                                   mpirun(3), nosa_binary(),
                                   tiny_model(attention::Mode::dense).string()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("not a multiple of --tp 2"), std::string::npos) << r.err;
  auto k = run_command(fmt::format("{}{} generate --model {} --tp 3 --prompt-ids 1,2 --threads 1",
                                   mpirun(3), nosa_binary(),
                                   tiny_model(attention::Mode::dense).string()));
  EXPECT_NE(k.exit_code, 0);
  EXPECT_NE(k.err.find("KV heads"), std::string::npos) << k.err;
}

}  // namespace
}  // namespace nosa::test
