// Prefill attention with Hopper's warpgroup MMA (prefill_wgmma.cu): the prefill kernel's work
// (dense or over the selected blocks, with or without the bias) for head_dim 128 and blocks of a
// multiple of 64 keys, on sm_90 GPUs when the build includes sm_90a code (NOSA_HAVE_WGMMA).
// Host-includable.
#pragma once

#include <cuda_runtime.h>

#include "attention/cuda/sparse_prefill.cuh"

namespace nosa::attention::cuda {

// Whether the wgmma kernel computes this launch (its shapes and shared memory; not whether the
// GPU runs it).
bool prefill_wgmma_fits(const PrefillArgs& args);
// variant: 1, each stage's products in turn, one thread block per SM; 2, the same with two
// (128 registers a thread); 3, pipelined: a stage's Q K^T issued with the stage before's P V,
// its softmax running while that product does (one block per SM, three stage buffers).
cudaError_t launch_prefill_wgmma(const PrefillArgs& args, int variant, cudaStream_t stream);

}  // namespace nosa::attention::cuda
