// The parts of `nosa batch` in process: the input line format, the input reader's share and
// duplicate rules, the append-only result file and its repair, and the progress display.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "launcher/batch/batch_request.h"
#include "launcher/batch/input_reader.h"
#include "launcher/batch/progress.h"
#include "launcher/batch/result_file.h"
#include "runtime/chat_template.h"
#include "tests/common/test_util.h"

namespace nosa::launcher::batch {
namespace {

using nlohmann::json;
using test::TempDir;

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

ParsedLine parse(const std::string& text, RequestDefaults d = {}) { return parse_line(text, 7, d); }

TEST(BatchLine, AcceptsIdOrCustomIdWithTextOrTokenPrompt) {
  ParsedLine a = parse(R"({"id": "a1", "prompt": "hello"})");
  ASSERT_EQ(a.error, "");
  EXPECT_TRUE(a.has_id);
  EXPECT_EQ(a.key, "\"a1\"");
  EXPECT_EQ(a.request.line, 7);
  ASSERT_TRUE(a.request.text.has_value());
  EXPECT_EQ(*a.request.text, "hello");

  ParsedLine b = parse(R"({"custom_id": 42, "prompt": [1, 5, 9], "max_tokens": 3})");
  ASSERT_EQ(b.error, "");
  EXPECT_EQ(b.key, "42");  // an integer id differs from the string "42"
  EXPECT_FALSE(b.request.text.has_value());
  EXPECT_EQ(b.request.prompt_ids, (std::vector<int32_t>{1, 5, 9}));
  EXPECT_EQ(b.request.max_tokens, 3);
}

TEST(BatchLine, LineFieldsOverrideDefaults) {
  RequestDefaults d;
  d.max_tokens = 11;
  d.temperature = 0.5f;
  d.stop = {"END"};
  ParsedLine plain = parse(R"({"id": "x", "prompt": "p"})", d);
  ASSERT_EQ(plain.error, "");
  EXPECT_EQ(plain.request.max_tokens, 11);
  EXPECT_FLOAT_EQ(plain.request.sampling.temperature, 0.5f);
  EXPECT_EQ(plain.request.stop, std::vector<std::string>{"END"});
  EXPECT_EQ(plain.request.logprobs, -1);

  ParsedLine own = parse(
      R"({"id": "x", "prompt": "p", "max_tokens": 2, "temperature": 0, "top_p": 0.9, "top_k": 5,
          "seed": 99, "stop": "a", "logprobs": 3, "ignore_eos": true})",
      d);
  ASSERT_EQ(own.error, "");
  EXPECT_EQ(own.request.max_tokens, 2);
  EXPECT_FLOAT_EQ(own.request.sampling.temperature, 0.0f);
  EXPECT_FLOAT_EQ(own.request.sampling.top_p, 0.9f);
  EXPECT_EQ(own.request.sampling.top_k, 5);
  EXPECT_EQ(own.request.sampling.seed, 99u);
  EXPECT_EQ(own.request.stop, std::vector<std::string>{"a"});
  EXPECT_EQ(own.request.logprobs, 3);
  EXPECT_EQ(own.request.sampling.logprobs, 3);
  EXPECT_TRUE(own.request.ignore_eos);
}

TEST(BatchLine, SeedWithoutLineSeedDependsOnIdAndBaseSeedOnly) {
  RequestDefaults d;
  d.seed = 5;
  auto seed_of = [&](const std::string& line) { return parse(line, d).request.sampling.seed; };
  EXPECT_EQ(seed_of(R"({"id": "a", "prompt": "p"})"), seed_of(R"({"id": "a", "prompt": "q"})"));
  EXPECT_NE(seed_of(R"({"id": "a", "prompt": "p"})"), seed_of(R"({"id": "b", "prompt": "p"})"));
  d.seed = 6;
  EXPECT_NE(seed_of(R"({"id": "a", "prompt": "p"})"),
            parse(R"({"id": "a", "prompt": "p"})").request.sampling.seed);
}

