#include "attention/sparse_params.h"

#include "runtime/core/error.h"

namespace nosa::attention {

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::dense: return "dense";
    case Mode::infllmv2: return "infllmv2";
    case Mode::nosa: return "nosa";
  }
  return "?";
}

Mode parse_mode(const std::string& name) {
  if (name == "dense") return Mode::dense;
  if (name == "infllmv2" || name == "infllm-v2") return Mode::infllmv2;
  if (name == "nosa") return Mode::nosa;
  NOSA_FAIL(ErrorCode::invalid_argument,
            "unknown attention mode '{}' (use dense, infllmv2 or nosa)", name);
}

void SparseParams::validate() const {
  NOSA_CHECK(block_size > 0, "sparse_config.block_size must be positive, got {}", block_size);
  NOSA_CHECK(kernel_stride > 0 && block_size % kernel_stride == 0,
             "sparse_config.kernel_stride ({}) must divide block_size ({})", kernel_stride,
             block_size);
  NOSA_CHECK(kernel_size >= kernel_stride,
             "sparse_config.kernel_size ({}) must be at least kernel_stride ({})", kernel_size,
             kernel_stride);
  NOSA_CHECK(init_blocks >= 0, "sparse_config.init_blocks must be >= 0, got {}", init_blocks);
  NOSA_CHECK(window_size >= 0 && window_size % block_size == 0,
             "sparse_config.window_size ({}) must be a multiple of block_size ({})", window_size,
             block_size);
  NOSA_CHECK(select_blocks >= 0, "sparse_config.select_blocks must be >= 0, got {}",
             select_blocks);
  NOSA_CHECK(topk >= q_select(),
             "sparse_config.topk ({}) must be at least init_blocks + window blocks + "
             "select_blocks ({})",
             topk, q_select());
  NOSA_CHECK(dense_len >= 0, "sparse_config.dense_len must be >= 0, got {}", dense_len);
}

}  // namespace nosa::attention
