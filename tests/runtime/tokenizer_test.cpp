// The SentencePiece tokenizer trained by `nosa make-model` round-trips real text.
#include <gtest/gtest.h>

#include "runtime/core/error.h"
#include "runtime/text_stream.h"
#include "runtime/tokenizer.h"
#include "tests/common/test_util.h"

namespace nosa::runtime {
namespace {

TEST(Tokenizer, RoundTripsRealText) {
  auto tok = Tokenizer::load(test::tiny_model(attention::Mode::dense));
  EXPECT_GT(tok->vocab_size(), 500);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  const std::vector<std::string> texts = {
      "The lighthouse keeper climbed the stairs at dusk, counting each step aloud.",
      "for (int i = 0; i < n; ++i) { total += prices[i]; }",
      "Temperatures reached 31.5 degrees on Tuesday, 14 March.",
      "Unseen words: zyxophone quackerbrush, and accents: café, naïve, Mirović.",
      "Line one\nLine two\ttabbed {\"key\": [1, 2, 3]}",
  };
  for (auto& text : texts) {
    auto ids = tok->encode(text);
    EXPECT_GT(ids.size(), 3u);
    EXPECT_LT(ids.size(), text.size());  // real subword pieces, not bytes
    EXPECT_EQ(tok->decode(ids), text);
  }
}

TEST(Tokenizer, StreamingDecodeEqualsWholeDecode) {
  auto tok = Tokenizer::load(test::tiny_model(attention::Mode::dense));
  std::string text = "A café in Mirović sells bread for 3.20 euros, and the baker says hello.";
  for (int i = 0; i < 4; ++i) text += " Then a ½ loaf costs €1.60 — or 160 cents — on Tuesday.";
  auto ids = tok->encode(text);
  ASSERT_GT(ids.size(), 100u);  // long enough for the decoder's window to slide
  StreamDecoder dec(*tok);
  std::string streamed;
  for (int32_t id : ids) streamed += dec.push(id);
  EXPECT_EQ(streamed, text);
}

TEST(Tokenizer, IdsBeyondTheTokenizerDecodeToNothing) {
  auto tok = Tokenizer::load(test::tiny_model(attention::Mode::dense));
  auto ids = tok->encode("hello world");
  auto with_unknown = ids;
  with_unknown.push_back(tok->vocab_size() + 100);
  EXPECT_EQ(tok->decode(with_unknown), tok->decode(ids));
}

TEST(Tokenizer, StopStringsEndTheTextAndArePartiallyHeldBack) {
  auto tok = Tokenizer::load(test::tiny_model(attention::Mode::dense));
  auto ids = tok->encode("The market opens at nine. Bring a basket and some coins.");
  TextStream stream(*tok, {"basket"});
  std::string out;
  for (int32_t id : ids) out += stream.push(id);
  out += stream.finish();
  EXPECT_TRUE(stream.stopped());
  EXPECT_EQ(out, "The market opens at nine. Bring a ");
  TextStream none(*tok, {"zebra"});
  std::string all;
  for (int32_t id : ids) all += none.push(id);
  all += none.finish();
  EXPECT_FALSE(none.stopped());
  EXPECT_EQ(all, "The market opens at nine. Bring a basket and some coins.");
}

TEST(Tokenizer, MissingTokenizerIsAClearError) {
  test::TempDir dir;
  try {
    Tokenizer::load(dir.path());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("tokenizer.model"), std::string::npos);
  }
}

}  // namespace
}  // namespace nosa::runtime