TEST(BatchLine, OpenAiBatchShapeWithChatMessages) {
  ParsedLine p = parse(
      R"({"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                   "max_completion_tokens": 4, "logprobs": true, "top_logprobs": 2}})");
  ASSERT_EQ(p.error, "");
  EXPECT_EQ(p.request.id, "req-1");
  EXPECT_EQ(p.request.max_tokens, 4);
  EXPECT_EQ(p.request.logprobs, 2);
  ASSERT_EQ(p.request.messages.size(), 2u);
  EXPECT_EQ(p.request.messages[1].role, "user");
  EXPECT_EQ(p.request.messages[1].content, "Hi");

  // Rendered with the default template, BOS first; a chat format adds its stop strings.
  auto tok = runtime::Tokenizer::load(test::tiny_model(attention::Mode::nosa));
  BatchRequest plain = p.request;
  ASSERT_EQ(prepare_prompt(plain, tok.get(), {tok->vocab_size(), 4096}), "");
  std::vector<int32_t> want = tok->encode("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n");
  want.insert(want.begin(), tok->bos_id());
  EXPECT_EQ(plain.prompt_ids, want);
  EXPECT_TRUE(plain.stop.empty());

  ChatPrompts chat;
  chat.render = [](const std::vector<runtime::ChatMessage>& m) { return m.back().content; };
  chat.stop_strings = {"<|im_end|>"};
  BatchRequest custom = p.request;
  custom.stop = {"x"};
  ASSERT_EQ(prepare_prompt(custom, tok.get(), {tok->vocab_size(), 4096}, &chat), "");
  want = tok->encode("Hi");
  want.insert(want.begin(), tok->bos_id());
  EXPECT_EQ(custom.prompt_ids, want);
  EXPECT_EQ(custom.stop, (std::vector<std::string>{"x", "<|im_end|>"}));
}

TEST(BatchLine, RejectsBadLinesWithAReason) {
  struct Case {
    const char* line;
    bool has_id;
    const char* error_part;
  };
  const Case cases[] = {
      {R"({"id": "a", "prompt": )", false, "malformed JSON"},
      {R"([1, 2])", false, "JSON object"},
      {R"({"prompt": "p"})", false, "no \"id\""},
      {R"({"id": "", "prompt": "p"})", false, "non-empty string or an integer"},
      {R"({"id": 1.5, "prompt": "p"})", false, "non-empty string or an integer"},
      {R"({"id": "a", "custom_id": "b", "prompt": "p"})", false, "differ"},
      {R"({"id": "a"})", true, "exactly one of \"prompt\" or \"messages\""},
      {R"({"id": "a", "prompt": "p", "messages": []})", true, "exactly one"},
      {R"({"id": "a", "prompt": ""})", true, "empty"},
      {R"({"id": "a", "prompt": ["x", "y"]})", true, "one prompt per line"},
      {R"({"id": "a", "prompt": [1, -2]})", true, "outside the vocabulary"},
      {R"({"id": "a", "prompt": "p", "max_tokens": 0})", true, "max_tokens"},
      {R"({"id": "a", "prompt": "p", "max_tokens": "9"})", true, "integer"},
      {R"({"id": "a", "prompt": "p", "temperature": -1})", true, "temperature"},
      {R"({"id": "a", "prompt": "p", "top_p": 0})", true, "top_p"},
      {R"({"id": "a", "prompt": "p", "top_k": -3})", true, "top_k"},
      {R"({"id": "a", "prompt": "p", "logprobs": 21})", true, "logprobs"},
      {R"({"id": "a", "prompt": "p", "stop": [""]})", true, "stop"},
      {R"({"id": "a", "prompt": "p", "n": 2})", true, "\"n\""},
      {R"({"id": "a", "prompt": "p", "temprature": 0.5})", true, "unknown field \"temprature\""},
      {R"({"id": "a", "messages": [{"role": "robot", "content": "x"}]})", true, "role"},
      {R"({"custom_id": "a", "body": {"prompt": "p"}, "max_tokens": 3})", true, "inside \"body\""},
      {R"({"custom_id": "a", "url": "/v1/embeddings", "body": {"prompt": "p"}})", true, "url"},
  };
  for (const Case& c : cases) {
    ParsedLine p = parse(c.line);
    EXPECT_NE(p.error.find(c.error_part), std::string::npos) << c.line << " -> '" << p.error << "'";
    EXPECT_EQ(p.has_id, c.has_id) << c.line;
  }
}

TEST(BatchLine, PreparePromptTokenizesAndChecksLimits) {
  auto tok = runtime::Tokenizer::load(test::tiny_model(attention::Mode::nosa));
  PromptLimits limits{tok->vocab_size(), 16};
  BatchRequest r = parse(R"({"id": "a", "prompt": "hello world"})").request;
  ASSERT_EQ(prepare_prompt(r, tok.get(), limits), "");
  std::vector<int32_t> want = tok->encode("hello world");
  want.insert(want.begin(), tok->bos_id());
  EXPECT_EQ(r.prompt_ids, want);
  EXPECT_EQ(r.prompt_tokens, int64_t(want.size()));
  EXPECT_FALSE(r.text.has_value());

  BatchRequest big =
      parse(R"({"id": "b", "prompt": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]})").request;
  EXPECT_NE(prepare_prompt(big, tok.get(), limits).find("context limit is 16"), std::string::npos);
  BatchRequest oov = parse(R"({"id": "c", "prompt": [1, 99999]})").request;
  EXPECT_NE(prepare_prompt(oov, tok.get(), limits).find("outside the vocabulary"),
            std::string::npos);
  BatchRequest text = parse(R"({"id": "d", "prompt": "x"})").request;
  EXPECT_NE(prepare_prompt(text, nullptr, limits).find("no tokenizer"), std::string::npos);
}

