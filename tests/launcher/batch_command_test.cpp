// End to end through the `nosa` binary: `nosa batch` over a few hundred prompts, killed and
// resumed, with bad lines, stopped by SIGTERM, and split over `mpirun -np 2` replicas. Every test
// checks the files' contents: one result per id, no duplicates, results equal to an
// uninterrupted run's, errors with their line numbers.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "runtime/tokenizer.h"
#include "tests/common/test_util.h"

namespace nosa::test {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string model_dir() { return tiny_model(attention::Mode::nosa).string(); }

std::vector<std::string> read_lines(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  return lines;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Results by id; fails the test on a malformed line or a duplicate id.
std::map<std::string, json> results_by_id(const fs::path& p) {
  std::map<std::string, json> out;
  const std::string text = slurp(p);
  EXPECT_TRUE(text.empty() || text.back() == '\n') << "the output ends in a partial line";
  for (const auto& line : read_lines(p)) {
    json j = json::parse(line);
    std::string id = j["id"].is_string() ? j["id"].get<std::string>() : j["id"].dump();
    EXPECT_TRUE(out.emplace(id, j).second) << "duplicate id " << id;
  }
  return out;
}

// The first line of `text` that starts with `start` ("" when none).
std::string line_starting(const std::string& text, const std::string& start) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(start, 0) == 0) return line;
  return "";
}

// `n` short prompts with ids q0..q{n-1}.
std::vector<std::string> write_prompts(const fs::path& p, int n) {
  static const char* words[] = {"the",      "cat", "river", "blue",  "over", "quick",
                                "mountain", "sky", "runs",  "green", "lazy", "fox"};
  std::ofstream out(p);
  std::vector<std::string> prompts;
  for (int i = 0; i < n; ++i) {
    std::string prompt;
    for (int w = 0; w < 2 + (i * 7) % 15; ++w)
      prompt += std::string(w ? " " : "") + words[(i * 5 + w * 3) % 12];
    prompts.push_back(prompt);
    out << json({{"id", fmt::format("q{}", i)}, {"prompt", prompt}}).dump() << "\n";
  }
  return prompts;
}

std::string batch_command(const fs::path& in, const fs::path& out, const std::string& extra) {
  return fmt::format("{} batch --model {} --input {} --output {} --threads 1 --log-level warn {}",
                     nosa_binary(), model_dir(), in.string(), out.string(), extra);
}

