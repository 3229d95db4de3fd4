// KV cache maintenance on the GPU: writing a step's new tokens into their blocks, and the
// compressed keys (with their mean eviction scores) of the windows a step completes
// (docs/nosa.md, section 3.2). CUDA twins of the CPU backend's append_kv / update_compressed.
#pragma once

#include <cuda_runtime.h>

#include "attention/cuda/kv_view.cuh"

namespace nosa::attention::cuda {

struct AppendKvArgs {
  KvView kv;
  StepView step;
  int layer = 0;
  const void* k = nullptr;      // [T][n_kv_heads][d] bf16, rotated
  const void* v_all = nullptr;  // [T][hv][d] bf16
  int hv = 0;                   // heads in v_all
  int v_head_begin = 0;         // first local head within v_all
  const float* c = nullptr;     // [T][n_kv_heads] or null (bias 0)
};
cudaError_t launch_append_kv(const AppendKvArgs& args, cudaStream_t stream);

struct UpdateCompressedArgs {
  KvView kv;
  StepView step;
  int layer = 0;
  int kernel_size = 32;
  int kernel_stride = 16;
  bool scores = false;     // NOSA: also the mean eviction score of each window
  int max_new_windows = 0;  // most windows any sequence completes in this step (host-computed)
};
cudaError_t launch_update_compressed(const UpdateCompressedArgs& args, cudaStream_t stream);

}  // namespace nosa::attention::cuda
