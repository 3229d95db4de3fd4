// The CPU reference backend: every op in float32, literally as docs/nosa.md says, parallel over
// the global thread pool. Each output element is computed by one thread in a fixed order, so
// results do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention/reference/attention.h"
#include "attention/reference/selection.h"
#include "runtime/backend.h"
#include "runtime/core/error.h"
#include "runtime/core/thread_pool.h"
#include "runtime/sampling.h"

namespace nosa::runtime {

namespace ref = attention::reference;

namespace {

// Dot product with eight independent accumulators, so that the compiler vectorises it.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void require_f32(const Tensor& t, const char* what) {
  NOSA_ASSERT(t.device() == Device::cpu && t.dtype() == DType::f32, "{}: expected a cpu float32 "
              "tensor, got {} {}", what, device_name(t.device()), dtype_name(t.dtype()));
}

// The slot holding a chunk's keys, values and scores: the chunk itself unless the cache is
// offloaded, then the block cache's slot (which must be resident).
inline int64_t slot_of(KvCache& cache, int64_t chunk) {
  if (!cache.offloaded()) return chunk;
  const int32_t slot = cache.slot_table().data<int32_t>()[chunk];
  NOSA_ASSERT(slot >= 0, "KV chunk {} is not resident", chunk);
  return slot;
}

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu; }
  std::string name() const override { return "cpu"; }
  DType activation_dtype() const override { return DType::f32; }

  Tensor alloc(DType dtype, Shape shape) override { return Tensor::empty_host(dtype, shape); }
  Tensor zeros(DType dtype, Shape shape) override { return Tensor::zeros_host(dtype, shape); }

  Tensor upload(const Tensor& host, DType dtype) override {
    if (dtype == host.dtype() && (dtype == DType::i32 || dtype == DType::i64)) {
      Tensor out = Tensor::empty_host(dtype, host.shape());
      std::memcpy(out.raw(), host.raw(), host.bytes());
      return out;
    }
    NOSA_ASSERT(dtype == DType::f32, "the cpu backend keeps float32 tensors");
    Tensor out = Tensor::empty_host(DType::f32, host.shape());
    const int64_t n = host.numel();
    const size_t in_size = dtype_size(host.dtype());
    ThreadPool::global().parallel_for(
        n,
        [&](int64_t b, int64_t e) {
          convert_to_f32(static_cast<const char*>(host.raw()) + b * in_size, host.dtype(),
                         out.data<float>() + b, size_t(e - b));
        },
        1 << 16);
    return out;
  }

  Tensor to_host(const Tensor& t) override { return t; }
  size_t free_memory_bytes() const override { return size_t(4) << 30; }
  void synchronize() override {}

  void begin_step(const StepBatch& step, bool) override { step_ = &step; }
  // Two slots: the model's micro-batch path runs here too (in order, so it only checks that the
  // split computes what the whole batch does).
  int step_slots() const override { return 2; }
  void use_step_slot(int slot) override {
    if (slot != slot_) std::swap(step_, other_step_);
    slot_ = slot;
  }

  void embedding(const Tensor& table, Tensor& out) override {
    require_f32(table, "embedding");
    const int64_t hidden = table.dim(1), vocab = table.dim(0);
    for (int64_t t = 0; t < step_->n_tokens(); ++t) {
      int32_t id = step_->tokens[t];
      NOSA_CHECK(id >= 0 && id < vocab, "token id {} is outside the vocabulary [0, {})", id,
                 vocab);
      std::memcpy(out.data<float>() + t * hidden, table.data<float>() + int64_t(id) * hidden,
                  hidden * 4);
    }
  }

  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    const int64_t rows = x.dim(0), n = x.dim(1);
    const float* w = weight.data<float>();
    ThreadPool::global().parallel_for(rows, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* xr = x.data<float>() + r * n;
        float* yr = out.data<float>() + r * n;
        double ss = 0.0;
        for (int64_t i = 0; i < n; ++i) ss += double(xr[i]) * xr[i];
        float inv = 1.0f / std::sqrt(float(ss / double(n)) + eps);
        for (int64_t i = 0; i < n; ++i) yr[i] = w[i] * (xr[i] * inv);
      }
    });
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) override {
    require_f32(x, "linear x");
    require_f32(w, "linear w");
    const int64_t rows = x.dim(0), k = x.dim(1), n = w.dim(0);
    NOSA_ASSERT(w.dim(1) == k && out.dim(0) == rows && out.dim(1) == n,
                "linear: shapes {} x {}^T -> {}", shape_string(x.shape()),
                shape_string(w.shape()), shape_string(out.shape()));
    const float* xd = x.data<float>();
    const float* wd = w.data<float>();
    const float* bd = bias ? bias->data<float>() : nullptr;
    float* od = out.data<float>();
    // Tiles of 16 weight rows x 8 input rows keep both in cache.
    constexpr int64_t k_wt = 16, k_xt = 8;
    const int64_t n_tiles = (n + k_wt - 1) / k_wt, r_tiles = (rows + k_xt - 1) / k_xt;
    ThreadPool::global().parallel_for(n_tiles * r_tiles, [&](int64_t b, int64_t e) {
      for (int64_t tile = b; tile < e; ++tile) {
        const int64_t n0 = (tile % n_tiles) * k_wt, r0 = (tile / n_tiles) * k_xt;
        const int64_t n1 = std::min(n, n0 + k_wt), r1 = std::min(rows, r0 + k_xt);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = n0; j < n1; ++j)
            od[r * n + j] = dot(xd + r * k, wd + j * k, k) + (bd ? bd[j] : 0.0f);
      }
    });
  }

  void add(Tensor& x, const Tensor& y) override {
    float* xd = x.data<float>();
    const float* yd = y.data<float>();
    ThreadPool::global().parallel_for(
        x.numel(), [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) xd[i] += yd[i];
        },
        1 << 14);
  }

  void silu_mul(const Tensor& gate_up, Tensor& out) override {
    const int64_t rows = gate_up.dim(0), f = out.dim(1);
    ThreadPool::global().parallel_for(rows, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* g = gate_up.data<float>() + r * 2 * f;
        const float* u = g + f;
        float* o = out.data<float>() + r * f;
        for (int64_t i = 0; i < f; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
      }
    });
  }

  void split_qkv_rope(const Tensor& qkv, const RopeTable& rope, Tensor& q, Tensor& k,
                      Tensor& v_all) override {
    const int64_t rows = qkv.dim(0), width = qkv.dim(1);
    const int hq = int(q.dim(1)), hk = int(k.dim(1)), hv = int(v_all.dim(1)), d = int(q.dim(2));
    NOSA_ASSERT(width == int64_t(hq + hk + hv) * d, "split_qkv_rope: width {} != ({}+{}+{})*{}",
                width, hq, hk, hv, d);
    const int half = d / 2;
    ThreadPool::global().parallel_for(rows, [&](int64_t b, int64_t e) {
      std::vector<float> cos(half), sin(half);
      for (int64_t r = b; r < e; ++r) {
        const float pos = float(step_->positions[r]);
        for (int i = 0; i < half; ++i) {
          float angle = pos * rope.inv_freq[i];
          cos[i] = std::cos(angle) * rope.attention_scaling;
          sin[i] = std::sin(angle) * rope.attention_scaling;
        }
        const float* src = qkv.data<float>() + r * width;
        auto rotate = [&](const float* in, float* out) {
          for (int i = 0; i < half; ++i) {
            out[i] = in[i] * cos[i] - in[i + half] * sin[i];
            out[i + half] = in[i + half] * cos[i] + in[i] * sin[i];
          }
        };
        for (int h = 0; h < hq; ++h) rotate(src + h * d, q.data<float>() + (r * hq + h) * d);
        for (int h = 0; h < hk; ++h)
          rotate(src + (hq + h) * d, k.data<float>() + (r * hk + h) * d);
        std::memcpy(v_all.data<float>() + r * hv * d, src + (hq + hk) * d, size_t(hv) * d * 4);
      }
    });
  }

  void gather_logit_rows(const Tensor& x, Tensor& out) override {
    const int64_t n = x.dim(1);
    for (size_t i = 0; i < step_->logit_rows.size(); ++i)
      std::memcpy(out.data<float>() + i * n, x.data<float>() + step_->logit_rows[i] * n, n * 4);
  }

  void eviction_scores(const Tensor& v_all, const Tensor& a, const Tensor& delta_w,
                       const Tensor* delta_b, int head_begin, int head_end, Tensor& c) override {
    const int64_t rows = v_all.dim(0);
    const int n_kv = int(v_all.dim(1)), d = int(v_all.dim(2));
    ThreadPool::global().parallel_for(rows, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        ref::eviction_scores(v_all.data<float>() + r * n_kv * d, n_kv, d, a.data<float>(),
                             delta_w.data<float>(), delta_b ? delta_b->data<float>() : nullptr,
                             head_begin, head_end, c.data<float>() + r * (head_end - head_begin));
    });
  }

  void append_kv(int layer, const Tensor& k, const Tensor& v_all, int v_head_begin,
                 const Tensor* c, KvCache& cache) override {
    const KvLayout& L = cache.layout();
    const int H = L.n_kv_heads, d = L.head_dim, bs = L.block_size, hv = int(v_all.dim(1));
    float* kv = cache.kv().data<float>();
    float* bias = cache.bias().data<float>();
    for (int64_t t = 0; t < step_->n_tokens(); ++t) {
      const StepSequence& s = step_->seqs[step_->token_seq[t]];
      const int64_t pos = step_->positions[t];
      const int64_t block = (*s.blocks).at(pos / bs);
      const int row = int(pos % bs);
      for (int h = 0; h < H; ++h) {
        const int64_t chunk = slot_of(cache, L.chunk(block, layer, h));
        float* kdst = kv + (chunk * 2 * bs + row) * d;
        float* vdst = kv + ((chunk * 2 + 1) * bs + row) * d;
        std::memcpy(kdst, k.data<float>() + (t * H + h) * d, d * 4);
        std::memcpy(vdst, v_all.data<float>() + (t * hv + v_head_begin + h) * d, d * 4);
        bias[chunk * bs + row] = c ? c->data<float>()[t * H + h] : 0.0f;
      }
    }
  }

  void update_compressed(int layer, bool scores, const attention::SparseParams& p,
                         KvCache& cache) override {
    const KvLayout& L = cache.layout();
    const int H = L.n_kv_heads, d = L.head_dim, bs = L.block_size, m = L.keys_per_block;
    const float* kv = cache.kv().data<float>();
    const float* bias = cache.bias().data<float>();
    for (const StepSequence& s : step_->seqs) {
      const int64_t j0 = ref::compressed_count(s.n_past - 1, p);
      const int64_t j1 = ref::compressed_count(s.n_past + s.n_new - 1, p);
      const auto& blocks = *s.blocks;
      ThreadPool::global().parallel_for((j1 - j0) * H, [&](int64_t b, int64_t e) {
        for (int64_t item = b; item < e; ++item) {
          const int64_t j = j0 + item / H;
          const int h = int(item % H);
          const int64_t home = L.chunk(blocks.at(j / m), layer, h);
          float* ck = cache.ck().data<float>() + (home * m + j % m) * d;
          std::fill(ck, ck + d, 0.0f);
          double e_sum = 0.0;
          for (int i = 0; i < p.kernel_size; ++i) {
            const int64_t pos = j * p.kernel_stride + i;
            const int64_t chunk = slot_of(cache, L.chunk(blocks.at(pos / bs), layer, h));
            const float* key = kv + (chunk * 2 * bs + pos % bs) * d;
            for (int x = 0; x < d; ++x) ck[x] += key[x];
            e_sum += bias[chunk * bs + pos % bs];
          }
          for (int x = 0; x < d; ++x) ck[x] /= float(p.kernel_size);
          cache.ck_scores().data<float>()[home * m + j % m] =
              scores ? float(e_sum / p.kernel_size) : 0.0f;
        }
      });
    }
  }

  Selection select_blocks(int layer, attention::Mode mode, const Tensor& q,
                          const attention::SparseParams& p, KvCache& cache) override {
    const KvLayout& L = cache.layout();
    const int H = L.n_kv_heads, d = L.head_dim, m = L.keys_per_block;
    const int hq = int(q.dim(1)), group = hq / H;
    const int64_t T = step_->n_tokens();
    int k_max = 1;
    for (int64_t t = 0; t < T; ++t)
      k_max = std::max(k_max, int(ref::selected_count(mode, step_->positions[t], p)));
    Selection sel;
    sel.k_max = k_max;
    sel.blocks = Tensor::empty_host(DType::i32, {T, H, k_max});
    std::fill_n(sel.blocks.data<int32_t>(), sel.blocks.numel(), -1);
    for (const StepSequence& s : step_->seqs) {
      // The sequence's compressed keys and window scores, contiguous per head.
      const int64_t n_c = ref::compressed_count(s.n_past + s.n_new - 1, p);
      std::vector<float> ck(size_t(H) * n_c * d), e(size_t(H) * n_c);
      for (int h = 0; h < H; ++h)
        for (int64_t j = 0; j < n_c; ++j) {
          const int64_t home = L.chunk(s.blocks->at(j / m), layer, h);
          std::memcpy(&ck[(h * n_c + j) * d], cache.ck().data<float>() + (home * m + j % m) * d,
                      d * 4);
          e[h * n_c + j] = cache.ck_scores().data<float>()[home * m + j % m];
        }
      ThreadPool::global().parallel_for(s.n_new * H, [&](int64_t b, int64_t end) {
        for (int64_t item = b; item < end; ++item) {
          const int64_t t = s.token_begin + item / H;
          const int h = int(item % H);
          auto chosen = ref::select_blocks(mode, q.data<float>() + (t * hq + h * group) * d,
                                           group, d, &ck[h * n_c * d], &e[h * n_c],
                                           step_->positions[t], p);
          std::copy(chosen.begin(), chosen.end(),
                    sel.blocks.data<int32_t>() + (t * H + h) * k_max);
        }
      });
    }
    return sel;
  }

  void attend(int layer, const Tensor& q, int q_head_begin, const Selection* selection,
              bool use_bias, KvCache& cache, Tensor& out) override {
    const KvLayout& L = cache.layout();
    const int H = L.n_kv_heads, d = L.head_dim, bs = L.block_size;
    const int hq_all = int(q.dim(1)), group = hq_all / H, hq = int(out.dim(1));
    const int64_t T = step_->n_tokens();
    const float* kv = cache.kv().data<float>();
    const float* bias = cache.bias().data<float>();
    ThreadPool::global().parallel_for(T * hq, [&](int64_t b, int64_t e) {
      std::vector<int32_t> ids;
      std::vector<ref::BlockView> views;
      for (int64_t item = b; item < e; ++item) {
        const int64_t t = item / hq;
        const int h = int(item % hq), g = (q_head_begin + h) / group;
        const StepSequence& s = step_->seqs[step_->token_seq[t]];
        const int64_t pos = step_->positions[t];
        ids.clear();
        if (selection) {
          const int32_t* row = selection->blocks.data<int32_t>() + (t * H + g) * selection->k_max;
          for (int i = 0; i < selection->k_max && row[i] >= 0; ++i) ids.push_back(row[i]);
        } else {
          for (int32_t blk = 0; blk <= pos / bs; ++blk) ids.push_back(blk);
        }
        views.resize(ids.size());
        for (size_t i = 0; i < ids.size(); ++i) {
          const int64_t chunk = slot_of(cache, L.chunk(s.blocks->at(ids[i]), layer, g));
          views[i] = {kv + chunk * 2 * bs * d, kv + (chunk * 2 + 1) * bs * d, bias + chunk * bs};
        }
        ref::attend(q.data<float>() + (t * hq_all + q_head_begin + h) * d, d, views.data(),
                    ids.data(),
                    int(ids.size()), bs, pos, use_bias, out.data<float>() + (t * hq + h) * d);
      }
    });
  }

  void copy_chunks(const std::vector<memory::ChunkCopy>& copies, bool to_device,
                   KvCache& cache) override {
    const KvLayout& L = cache.layout();
    const size_t kv_bytes = L.kv_chunk_bytes(), bias_bytes = L.bias_chunk_bytes();
    char* kv = static_cast<char*>(cache.kv().raw());
    char* bias = static_cast<char*>(cache.bias().raw());
    int32_t* table = cache.slot_table().data<int32_t>();
    for (const auto& c : copies) {
      if (to_device) {
        if (c.evicted >= 0) table[c.evicted] = -1;
        table[c.chunk] = c.slot;
        if (!c.host) continue;  // a chunk never written: nothing to copy
        std::memcpy(kv + c.slot * kv_bytes, c.host, kv_bytes);
        std::memcpy(bias + c.slot * bias_bytes, c.host + kv_bytes, bias_bytes);
      } else {
        std::memcpy(c.host, kv + c.slot * kv_bytes, kv_bytes);
        std::memcpy(c.host + kv_bytes, bias + c.slot * bias_bytes, bias_bytes);
      }
    }
  }

  std::vector<SampledToken> sample(const Tensor& logits,
                                   const std::vector<SamplingParams>& params) override {
    const int64_t n = logits.dim(0), vocab = logits.dim(1);
    NOSA_ASSERT(int64_t(params.size()) == n, "sample: {} rows but {} parameter sets", n,
                params.size());
    std::vector<SampledToken> out(n);
    ThreadPool::global().parallel_for(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        out[i] = sample_row(logits.data<float>() + i * vocab, vocab, params[i]);
    });
    return out;
  }

 private:
  const StepBatch* step_ = nullptr;
  const StepBatch* other_step_ = nullptr;  // the step of the slot not current
  int slot_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace nosa::runtime