// Starts a shell command in the background; returns its pid.
pid_t spawn(const std::string& command) {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", ("exec " + command).c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// The exit code, or 128 + signal.
int wait_exit(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Waits until the file has at least `n` complete lines; false when the process ended first.
bool wait_for_lines(const fs::path& p, size_t n, pid_t pid) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (read_lines(p).size() >= n) return true;
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

TEST(BatchCommand, WritesExactlyOneCorrectResultPerId) {
  TempDir dir;
  const int n = 300;
  auto prompts = write_prompts(dir / "in.jsonl", n);
  auto r = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl",
                                     "--max-tokens 6 --progress lines --progress-interval 0.05"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto results = results_by_id(dir / "out.jsonl");
  ASSERT_EQ(results.size(), size_t(n));
  auto tok = runtime::Tokenizer::load(model_dir());
  for (int i = 0; i < n; ++i) {
    const json& j = results.at(fmt::format("q{}", i));
    std::vector<int32_t> ids = j["token_ids"].get<std::vector<int32_t>>();
    ASSERT_GE(ids.size(), 1u);
    ASSERT_LE(ids.size(), 6u);
    EXPECT_EQ(j["usage"]["completion_tokens"], ids.size());
    // BOS + the prompt's tokens.
    EXPECT_EQ(j["usage"]["prompt_tokens"], tok->encode(prompts[size_t(i)]).size() + 1);
    EXPECT_EQ(j["text"], tok->decode(ids));
    if (ids.size() < 6) {
      EXPECT_EQ(j["finish_reason"], "stop");
      EXPECT_EQ(ids.back(), tok->eos_id());
    } else {
      EXPECT_TRUE(j["finish_reason"] == "length" || j["finish_reason"] == "stop");
    }
  }
  // The error file exists and is empty; progress lines and the summary are on stderr.
  EXPECT_TRUE(fs::exists(dir / "out.jsonl.errors.jsonl"));
  EXPECT_EQ(fs::file_size(dir / "out.jsonl.errors.jsonl"), 0u);
  EXPECT_NE(r.err.find("300/300 requests (100%)"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("300 of 300 finished: 300 written, 0 resumed, 0 errors"), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("completion tok/s"), std::string::npos);

  // Greedy batch results equal a lone `nosa generate` of the same prompt.
  auto g = run_command(fmt::format(
      "{} generate --model {} --prompt '{}' --max-tokens 6 --json --threads 1 --log-level warn",
      nosa_binary(), model_dir(), prompts[17]));
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_EQ(json::parse(g.out)["token_ids"], results.at("q17")["token_ids"]);
}

TEST(BatchCommand, KilledMidwayThenRerunCompletesWithoutDuplicates) {
  TempDir dir;
  const int n = 300;
  write_prompts(dir / "in.jsonl", n);
  const std::string flags = "--max-tokens 12 --ignore-eos --max-running 8 --progress off";
  // The reference: one uninterrupted run.
  auto ref = run_command(batch_command(dir / "in.jsonl", dir / "ref.jsonl", flags));
  ASSERT_EQ(ref.exit_code, 0) << ref.err;
  auto want = results_by_id(dir / "ref.jsonl");
  ASSERT_EQ(want.size(), size_t(n));

  pid_t pid = spawn(batch_command(dir / "in.jsonl", dir / "out.jsonl", flags) + " 2>/dev/null");
  ASSERT_TRUE(wait_for_lines(dir / "out.jsonl", 40, pid)) << "the job ended before the kill";
  ::kill(pid, SIGKILL);
  EXPECT_EQ(wait_exit(pid), 128 + SIGKILL);
  const size_t before = read_lines(dir / "out.jsonl").size();
  ASSERT_LT(before, size_t(n)) << "killed too late to test a resume";
  // A crash in the middle of a write leaves a cut-short line: the rerun must drop it.
  {
    std::ofstream torn(dir / "out.jsonl", std::ios::app);
    torn << R"({"id":"q299","text":"cut sh)";
  }

  auto rerun = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl", flags));
  ASSERT_EQ(rerun.exit_code, 0) << rerun.err;
  EXPECT_NE(rerun.err.find("dropped a cut-short last line"), std::string::npos) << rerun.err;
  EXPECT_NE(rerun.err.find(fmt::format("{} resumed", before)), std::string::npos) << rerun.err;
  auto got = results_by_id(dir / "out.jsonl");
  ASSERT_EQ(got.size(), size_t(n));
  EXPECT_EQ(read_lines(dir / "out.jsonl").size(), size_t(n));
  for (const auto& [id, j] : want) {
    ASSERT_TRUE(got.count(id)) << id;
    EXPECT_EQ(got[id]["token_ids"], j["token_ids"]) << id;
    EXPECT_EQ(got[id]["text"], j["text"]) << id;
  }

  // A third run finds nothing to do and writes nothing.
  auto again = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl", flags));
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.err.find("300 of 300 finished: 0 written, 300 resumed"), std::string::npos)
      << again.err;
  EXPECT_EQ(read_lines(dir / "out.jsonl").size(), size_t(n));
}

TEST(BatchCommand, SigtermStopsCleanlyAndTheRerunFinishes) {
  TempDir dir;
  const int n = 200;
  write_prompts(dir / "in.jsonl", n);
  const std::string flags = "--max-tokens 12 --ignore-eos --max-running 4 --progress off";
  pid_t pid = spawn(batch_command(dir / "in.jsonl", dir / "out.jsonl", flags) + " 2>" +
                    (dir / "err.txt").string());
  ASSERT_TRUE(wait_for_lines(dir / "out.jsonl", 20, pid)) << "the job ended before the signal";
  ::kill(pid, SIGTERM);
  EXPECT_EQ(wait_exit(pid), 143);
  const std::string err = slurp(dir / "err.txt");
  EXPECT_NE(err.find("interrupted (rerun the same command to resume)"), std::string::npos) << err;
  auto partial = results_by_id(dir / "out.jsonl");  // whole lines only
  EXPECT_LT(partial.size(), size_t(n));
  EXPECT_GE(partial.size(), 20u);

  auto rerun = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl", flags));
  ASSERT_EQ(rerun.exit_code, 0) << rerun.err;
  EXPECT_EQ(results_by_id(dir / "out.jsonl").size(), size_t(n));
}

TEST(BatchCommand, BadLinesGoToTheErrorsFileWithLineNumbers) {
  TempDir dir;
  const std::string lines[] = {
      R"({"id": "good1", "prompt": "the quick fox"})",            // 1
      R"({"id": "broken", "prompt": )",                           // 2
      R"({"prompt": "no id here"})",                              // 3
      R"({"id": "noprompt"})",                                    // 4
      R"({"id": "good1", "prompt": "again"})",                    // 5
      R"({"id": "badparam", "prompt": "x", "temperature": -1})",  // 6
      "",                                                         // 7 (blank)
      R"({"id": "toolong", "prompt": [1,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37]})",  // 8
      R"({"id": "oov", "prompt": [1, 5, 99999]})",  // 9
      R"({"custom_id": "good2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}})",  // 10
      R"({"id": "typo", "prompt": "x", "max_token": 3})",  // 11
      R"({"id": 3, "prompt": [1, 5, 6], "logprobs": 2})",  // 12
  };
  {
    std::ofstream out(dir / "in.jsonl");
    for (const auto& l : lines) out << l << "\n";
  }
  const std::string flags =
      fmt::format("--max-tokens 4 --max-context 32 --errors {}", (dir / "bad.jsonl").string());
  auto r = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl", flags));
  ASSERT_EQ(r.exit_code, 0) << r.err;

  auto results = results_by_id(dir / "out.jsonl");
  ASSERT_EQ(results.size(), 3u);
  EXPECT_TRUE(results.count("good1") && results.count("good2") && results.count("3"));
  EXPECT_EQ(results["3"]["logprobs"].size(), results["3"]["token_ids"].size());
  EXPECT_EQ(results["3"]["logprobs"][0]["top"].size(), 2u);
  EXPECT_LE(results["good2"]["token_ids"].size(), 3u);
  // The chat went through the checkpoint's chat format (the plain default here), BOS first.
  auto tok = runtime::Tokenizer::load(model_dir());
  EXPECT_EQ(results["good2"]["usage"]["prompt_tokens"],
            tok->encode("<|user|>\nhi\n<|assistant|>\n").size() + 1);

  const std::map<int, std::pair<json, std::string>> want = {
      {2, {json(), "malformed JSON"}},
      {3, {json(), "no \"id\""}},
      {4, {json("noprompt"), "exactly one of \"prompt\" or \"messages\""}},
      {5, {json("good1"), "duplicate id \"good1\" (first on line 1)"}},
      {6, {json("badparam"), "temperature"}},
      {8, {json("toolong"), "context limit is 32"}},
      {9, {json("oov"), "outside the vocabulary"}},
      {11, {json("typo"), "unknown field \"max_token\""}},
  };
  auto check_errors = [&] {
    auto errs = read_lines(dir / "bad.jsonl");
    ASSERT_EQ(errs.size(), want.size()) << slurp(dir / "bad.jsonl");
    for (const auto& line : errs) {
      json e = json::parse(line);
      const int no = e["line"].get<int>();
      ASSERT_TRUE(want.count(no)) << line;
      EXPECT_EQ(e["id"], want.at(no).first) << line;
      EXPECT_NE(e["error"].get<std::string>().find(want.at(no).second), std::string::npos) << line;
    }
  };
  check_errors();
  EXPECT_NE(r.err.find("11 of 11 finished: 3 written, 0 resumed, 8 errors"), std::string::npos)
      << r.err;

  // A rerun writes no result twice and reports the same errors once (the file is rewritten).
  auto again = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl", flags));
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(results_by_id(dir / "out.jsonl").size(), 3u);
  check_errors();
}

