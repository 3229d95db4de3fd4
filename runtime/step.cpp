#include "runtime/step.h"

namespace nosa::runtime {

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

}  // namespace nosa::runtime
