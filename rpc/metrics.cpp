#include "rpc/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace nosa::rpc {

std::vector<double> step_latency_bounds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

std::vector<double> request_latency_bounds() {
  return {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
}

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double value) {
  std::lock_guard lock(mutex_);
  const size_t i =
      size_t(std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  ++counts_[i];
  ++count_;
  sum_ += value;
}

pb::Histogram Histogram::snapshot() const {
  std::lock_guard lock(mutex_);
  pb::Histogram h;
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    h.add_bounds(bounds_[i]);
    h.add_counts(cumulative);
  }
  h.set_count(count_);
  h.set_sum(sum_);
  return h;
}

namespace {
std::string escape(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out.push_back('\\');
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out.push_back(c);
  }
  return out;
}

std::string labels_text(const Labels& labels) {
  if (labels.empty()) return {};
  std::string out = "{";
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i) out += ",";
    out += labels[i].first + "=\"" + escape(labels[i].second) + "\"";
  }
  return out + "}";
}

std::string number(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return fmt::format("{}", int64_t(v));
  return fmt::format("{}", v);
}
}  // namespace

void PrometheusWriter::family(const std::string& name, const std::string& type,
                              const std::string& help) {
  if (families_.count(name)) return;
  order_.push_back(name);
  families_[name] = Family{type, help, {}};
}

void PrometheusWriter::sample(const std::string& name, const Labels& labels, double value) {
  families_[name].lines.push_back(name + labels_text(labels) + " " + number(value));
}

void PrometheusWriter::histogram(const std::string& name, const Labels& labels,
                                 const pb::Histogram& h) {
  auto& lines = families_[name].lines;
  for (int i = 0; i < h.bounds_size(); ++i) {
    Labels l = labels;
    l.emplace_back("le", number(h.bounds(i)));
    lines.push_back(name + "_bucket" + labels_text(l) + " " + number(double(h.counts(i))));
  }
  Labels l = labels;
  l.emplace_back("le", "+Inf");
  lines.push_back(name + "_bucket" + labels_text(l) + " " + number(double(h.count())));
  lines.push_back(name + "_sum" + labels_text(labels) + " " + number(h.sum()));
  lines.push_back(name + "_count" + labels_text(labels) + " " + number(double(h.count())));
}

std::string PrometheusWriter::text() const {
  std::string out;
  for (const auto& name : order_) {
    const Family& f = families_.at(name);
    out += "# HELP " + name + " " + f.help + "\n";
    out += "# TYPE " + name + " " + f.type + "\n";
    for (const auto& line : f.lines) out += line + "\n";
  }
  return out;
}

}  // namespace nosa::rpc
