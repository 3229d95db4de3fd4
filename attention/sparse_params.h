// The attention modes and the sparse parameters of NOSA / InfLLM-V2 (docs/nosa.md, section 2).
#pragma once

#include <cstdint>
#include <string>

namespace nosa::attention {

enum class Mode { dense, infllmv2, nosa };

const char* mode_name(Mode mode);
// Parses "dense", "infllmv2" or "nosa"; throws invalid_argument otherwise.
Mode parse_mode(const std::string& name);

// Block-sparse selection parameters, in tokens unless the name says blocks. The defaults are
// those of the released NOSA models.
struct SparseParams {
  int block_size = 64;     // tokens per KV block: the unit of selection, caching and transfer
  int kernel_size = 32;    // tokens averaged into one compressed key
  int kernel_stride = 16;  // a new compressed key every kernel_stride tokens
  int init_blocks = 1;     // leading blocks always selected (attention sink)
  int window_size = 1024;  // local window: window_size / block_size blocks before the current
  int topk = 64;           // blocks selected in total per (query token, KV head)
  int select_blocks = 16;  // NOSA: blocks chosen by the query beyond the forced ones
  int dense_len = 0;       // sequences shorter than this attend densely

  int local_blocks() const { return window_size / block_size; }
  // Blocks chosen by the query-aware score, forced ones included (33 by default).
  int q_select() const { return init_blocks + local_blocks() + select_blocks; }
  // Compressed keys per block; also the stride of block pooling in compressed units.
  int keys_per_block() const { return block_size / kernel_stride; }

  // Throws invalid_argument (naming the field) if the parameters are inconsistent.
  void validate() const;
  bool operator==(const SparseParams&) const = default;
};

}  // namespace nosa::attention