TEST(BatchLine, ResultAndErrorLinesAreValidJson) {
  BatchRequest r = parse(R"({"id": "a", "prompt": [1, 2], "logprobs": 1})").request;
  r.prompt_tokens = 2;
  runtime::SampledToken t;
  t.token = 9;
  t.logprob = -0.5f;
  t.top = {{9, -0.5f}};
  // Invalid UTF-8 in the text is replaced, never a broken line.
  std::string line = result_line(r, std::string("ok \xff"), {t}, "length");
  EXPECT_EQ(line.find('\n'), std::string::npos);
  json j = json::parse(line);
  EXPECT_EQ(j["id"], "a");
  EXPECT_EQ(j["token_ids"], json::array({9}));
  EXPECT_EQ(j["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 2);
  EXPECT_EQ(j["usage"]["completion_tokens"], 1);
  EXPECT_EQ(j["logprobs"][0]["top"][0]["token"], 9);
  EXPECT_EQ(j["text"], "ok \xEF\xBF\xBD");

  json e = json::parse(error_line(12, json(), "bad\nthing"));
  EXPECT_EQ(e["line"], 12);
  EXPECT_TRUE(e["id"].is_null());
  EXPECT_EQ(e["error"], "bad\nthing");
}

TEST(BatchInput, ReplicasSplitNonBlankLinesDisjointlyAndAgreeOnDuplicates) {
  TempDir dir;
  std::string text;
  for (int i = 0; i < 10; ++i) text += json({{"id", i}, {"prompt", "p"}}).dump() + "\n\n";
  text += json({{"id", 3}, {"prompt", "again"}}).dump() + "\n";  // line 21: duplicate of line 7
  write_file(dir / "in.jsonl", text);
  std::multiset<int64_t> lines;
  int duplicates = 0;
  for (int r = 0; r < 3; ++r) {
    InputShare share{r, 3};
    InputReader reader(dir / "in.jsonl", share, {}, {});
    int64_t n = 0;
    while (auto item = reader.next()) {
      ++n;
      lines.insert(item->line);
      if (item->kind == InputItem::Kind::error) {
        EXPECT_NE(item->error.find("duplicate id 3 (first on line 7)"), std::string::npos);
        EXPECT_EQ(item->line, 21);
        ++duplicates;
      }
    }
    EXPECT_EQ(n, count_owned_lines(dir / "in.jsonl", share));
  }
  EXPECT_EQ(duplicates, 1);
  EXPECT_EQ(lines.size(), 11u);
  EXPECT_EQ(std::set<int64_t>(lines.begin(), lines.end()).size(), 11u);
}

TEST(BatchInput, IdsInTheOutputAreResumedNotRerun) {
  TempDir dir;
  write_file(dir / "in.jsonl",
             "{\"id\": \"a\", \"prompt\": \"p\"}\n{\"id\": \"b\", \"prompt\": \"p\"}\r\n");
  InputReader reader(dir / "in.jsonl", {}, {}, {"\"a\""});
  auto first = reader.next();
  ASSERT_TRUE(first);
  EXPECT_EQ(first->kind, InputItem::Kind::resumed);
  auto second = reader.next();
  ASSERT_TRUE(second);
  EXPECT_EQ(second->kind, InputItem::Kind::request);
  EXPECT_EQ(second->request.id, "b");
  EXPECT_FALSE(reader.next());
  EXPECT_TRUE(reader.at_end());
}

TEST(BatchResultFile, DropsACutShortLastLineOnly) {
  TempDir dir;
  auto p = dir / "out.jsonl";
  EXPECT_EQ(drop_partial_tail(p), 0);  // missing file
  write_file(p, "{\"id\": 1}\n{\"id\": 2}\n");
  EXPECT_EQ(drop_partial_tail(p), 0);
  EXPECT_EQ(slurp(p), "{\"id\": 1}\n{\"id\": 2}\n");
  write_file(p, "{\"id\": 1}\n{\"id\": 2}\n{\"id\": 3, \"te");
  ExistingResults before = read_existing_results(p);
  EXPECT_EQ(before.keys.size(), 2u);
  EXPECT_EQ(before.partial_tail_bytes, 13);
  EXPECT_EQ(drop_partial_tail(p), 13);
  EXPECT_EQ(slurp(p), "{\"id\": 1}\n{\"id\": 2}\n");
  write_file(p, "no newline at all");
  EXPECT_EQ(drop_partial_tail(p), 17);
  EXPECT_EQ(slurp(p), "");
}

TEST(BatchResultFile, ReadsIdsAndSkipsLinesThatAreNotResults) {
  TempDir dir;
  auto p = dir / "out.jsonl";
  write_file(p, "{\"id\": \"a\"}\ngarbage\n\n{\"id\": 7}\n{\"text\": \"no id\"}\n");
  ExistingResults r = read_existing_results(p);
  EXPECT_EQ(r.keys, (std::unordered_set<std::string>{"\"a\"", "7"}));
  EXPECT_EQ(r.lines, 4);
  EXPECT_EQ(r.bad_lines, 2);
}

TEST(BatchResultFile, ConcurrentAppendersNeverInterleaveLines) {
  TempDir dir;
  auto p = dir / "out.jsonl";
  constexpr int k_writers = 4, k_lines = 300;
  std::vector<std::thread> threads;
  for (int w = 0; w < k_writers; ++w)
    threads.emplace_back([&, w] {
      AppendFile f(p);  // each with its own descriptor, as separate processes would
      for (int i = 0; i < k_lines; ++i)
        f.append(
            json({{"id", w * k_lines + i}, {"pad", std::string(size_t(100 + i * 37 % 5000), 'x')}})
                .dump());
    });
  for (auto& t : threads) t.join();
  ExistingResults r = read_existing_results(p);
  EXPECT_EQ(r.lines, k_writers * k_lines);
  EXPECT_EQ(r.bad_lines, 0);
  EXPECT_EQ(r.keys.size(), size_t(k_writers * k_lines));
  EXPECT_EQ(r.partial_tail_bytes, 0);
}

TEST(BatchProgress, PlainLinesAndBarShowCountsRateAndEta) {
  BatchCounts c;
  c.total = 10;
  c.written = 3;
  c.resumed = 2;
  c.errors = 1;
  c.in_flight = 4;
  c.completion_tokens = 30;
  Progress lines(stderr, false, std::chrono::seconds(10), "[replica 1/2] ");
  std::string l = lines.status_line(c);
  EXPECT_EQ(l.rfind("[replica 1/2] 6/10 requests (60%, 2 resumed, 1 errors) | 4 running", 0), 0u)
      << l;
  EXPECT_NE(l.find("tok/s"), std::string::npos);
  EXPECT_NE(l.find("ETA "), std::string::npos);

  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  Progress bar(f, true, std::chrono::seconds(10), "");
  bar.update(c, true);
  bar.finish();
  std::rewind(f);
  char buf[512] = {0};
  size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  std::string drawn(buf, n);
  EXPECT_EQ(drawn.rfind("\r[##############..........] 6/10", 0), 0u) << drawn;
  EXPECT_EQ(drawn.back(), '\n');
}

TEST(BatchProgress, SummaryNamesEveryTotal) {
  BatchSummary s;
  s.counts.total = 5;
  s.counts.written = 4;
  s.counts.errors = 1;
  s.counts.prompt_tokens = 40;
  s.counts.completion_tokens = 20;
  s.wall_seconds = 2;
  s.extra = {{"kv host reads", "1.0 GiB"}};
  std::string text = format_summary(s, "");
  EXPECT_NE(text.find("5 of 5 finished: 4 written, 0 resumed, 1 errors"), std::string::npos);
  EXPECT_NE(text.find("2.00 requests/s, 10.0 completion tok/s, 30.0 total tok/s"),
            std::string::npos);
  EXPECT_NE(text.find("kv host reads:"), std::string::npos);
  EXPECT_EQ(format_duration(75), "1m15s");
  EXPECT_EQ(format_duration(3 * 3600 + 120), "3h02m");
}

TEST(BatchProgress, KvTierLinesReportHitsPrefetchTrafficAndOccupancy) {
  memory::TierStats t;
  t.hits = 3;
  t.misses = 1;
  t.selected = 10;
  t.overlap = 9;
  t.prefetched = 8;
  t.prefetch_hits = 6;
  t.bytes_host_to_device = int64_t(1) << 30;
  t.host_blocks_used = 5;
  t.host_blocks = 8;
  auto lines = kv_tier_lines(t);
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_NE(lines[0].second.find("3 hits, 1 misses (75.0% hit rate)"), std::string::npos);
  EXPECT_NE(lines[1].second.find("90.0% of 10"), std::string::npos);
  EXPECT_EQ(lines[2].first, "kv prefetch");
  EXPECT_NE(lines[2].second.find("8 chunks copied"), std::string::npos);
  EXPECT_NE(lines[2].second.find("75.0% of them then selected"), std::string::npos);
  EXPECT_NE(lines[3].second.find("host->device 1.00 GiB"), std::string::npos);
  EXPECT_NE(lines[4].second.find("host 5/8 blocks"), std::string::npos);
}

}  // namespace
}  // namespace nosa::launcher::batch
