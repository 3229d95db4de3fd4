// Request checking of the OpenAI-compatible API: good requests become the right Submit; each kind
// of bad input is a 400 naming the parameter; responses and stream chunks have OpenAI's shapes.
// Also the Prometheus text writer and the chat formats.
#include "rpc/openai_api.h"

#include <gtest/gtest.h>

#include <fstream>

#include "rpc/chat_format.h"
#include "rpc/metrics.h"
#include "runtime/core/error.h"
#include "tests/common/test_util.h"

namespace nosa::rpc {
namespace {

using json = nlohmann::json;

ApiError error_of(Endpoint e, const std::string& body) {
  try {
    parse_request(e, body);
  } catch (const ApiException& x) {
    return x.error();
  }
  ADD_FAILURE() << "accepted: " << body;
  return {};
}

TEST(OpenAiApi, CompletionRequestBecomesASubmit) {
  auto r = parse_request(Endpoint::completions,
                         R"({"model":"m","prompt":"hi","max_tokens":5,"temperature":0.5,
                             "top_p":0.9,"top_k":40,"seed":7,"stop":["\n","END"],"logprobs":2,
                             "stream":true,"stream_options":{"include_usage":true}})");
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.submit.text(), "hi");
  EXPECT_EQ(r.submit.max_tokens(), 5);
  EXPECT_FLOAT_EQ(r.submit.temperature(), 0.5f);
  EXPECT_FLOAT_EQ(r.submit.top_p(), 0.9f);
  EXPECT_EQ(r.submit.top_k(), 40);
  EXPECT_EQ(r.submit.seed(), 7u);
  ASSERT_EQ(r.submit.stop_size(), 2);
  EXPECT_EQ(r.submit.stop(1), "END");
  EXPECT_EQ(r.submit.logprobs(), 2);
  EXPECT_TRUE(r.stream && r.include_usage && r.want_logprobs);
}

TEST(OpenAiApi, DefaultsFollowOpenAi) {
  auto c = parse_request(Endpoint::completions, R"({"prompt":"x"})");
  EXPECT_EQ(c.submit.max_tokens(), k_default_completion_max_tokens);
  EXPECT_FLOAT_EQ(c.submit.temperature(), 1.0f);
  EXPECT_EQ(c.submit.logprobs(), -1);
  EXPECT_TRUE(c.model.empty());
  auto chat =
      parse_request(Endpoint::chat_completions, R"({"messages":[{"role":"user","content":"x"}]})");
  EXPECT_EQ(chat.submit.max_tokens(), 0);  // up to the context
}

TEST(OpenAiApi, PromptForms) {
  auto ids = parse_request(Endpoint::completions, R"({"prompt":[1,2,3]})");
  EXPECT_EQ(ids.submit.token_ids().ids_size(), 3);
  auto one = parse_request(Endpoint::completions, R"({"prompt":["just one"]})");
  EXPECT_EQ(one.submit.text(), "just one");
  auto nested = parse_request(Endpoint::completions, R"({"prompt":[[4,5]]})");
  EXPECT_EQ(nested.submit.token_ids().ids(1), 5);
  EXPECT_EQ(error_of(Endpoint::completions, R"({"prompt":["a","b"]})").param, "prompt");
  EXPECT_EQ(error_of(Endpoint::completions, R"({"prompt":[]})").param, "prompt");
  EXPECT_EQ(error_of(Endpoint::completions, R"({"prompt":[1,-2]})").param, "prompt");
  EXPECT_EQ(error_of(Endpoint::completions, R"({"prompt":[1,"x"]})").param, "prompt");
}

