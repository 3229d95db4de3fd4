#include "runtime/step.h"

#include <algorithm>
#include <cstring>

#include "runtime/core/error.h"

namespace nosa::runtime {

bool StepBatch::decode_only() const {
  return std::all_of(seqs.begin(), seqs.end(), [](const StepSequence& s) { return s.n_new == 1; });
}

void StepBatch::add(const std::vector<int32_t>& new_tokens, int64_t n_past,
                    const std::vector<int32_t>* blocks, bool want_logits, bool all_logits) {
  StepSequence s;
  s.n_past = n_past;
  s.n_new = int64_t(new_tokens.size());
  s.token_begin = n_tokens();
  s.blocks = blocks;
  s.want_logits = want_logits;
  s.all_logits = all_logits;
  const int32_t index = int32_t(seqs.size());
  for (int64_t i = 0; i < s.n_new; ++i) {
    tokens.push_back(new_tokens[i]);
    positions.push_back(int32_t(n_past + i));
    token_seq.push_back(index);
    if (all_logits || (want_logits && i + 1 == s.n_new)) logit_rows.push_back(int32_t(s.token_begin + i));
  }
  seqs.push_back(s);
}

namespace {

class Writer {
 public:
  template <typename T>
  void put(const T& v) {
    const char* p = reinterpret_cast<const char*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof(T));
  }
  template <typename T>
  void put_vector(const std::vector<T>& v) {
    put<uint64_t>(v.size());
    const char* p = reinterpret_cast<const char*>(v.data());
    bytes.insert(bytes.end(), p, p + v.size() * sizeof(T));
  }
  std::vector<char> bytes;
};

class Reader {
 public:
  explicit Reader(const std::vector<char>& b) : bytes_(b) {}
  template <typename T>
  T get() {
    NOSA_ASSERT(pos_ + sizeof(T) <= bytes_.size(), "truncated step plan");
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  template <typename T>
  void get_vector(std::vector<T>& v) {
    uint64_t n = get<uint64_t>();
    NOSA_ASSERT(pos_ + n * sizeof(T) <= bytes_.size(), "truncated step plan");
    v.resize(n);
    std::memcpy(v.data(), bytes_.data() + pos_, n * sizeof(T));
    pos_ += n * sizeof(T);
  }

 private:
  const std::vector<char>& bytes_;
  size_t pos_ = 0;
};

}  // namespace

std::vector<char> encode_step(const StepBatch& batch, StepPlan::Kind kind,
                              const std::vector<int32_t>& released) {
  Writer w;
  w.put<uint8_t>(uint8_t(kind));
  w.put_vector(released);
  w.put_vector(batch.tokens);
  w.put_vector(batch.positions);
  w.put_vector(batch.token_seq);
  w.put_vector(batch.logit_rows);
  w.put<uint64_t>(batch.seqs.size());
  for (const StepSequence& s : batch.seqs) {
    w.put(s.n_past);
    w.put(s.n_new);
    w.put(s.token_begin);
    w.put<uint8_t>(uint8_t(s.all_logits) | uint8_t(s.want_logits) << 1);
    w.put_vector(*s.blocks);
  }
  return std::move(w.bytes);
}

void decode_step(const std::vector<char>& bytes, StepPlan& plan) {
  Reader r(bytes);
  plan.kind = StepPlan::Kind(r.get<uint8_t>());
  r.get_vector(plan.released);
  StepBatch& b = plan.batch;
  r.get_vector(b.tokens);
  r.get_vector(b.positions);
  r.get_vector(b.token_seq);
  r.get_vector(b.logit_rows);
  const uint64_t n = r.get<uint64_t>();
  b.seqs.resize(n);
  plan.blocks.resize(n);
  for (uint64_t i = 0; i < n; ++i) {
    StepSequence& s = b.seqs[i];
    s.n_past = r.get<int64_t>();
    s.n_new = r.get<int64_t>();
    s.token_begin = r.get<int64_t>();
    uint8_t flags = r.get<uint8_t>();
    s.all_logits = flags & 1;
    s.want_logits = (flags >> 1) & 1;
    r.get_vector(plan.blocks[i]);
    s.blocks = &plan.blocks[i];
  }
}

}  // namespace nosa::runtime
