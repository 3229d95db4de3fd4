// Memory-mapped safetensors checkpoints: a single model.safetensors or shards listed in
// model.safetensors.index.json. Tensors are views of the mapping (no copy at open).
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime/core/tensor.h"

namespace nosa::runtime {

// One .safetensors file, mapped read-only. Opening validates the whole header: every bad input
// (truncated file, header past the end, malformed JSON, unknown dtype, offsets that do not match
// the shape or lie outside the data) throws bad_checkpoint naming the file.
class SafetensorsFile {
 public:
  struct Entry {
    DType dtype;
    Shape shape;
    size_t offset = 0;  // from the start of the data section
    size_t bytes = 0;
  };

  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);
  ~SafetensorsFile();

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, Entry>& entries() const { return entries_; }
  // A host tensor viewing the mapping; it keeps the file mapped while alive.
  Tensor tensor(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::filesystem::path path_;
  std::map<std::string, Entry> entries_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const char* data_ = nullptr;
  std::weak_ptr<SafetensorsFile> self_;
};

// All tensors of a model directory.
class Checkpoint {
 public:
  // Opens DIR/model.safetensors.index.json (sharded) or else DIR/model.safetensors, or else the
  // single *.safetensors file in DIR.
  static Checkpoint open(const std::filesystem::path& model_dir);

  bool has(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsFile::Entry& entry(const std::string& name) const;
  // The named tensor; throws bad_checkpoint naming the tensor if it is missing.
  Tensor tensor(const std::string& name) const;
  std::vector<std::string> names() const;

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;
  std::filesystem::path dir_;
};

// One tensor of a file being written: its bytes are produced by a callback, so that large
// checkpoints are written one tensor at a time.
struct TensorSpec {
  std::string name;
  DType dtype;
  Shape shape;
};
using TensorFiller = std::function<void(size_t index, void* bytes)>;

// Writes a .safetensors file atomically (a temporary file renamed): fill(i, buffer) writes the
// bytes of specs[i].
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorSpec>& specs,
                       const TensorFiller& fill,
                       const std::map<std::string, std::string>& metadata = {});

// Writes tensors (host memory) to a .safetensors file, atomically.
void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace nosa::runtime