TEST(OpenAiApi, ChatMessages) {
  auto r = parse_request(Endpoint::chat_completions,
                         R"({"messages":[{"role":"developer","content":"be nice"},
                                         {"role":"user","content":[{"type":"text","text":"a"},
                                                                   {"type":"text","text":"b"}]}],
                             "logprobs":true,"top_logprobs":3,"max_completion_tokens":9})");
  ASSERT_EQ(r.submit.chat().messages_size(), 2);
  EXPECT_EQ(r.submit.chat().messages(0).role(), "system");
  EXPECT_EQ(r.submit.chat().messages(1).content(), "ab");
  EXPECT_EQ(r.submit.logprobs(), 3);
  EXPECT_EQ(r.submit.max_tokens(), 9);
  EXPECT_EQ(error_of(Endpoint::chat_completions,
                     R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})")
                .param,
            "messages");
  EXPECT_EQ(error_of(Endpoint::chat_completions,
                     R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})")
                .param,
            "top_logprobs");
  EXPECT_EQ(error_of(Endpoint::chat_completions, R"({"messages":"hi"})").param, "messages");
  EXPECT_EQ(error_of(Endpoint::chat_completions, R"({"prompt":"hi"})").param, "prompt");
}

TEST(OpenAiApi, BadInputIsA400NamingTheParameter) {
  struct Case {
    const char* body;
    const char* param;
  } cases[] = {
      {R"({"prompt":"x","max_tokens":"5"})", "max_tokens"},
      {R"({"prompt":"x","max_tokens":-1})", "max_tokens"},
      {R"({"prompt":"x","max_tokens":0})", "max_tokens"},
      {R"({"prompt":"x","max_tokens":1e300})", "max_tokens"},
      {R"({"prompt":"x","max_tokens":18446744073709551615})", "max_tokens"},
      {R"({"prompt":"x","temperature":-0.1})", "temperature"},
      {R"({"prompt":"x","temperature":true})", "temperature"},
      {R"({"prompt":"x","top_p":0})", "top_p"},
      {R"({"prompt":"x","top_k":-2})", "top_k"},
      {R"({"prompt":"x","logprobs":21})", "logprobs"},
      {R"({"prompt":"x","stop":5})", "stop"},
      {R"({"prompt":"x","stream":"yes"})", "stream"},
      {R"({"prompt":"x","stream_options":{"include_usage":true}})", "stream_options"},
      {R"({"prompt":"x","n":2})", "n"},
      {R"({"prompt":"x","best_of":3})", "best_of"},
      {R"({"prompt":"x","echo":true})", "echo"},
      {R"({"prompt":"x","logit_bias":{"5":1}})", "logit_bias"},
      {R"({"prompt":"x","frequency_penalty":1})", "frequency_penalty"},
      {R"({"prompt":"x","model":5})", "model"},
      {R"({"prompt":"x","max_tokenz":5})", "max_tokenz"},
  };
  for (auto& c : cases) {
    ApiError e = error_of(Endpoint::completions, c.body);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body << ": " << e.message;
    EXPECT_EQ(e.type, "invalid_request_error");
  }
  for (const char* body : {"", "{", "[1,2]", "\"text\"", "{\"prompt\": \"x\",}"}) {
    ApiError e = error_of(Endpoint::completions, body);
    EXPECT_EQ(e.status, 400) << body;
  }
}

TEST(OpenAiApi, IntegralFloatsAndNullsAreAccepted) {
  auto r = parse_request(Endpoint::completions,
                         R"({"prompt":"x","max_tokens":16.0,"temperature":null,"stop":null,
                             "n":1,"user":"me","top_k":-1})");
  EXPECT_EQ(r.submit.max_tokens(), 16);
  EXPECT_EQ(r.submit.top_k(), 0);
}

TEST(OpenAiApi, ErrorBodyHasOpenAisShape) {
  json j = bad_request("nope", "max_tokens").body();
  EXPECT_EQ(j["error"]["message"], "nope");
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_EQ(j["error"]["param"], "max_tokens");
  EXPECT_TRUE(j["error"]["code"].is_null());
  EXPECT_EQ(model_not_found("x").status, 404);
  EXPECT_EQ(model_not_found("x").code, "model_not_found");
  EXPECT_EQ(not_found_path("GET", "/x").status, 404);
  EXPECT_EQ(server_error(503, "down").type, "service_unavailable");
}