TEST(BatchCommand, RequestsTheEngineCannotHoldAreReportedAndRetriedOnRerun) {
  TempDir dir;
  {
    std::ofstream out(dir / "in.jsonl");
    out << R"({"id": "long", "prompt": "the river runs over the blue mountain", "max_tokens": 40, "ignore_eos": true})"
        << "\n"
        << R"({"id": "short", "prompt": "hi", "max_tokens": 4})"
        << "\n";
  }
  // Two blocks of 16 tokens: "long" outgrows the cache while it generates.
  auto r = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl", "--kv-blocks 2"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto results = results_by_id(dir / "out.jsonl");
  EXPECT_EQ(results.size(), 1u);
  EXPECT_TRUE(results.count("short"));
  auto errs = read_lines(dir / "out.jsonl.errors.jsonl");
  ASSERT_EQ(errs.size(), 1u);
  json e = json::parse(errs[0]);
  EXPECT_EQ(e["line"], 1);
  EXPECT_EQ(e["id"], "long");
  EXPECT_NE(e["error"].get<std::string>().find("KV cache"), std::string::npos) << errs[0];

  // With room, the rerun finishes it.
  auto rerun = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl", "--kv-blocks 8"));
  ASSERT_EQ(rerun.exit_code, 0) << rerun.err;
  results = results_by_id(dir / "out.jsonl");
  EXPECT_EQ(results.size(), 2u);
  EXPECT_EQ(results["long"]["token_ids"].size(), 40u);
  EXPECT_EQ(fs::file_size(dir / "out.jsonl.errors.jsonl"), 0u);
}

