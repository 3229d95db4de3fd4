#include "runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"

namespace nosa::runtime {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {
constexpr uint64_t k_max_header_bytes = 100ull << 20;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  const std::string name = path.string();
  int fd = ::open(name.c_str(), O_RDONLY | O_CLOEXEC);
  NOSA_CHECK_CODE(fd >= 0, ErrorCode::bad_checkpoint, "{}: cannot open: {}", name,
                  std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    NOSA_FAIL(ErrorCode::bad_checkpoint, "{}: cannot stat: {}", name, std::strerror(errno));
  }
  const size_t file_bytes = size_t(st.st_size);
  if (file_bytes < 8) {
    ::close(fd);
    NOSA_FAIL(ErrorCode::bad_checkpoint,
              "{}: truncated safetensors file ({} bytes, less than the 8-byte header length)",
              name, file_bytes);
  }
  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  NOSA_CHECK_CODE(map != MAP_FAILED, ErrorCode::bad_checkpoint, "{}: cannot map: {}", name,
                  std::strerror(errno));

  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_bytes_ = file_bytes;
  file->self_ = file;

  const char* base = static_cast<const char*>(map);
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, base, 8);  // little-endian, as the format says (x86 / arm64)
  NOSA_CHECK_CODE(header_bytes <= k_max_header_bytes && header_bytes <= file_bytes - 8,
                  ErrorCode::bad_checkpoint,
                  "{}: corrupt safetensors header: it claims {} bytes but the file has {} after "
                  "the length",
                  name, header_bytes, file_bytes - 8);
  json header;
  try {
    header = json::parse(base + 8, base + 8 + header_bytes);
  } catch (const json::exception& e) {
    NOSA_FAIL(ErrorCode::bad_checkpoint, "{}: corrupt safetensors header (malformed JSON): {}",
              name, e.what());
  }
  NOSA_CHECK_CODE(header.is_object(), ErrorCode::bad_checkpoint,
                  "{}: corrupt safetensors header (not a JSON object)", name);
  file->data_ = base + 8 + header_bytes;
  const size_t data_bytes = file_bytes - 8 - header_bytes;

  for (auto& [key, value] : header.items()) {
    if (key == "__metadata__") continue;
    auto bad = [&](const std::string& why) {
      NOSA_FAIL(ErrorCode::bad_checkpoint, "{}: tensor '{}': {}", name, key, why);
    };
    if (!value.is_object() || !value.contains("dtype") || !value.contains("shape") ||
        !value.contains("data_offsets"))
      bad("entry needs dtype, shape and data_offsets");
    if (!value["dtype"].is_string()) bad("dtype is not a string");
    Entry e;
    e.dtype = dtype_from_safetensors(value["dtype"].get<std::string>());
    auto& shape = value["shape"];
    if (!shape.is_array()) bad("shape is not a list");
    for (auto& d : shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) bad("shape has a non-integer entry");
      e.shape.push_back(d.get<int64_t>());
    }
    auto& off = value["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      bad("data_offsets must be two non-negative integers");
    uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_bytes)
      bad(fmt::format("data [{}, {}) lies outside the {} data bytes (truncated file?)", begin, end,
                      data_bytes));
    e.offset = begin;
    e.bytes = end - begin;
    uint64_t expect = uint64_t(shape_numel(e.shape)) * dtype_size(e.dtype);
    if (e.bytes != expect)
      bad(fmt::format("has {} bytes but shape {} of {} needs {}", e.bytes, shape_string(e.shape),
                      dtype_name(e.dtype), expect));
    file->entries_.emplace(key, std::move(e));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_bytes_);
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = entries_.find(name);
  NOSA_CHECK_CODE(it != entries_.end(), ErrorCode::bad_checkpoint, "{}: no tensor '{}'",
                  path_.string(), name);
  auto keep = self_.lock();
  return Tensor(std::static_pointer_cast<void>(keep),
                const_cast<char*>(data_) + it->second.offset, it->second.dtype, it->second.shape,
                Device::cpu);
}

