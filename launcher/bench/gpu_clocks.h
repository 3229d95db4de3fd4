// The GPU's clocks and power during a benchmark's timed region, sampled through NVML (the
// driver's management library, opened at run time: no build dependency; where it or the device
// is missing nothing is sampled). A speed-up that falls short of its kernels' can then be read
// against the clocks it ran at: a GPU at its power cap lowers its clocks under heavy GEMMs.
#pragma once

#include <atomic>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace nosa::launcher::bench {

struct GpuSample {
  double sm_mhz = 0;          // SM clock
  double power_w = 0;         // board power
  bool power_capped = false;  // clocks held down by the power cap (software or hardware)
};

struct GpuClockStats {
  int samples = 0;
  double sm_mhz_mean = 0, sm_mhz_min = 0;
  double power_w_mean = 0;
  double power_capped_share = 0;  // of the samples
};

// None for no samples.
std::optional<GpuClockStats> summarize_gpu_samples(const std::vector<GpuSample>& samples);

// Adds the statistics to a result row: gpu_clock_samples, gpu_sm_mhz_mean, gpu_sm_mhz_min,
// gpu_power_w_mean, gpu_power_capped_share.
void add_gpu_clock_stats(const GpuClockStats& s, nlohmann::json& row);

// Samples the GPU whose PCI bus id is given (Backend::pci_bus_id(); empty: none) every
// period_ms on a thread of its own between start() and stop().
class GpuSampler {
 public:
  explicit GpuSampler(const std::string& pci_bus_id, int period_ms = 20);
  ~GpuSampler();
  GpuSampler(const GpuSampler&) = delete;
  GpuSampler& operator=(const GpuSampler&) = delete;

  // Whether NVML answered for the device.
  bool available() const { return device_ != nullptr; }
  void start();
  // Stops sampling; the statistics of the samples since start(), if any.
  std::optional<GpuClockStats> stop();

 private:
  void* device_ = nullptr;  // nvmlDevice_t
  int period_ms_;
  std::atomic<bool> running_{false};
  std::thread thread_;
  std::mutex mutex_;
  std::vector<GpuSample> samples_;
};

}  // namespace nosa::launcher::bench