// Tensor parallelism with the KV offloaded to host memory and disk gives the tokens of one rank,
// over many short requests, a few at a time, whose blocks are freed (on every rank: the leader
// sends them with its step plans) and reused many times over.
TEST(BatchCommand, TensorParallelOffloadedBatchGivesTheTokensOfOneRank) {
  if (run_command("command -v mpirun").exit_code != 0) GTEST_SKIP() << "mpirun not found";
  TempDir dir;
  const int n = 40;
  write_prompts(dir / "in.jsonl", n);
  const std::string flags = fmt::format(
      "--max-tokens 40 --ignore-eos --max-running 2 --progress off --offload host+disk "
      "--gpu-kv-gib 0.002 --host-kv-gib 0.0004 --disk-kv-gib 0.002 --disk-kv-dir {}",
      (dir / "kv").string());
  auto single = run_command(batch_command(dir / "in.jsonl", dir / "ref.jsonl", flags));
  ASSERT_EQ(single.exit_code, 0) << single.err;
  auto want = results_by_id(dir / "ref.jsonl");
  ASSERT_EQ(want.size(), size_t(n));
  auto r = run_command("mpirun --allow-run-as-root --oversubscribe -np 2 " +
                       batch_command(dir / "in.jsonl", dir / "out.jsonl", flags + " --tp 2"));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  auto got = results_by_id(dir / "out.jsonl");
  ASSERT_EQ(got.size(), size_t(n));
  for (const auto& [id, j] : want) EXPECT_EQ(got[id]["token_ids"], j["token_ids"]) << id;
}

// `nosa batch` on n prompts with the offload `flags`, once in one process as the reference
// (environment `ref_env`, `ref_extra`), then as `launch` turns one rank's command (debug log,
// environment `run_env`, `extra`) into the command line to run: the run must end well with the
// reference's tokens. Returns the run's output for further checks.
CommandResult expect_tokens_of_the_reference(
    const std::function<std::string(const std::string&)>& launch, int n, const std::string& flags,
    const std::string& ref_env, const std::string& ref_extra, const std::string& run_env,
    const std::string& extra) {
  TempDir dir;
  write_prompts(dir / "in.jsonl", n);
  auto one = run_command("env " + ref_env + " " +
                         batch_command(dir / "in.jsonl", dir / "ref.jsonl", flags + " " + ref_extra));
  EXPECT_EQ(one.exit_code, 0) << one.err;
  auto r = run_command("env " + run_env + " " + launch(fmt::format(
      "{} batch --model {} --input {} --output {} --threads 1 --log-level debug {} {}",
      nosa_binary(), model_dir(), (dir / "in.jsonl").string(), (dir / "out.jsonl").string(),
      flags, extra)));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  auto want = results_by_id(dir / "ref.jsonl");
  auto got = results_by_id(dir / "out.jsonl");
  EXPECT_EQ(want.size(), size_t(n));
  EXPECT_EQ(got.size(), size_t(n));
  for (const auto& [id, j] : want) EXPECT_EQ(got[id]["token_ids"], j["token_ids"]) << id;
  return r;
}

