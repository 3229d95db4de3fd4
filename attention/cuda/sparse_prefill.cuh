// Sparse (and dense) attention for prompt chunks: a tiled tensor-core kernel. A thread block
// takes a tile of 128 rows, the (token, query head) pairs of up to min(64, 128 / group)
// consecutive tokens of one sequence for one KV head, and walks the union of the blocks its tokens
// selected (every block up to the last token's without a selection), 64 keys per stage (keys and
// values load through a ring of two to four slots, up to a whole stage ahead). A warp (32
// rows) skips a stage that none of its tokens selected or that lies after them all; it masks keys
// per row (the row token's own selection and causality) only in stages that some of its tokens do
// not fully see, so that dense and shared stages cost only the MMAs and the softmax.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention/cuda/kv_view.cuh"

namespace nosa::attention::cuda {

// A prefill tile: tokens [first, first + count) of the step, all of sequence seq.
struct PrefillTile {
  int32_t seq = 0;
  int32_t first = 0;
  int32_t count = 0;
};

struct PrefillArgs {
  KvView kv;
  StepView step;
  int layer = 0;
  const void* q = nullptr;  // [T][H * group][d] bf16
  int group = 1;            // at most 64
  float scale = 1.0f;
  bool use_bias = false;
  const int32_t* selection = nullptr;  // [T][H][k_max] ascending, -1 padded; null: all blocks
  int k_max = 0;
  const PrefillTile* tiles = nullptr;  // [n_tiles], count <= prefill_tile_tokens(group)
  int n_tiles = 0;
  int nb_max = 0;  // largest query block + 1 over the tiles' tokens
  void* out = nullptr;  // [T][H * group][d] bf16
  // The wgmma kernel's variant (1, 2 or 3; prefill_wgmma.cuh) where it fits and the GPU runs
  // it, 0 the mma.sync kernel (the CUDA backend sets it from NOSA_PREFILL_WGMMA).
  int wgmma = 0;
};

// Tokens per tile: 128 rows / group, at most 64 (one bit per token in the key masks).
int prefill_tile_tokens(int group);
// Shared memory the kernel needs for tiles whose tokens reach block nb_max - 1 (the block list
// grows with the context), and what this device allows a thread block.
size_t prefill_shared_bytes(int head_dim, int nb_max);
size_t prefill_shared_limit();
cudaError_t launch_sparse_prefill(const PrefillArgs& args, cudaStream_t stream);
// Tests: the K/V slots (2, 3 or 4) every later launch takes where its shared memory allows, so
// that all three kernels are compared with the CPU (the launcher's own choice takes fewer slots
// only for block lists longer than tests build); 0 restores the launcher's choice.
void force_prefill_slots(int slots);
// Tests and comparisons: launches through the wgmma kernel's variant 1, 2 or 3
// (prefill_wgmma.cuh) where it fits and the GPU runs it, or never (0), whatever PrefillArgs::wgmma
// says; -1 (the default) restores PrefillArgs::wgmma.
void force_prefill_wgmma(int variant);
// Whether this build and GPU run the wgmma kernel (sm_90a code built, an sm_90 device), and how
// many launches took it so far in this process (tests: that a forced variant really ran).
bool prefill_wgmma_available();
int64_t prefill_wgmma_launches();

}  // namespace nosa::attention::cuda
