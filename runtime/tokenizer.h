// Text <-> token ids with a SentencePiece model (tokenizer.model in the checkpoint), and the
// training of the small tokenizer that `nosa make-model` ships with random checkpoints.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace nosa::runtime {

class Tokenizer {
 public:
  // Loads DIR/tokenizer.model; throws bad_checkpoint if missing or unreadable.
  static std::unique_ptr<Tokenizer> load(const std::filesystem::path& model_dir);
  ~Tokenizer();

  std::vector<int32_t> encode(const std::string& text) const;
  // Ids outside the tokenizer's vocabulary (a model's vocabulary can be larger) decode to "".
  std::string decode(const std::vector<int32_t>& ids) const;
  // The text of one token as it continues a stream (leading space kept), for streaming output.
  std::string piece_text(int32_t id) const;
  int32_t vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;

 private:
  Tokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

// Incremental detokenizer: feeds ids one at a time and returns the new text, holding back
// bytes of an incomplete UTF-8 character. Each push decodes only a short window of recent ids
// (a few tokens of context keep word-start spaces right), so a long generation costs linear time.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok) : tok_(tok) {}
  std::string push(int32_t id);
  // At the end of the stream: text held back for an incomplete character, as decoded.
  std::string flush();

 private:
  const Tokenizer& tok_;
  std::string held_;
  std::vector<int32_t> window_;  // ids from the context start to the newest
  size_t emitted_ = 0;           // bytes of decode(window_) already returned
};

// Trains a SentencePiece (unigram) model of `vocab_size` pieces on the corpus the project ships
// and writes it to `out_file`.
void train_tokenizer(const std::filesystem::path& out_file, int vocab_size);

// The training corpus (embedded in the binary).
const std::string& tokenizer_corpus();

}  // namespace nosa::runtime
