#include "launcher/bench/gpu_clocks.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>

namespace nosa::launcher::bench {

namespace {

// The few NVML entry points used, as the driver exports them (nvml.h: nvmlReturn_t is an int,
// 0 on success; nvmlDevice_t an opaque pointer).
struct Nvml {
  using Device = void*;
  int (*get_handle)(const char*, Device*) = nullptr;
  int (*clock)(Device, int, unsigned*) = nullptr;
  int (*power)(Device, unsigned*) = nullptr;
  int (*reasons)(Device, unsigned long long*) = nullptr;
  bool ok = false;
};

constexpr int k_nvml_clock_sm = 1;
// Clock event reasons: the software power cap and the hardware power brake.
constexpr unsigned long long k_power_reasons = 0x4ull | 0x80ull;

// Loaded and initialized once per process; never shut down (the samplers of a run share it).
const Nvml& nvml() {
  static const Nvml n = [] {
    Nvml r;
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return r;
    auto init = reinterpret_cast<int (*)()>(dlsym(lib, "nvmlInit_v2"));
    r.get_handle =
        reinterpret_cast<decltype(r.get_handle)>(dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2"));
    r.clock = reinterpret_cast<decltype(r.clock)>(dlsym(lib, "nvmlDeviceGetClockInfo"));
    r.power = reinterpret_cast<decltype(r.power)>(dlsym(lib, "nvmlDeviceGetPowerUsage"));
    r.reasons =
        reinterpret_cast<decltype(r.reasons)>(dlsym(lib, "nvmlDeviceGetCurrentClocksEventReasons"));
    if (!r.reasons)
      r.reasons = reinterpret_cast<decltype(r.reasons)>(
          dlsym(lib, "nvmlDeviceGetCurrentClocksThrottleReasons"));
    r.ok = init && r.get_handle && r.clock && r.power && init() == 0;
    return r;
  }();
  return n;
}

}  // namespace

std::optional<GpuClockStats> summarize_gpu_samples(const std::vector<GpuSample>& samples) {
  if (samples.empty()) return std::nullopt;
  GpuClockStats s;
  s.samples = int(samples.size());
  s.sm_mhz_min = samples.front().sm_mhz;
  int capped = 0;
  for (const GpuSample& x : samples) {
    s.sm_mhz_mean += x.sm_mhz;
    s.sm_mhz_min = std::min(s.sm_mhz_min, x.sm_mhz);
    s.power_w_mean += x.power_w;
    capped += x.power_capped ? 1 : 0;
  }
  const double n = double(samples.size());
  s.sm_mhz_mean /= n;
  s.power_w_mean /= n;
  s.power_capped_share = double(capped) / n;
  return s;
}

void add_gpu_clock_stats(const GpuClockStats& s, nlohmann::json& row) {
  row["gpu_clock_samples"] = s.samples;
  row["gpu_sm_mhz_mean"] = s.sm_mhz_mean;
  row["gpu_sm_mhz_min"] = s.sm_mhz_min;
  row["gpu_power_w_mean"] = s.power_w_mean;
  row["gpu_power_capped_share"] = s.power_capped_share;
}

GpuSampler::GpuSampler(const std::string& pci_bus_id, int period_ms)
    : period_ms_(std::max(1, period_ms)) {
  const Nvml& n = nvml();
  Nvml::Device d = nullptr;
  if (!pci_bus_id.empty() && n.ok && n.get_handle(pci_bus_id.c_str(), &d) == 0) device_ = d;
}

GpuSampler::~GpuSampler() { stop(); }

void GpuSampler::start() {
  stop();
  samples_.clear();
  if (!device_) return;
  running_ = true;
  thread_ = std::thread([this] {
    const Nvml& n = nvml();
    while (running_) {
      unsigned mhz = 0, mw = 0;
      unsigned long long why = 0;
      if (n.clock(device_, k_nvml_clock_sm, &mhz) == 0 && n.power(device_, &mw) == 0) {
        GpuSample x;
        x.sm_mhz = mhz;
        x.power_w = mw / 1000.0;
        x.power_capped = n.reasons && n.reasons(device_, &why) == 0 && (why & k_power_reasons);
        std::lock_guard<std::mutex> lock(mutex_);
        samples_.push_back(x);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(period_ms_));
    }
  });
}

std::optional<GpuClockStats> GpuSampler::stop() {
  if (thread_.joinable()) {
    running_ = false;
    thread_.join();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return summarize_gpu_samples(samples_);
}

}  // namespace nosa::launcher::bench
