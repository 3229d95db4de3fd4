#include "runtime/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <fstream>

#include "runtime/core/error.h"

namespace nosa::runtime {

namespace fs = std::filesystem;

std::unique_ptr<Tokenizer> Tokenizer::load(const fs::path& model_dir) {
  fs::path path = model_dir / "tokenizer.model";
  NOSA_CHECK_CODE(fs::exists(path), ErrorCode::bad_checkpoint,
                  "{}: missing (a SentencePiece tokenizer is needed for text prompts; "
                  "token ids work without one)",
                  path.string());
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  tok->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  auto status = tok->sp_->Load(path.string());
  NOSA_CHECK_CODE(status.ok(), ErrorCode::bad_checkpoint, "{}: not a SentencePiece model: {}",
                  path.string(), status.ToString());
  return tok;
}

Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  auto status = sp_->Encode(text, &ids);
  NOSA_CHECK(status.ok(), "cannot tokenize the text: {}", status.ToString());
  return {ids.begin(), ids.end()};
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<int> known;
  known.reserve(ids.size());
  const int n = sp_->GetPieceSize();
  for (int32_t id : ids)
    if (id >= 0 && id < n && !sp_->IsControl(id)) known.push_back(id);
  std::string text;
  auto status = sp_->Decode(known, &text);
  NOSA_CHECK_CODE(status.ok(), ErrorCode::internal, "cannot detokenize: {}", status.ToString());
  return text;
}

std::string Tokenizer::piece_text(int32_t id) const {
  if (id < 0 || id >= sp_->GetPieceSize() || sp_->IsControl(id)) return "";
  std::string piece = sp_->IdToPiece(id);
  // SentencePiece marks a word start with U+2581.
  std::string out;
  const std::string marker = "\xE2\x96\x81";
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, marker.size(), marker) == 0) {
      out.push_back(' ');
      i += marker.size();
    } else {
      out.push_back(piece[i++]);
    }
  }
  return out;
}

int32_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int32_t Tokenizer::bos_id() const { return sp_->bos_id(); }
int32_t Tokenizer::eos_id() const { return sp_->eos_id(); }

std::string StreamDecoder::flush() {
  std::string out = std::move(held_);
  held_.clear();
  window_.clear();
  emitted_ = 0;
  return out;
}

std::string StreamDecoder::push(int32_t id) {
  window_.push_back(id);
  std::string full = tok_.decode(window_);
  // Hold back trailing replacement characters (at most three: one per byte of an incomplete
  // UTF-8 sequence decoded by byte fallback): the next tokens may complete the character.
  static const std::string replacement = "\xEF\xBF\xBD";
  size_t usable = full.size();
  for (int i = 0; i < 3 && usable >= replacement.size() && usable > emitted_ &&
                  full.compare(usable - replacement.size(), replacement.size(), replacement) == 0;
       ++i)
    usable -= replacement.size();
  held_ = full.substr(usable);
  std::string out;
  if (usable > emitted_) {
    out = full.substr(emitted_, usable - emitted_);
    emitted_ = usable;
  }
  // Slide the window once everything is emitted, keeping a few ids of context: decoding a
  // window that starts mid-text drops the first piece's leading space, the same way each time.
  constexpr size_t k_context = 4, k_slide = 32;
  if (window_.size() > k_slide && emitted_ == full.size()) {
    window_.erase(window_.begin(), window_.end() - k_context);
    emitted_ = tok_.decode(window_).size();
  }
  return out;
}

void train_tokenizer(const fs::path& out_file, int vocab_size) {
  fs::path dir = out_file.parent_path().empty() ? fs::path(".") : out_file.parent_path();
  fs::path corpus = dir / fmt::format(".nosa-corpus-{}.txt", ::getpid());
  {
    std::ofstream out(corpus, std::ios::binary);
    out << tokenizer_corpus();
    NOSA_CHECK_CODE(out.good(), ErrorCode::io, "{}: cannot write", corpus.string());
  }
  fs::path prefix = dir / fmt::format(".nosa-tokenizer-{}", ::getpid());
  std::string args = fmt::format(
      "--input={} --model_prefix={} --vocab_size={} --model_type=unigram "
      "--character_coverage=1.0 --byte_fallback=true --unk_id=0 --bos_id=1 --eos_id=2 "
      "--pad_id=-1 --num_threads=1 --minloglevel=2 --hard_vocab_limit=false "
      "--normalization_rule_name=identity --remove_extra_whitespaces=false "
      "--allow_whitespace_only_pieces=true --split_digits=true "
      "--max_sentence_length=8192",
      corpus.string(), prefix.string(), vocab_size);
  auto status = sentencepiece::SentencePieceTrainer::Train(args);
  fs::remove(corpus);
  fs::remove(fs::path(prefix.string() + ".vocab"));
  NOSA_CHECK_CODE(status.ok(), ErrorCode::internal, "tokenizer training failed: {}",
                  status.ToString());
  fs::rename(prefix.string() + ".model", out_file);
}

}  // namespace nosa::runtime