// Offloaded decoding with micro-batches (the host path's residency: a cache with device-side
// partitions does not split steps): the tokens of one process deciding each step in one batch,
// and some rank says it split a step.
CommandResult expect_micro_batches_keep_the_tokens(
    const std::function<std::string(const std::string&)>& launch, const std::string& extra) {
  auto r = expect_tokens_of_the_reference(
      launch, 12,
      "--max-tokens 24 --ignore-eos --max-running 4 --progress off --offload host "
      "--gpu-kv-gib 0.004 --host-kv-gib 0.004",
      "", "--micro-batch-min-seqs 0", "NOSA_DEVICE_RESIDENCY=0", extra);
  EXPECT_NE((r.out + r.err).find("runs as two micro-batches"), std::string::npos)
      << "no step ran as two micro-batches";
  return r;
}

std::string as_is(const std::string& command) { return command; }

TEST(BatchCommand, MicroBatchesGiveTheTokensOfOneBatch) {
  expect_micro_batches_keep_the_tokens(as_is, "--micro-batch-min-seqs 2");
  // A negative count is refused, naming the flag.
  TempDir dir;
  write_prompts(dir / "in.jsonl", 1);
  auto bad = run_command(batch_command(dir / "in.jsonl", dir / "bad.jsonl",
                                       "--offload host --micro-batch-min-seqs -1"));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--micro-batch-min-seqs"), std::string::npos) << bad.err;
}

// --prefetch takes on, off or auto, and on needs offloading (without it every block is on the
// device); auto (the default) needs nothing; with offloading on is accepted and the job
// completes.
TEST(BatchCommand, PrefetchTakesOnOffOrAutoAndOnNeedsOffloading) {
  TempDir dir;
  write_prompts(dir / "in.jsonl", 1);
  auto none = run_command(batch_command(dir / "in.jsonl", dir / "a.jsonl", "--prefetch on"));
  EXPECT_NE(none.exit_code, 0);
  EXPECT_NE(none.err.find("--prefetch on needs --offload host or host+disk"), std::string::npos)
      << none.err;
  auto bad = run_command(
      batch_command(dir / "in.jsonl", dir / "b.jsonl", "--offload host --prefetch maybe"));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--prefetch"), std::string::npos) << bad.err;
  auto ok = run_command(batch_command(dir / "in.jsonl", dir / "c.jsonl",
                                      "--offload host --prefetch on --max-tokens 4"));
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  auto automatic =
      run_command(batch_command(dir / "in.jsonl", dir / "d.jsonl", "--prefetch auto --max-tokens 4"));
  EXPECT_EQ(automatic.exit_code, 0) << automatic.err;
}

// Residency decided on the device under tensor parallelism: each rank keeps partitions of its
// own block cache (the replica's smallest fit), and the job gives the tokens of the host path in
// one process, with a block cache whose partitions hold every running sequence.
TEST(BatchCommand, TensorParallelResidencyOnTheDeviceGivesTheTokensOfOneRank) {
  if (run_command("command -v mpirun").exit_code != 0) GTEST_SKIP() << "mpirun not found";
  auto r = expect_tokens_of_the_reference(
      [](const std::string& rank) {
        return "timeout 120 mpirun --allow-run-as-root --oversubscribe -np 2 " + rank;
      },
      6,
      "--max-tokens 24 --ignore-eos --max-running 3 --progress off --offload host "
      "--gpu-kv-gib 0.02 --host-kv-gib 0.004",
      "NOSA_DEVICE_RESIDENCY=0", "", "NOSA_DEVICE_RESIDENCY=1", "--tp 2 --rank-timeout 20");
  for (const char* rank : {"[rank 0]", "[rank 1]"})
    EXPECT_NE((r.out + r.err).find(std::string(rank) + "[memory] a decoding step of"),
              std::string::npos)
        << rank << " decided no step's residency on the device";
}

// Under tensor parallelism both ranks split every step alike and stay in lockstep (the same
// collectives in the same order).
TEST(BatchCommand, TensorParallelMicroBatchesGiveTheTokensOfOneRank) {
  if (run_command("command -v mpirun").exit_code != 0) GTEST_SKIP() << "mpirun not found";
  expect_micro_batches_keep_the_tokens(
      [](const std::string& rank) {
        return "mpirun --allow-run-as-root --oversubscribe -np 2 " + rank;
      },
      "--micro-batch-min-seqs 2 --tp 2");
}

