// What one engine step computes: the flattened tokens of every scheduled sequence (decode tokens
// and prefill chunks mixed), and where each sequence's KV lives.
#pragma once

#include <cstdint>
#include <vector>

namespace nosa::runtime {

struct StepSequence {
  int64_t n_past = 0;       // tokens already in the KV cache
  int64_t n_new = 0;        // tokens computed in this step (1 when decoding)
  int64_t token_begin = 0;  // index of its first token in StepBatch::tokens
  const std::vector<int32_t>* blocks = nullptr;  // block table: logical block -> physical block
  bool all_logits = false;  // logits for every new token (tests), else only for the last
  bool want_logits = true;  // false for a prefill chunk that does not end the prompt
};

struct StepBatch {
  std::vector<int32_t> tokens;     // [T]
  std::vector<int32_t> positions;  // [T]
  std::vector<int32_t> token_seq;  // [T]: index into seqs
  std::vector<StepSequence> seqs;
  std::vector<int32_t> logit_rows;  // rows of tokens whose logits are returned, in order

  int64_t n_tokens() const { return int64_t(tokens.size()); }
  // Every sequence computes one new token (no prompt chunk).
  bool decode_only() const;
  // Appends a sequence's new tokens (positions n_past...) and fills token_seq and logit_rows.
  void add(const std::vector<int32_t>& new_tokens, int64_t n_past,
           const std::vector<int32_t>* blocks, bool want_logits = true, bool all_logits = false);
};

// A step as it travels from a replica's leader to its followers: the batch with its own copies of
// the block tables.
struct StepPlan {
  enum class Kind : uint8_t { run, stop } kind = Kind::run;
  StepBatch batch;
  std::vector<std::vector<int32_t>> blocks;  // one table per sequence
  std::vector<int32_t> released;             // blocks the leader freed since the last plan
};

std::vector<char> encode_step(const StepBatch& batch, StepPlan::Kind kind = StepPlan::Kind::run,
                              const std::vector<int32_t>& released = {});
// Decodes bytes from encode_step; batch.seqs[i].blocks points into plan.blocks. Throws internal
// on malformed bytes.
void decode_step(const std::vector<char>& bytes, StepPlan& plan);

}  // namespace nosa::runtime
