// Helpers of the CUDA backend tests: both backends side by side, the same random inputs on each
// (bf16-representable values, so that the GPU sees exactly what the CPU sees), NaN-poisoned GPU
// outputs (an element the GPU forgets to write stays NaN), error measures, and device copies of
// host vectors for the tests that call kernels directly.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "attention/sparse_params.h"
#include "runtime/backend.h"
#include "runtime/kv_cache.h"
#include "runtime/step.h"

namespace nosa::test {

// A device copy of a host vector (freed with it), copied back on request.
template <typename T>
struct DeviceArray {
  T* p = nullptr;
  size_t n = 0;
  explicit DeviceArray(const std::vector<T>& v) : n(v.size()) {
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T)), cudaSuccess);
    if (n) {
      EXPECT_EQ(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> v(n);
    if (n) {
      EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    }
    return v;
  }
};

// Skips the test where no GPU exists (CI builds and skips these tests).
#define NOSA_REQUIRE_GPU()                                          \
  do {                                                              \
    if (!::nosa::runtime::cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

struct Backends {
  std::unique_ptr<runtime::Backend> cpu;
  std::unique_ptr<runtime::Backend> gpu;
  Backends();
};

// A host float32 tensor of bf16-representable uniform values in [lo, hi).
Tensor host_uniform(const Shape& shape, uint64_t seed, float lo, float hi);

// The same host values on both backends: float32 on the CPU, `gpu_dtype` on the GPU.
struct Twin {
  Tensor cpu, gpu;
};
Twin twin(Backends& b, const Tensor& host, DType gpu_dtype = DType::bf16);
// Outputs: zeros on the CPU, NaN on the GPU.
Twin outputs(Backends& b, const Shape& shape, DType gpu_dtype = DType::bf16);

struct Comparison {
  double rel_error = 0;  // ||gpu - cpu|| / ||cpu||
  int64_t non_finite = 0;
  int64_t n = 0;
};
Comparison compare(Backends& b, const Tensor& cpu, const Tensor& gpu);
// EXPECTs every GPU element finite and the relative error under tol.
void expect_close(Backends& b, const Tensor& cpu, const Tensor& gpu, double tol,
                  const std::string& what);

// A step over sequences (n_past, n_new) whose block tables are shuffled physical blocks of a
// pool of n_blocks; tokens are random ids below vocab.
struct StepFixture {
  std::vector<std::vector<int32_t>> tables;
  runtime::StepBatch step;
  StepFixture(const std::vector<std::pair<int64_t, int64_t>>& seqs, int block_size,
              int64_t n_blocks, uint64_t seed, int vocab = 100, bool all_logits = false);
  StepFixture(const StepFixture&) = delete;
};

// A KV cache on each backend with the same layout (float32 on the CPU, bf16 on the GPU).
struct TwinCache {
  std::unique_ptr<runtime::KvCache> cpu, gpu;
  TwinCache(Backends& b, runtime::KvLayout layout, int64_t n_blocks);
  // Fills kv, bias, compressed keys and their scores with the same random values on both.
  void fill_random(Backends& b, uint64_t seed, float bias_lo = -1.0f, float bias_hi = 1.0f);
};

// The inputs of an attention comparison on one step: a twin KV cache (2 layers, `layout`'s KV
// heads) with random contents, the step over `seqs`, random queries [T, KV heads x group, d] and
// poisoned outputs of that shape; both backends have begun the step.
struct AttentionRig {
  TwinCache cache;
  StepFixture f;
  Twin q, out;
  AttentionRig(Backends& b, const runtime::KvLayout& layout, int group,
               const std::vector<std::pair<int64_t, int64_t>>& seqs, int64_t n_blocks,
               uint64_t seed);
};

// A CPU selection's copy on the GPU (so that both backends attend over the same blocks).
runtime::Selection selection_on_gpu(Backends& b, const runtime::Selection& cpu);

// The validated sparse parameters of a test case (any struct with block_size, kernel_size,
// kernel_stride, window, topk and select).
template <class Case>
attention::SparseParams case_params(const Case& c) {
  attention::SparseParams p;
  p.block_size = c.block_size;
  p.kernel_size = c.kernel_size;
  p.kernel_stride = c.kernel_stride;
  p.window_size = c.window;
  p.topk = c.topk;
  p.select_blocks = c.select;
  p.validate();
  return p;
}

// The (token, KV head) rows whose selections differ between the CPU and the GPU (the first few
// are reported as failures, with the first differing entry), and how many rows there are.
std::pair<int64_t, int64_t> selection_mismatches(Backends& b, const runtime::Selection& cpu,
                                                 const runtime::Selection& gpu);

}  // namespace nosa::test
