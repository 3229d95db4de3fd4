// Block selection on the GPU (docs/nosa.md, section 3, steps 3-6): query-aware scores against
// the compressed keys (softmax per query head, summed over the GQA group), max-pooling with
// forced blocks, and the top-k (InfLLM-V2: one stage; NOSA: two stages, the second by the
// pooled eviction scores). Three paths with the same result: split, the logits spread over many
// thread blocks, then the softmax sums, pooling and radix top-k in one thread block per (token,
// KV head) or (few tokens at long contexts) sums and pooling spread too (decode: steps of up to
// 1024 tokens whose scratch fits); tiled, one thread block per (tile of consecutive tokens, KV
// head), whose logits are a small GEMM that reads each compressed key once per tile (prefill);
// per_token, one thread block per (token, KV head) for the whole selection (where neither fits:
// groups over 32 query heads).
//
// The scores are computed in float32 in the CPU reference's order (sequential dot products, the
// same with or without fused multiply-add since q and the compressed keys are bf16; softmax sums
// in double), so that the selection matches attention/reference/selection.cpp block for block on
// the same inputs; ties break toward the lower block index.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "attention/cuda/kv_view.cuh"

namespace nosa::attention::cuda {

enum class SelectMode : int { dense = 0, infllmv2 = 1, nosa = 2 };
enum class SelectPath : int { automatic = 0, per_token = 1, split = 2, tiled = 3 };

struct SelectArgs {
  KvView kv;
  StepView step;
  SparseView p;
  SelectMode mode = SelectMode::nosa;
  int layer = 0;
  const void* q = nullptr;  // [T][H * group][d] bf16, rotated
  int group = 1;            // query heads per KV head
  float scale = 1.0f;       // 1 / sqrt(d), as the host computes it
  int32_t* out = nullptr;   // [T][H][k_max], ascending, -1 padded
  int k_max = 0;
  int n_max = 0;   // largest compressed_count over the step's tokens
  int nb_max = 0;  // largest query block + 1 over the step's tokens
  float* scratch = nullptr;      // logits, select_scratch_floats(...) floats
  size_t scratch_floats = 0;
  SelectPath path = SelectPath::per_token;  // as select_path() resolved it
  // The split path's finish: -1 its own choice, 1 one thread block per (token, KV head) where
  // its shared memory fits, 0 the three kernels spread over the GPU.
  int split_finish = -1;
  // The tiled path's screening (select.cu, "Screening"): certified fast scores first, the exact
  // kernel only on the tiles it could not certify (the default, where the tile shape allows).
  // Off: the exact kernel on every tile.
  bool screen = true;
  // The tiled path's pooling and top-k apart (select.cu, pooled_topk), where the pooled scores
  // fit the scratch: the tile kernel writes its tokens' pooled scores, a kernel of one warp per
  // (token, KV head) selects (for screened tiles too). Off: one warp per token in the tile
  // kernel.
  bool pooled_topk = true;
};

// The path a step takes: split where requested or automatic and its scratch and shared memory
// fit (at most 1024 tokens, 256 MiB of scratch); else, automatic or requested, tiled where the
// group has at most 32 query heads (head_dim 64 or 128); else per_token.
SelectPath select_path(SelectPath requested, int n_kv_heads, int group, int head_dim,
                       int keys_per_block, int n_max, int nb_max, int n_tokens);
// Floats of global scratch the launcher needs for that path, with screen (args' screen, false
// in dense mode, which selects nothing) and args' pooled_topk
// (per_token: 0 when the logits fit in shared memory; tiled: the pooled scores of the step's
// tokens where pooled_topk applies, and with screen the list of tiles to redo; both, where the
// logits do not fit, process tokens in groups to stay inside a fixed budget).
size_t select_scratch_floats(SelectPath path, int n_kv_heads, int group, int head_dim,
                             int keys_per_block, int n_max, int nb_max, int n_tokens, bool screen,
                             bool pooled_topk);
// Whether the per-token kernel (the last fallback) fits this GPU's shared memory at this many
// compressed keys and blocks; past it (about 530K positions with NOSA's parameters on Hopper)
// no path can select, and the caller refuses the step.
bool per_token_fits(int group, int head_dim, int n_max, int nb_max);
cudaError_t launch_block_select(const SelectArgs& args, cudaStream_t stream);
// The (tile, KV head) pairs that launch_block_select(args) screens (0: none); after it, the first
// int of args.scratch counts those it redid exactly.
int screened_tiles(const SelectArgs& args);

}  // namespace nosa::attention::cuda
