// Checkpoint loading: good files in every supported layout and dtype, and a clear error (naming
// the file and the problem) for every bad input.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"
#include "runtime/make_model.h"
#include "runtime/model.h"
#include "runtime/model_config.h"
#include "runtime/safetensors.h"
#include "tests/common/test_util.h"

namespace nosa::runtime {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Copies a model directory so a test can damage it.
fs::path copy_model(const fs::path& from, const test::TempDir& dir) {
  fs::path to = dir / "model";
  fs::copy(from, to, fs::copy_options::recursive);
  return to;
}

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
}

// Loads the model on the CPU and returns the error's message ("" on success).
std::string load_error(const fs::path& dir, std::optional<attention::Mode> mode = {}) {
  auto backend = make_cpu_backend();
  auto comm = parallel::make_single_rank_communicator();
  try {
    LoadOptions o;
    o.mode = mode;
    load_model(dir, o, *backend, *comm);
  } catch (const Error& e) {
    return e.message();
  }
  return "";
}

TEST(Loader, ReadsTheConfigOfARandomCheckpoint) {
  ModelConfig c = ModelConfig::load(test::tiny_model(attention::Mode::nosa));
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.sparse.block_size, 16);
  EXPECT_EQ(c.sparse.topk, 16);
  EXPECT_EQ(c.default_mode, attention::Mode::nosa);
  EXPECT_EQ(c.eos_token_ids, std::vector<int>{2});
}

TEST(Loader, SparseConfigDefaultsFollowNosaMd) {
  json j = {{"hidden_size", 64},     {"intermediate_size", 128}, {"num_hidden_layers", 1},
            {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 10},
            {"sparse_config", json::object()}};
  ModelConfig c = ModelConfig::from_json(j, "x");
  EXPECT_EQ(c.sparse, attention::SparseParams{});
  EXPECT_EQ(c.sparse.q_select(), 33);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.default_mode, attention::Mode::infllmv2);
  j.erase("sparse_config");
  EXPECT_EQ(ModelConfig::from_json(j, "x").default_mode, attention::Mode::dense);
}

TEST(Loader, ParsesRopeScalingAndEosLists) {
  json j = {{"hidden_size", 64},      {"intermediate_size", 128}, {"num_hidden_layers", 1},
            {"num_attention_heads", 4}, {"vocab_size", 10},         {"eos_token_id", {2, 7}},
            {"rope_scaling",
             {{"rope_type", "llama3"},
              {"factor", 8.0},
              {"low_freq_factor", 1.0},
              {"high_freq_factor", 4.0},
              {"original_max_position_embeddings", 8192}}}};
  ModelConfig c = ModelConfig::from_json(j, "x");
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::llama3);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int>{2, 7}));
  RopeTable r = make_rope_table(c);
  // High frequencies are kept, low ones divided by the factor.
  EXPECT_FLOAT_EQ(r.inv_freq[0], 1.0f);
  EXPECT_NEAR(r.inv_freq.back(), 1.0 / std::pow(10000.0, 14.0 / 16.0) / 8.0, 1e-9);
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  EXPECT_FLOAT_EQ(make_rope_table(ModelConfig::from_json(j, "x")).inv_freq[0], 0.5f);
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 2.0}};
  EXPECT_THROW(ModelConfig::from_json(j, "x"), Error);
}

TEST(Loader, LoadsBf16F16AndF32Checkpoints) {
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    test::TempDir dir;
    MakeModelOptions o;
    o.shape = "tiny";
    o.mode = attention::Mode::dense;
    o.dtype = dtype;
    o.out = dir / "m";
    make_model(o);
    Checkpoint ck = Checkpoint::open(o.out);
    EXPECT_EQ(ck.entry("model.norm.weight").dtype, dtype);
    EXPECT_EQ(load_error(o.out), "") << dtype_name(dtype);
  }
}