// Ranks whose environments disagree on the micro-batch threshold still split the same steps
// (the leader's threshold holds): the job finishes with the tokens of one rank instead of the
// ranks' collectives going out of step.
TEST(BatchCommand, TensorParallelRanksAgreeOnTheMicroBatchThreshold) {
  if (run_command("command -v mpirun").exit_code != 0) GTEST_SKIP() << "mpirun not found";
  auto r = expect_micro_batches_keep_the_tokens(
      [](const std::string& rank) {
        return "timeout 120 mpirun --allow-run-as-root --oversubscribe -np 1 -x "
               "NOSA_MICRO_BATCH_MIN_SEQS=2 " + rank + " : -np 1 -x NOSA_MICRO_BATCH_MIN_SEQS=0 " +
               rank;
      },
      "--tp 2 --rank-timeout 20");
  EXPECT_NE((r.out + r.err).find("[rank 1][runtime] offloaded decoding: a step"),
            std::string::npos)
      << "rank 1 did not follow the leader's threshold";
}

TEST(BatchCommand, MpirunReplicasSplitTheInputIntoOneCompleteOutput) {
  if (run_command("command -v mpirun").exit_code != 0) GTEST_SKIP() << "mpirun not found";
  TempDir dir;
  const int n = 200;
  write_prompts(dir / "in.jsonl", n);
  const std::string flags = "--max-tokens 5 --progress lines";
  auto single = run_command(batch_command(dir / "in.jsonl", dir / "ref.jsonl", flags));
  ASSERT_EQ(single.exit_code, 0) << single.err;
  auto want = results_by_id(dir / "ref.jsonl");

  auto r = run_command("mpirun --allow-run-as-root --oversubscribe -np 2 " +
                       batch_command(dir / "in.jsonl", dir / "out.jsonl", flags));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  auto got = results_by_id(dir / "out.jsonl");
  ASSERT_EQ(got.size(), size_t(n));
  EXPECT_EQ(read_lines(dir / "out.jsonl").size(), size_t(n));
  for (const auto& [id, j] : want) EXPECT_EQ(got[id]["token_ids"], j["token_ids"]) << id;
  // Each replica took its half (non-blank lines alternate between them) and the job's totals
  // add up.
  EXPECT_NE(
      line_starting(r.err, "[replica 0/2] requests:").find("100 of 100 finished: 100 written"),
      std::string::npos)
      << r.err;
  EXPECT_NE(
      line_starting(r.err, "[replica 1/2] requests:").find("100 of 100 finished: 100 written"),
      std::string::npos)
      << r.err;
  EXPECT_NE(
      line_starting(r.err, "[all replicas] requests:").find("200 of 200 finished: 200 written"),
      std::string::npos)
      << r.err;

  // Resume with another replica count (one process): nothing is redone.
  auto again = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl", flags));
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.err.find("200 of 200 finished: 0 written, 200 resumed"), std::string::npos)
      << again.err;
  EXPECT_EQ(read_lines(dir / "out.jsonl").size(), size_t(n));
}

TEST(BatchCommand, RejectsBadCommandLines) {
  TempDir dir;
  write_prompts(dir / "in.jsonl", 2);
  auto missing = run_command(batch_command(dir / "nope.jsonl", dir / "out.jsonl", ""));
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.err.find("no such input file"), std::string::npos) << missing.err;
  auto same = run_command(batch_command(dir / "in.jsonl", dir / "in.jsonl", ""));
  EXPECT_NE(same.exit_code, 0);
  EXPECT_NE(same.err.find("--output must differ from --input"), std::string::npos) << same.err;
  auto bad = run_command(batch_command(dir / "in.jsonl", dir / "out.jsonl", "--top-p 0"));
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--top-p"), std::string::npos) << bad.err;
  EXPECT_FALSE(fs::exists(dir / "out.jsonl"));
  // A bad checkpoint fails before any file is touched.
  auto no_model = run_command(fmt::format(
      "{} batch --model {} --input {} --output {} --log-level warn", nosa_binary(),
      (dir / "no-model").string(), (dir / "in.jsonl").string(), (dir / "out.jsonl").string()));
  EXPECT_NE(no_model.exit_code, 0);
  EXPECT_FALSE(fs::exists(dir / "out.jsonl"));
  EXPECT_FALSE(fs::exists(dir / "out.jsonl.errors.jsonl"));
}

}  // namespace
}  // namespace nosa::test
