// Helpers shared by the tests: temporary directories, tiny random checkpoints, running the
// `nosa` binary.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "attention/sparse_params.h"

namespace nosa::test {

// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// A tiny random checkpoint of the given mode (and layer count, when > 0), made once per test
// process and reused.
const std::filesystem::path& tiny_model(attention::Mode mode, int layers = 0);

// The path of the built `nosa` binary.
std::string nosa_binary();

struct CommandResult {
  int exit_code = 0;
  std::string out;  // stdout
  std::string err;  // stderr
};
// Runs a shell command and captures its output.
CommandResult run_command(const std::string& command);

// Deterministic pseudo-random floats in [-scale, scale).
std::vector<float> random_floats(size_t n, uint64_t seed, float scale = 1.0f);

}  // namespace nosa::test