Checkpoint Checkpoint::open(const fs::path& dir) {
  NOSA_CHECK_CODE(fs::is_directory(dir), ErrorCode::bad_checkpoint,
                  "model directory '{}' does not exist", dir.string());
  Checkpoint ckpt;
  ckpt.dir_ = dir;
  fs::path index = dir / "model.safetensors.index.json";
  std::vector<fs::path> shards;
  if (fs::exists(index)) {
    std::ifstream in(index);
    json j;
    try {
      in >> j;
    } catch (const json::exception& e) {
      NOSA_FAIL(ErrorCode::bad_checkpoint, "{}: malformed JSON: {}", index.string(), e.what());
    }
    NOSA_CHECK_CODE(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
                    ErrorCode::bad_checkpoint, "{}: no weight_map object", index.string());
    std::map<std::string, size_t> shard_ids;
    std::map<std::string, std::string> wanted;
    for (auto& [tensor, shard] : j["weight_map"].items()) {
      NOSA_CHECK_CODE(shard.is_string(), ErrorCode::bad_checkpoint,
                      "{}: weight_map['{}'] is not a file name", index.string(), tensor);
      wanted[tensor] = shard.get<std::string>();
      if (!shard_ids.count(wanted[tensor])) {
        shard_ids[wanted[tensor]] = shards.size();
        shards.push_back(dir / wanted[tensor]);
      }
    }
    for (auto& p : shards) ckpt.files_.push_back(SafetensorsFile::open(p));
    for (auto& [tensor, shard] : wanted) {
      size_t id = shard_ids[shard];
      NOSA_CHECK_CODE(ckpt.files_[id]->entries().count(tensor), ErrorCode::bad_checkpoint,
                      "{}: lists tensor '{}' in {}, which does not contain it", index.string(),
                      tensor, shard);
      ckpt.where_[tensor] = id;
    }
    return ckpt;
  }
  fs::path single = dir / "model.safetensors";
  if (!fs::exists(single)) {
    std::vector<fs::path> found;
    for (auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".safetensors") found.push_back(e.path());
    NOSA_CHECK_CODE(found.size() == 1, ErrorCode::bad_checkpoint,
                    "{}: expected model.safetensors, model.safetensors.index.json or a single "
                    "*.safetensors file; found {} .safetensors files",
                    dir.string(), found.size());
    single = found[0];
  }
  ckpt.files_.push_back(SafetensorsFile::open(single));
  for (auto& [name, e] : ckpt.files_[0]->entries()) ckpt.where_[name] = 0;
  return ckpt;
}

const SafetensorsFile::Entry& Checkpoint::entry(const std::string& name) const {
  auto it = where_.find(name);
  NOSA_CHECK_CODE(it != where_.end(), ErrorCode::bad_checkpoint,
                  "{}: missing tensor '{}' in the checkpoint", dir_.string(), name);
  return files_[it->second]->entries().at(name);
}

Tensor Checkpoint::tensor(const std::string& name) const {
  auto it = where_.find(name);
  NOSA_CHECK_CODE(it != where_.end(), ErrorCode::bad_checkpoint,
                  "{}: missing tensor '{}' in the checkpoint", dir_.string(), name);
  return files_[it->second]->tensor(name);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (auto& [name, id] : where_) out.push_back(name);
  return out;
}

void write_safetensors(const fs::path& path, const std::vector<TensorSpec>& specs,
                       const TensorFiller& fill,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0, largest = 0;
  for (auto& spec : specs) {
    size_t bytes = size_t(shape_numel(spec.shape)) * dtype_size(spec.dtype);
    header[spec.name] = {{"dtype", dtype_to_safetensors(spec.dtype)},
                         {"shape", spec.shape},
                         {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    largest = std::max(largest, bytes);
  }
  std::string text = header.dump();
  // Pad the header with spaces so the data section starts 8-byte aligned.
  while ((8 + text.size()) % 8) text.push_back(' ');
  fs::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    NOSA_CHECK_CODE(out.good(), ErrorCode::io, "{}: cannot create", tmp.string());
    uint64_t n = text.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(text.data(), std::streamsize(text.size()));
    std::vector<char> buffer(largest);
    for (size_t i = 0; i < specs.size(); ++i) {
      size_t bytes = size_t(shape_numel(specs[i].shape)) * dtype_size(specs[i].dtype);
      fill(i, buffer.data());
      out.write(buffer.data(), std::streamsize(bytes));
      NOSA_CHECK_CODE(out.good(), ErrorCode::io, "{}: write failed (disk full?)", tmp.string());
    }
    out.flush();
    NOSA_CHECK_CODE(out.good(), ErrorCode::io, "{}: write failed (disk full?)", tmp.string());
  }
  fs::rename(tmp, path);
}

void write_safetensors(const fs::path& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  for (auto& [name, t] : tensors) {
    NOSA_CHECK(t.device() == Device::cpu, "write_safetensors: tensor '{}' is not on the host",
               name);
    specs.push_back({name, t.dtype(), t.shape()});
  }
  write_safetensors(
      path, specs,
      [&](size_t i, void* bytes) {
        std::memcpy(bytes, tensors[i].second.raw(), tensors[i].second.bytes());
      },
      metadata);
}

}  // namespace nosa::runtime
