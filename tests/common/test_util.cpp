#include "tests/common/test_util.h"

#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>

#include "runtime/make_model.h"

namespace nosa::test {

namespace fs = std::filesystem;

TempDir::TempDir() {
  static int counter = 0;
  path_ = fs::temp_directory_path() /
          fmt::format("nosa-test-{}-{}-{}", ::getpid(), counter++, std::random_device{}());
  fs::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

const fs::path& tiny_model(attention::Mode mode, int layers) {
  static std::mutex mutex;
  static std::map<std::pair<attention::Mode, int>, std::unique_ptr<TempDir>> dirs;
  static std::map<std::pair<attention::Mode, int>, fs::path> paths;
  std::lock_guard lock(mutex);
  const auto key = std::make_pair(mode, layers);
  auto it = paths.find(key);
  if (it != paths.end()) return it->second;
  auto dir = std::make_unique<TempDir>();
  runtime::MakeModelOptions o;
  o.shape = "tiny";
  o.mode = mode;
  o.seed = 7;
  o.layers = layers;
  o.out = dir->path() / "model";
  runtime::make_model(o);
  paths[key] = o.out;
  dirs[key] = std::move(dir);
  return paths[key];
}

std::string nosa_binary() { return NOSA_BINARY; }

CommandResult run_command(const std::string& command) {
  TempDir dir;
  fs::path out = dir / "stdout", err = dir / "stderr";
  std::string full = fmt::format("{} >{} 2>{}", command, out.string(), err.string());
  int status = std::system(full.c_str());
  CommandResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  auto slurp = [](const fs::path& p) {
    std::ifstream in(p);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

std::vector<float> random_floats(size_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

}  // namespace nosa::test
