// Builds without CUDA: the CUDA backend is absent and says so.
#include "runtime/backend.h"
#include "runtime/core/error.h"

namespace nosa::runtime {

bool cuda_available() { return false; }

void force_cuda_select_path(const std::string& path) {
  check_select_path_name(path);
}

void count_cuda_select_screening(bool) {}
int64_t cuda_select_screened_tiles() { return 0; }
int64_t cuda_select_redone_tiles() { return 0; }
void set_cuda_graphs(bool) {}
int64_t cuda_graph_replays() { return 0; }
int64_t cuda_attention_in_parts() { return 0; }

std::unique_ptr<Backend> make_cuda_backend(int) {
  NOSA_FAIL(ErrorCode::unavailable, "this build of nosa has no CUDA backend (built without nvcc)");
}

}  // namespace nosa::runtime
