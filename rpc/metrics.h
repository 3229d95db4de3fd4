// Metrics of the service in Prometheus' text format (version 0.0.4): cumulative histograms with
// fixed bounds, and a writer that groups samples by family with HELP and TYPE lines.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "nosa_rpc.pb.h"

namespace nosa::rpc {

// Bounds in seconds for step latencies (1 ms .. 10 s) and request latencies (10 ms .. 300 s).
std::vector<double> step_latency_bounds();
std::vector<double> request_latency_bounds();

// A histogram with fixed upper bounds (an implicit +Inf bucket on top). Thread-safe.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double value);
  // A consistent copy (cumulative counts per bound, count, sum) for the wire and for printing.
  pb::Histogram snapshot() const;

 private:
  mutable std::mutex mutex_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative; last is +Inf
  uint64_t count_ = 0;
  double sum_ = 0;
};

// Labels as written: {a="x",b="y"} (values escaped).
using Labels = std::vector<std::pair<std::string, std::string>>;

// Collects samples and writes them family by family.
class PrometheusWriter {
 public:
  // type: counter, gauge or histogram. Families keep the order of their first use.
  void family(const std::string& name, const std::string& type, const std::string& help);
  void sample(const std::string& name, const Labels& labels, double value);
  void histogram(const std::string& name, const Labels& labels, const pb::Histogram& h);
  std::string text() const;

 private:
  struct Family {
    std::string type, help;
    std::vector<std::string> lines;
  };
  std::vector<std::string> order_;
  std::map<std::string, Family> families_;
};

}  // namespace nosa::rpc