TEST(Loader, LoadsShardedCheckpointsWithAnIndex) {
  test::TempDir dir;
  fs::path src = test::tiny_model(attention::Mode::nosa);
  fs::path dst = dir / "sharded";
  fs::create_directories(dst);
  fs::copy(src / "config.json", dst / "config.json");
  Checkpoint ck = Checkpoint::open(src);
  std::vector<std::pair<std::string, Tensor>> a, b;
  json map = json::object();
  int i = 0;
  for (auto& name : ck.names()) {
    bool first = i++ % 2 == 0;
    (first ? a : b).emplace_back(name, ck.tensor(name));
    map[name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_safetensors(dst / "model-00001-of-00002.safetensors", a);
  write_safetensors(dst / "model-00002-of-00002.safetensors", b);
  write_text(dst / "model.safetensors.index.json", json{{"weight_map", map}}.dump());
  Checkpoint sharded = Checkpoint::open(dst);
  EXPECT_EQ(sharded.names(), ck.names());
  Tensor x = sharded.tensor("model.layers.1.mlp.up_proj.weight");
  Tensor y = ck.tensor("model.layers.1.mlp.up_proj.weight");
  ASSERT_EQ(x.bytes(), y.bytes());
  EXPECT_EQ(std::memcmp(x.raw(), y.raw(), x.bytes()), 0);
  EXPECT_EQ(load_error(dst), "");

  // An index naming a tensor its shard lacks is an error.
  map["model.extra.weight"] = "model-00001-of-00002.safetensors";
  write_text(dst / "model.safetensors.index.json", json{{"weight_map", map}}.dump());
  EXPECT_THROW(Checkpoint::open(dst), Error);
}

TEST(Loader, MissingDirectoryOrConfigIsAClearError) {
  test::TempDir dir;
  EXPECT_NE(load_error(dir / "nope").find("does not exist"), std::string::npos);
  fs::create_directories(dir / "empty");
  EXPECT_NE(load_error(dir / "empty").find("config.json"), std::string::npos);
}

TEST(Loader, MalformedConfigIsAClearError) {
  test::TempDir dir;
  fs::path m = copy_model(test::tiny_model(attention::Mode::dense), dir);
  write_text(m / "config.json", "{\"hidden_size\": 256,");
  EXPECT_NE(load_error(m).find("malformed JSON"), std::string::npos);

  json j = read_json(test::tiny_model(attention::Mode::dense) / "config.json");
  j.erase("num_hidden_layers");
  write_text(m / "config.json", j.dump());
  EXPECT_NE(load_error(m).find("missing required key 'num_hidden_layers'"), std::string::npos);

  j = read_json(test::tiny_model(attention::Mode::dense) / "config.json");
  j["hidden_size"] = "big";
  write_text(m / "config.json", j.dump());
  EXPECT_NE(load_error(m).find("'hidden_size' has the wrong type"), std::string::npos);

  j = read_json(test::tiny_model(attention::Mode::dense) / "config.json");
  j["num_attention_heads"] = 3;
  write_text(m / "config.json", j.dump());
  EXPECT_NE(load_error(m).find("not a multiple"), std::string::npos);

  j = read_json(test::tiny_model(attention::Mode::dense) / "config.json");
  j["sparse_config"] = {{"block_size", 16}, {"kernel_stride", 5}};
  write_text(m / "config.json", j.dump());
  EXPECT_NE(load_error(m).find("kernel_stride"), std::string::npos);

  j = read_json(test::tiny_model(attention::Mode::dense) / "config.json");
  j["attention_mode"] = "fancy";
  write_text(m / "config.json", j.dump());
  EXPECT_NE(load_error(m).find("unknown attention mode 'fancy'"), std::string::npos);
}

TEST(Loader, TruncatedOrCorruptSafetensorsIsAClearError) {
  test::TempDir dir;
  fs::path m = copy_model(test::tiny_model(attention::Mode::dense), dir);
  fs::path st = m / "model.safetensors";
  const auto size = fs::file_size(st);

  fs::resize_file(st, size - 1000);  // the data section is cut short
  std::string e = load_error(m);
  EXPECT_NE(e.find("model.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("outside"), std::string::npos) << e;

  fs::resize_file(st, 4);  // not even the header length
  EXPECT_NE(load_error(m).find("truncated"), std::string::npos);

  {  // a header length past the end of the file
    std::ofstream out(st, std::ios::binary | std::ios::trunc);
    uint64_t n = 1 << 20;
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << "{}";
  }
  EXPECT_NE(load_error(m).find("corrupt safetensors header"), std::string::npos);

  {  // a header that is not JSON
    std::ofstream out(st, std::ios::binary | std::ios::trunc);
    uint64_t n = 8;
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << "{{{{{{{{";
  }
  EXPECT_NE(load_error(m).find("malformed JSON"), std::string::npos);

  {  // a dtype the format does not have, and offsets that disagree with the shape
    json h = {{"a", {{"dtype", "Q7"}, {"shape", {2}}, {"data_offsets", {0, 8}}}}};
    std::string text = h.dump();
    std::ofstream out(st, std::ios::binary | std::ios::trunc);
    uint64_t n = text.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << text << std::string(8, '\0');
  }
  EXPECT_NE(load_error(m).find("unsupported tensor dtype 'Q7'"), std::string::npos);
  {
    json h = {{"a", {{"dtype", "F32"}, {"shape", {3}}, {"data_offsets", {0, 8}}}}};
    std::string text = h.dump();
    std::ofstream out(st, std::ios::binary | std::ios::trunc);
    uint64_t n = text.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << text << std::string(8, '\0');
  }
  EXPECT_NE(load_error(m).find("needs 12"), std::string::npos);
}

TEST(Loader, MissingTensorOrWrongShapeNamesTheTensor) {
  test::TempDir dir;
  fs::path src = test::tiny_model(attention::Mode::dense);
  fs::path m = copy_model(src, dir);
  Checkpoint ck = Checkpoint::open(src);
  std::vector<std::pair<std::string, Tensor>> kept;
  for (auto& name : ck.names())
    if (name != "model.layers.1.self_attn.k_proj.weight") kept.emplace_back(name, ck.tensor(name));
  write_safetensors(m / "model.safetensors", kept);
  std::string e = load_error(m);
  EXPECT_NE(e.find("missing tensor 'model.layers.1.self_attn.k_proj.weight'"), std::string::npos)
      << e;

  kept.clear();
  Tensor small = Tensor::zeros_host(DType::bf16, {10, 256});
  for (auto& name : ck.names())
    kept.emplace_back(name, name == "model.layers.0.mlp.up_proj.weight" ? small : ck.tensor(name));
  write_safetensors(m / "model.safetensors", kept);
  e = load_error(m);
  EXPECT_NE(e.find("'model.layers.0.mlp.up_proj.weight' has shape [10, 256]"), std::string::npos)
      << e;
}

TEST(Loader, NosaModeNeedsNosaTensors) {
  fs::path dense = test::tiny_model(attention::Mode::dense);
  std::string e = load_error(dense, attention::Mode::nosa);
  EXPECT_NE(e.find("needs the checkpoint's NOSA tensors"), std::string::npos) << e;
  // A NOSA checkpoint also runs in the other modes.
  fs::path nosa = test::tiny_model(attention::Mode::nosa);
  EXPECT_EQ(load_error(nosa, attention::Mode::dense), "");
  EXPECT_EQ(load_error(nosa, attention::Mode::infllmv2), "");
  EXPECT_THROW(attention::parse_mode("sparse"), Error);
}

}  // namespace
}  // namespace nosa::runtime
