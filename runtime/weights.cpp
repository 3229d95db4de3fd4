#include "runtime/weights.h"

#include <cstring>

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::runtime {

namespace {

// A rectangle [row0, row0 + rows) x [col0, col0 + cols) of a 2-D host tensor.
struct Part {
  Tensor src;
  int64_t row0, rows, col0, cols;
};

class Loader {
 public:
  Loader(const Checkpoint& ckpt, Backend& backend) : ckpt_(ckpt), backend_(backend) {}

  // The named tensor, checked against the expected shape.
  Tensor get(const std::string& name, const Shape& shape) {
    Tensor t = ckpt_.tensor(name);
    NOSA_CHECK_CODE(t.shape() == shape, ErrorCode::bad_checkpoint,
                    "tensor '{}' has shape {} but the config implies {}", name,
                    shape_string(t.shape()), shape_string(shape));
    NOSA_CHECK_CODE(t.dtype() == DType::f32 || t.dtype() == DType::f16 || t.dtype() == DType::bf16,
                    ErrorCode::bad_checkpoint, "tensor '{}' has dtype {}; expected a float type",
                    name, dtype_name(t.dtype()));
    return t;
  }

  // Concatenates row ranges of 2-D (or 1-D, cols = 1) tensors into one host tensor, keeping the
  // common dtype (float32 when they differ), and uploads it.
  Tensor assemble(const std::vector<Part>& parts, DType target) {
    int64_t rows = 0;
    DType dtype = parts.at(0).src.dtype();
    for (auto& p : parts) {
      rows += p.rows;
      NOSA_ASSERT(p.cols == parts[0].cols, "assemble: column counts differ");
      if (p.src.dtype() != dtype) dtype = DType::f32;
    }
    const int64_t cols = parts[0].cols;
    const size_t es = dtype_size(dtype);
    Tensor host = Tensor::empty_host(dtype, cols == 1 && parts[0].src.rank() == 1
                                               ? Shape{rows}
                                               : Shape{rows, cols});
    char* dst = static_cast<char*>(host.raw());
    for (auto& p : parts) {
      const int64_t src_cols = p.src.rank() == 1 ? 1 : p.src.dim(1);
      const size_t src_es = dtype_size(p.src.dtype());
      for (int64_t r = 0; r < p.rows; ++r) {
        const char* src =
            static_cast<const char*>(p.src.raw()) + ((p.row0 + r) * src_cols + p.col0) * src_es;
        if (p.src.dtype() == dtype) {
          std::memcpy(dst, src, size_t(p.cols) * es);
        } else {
          convert_to_f32(src, p.src.dtype(), reinterpret_cast<float*>(dst), size_t(p.cols));
        }
        dst += p.cols * es;
      }
    }
    return backend_.upload(host, target);
  }

  Tensor whole(const std::string& name, const Shape& shape, DType target) {
    Tensor t = get(name, shape);
    return backend_.upload(t, target);
  }

 private:
  const Checkpoint& ckpt_;
  Backend& backend_;
};

Part rows_of(const Tensor& t, int64_t row0, int64_t rows) {
  return {t, row0, rows, 0, t.rank() == 1 ? 1 : t.dim(1)};
}

}  // namespace

bool has_nosa_tensors(const Checkpoint& ckpt, const ModelConfig& config) {
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    std::string p = fmt::format("model.layers.{}.self_attn.", l);
    if (!ckpt.has(p + "A") || !ckpt.has(p + "delta.weight")) return false;
  }
  return true;
}

