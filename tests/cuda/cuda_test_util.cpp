#include "tests/cuda/cuda_test_util.h"

#include <algorithm>
#include <numeric>
#include <random>

#include "runtime/core/dtype.h"
#include "tests/common/test_util.h"

namespace nosa::test {

Backends::Backends() {
  cpu = runtime::make_cpu_backend();
  if (runtime::cuda_available()) gpu = runtime::make_cuda_backend(0);
}

Tensor host_uniform(const Shape& shape, uint64_t seed, float lo, float hi) {
  Tensor t = Tensor::empty_host(DType::f32, shape);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  float* d = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) d[i] = bf16_to_f32(f32_to_bf16(dist(rng)));
  return t;
}

Twin twin(Backends& b, const Tensor& host, DType gpu_dtype) {
  return {b.cpu->upload(host, DType::f32), b.gpu->upload(host, gpu_dtype)};
}

Twin outputs(Backends& b, const Shape& shape, DType gpu_dtype) {
  Twin t{b.cpu->zeros(DType::f32, shape), b.gpu->alloc(gpu_dtype, shape)};
  b.gpu->fill_uniform(t.gpu, 0, NAN, NAN);
  return t;
}

Comparison compare(Backends& b, const Tensor& cpu, const Tensor& gpu) {
  Tensor r = b.cpu->to_host(cpu), g = b.gpu->to_host(gpu);
  Comparison c;
  c.n = r.numel();
  EXPECT_EQ(r.numel(), g.numel());
  double num = 0, den = 0;
  const float* rd = r.data<float>();
  const float* gd = g.data<float>();
  for (int64_t i = 0; i < std::min(r.numel(), g.numel()); ++i) {
    if (!std::isfinite(gd[i])) {
      ++c.non_finite;
      continue;
    }
    const double e = double(gd[i]) - double(rd[i]);
    num += e * e;
    den += double(rd[i]) * double(rd[i]);
  }
  c.rel_error = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return c;
}

void expect_close(Backends& b, const Tensor& cpu, const Tensor& gpu, double tol,
                  const std::string& what) {
  Comparison c = compare(b, cpu, gpu);
  EXPECT_EQ(c.non_finite, 0) << what << ": " << c.non_finite << " of " << c.n
                             << " GPU outputs are NaN/inf (unwritten?)";
  EXPECT_LT(c.rel_error, tol) << what;
  std::printf("[ compare  ] %-40s rel error %.3e over %lld values\n", what.c_str(), c.rel_error,
              (long long)c.n);
}

StepFixture::StepFixture(const std::vector<std::pair<int64_t, int64_t>>& seqs, int block_size,
                         int64_t n_blocks, uint64_t seed, int vocab, bool all_logits) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> pool(n_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  size_t next = 0;
  tables.reserve(seqs.size());
  for (auto [n_past, n_new] : seqs) {
    const int64_t need = (n_past + n_new + block_size - 1) / block_size;
    EXPECT_LE(next + need, pool.size()) << "the test's block pool is too small";
    tables.emplace_back(pool.begin() + next, pool.begin() + next + need);
    next += need;
  }
  std::uniform_int_distribution<int> tok(0, vocab - 1);
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::vector<int32_t> ids(seqs[i].second);
    for (auto& id : ids) id = tok(rng);
    step.add(ids, seqs[i].first, &tables[i], true, all_logits);
  }
}

TwinCache::TwinCache(Backends& b, runtime::KvLayout layout, int64_t n_blocks) {
  runtime::KvLayout lc = layout, lg = layout;
  lc.dtype = DType::f32;
  lg.dtype = DType::bf16;
  cpu = std::make_unique<runtime::KvCache>(lc, n_blocks, *b.cpu);
  gpu = std::make_unique<runtime::KvCache>(lg, n_blocks, *b.gpu);
}

void TwinCache::fill_random(Backends& b, uint64_t seed, float bias_lo, float bias_hi) {
  Tensor kv = host_uniform(cpu->kv().shape(), seed, -1.0f, 1.0f);
  Tensor bias = host_uniform(cpu->bias().shape(), seed + 1, bias_lo, bias_hi);
  Tensor ck = host_uniform(cpu->ck().shape(), seed + 2, -1.0f, 1.0f);
  Tensor cks = host_uniform(cpu->ck_scores().shape(), seed + 3, bias_lo, bias_hi);
  cpu->kv() = b.cpu->upload(kv, DType::f32);
  gpu->kv() = b.gpu->upload(kv, DType::bf16);
  cpu->bias() = b.cpu->upload(bias, DType::f32);
  gpu->bias() = b.gpu->upload(bias, DType::f32);
  cpu->ck() = b.cpu->upload(ck, DType::f32);
  gpu->ck() = b.gpu->upload(ck, DType::bf16);
  cpu->ck_scores() = b.cpu->upload(cks, DType::f32);
  gpu->ck_scores() = b.gpu->upload(cks, DType::f32);
}

std::pair<int64_t, int64_t> selection_mismatches(Backends& b, const runtime::Selection& cpu,
                                                 const runtime::Selection& gpu) {
  EXPECT_EQ(cpu.k_max, gpu.k_max);
  Tensor g = b.gpu->to_host(gpu.blocks);
  const int32_t* cd = cpu.blocks.data<int32_t>();
  const int32_t* gd = g.data<int32_t>();
  const int64_t n = cpu.blocks.numel() / cpu.k_max;
  int64_t bad = 0;
  for (int64_t r = 0; r < n; ++r)
    for (int i = 0; i < cpu.k_max; ++i)
      if (cd[r * cpu.k_max + i] != gd[r * cpu.k_max + i]) {
        if (bad < 3)
          ADD_FAILURE() << "selection row " << r << " differs first at entry " << i << ": cpu "
                        << cd[r * cpu.k_max + i] << ", gpu " << gd[r * cpu.k_max + i];
        ++bad;
        break;
      }
  return {bad, n};
}

AttentionRig::AttentionRig(Backends& b, const runtime::KvLayout& layout, int group,
                           const std::vector<std::pair<int64_t, int64_t>>& seqs,
                           int64_t n_blocks, uint64_t seed)
    : cache(b, layout, n_blocks), f(seqs, layout.block_size, n_blocks, seed + 1) {
  cache.fill_random(b, seed, -2.0f, 1.0f);
  const int64_t T = f.step.n_tokens(), hq = int64_t(layout.n_kv_heads) * group;
  q = twin(b, host_uniform({T, hq, layout.head_dim}, seed + 2, -2, 2));
  b.cpu->begin_step(f.step);
  b.gpu->begin_step(f.step);
  out = outputs(b, {T, hq, layout.head_dim});
}

runtime::Selection selection_on_gpu(Backends& b, const runtime::Selection& cpu) {
  runtime::Selection g;
  g.k_max = cpu.k_max;
  g.blocks = b.gpu->upload(b.cpu->to_host(cpu.blocks), DType::i32);
  return g;
}

}  // namespace nosa::test