TEST(OpenAiApi, ResponseShapes) {
  auto r = parse_request(Endpoint::completions, R"({"prompt":"x","logprobs":1})");
  Completion c;
  c.text = "ab";
  pb::Token t;
  t.set_id(5);
  t.set_text("a");
  t.set_logprob(-0.5f);
  auto* top = t.add_top();
  top->set_text("z");
  top->set_logprob(-1.0f);
  c.tokens = {t, t};
  c.tokens[1].set_text("b");
  c.finish_reason = "length";
  c.prompt_tokens = 3;
  c.completion_tokens = 2;
  json j = completion_response(r, "cmpl-1", 100, "m", c);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["text"], "ab");
  EXPECT_EQ(j["choices"][0]["logprobs"]["tokens"], json({"a", "b"}));
  EXPECT_EQ(j["choices"][0]["logprobs"]["text_offset"], json({0, 1}));
  EXPECT_EQ(j["usage"]["total_tokens"], 5);

  auto chat = parse_request(Endpoint::chat_completions,
                            R"({"messages":[{"role":"user","content":"x"}],"logprobs":true})");
  json k = completion_response(chat, "chatcmpl-1", 100, "m", c);
  EXPECT_EQ(k["object"], "chat.completion");
  EXPECT_EQ(k["choices"][0]["message"]["content"], "ab");
  EXPECT_EQ(k["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["token"], "z");
  json chunk = stream_chunk(chat, "chatcmpl-1", 100, "m", "hi", {}, "");
  EXPECT_EQ(chunk["object"], "chat.completion.chunk");
  EXPECT_EQ(chunk["choices"][0]["delta"]["content"], "hi");
  EXPECT_TRUE(chunk["choices"][0]["finish_reason"].is_null());
  json last = stream_chunk(chat, "chatcmpl-1", 100, "m", "", {}, "stop");
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_TRUE(last["choices"][0]["delta"].empty());
  EXPECT_EQ(models_response({{"m", 1}})["data"][0]["id"], "m");
}

TEST(Metrics, PrometheusTextWithHistograms) {
  Histogram h({0.1, 1.0});
  h.observe(0.05);
  h.observe(0.5);
  h.observe(5);
  PrometheusWriter w;
  w.family("x_seconds", "histogram", "Some latency");
  w.histogram("x_seconds", {{"replica", "1"}}, h.snapshot());
  w.family("y_total", "counter", "A \"count\"");
  w.sample("y_total", {{"k", "a\"b"}}, 3);
  const std::string t = w.text();
  EXPECT_NE(t.find("# TYPE x_seconds histogram\n"), std::string::npos) << t;
  EXPECT_NE(t.find("x_seconds_bucket{replica=\"1\",le=\"0.1\"} 1\n"), std::string::npos) << t;
  EXPECT_NE(t.find("x_seconds_bucket{replica=\"1\",le=\"1\"} 2\n"), std::string::npos) << t;
  EXPECT_NE(t.find("x_seconds_bucket{replica=\"1\",le=\"+Inf\"} 3\n"), std::string::npos) << t;
  EXPECT_NE(t.find("x_seconds_count{replica=\"1\"} 3\n"), std::string::npos) << t;
  EXPECT_NE(t.find("y_total{k=\"a\\\"b\"} 3\n"), std::string::npos) << t;
}

TEST(ChatFormat, RecognisesTemplatesAndRenders) {
  test::TempDir dir;
  EXPECT_EQ(ChatFormat::for_model(dir.path()).name(), "default");
  {
    std::ofstream(dir / "tokenizer_config.json")
        << R"({"chat_template": "{% for m in messages %}<|im_start|>{{m.role}}..."})";
  }
  ChatFormat f = ChatFormat::for_model(dir.path());
  EXPECT_EQ(f.name(), "chatml");
  EXPECT_EQ(f.render({{"user", "hi"}}), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(f.stop_strings(), std::vector<std::string>{"<|im_end|>"});
  EXPECT_EQ(ChatFormat::named("default").render({{"user", "hi"}}), "<|user|>\nhi\n<|assistant|>\n");
  EXPECT_NE(ChatFormat::named("llama3").render({{"user", "hi"}}).find("<|eot_id|>"),
            std::string::npos);
  EXPECT_THROW(ChatFormat::named("jinja"), Error);
  EXPECT_THROW(f.render({}), Error);
}

}  // namespace
}  // namespace nosa::rpc