ModelWeights load_weights(const Checkpoint& ckpt, const ModelConfig& c,
                          const parallel::Partition& part, bool load_nosa, Backend& backend) {
  Loader ld(ckpt, backend);
  const DType act = backend.activation_dtype();
  const int64_t H = c.hidden_size, d = c.head_dim, V = c.vocab_size, F = c.intermediate_size;
  const int64_t nq = c.num_attention_heads, nkv = c.num_key_value_heads;
  ModelWeights w;
  w.embed = ld.whole("model.embed_tokens.weight", {V, H}, act);
  w.final_norm = ld.whole("model.norm.weight", {H}, act);
  if (part.rank == 0) {
    if (c.tie_word_embeddings || !ckpt.has("lm_head.weight")) {
      NOSA_CHECK_CODE(c.tie_word_embeddings, ErrorCode::bad_checkpoint,
                      "missing tensor 'lm_head.weight' (and tie_word_embeddings is false)");
      w.lm_head = w.embed;
    } else {
      w.lm_head = ld.whole("lm_head.weight", {V, H}, act);
    }
  }
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    LayerWeights L;
    L.attn_norm = ld.whole(p + "input_layernorm.weight", {H}, act);
    L.mlp_norm = ld.whole(p + "post_attention_layernorm.weight", {H}, act);
    Tensor q = ld.get(p + "self_attn.q_proj.weight", {nq * d, H});
    Tensor k = ld.get(p + "self_attn.k_proj.weight", {nkv * d, H});
    Tensor v = ld.get(p + "self_attn.v_proj.weight", {nkv * d, H});
    L.qkv = ld.assemble({rows_of(q, part.group_q_begin * d, part.group_q_count * d),
                         rows_of(k, part.kv_begin * d, part.kv_count * d), rows_of(v, 0, nkv * d)},
                        act);
    if (c.attention_bias) {
      Tensor qb = ld.get(p + "self_attn.q_proj.bias", {nq * d});
      Tensor kb = ld.get(p + "self_attn.k_proj.bias", {nkv * d});
      Tensor vb = ld.get(p + "self_attn.v_proj.bias", {nkv * d});
      L.qkv_bias = ld.assemble({rows_of(qb, part.group_q_begin * d, part.group_q_count * d),
                                rows_of(kb, part.kv_begin * d, part.kv_count * d),
                                rows_of(vb, 0, nkv * d)},
                               act);
    }
    Tensor o = ld.get(p + "self_attn.o_proj.weight", {H, nq * d});
    L.o_proj = ld.assemble({{o, 0, H, part.q_begin * d, part.q_count * d}}, act);
    if (c.attention_bias && part.rank == 0 && ckpt.has(p + "self_attn.o_proj.bias"))
      L.o_bias = ld.whole(p + "self_attn.o_proj.bias", {H}, act);

    Tensor gate = ld.get(p + "mlp.gate_proj.weight", {F, H});
    Tensor up = ld.get(p + "mlp.up_proj.weight", {F, H});
    L.gate_up = ld.assemble({rows_of(gate, part.ffn_begin, part.ffn_count),
                             rows_of(up, part.ffn_begin, part.ffn_count)},
                            act);
    Tensor down = ld.get(p + "mlp.down_proj.weight", {H, F});
    L.down = ld.assemble({{down, 0, H, part.ffn_begin, part.ffn_count}}, act);
    if (c.mlp_bias) {
      Tensor gb = ld.get(p + "mlp.gate_proj.bias", {F});
      Tensor ub = ld.get(p + "mlp.up_proj.bias", {F});
      L.gate_up_bias = ld.assemble({rows_of(gb, part.ffn_begin, part.ffn_count),
                                    rows_of(ub, part.ffn_begin, part.ffn_count)},
                                   act);
      if (part.rank == 0) L.down_bias = ld.whole(p + "mlp.down_proj.bias", {H}, act);
    }
    if (load_nosa) {
      // The eviction score is computed in float32 (docs/nosa.md).
      L.nosa_a = ld.whole(p + "self_attn.A", {nkv}, DType::f32);
      L.nosa_delta_w = ld.whole(p + "self_attn.delta.weight", {nkv, nkv * d}, DType::f32);
      if (ckpt.has(p + "self_attn.delta.bias"))
        L.nosa_delta_b = ld.whole(p + "self_attn.delta.bias", {nkv}, DType::f32);
    }
    w.layers.push_back(std::move(L));
  }
  return w;
}

}  // namespace nosa::runtime
