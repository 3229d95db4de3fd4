#include "launcher/bench/report.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "runtime/core/error.h"

namespace nosa::launcher::bench {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ---- row fields ---------------------------------------------------------------------------------

std::optional<double> num(const json& r, const char* key) {
  auto it = r.find(key);
  if (it == r.end() || !it->is_number()) return std::nullopt;
  return it->get<double>();
}
double num_or(const json& r, const char* key, double def) { return num(r, key).value_or(def); }
std::string str(const json& r, const char* key, const std::string& def = "") {
  auto it = r.find(key);
  return it != r.end() && it->is_string() ? it->get<std::string>() : def;
}
std::string suite(const json& r) { return str(r, "suite"); }
std::string mode(const json& r) { return str(r, "mode"); }
std::string shape(const json& r) { return str(r, "shape"); }
std::string offload(const json& r) { return str(r, "offload", "none"); }
int64_t batch(const json& r) { return int64_t(num_or(r, "batch", 0)); }
int64_t context(const json& r) { return int64_t(num_or(r, "context", 0)); }
int tp(const json& r) { return int(num_or(r, "tp", 1)); }
bool controlled(const json& r) { return num(r, "controlled_miss_rate").has_value(); }
bool measured(const json& r) { return !r.contains("skipped") && num(r, "tokens_per_s"); }
double tok_s(const json& r) { return num_or(r, "tokens_per_s", 0); }
bool is_peer(const json& r) { return mode(r) == "transformers"; }
bool offloaded(const json& r) { return offload(r) != "none"; }

// "nosa", "nosa host", "infllmv2 host+disk", "transformers".
std::string label(const json& r) { return offloaded(r) ? mode(r) + " " + offload(r) : mode(r); }
std::string tp_suffix(const json& r) { return tp(r) > 1 ? fmt::format(" TP={}", tp(r)) : ""; }
std::string bc(const json& r) {
  return fmt::format("B={} C={}", batch(r), tick_label(double(context(r))));
}

std::string fixed(double v) {
  const double a = std::fabs(v);
  return a >= 100  ? fmt::format("{:.0f}", v)
         : a >= 10 ? fmt::format("{:.1f}", v)
                   : fmt::format("{:.2f}", v);
}

std::string opt_fixed(const json& r, const char* key) {
  auto v = num(r, key);
  return v ? fixed(*v) : "-";
}

// ---- loading ------------------------------------------------------------------------------------

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  NOSA_CHECK_CODE(in.good(), ErrorCode::io, "cannot read {}", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

std::string describe_machine(const json& m) {
  if (!m.is_object()) return m.is_string() ? m.get<std::string>() : "unknown";
  std::vector<std::string> parts;
  if (m.contains("gpu")) parts.push_back(str(m, "gpu"));
  if (m.contains("backend")) parts.push_back(str(m, "backend"));
  if (auto t = num(m, "cpu_threads")) parts.push_back(fmt::format("{} CPU threads", int(*t)));
  if (parts.empty()) parts.push_back("host " + str(m, "hostname", "unknown"));
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? ", " : "") + parts[i];
  return out;
}

struct Spec {
  std::string path;
  std::map<std::string, std::string> keys;
};

Spec parse_spec(const std::string& spec) {
  Spec s;
  const size_t q = spec.find('?');
  s.path = spec.substr(0, q);
  if (q == std::string::npos) return s;
  std::stringstream ss(spec.substr(q + 1));
  for (std::string kv; std::getline(ss, kv, '&');) {
    const size_t eq = kv.find('=');
    NOSA_CHECK(eq != std::string::npos, "bad results spec '{}': '{}' is not key=value", spec, kv);
    const std::string key = kv.substr(0, eq);
    NOSA_CHECK(key == "run" || key == "commit" || key == "machine" || key == "commands" ||
                   key == "command",
               "bad results spec '{}': unknown key '{}' (run, commit, machine, command, commands)",
               spec, key);
    s.keys[key] = kv.substr(eq + 1);
  }
  return s;
}

// The commands of a log's runs that produced results, in order (see load_results).
std::vector<std::string> commands_of_log(const std::string& path) {
  std::vector<std::string> lines;
  {
    std::stringstream ss(slurp(path));
    for (std::string l; std::getline(ss, l);) lines.push_back(l);
  }
  std::vector<std::string> out;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].rfind("$ nosa bench", 0) != 0) continue;
    size_t j = i + 1;
    while (j < lines.size() && lines[j].find_first_not_of(" \t") == std::string::npos) ++j;
    if (j < lines.size() && lines[j].find("FAILED") != std::string::npos) continue;
    std::string cmd = lines[i].substr(2);
    while (!cmd.empty() && cmd.back() == ' ') cmd.pop_back();
    int ranks = 1;
    if (!cmd.empty() && cmd.back() == ')') {
      const size_t open = cmd.rfind('(');
      if (open != std::string::npos) {
        ranks = std::atoi(cmd.c_str() + open + 1);
        cmd = cmd.substr(0, open);
        while (!cmd.empty() && cmd.back() == ' ') cmd.pop_back();
      }
    }
    out.push_back(ranks > 1 ? fmt::format("mpirun -np {} {}", ranks, cmd) : cmd);
  }
  return out;
}

// The value of "--flag V" in a command line, or "".
std::string flag_value(const std::string& cmd, const std::string& flag) {
  const size_t p = cmd.find(flag + " ");
  if (p == std::string::npos) return "";
  const size_t b = p + flag.size() + 1, e = cmd.find(' ', b);
  return cmd.substr(b, e == std::string::npos ? std::string::npos : e - b);
}

bool is_sdpa(const json& r) { return mode(r).rfind("sdpa", 0) == 0; }

json peer_rows(const json& peer_result) {
  const json& r = peer_result;
  json out = json::array();
  if (is_sdpa(r)) {  // scripts/bench_sdpa.py: attention alone, no tokens/s (not in the charts)
    json row = r;
    if (!row.contains("tp")) row["tp"] = 1;
    out.push_back(row);
    return out;
  }
  json common = {{"shape", str(r, "shape")}, {"mode", "transformers"}, {"tp", 1}};
  if (auto ms = num(r, "decode_step_ms")) {
    json d = common;
    d["suite"] = "decode";
    d["offload"] = "none";
    d["batch"] = r.value("batch", 0);
    d["context"] = r.value("context", 0);
    d["step_ms_median"] = *ms;
    d["tokens_per_s"] =
        num_or(r, "decode_tokens_per_s", *ms > 0 ? d["batch"].get<double>() * 1e3 / *ms : 0);
    out.push_back(d);
  }
  if (auto t = num(r, "prefill_tokens_per_s")) {
    json p = common;
    p["suite"] = "prefill";
    p["prompts"] = r.value("batch", 0);
    p["prompt_len"] = r.value("context", 0);
    p["tokens_per_s"] = *t;
    if (auto s = num(r, "prefill_seconds")) p["seconds"] = *s;
    out.push_back(p);
  }
  return out;
}

class Loader {
 public:
  explicit Loader(const Spec& spec) : spec_(spec) {
    if (spec.keys.count("commands")) commands_ = commands_of_log(spec.keys.at("commands"));
  }

  void document(const json& doc, std::vector<ResultRow>& out) {
    NOSA_CHECK(doc.is_object(), "{}: a run is not a JSON object", spec_.path);
    const bool peer = doc.contains("peer");
    auto src = std::make_shared<Source>();
    src->file = spec_.path;
    src->run = run_name();
    const std::string file_commit = one_line(str(doc, "commit"));
    src->commit = spec_.keys.count("commit") ? spec_.keys.at("commit") : file_commit;
    if (src->commit.empty()) src->commit = "not recorded";
    if (spec_.keys.count("commit") && !file_commit.empty() && file_commit != src->commit)
      src->commit_in_file = file_commit;
    src->machine = spec_.keys.count("machine") ? spec_.keys.at("machine")
                                               : describe_machine(doc.value("machine", json()));
    src->date = str(doc, "date");
    src->command = str(doc, "command");
    const std::string doc_suite = str(doc, "suite");
    if (src->command.empty() && !peer && next_command_ < commands_.size()) {
      src->command = commands_[next_command_++];
      // The log and the file must agree on what ran.
      const std::string s = flag_value(src->command, "--suite");
      const std::string t = flag_value(src->command, "--tp");
      NOSA_CHECK(s.empty() || doc_suite.empty() || s == doc_suite,
                 "{}: run {} is suite '{}' but the log's command {} says '{}'", spec_.path,
                 document_, doc_suite, next_command_, s);
      NOSA_CHECK(t.empty() || std::stoi(t) == int(num_or(doc, "tp", 1)),
                 "{}: run {} has tp {} but the log's command says {}", spec_.path, document_,
                 num_or(doc, "tp", 1), t);
    }
    if (src->command.empty() && spec_.keys.count("command"))
      src->command = spec_.keys.at("command");
    if (src->command.empty()) src->command = "not recorded";
    const json results = doc.value("results", json::array());
    NOSA_CHECK(results.is_array(), "{}: \"results\" is not an array", spec_.path);
    for (const json& r : results) {
      if (peer) {
        for (const json& p : peer_rows(r)) out.push_back({p, src, document_});
        continue;
      }
      json row = r;
      if (!row.contains("tp")) row["tp"] = num_or(doc, "tp", 1);
      if (!row.contains("suite")) row["suite"] = doc_suite;
      if (!row.contains("offload") && suite(row) == "decode") row["offload"] = "none";
      out.push_back({row, src, document_});
    }
    ++document_;
  }

  void csv(const std::string& text, std::vector<ResultRow>& out) {
    const auto table = parse_csv(text);
    NOSA_CHECK(!table.empty(), "{}: empty CSV", spec_.path);
    const auto& head = table[0];
    std::map<std::string, std::shared_ptr<Source>> sources;
    for (size_t i = 1; i < table.size(); ++i) {
      const auto& cells = table[i];
      if (cells.size() == 1 && cells[0].empty()) continue;
      NOSA_CHECK(cells.size() == head.size(), "{}: line {} has {} fields, the header {}",
                 spec_.path, i + 1, cells.size(), head.size());
      json row = json::object(), meta = json::object();
      for (size_t c = 0; c < head.size(); ++c) {
        const std::string& k = head[c];
        const std::string& v = cells[c];
        if (k == "commit" || k == "machine" || k == "backend" || k == "date" || k == "command") {
          meta[k] = v;
          continue;
        }
        if (v.empty()) continue;
        row[k] = parse_cell(v);
      }
      if (!row.contains("tp")) row["tp"] = 1;
      if (!row.contains("offload") && suite(row) == "decode") row["offload"] = "none";
      json doc = {{"commit", str(meta, "commit")},
                  {"date", str(meta, "date")},
                  {"command", str(meta, "command")},
                  {"machine",
                   meta.contains("machine") ? meta["machine"] : meta.value("backend", json(""))}};
      const std::string key = doc.dump();
      auto& src = sources[key];
      if (!src) {
        src = std::make_shared<Source>();
        src->file = spec_.path;
        src->run = run_name();
        src->commit = spec_.keys.count("commit") ? spec_.keys.at("commit") : str(doc, "commit");
        if (src->commit.empty()) src->commit = "not recorded";
        if (spec_.keys.count("commit") && !str(doc, "commit").empty() &&
            str(doc, "commit") != src->commit)
          src->commit_in_file = str(doc, "commit");
        src->machine = spec_.keys.count("machine") ? spec_.keys.at("machine") : str(doc, "machine");
        src->date = str(doc, "date");
        src->command = str(doc, "command");
        if (src->command.empty() && spec_.keys.count("command"))
          src->command = spec_.keys.at("command");
        if (src->command.empty()) src->command = "not recorded";
      }
      out.push_back({row, src, int(sources.size()) - 1});
    }
  }

 private:
  static json parse_cell(const std::string& v) {
    char* end = nullptr;
    const long long i = std::strtoll(v.c_str(), &end, 10);
    if (end && *end == '\0') return i;
    const double d = std::strtod(v.c_str(), &end);
    if (end && *end == '\0') return d;
    if (v == "true" || v == "false") return v == "true";
    return v;
  }
  std::string run_name() const {
    if (spec_.keys.count("run")) return spec_.keys.at("run");
    const fs::path dir = fs::path(spec_.path).parent_path();
    return dir.empty() ? "." : dir.filename().string();
  }

  Spec spec_;
  std::vector<std::string> commands_;
  size_t next_command_ = 0;
  int document_ = 0;
};

}  // namespace

std::vector<std::vector<std::string>> parse_csv(const std::string& text) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> row;
  std::string cell;
  bool quoted = false, any = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (quoted) {
      if (c == '"' && i + 1 < text.size() && text[i + 1] == '"')
        cell += '"', ++i;
      else if (c == '"')
        quoted = false;
      else
        cell += c;
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      row.push_back(std::move(cell));
      cell.clear();
    } else if (c == '\n' || c == '\r') {
      if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i;
      row.push_back(std::move(cell));
      cell.clear();
      rows.push_back(std::move(row));
      row.clear();
      any = false;
      continue;
    } else {
      cell += c;
    }
    any = true;
  }
  if (any || !row.empty()) {
    row.push_back(std::move(cell));
    rows.push_back(std::move(row));
  }
  return rows;
}

std::vector<ResultRow> load_results(const std::string& spec_text) {
  const Spec spec = parse_spec(spec_text);
  const std::string text = slurp(spec.path);
  Loader loader(spec);
  std::vector<ResultRow> out;
  const std::string ext = fs::path(spec.path).extension().string();
  try {
    if (ext == ".csv") {
      loader.csv(text, out);
    } else if (ext == ".jsonl") {
      std::stringstream ss(text);
      for (std::string line; std::getline(ss, line);)
        if (line.find_first_not_of(" \t\r") != std::string::npos)
          loader.document(json::parse(line), out);
    } else {
      const json doc = json::parse(text);
      if (doc.contains("runs")) {
        for (const json& run : doc["runs"]) loader.document(run, out);
      } else {
        loader.document(doc, out);
      }
    }
  } catch (const json::exception& e) {
    NOSA_FAIL(ErrorCode::invalid_argument, "{}: {}", spec.path, e.what());
  }
  return out;
}

std::vector<ResultRow> rows_of_document(const json& meta, const std::string& file) {
  Spec spec;
  spec.path = file;
  spec.keys["run"] = "this run";
  std::vector<ResultRow> out;
  Loader(spec).document(meta, out);
  return out;
}

// ---- figures ------------------------------------------------------------------------------------

namespace {

struct Kind {
  const char* name;
  const char* title;
  const char* x_label;
  const char* x_key;
  const char* x_name;
  Axis axis;
  std::function<bool(const json&)> accepts;
  std::function<std::string(const json&)> series;
};

bool decode_like(const json& r) {
  return (suite(r) == "decode" || suite(r) == "offload") && !controlled(r);
}

const std::vector<Kind>& kinds() {
  static const std::vector<Kind> k = {
      {"decode-batch", "Decode throughput vs batch size", "batch size (sequences)", "batch",
       "batch", Axis::log2, decode_like,
       [](const json& r) {
         return label(r) + " C=" + tick_label(double(context(r))) + tp_suffix(r);
       }},
      {"decode-context", "Decode throughput vs context", "context (tokens)", "context", "context",
       Axis::log2, decode_like,
       [](const json& r) { return label(r) + fmt::format(" B={}", batch(r)) + tp_suffix(r); }},
      {"miss-rate", "Offloaded decode vs controlled miss rate",
       "fraction of each selection replaced per step", "controlled_miss_rate", "replaced",
       Axis::linear, [](const json& r) { return suite(r) == "offload" && controlled(r); },
       [](const json& r) { return label(r) + " " + bc(r) + tp_suffix(r); }},
      {"gpus", "Decode scaling with GPUs (tensor parallel)", "GPUs (tensor-parallel ranks)", "tp",
       "GPUs", Axis::log2, [](const json& r) { return decode_like(r) && !is_peer(r); },
       [](const json& r) {
         const std::string l = str(r, "label");
         return label(r) + " " + bc(r) + (l.empty() ? "" : " [" + l + "]");
       }},
      {"prefill", "Prefill throughput vs prompt length", "prompt length (tokens)", "prompt_len",
       "prompt length", Axis::log2, [](const json& r) { return suite(r) == "prefill"; },
       [](const json& r) {
         return mode(r) + fmt::format(" x{}", int64_t(num_or(r, "prompts", 0)));
       }},
  };
  return k;
}

}  // namespace

std::vector<Figure> make_figures(const std::vector<ResultRow>& rows) {
  std::vector<std::string> shapes;
  for (const ResultRow& r : rows)
    if (std::find(shapes.begin(), shapes.end(), shape(r.row)) == shapes.end())
      shapes.push_back(shape(r.row));
  std::vector<Figure> out;
  for (const std::string& sh : shapes)
    for (const Kind& kind : kinds()) {
      std::vector<const ResultRow*> picked;
      std::set<std::string> runs;
      for (const ResultRow& r : rows)
        if (shape(r.row) == sh && measured(r.row) && num(r.row, kind.x_key) &&
            kind.accepts(r.row)) {
          picked.push_back(&r);
          runs.insert(r.source->run);
        }
      // Series by configuration; when two rows of a series share an x, name the runs too.
      auto build = [&](bool with_run, Figure& fig) {
        std::vector<std::string> names;
        std::vector<std::map<double, const ResultRow*>> points;
        bool collision = false;
        for (const ResultRow* r : picked) {
          std::string name = kind.series(r->row);
          if (with_run) name += " @" + r->source->run;
          auto it = std::find(names.begin(), names.end(), name);
          if (it == names.end()) {
            names.push_back(name);
            points.emplace_back();
            it = names.end() - 1;
          }
          auto& pts = points[size_t(it - names.begin())];
          const double x = *num(r->row, kind.x_key);
          if (pts.count(x)) {
            collision = true;
            ++fig.duplicates_dropped;
          } else {
            pts[x] = r;
          }
        }
        fig.chart.series.clear();
        fig.rows.clear();
        for (size_t i = 0; i < names.size(); ++i) {
          Series s{names[i], {}};
          std::vector<const ResultRow*> rs;
          for (auto [x, r] : points[i]) {
            s.points.push_back({x, tok_s(r->row)});
            rs.push_back(r);
          }
          fig.chart.series.push_back(std::move(s));
          fig.rows.push_back(std::move(rs));
        }
        return collision;
      };
      Figure fig;
      fig.name = std::string(kind.name) + "-" + sh;
      fig.x_key = kind.x_key;
      fig.x_name = kind.x_name;
      fig.chart.title = std::string(kind.title) + ", " + sh;
      fig.chart.x_label = kind.x_label;
      fig.chart.y_label = "tokens/s";
      fig.chart.x_axis = kind.axis;
      if (build(false, fig) && runs.size() > 1) {
        fig.duplicates_dropped = 0;
        build(true, fig);
      }
      if (fig.x_key == "tp") {  // only configurations measured on several GPU counts
        for (size_t i = fig.chart.series.size(); i-- > 0;)
          if (fig.chart.series[i].points.size() < 2) {
            fig.chart.series.erase(fig.chart.series.begin() + std::ptrdiff_t(i));
            fig.rows.erase(fig.rows.begin() + std::ptrdiff_t(i));
          }
      }
      bool worth = false;
      for (const Series& s : fig.chart.series) worth |= s.points.size() >= 2;
      if (worth) out.push_back(std::move(fig));
    }
  return out;
}

std::vector<std::string> write_figures(const std::vector<Figure>& figures, const std::string& dir,
                                       const std::string& prefix) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  NOSA_CHECK_CODE(!ec, ErrorCode::io, "cannot create {}: {}", dir, ec.message());
  std::vector<std::string> paths;
  for (const Figure& f : figures) {
    const std::string path = (fs::path(dir) / (prefix + f.name + ".png")).string();
    write_png(path, render_chart(f.chart));
    paths.push_back(path);
  }
  return paths;
}

// ---- Markdown -----------------------------------------------------------------------------------

namespace {

std::string source_line(const Source& s) {
  std::string commit = "`" + s.commit + "`";
  if (!s.commit_in_file.empty()) commit += " (the file says `" + s.commit_in_file + "`)";
  return fmt::format("- run `{}`, `{}`: {}; commit {}{}; `{}`", s.run, s.file, s.machine, commit,
                     s.date.empty() ? "" : "; " + s.date, s.command);
}

std::string sources_markdown(const std::vector<const ResultRow*>& rows) {
  std::vector<const Source*> seen;
  std::string out;
  for (const ResultRow* r : rows)
    if (std::find(seen.begin(), seen.end(), r->source.get()) == seen.end()) {
      seen.push_back(r->source.get());
      out += source_line(*r->source) + "\n";
    }
  return out;
}

std::string x_text(const Figure& f, double x) {
  return f.x_key == "controlled_miss_rate" ? fmt::format("{:.2f}", x) : tick_label(x);
}

}  // namespace

std::string figures_markdown(const std::vector<Figure>& figures, const std::string& image_prefix) {
  std::string out;
  for (const Figure& f : figures) {
    std::vector<const ResultRow*> all;
    bool offload_cols = false, several_runs = false;
    for (const auto& rs : f.rows)
      for (const ResultRow* r : rs) {
        all.push_back(r);
        offload_cols |= num(r->row, "overlap").has_value();
        several_runs |= r->source->run != f.rows[0][0]->source->run;
      }
    out += fmt::format("#### {}\n\n![{}]({}{}.png)\n\n", f.chart.title, f.chart.title, image_prefix,
                       f.name);
    out += fmt::format("| series | {} | tokens/s | ms/step | x floor |", f.x_name);
    if (offload_cols) out += " overlap | miss rate | PCIe MB/step |";
    if (several_runs) out += " run |";
    out += "\n|---|---|---|---|---|";
    if (offload_cols) out += "---|---|---|";
    if (several_runs) out += "---|";
    out += "\n";
    for (size_t i = 0; i < f.rows.size(); ++i)
      for (const ResultRow* r : f.rows[i]) {
        const json& j = r->row;
        auto opt = [&](const char* k, const char* fmt_s, double scale = 1) {
          auto v = num(j, k);
          return v ? fmt::format(fmt::runtime(fmt_s), *v * scale) : std::string();
        };
        out += fmt::format("| {} | {} | {} | {} | {} |", f.chart.series[i].name,
                           x_text(f, *num(j, f.x_key.c_str())), fixed(tok_s(j)),
                           opt("step_ms_median", "{:.2f}"), opt("ratio_to_floor", "{:.2f}"));
        if (offload_cols)
          out +=
              fmt::format(" {} | {} | {} |", opt("overlap", "{:.3f}"), opt("miss_rate", "{:.3f}"),
                          opt("pcie_bytes_per_step", "{:.1f}", 1e-6));
        if (several_runs) out += " " + r->source->run + " |";
        out += "\n";
      }
    if (f.duplicates_dropped > 0)
      out += fmt::format(
          "\n{} row(s) repeating a configuration of the same run are not plotted "
          "(the first is).\n",
          f.duplicates_dropped);
    out +=
        "\nSources (run, file: machine; commit; date; command):\n\n" + sources_markdown(all) + "\n";
  }
  return out;
}

namespace {

enum class Cmp {
  nosa_vs_dense,
  nosa_vs_infllmv2,
  offloaded_vs_hbm,
  nosa_offloaded_vs_dense,
  tp_scaling,
  decode_vs_peer,
  prefill_vs_peer
};

struct Comparison {
  Cmp kind;
  std::string what, note;
  const ResultRow* a;
  const ResultRow* b;
  double ratio() const { return tok_s(b->row) > 0 ? tok_s(a->row) / tok_s(b->row) : 0; }
};

// The row of `a`'s run that `pred` accepts, preferring `a`'s own file and run document.
const ResultRow* partner(const std::vector<ResultRow>& rows, const ResultRow& a,
                         const std::function<bool(const json&)>& pred) {
  const ResultRow* best = nullptr;
  for (const ResultRow& b : rows) {
    if (&b == &a || b.source->run != a.source->run || !measured(b.row) || !pred(b.row)) continue;
    if (b.source == a.source) return &b;
    if (!best) best = &b;
  }
  return best;
}

std::vector<Comparison> comparisons(const std::vector<ResultRow>& rows) {
  std::vector<Comparison> out;
  for (const ResultRow& a : rows) {
    const json& r = a.row;
    if (!measured(r) || is_peer(r)) continue;
    auto same = [&](const json& b) {
      return shape(b) == shape(r) && batch(b) == batch(r) && context(b) == context(r);
    };
    auto add = [&](Cmp kind, std::string what, const std::function<bool(const json&)>& pred,
                   std::string note = "") {
      if (const ResultRow* b = partner(rows, a, pred))
        out.push_back({kind, std::move(what), std::move(note), &a, b});
    };
    const bool dec = suite(r) == "decode", off = suite(r) == "offload" && !controlled(r);
    if (dec && mode(r) == "nosa") {
      add(Cmp::nosa_vs_dense, "NOSA vs dense, KV in HBM", [&](const json& b) {
        return suite(b) == "decode" && mode(b) == "dense" && same(b) && tp(b) == tp(r);
      });
      add(Cmp::nosa_vs_infllmv2, "NOSA vs InfLLM-V2, KV in HBM", [&](const json& b) {
        return suite(b) == "decode" && mode(b) == "infllmv2" && same(b) && tp(b) == tp(r);
      });
    }
    if (off && mode(r) == "nosa") {
      // On equal terms: the same residency, copy overlap, prefetching and micro-batches (a run
      // that alternates them has a row of each per mode).
      auto same_variant = [&](const json& b) {
        for (const char* k : {"residency", "copy_overlap", "prefetch", "micro_batch_min_seqs"})
          if (b.value(k, json()) != r.value(k, json())) return false;
        return true;
      };
      const ResultRow* b = partner(rows, a, [&](const json& b) {
        return suite(b) == "offload" && !controlled(b) && mode(b) == "infllmv2" && same(b) &&
               tp(b) == tp(r) && offload(b) == offload(r) && same_variant(b);
      });
      if (b)
        out.push_back({Cmp::nosa_vs_infllmv2,
                       fmt::format("NOSA vs InfLLM-V2, both offloaded ({})", offload(r)),
                       fmt::format("overlap {:.2f} vs {:.2f}", num_or(r, "overlap", 0),
                                   num_or(b->row, "overlap", 0)),
                       &a, b});
      add(Cmp::nosa_offloaded_vs_dense,
          fmt::format("NOSA offloaded ({}) vs dense in HBM", offload(r)), [&](const json& b) {
            return suite(b) == "decode" && mode(b) == "dense" && same(b) && tp(b) == tp(r);
          });
    }
    if (off)
      add(Cmp::offloaded_vs_hbm, fmt::format("{} offloaded ({}) vs in HBM", mode(r), offload(r)),
          [&](const json& b) {
            return suite(b) == "decode" && mode(b) == mode(r) && same(b) && tp(b) == tp(r);
          });
    if ((dec || off) && tp(r) > 1) {
      auto one_gpu = [&](const json& b) {
        return suite(b) == suite(r) && !controlled(b) && mode(b) == mode(r) && same(b) &&
               offload(b) == offload(r) && tp(b) == 1;
      };
      // The TP=1 row of the same label (the same scaling series) first.
      const ResultRow* b = partner(
          rows, a, [&](const json& b) { return one_gpu(b) && str(b, "label") == str(r, "label"); });
      if (!b) b = partner(rows, a, one_gpu);
      if (b) {
        const double eff = tok_s(r) / tok_s(b->row) / tp(r);
        out.push_back({Cmp::tp_scaling,
                       fmt::format("TP={} vs TP=1, {} {}", tp(r), mode(r),
                                   offloaded(r) ? "offloaded (" + offload(r) + ")" : "KV in HBM"),
                       fmt::format("efficiency {:.2f}", eff), &a, b});
      }
    }
    if (dec && tp(r) == 1)
      add(Cmp::decode_vs_peer, fmt::format("{} decode vs transformers generate", mode(r)),
          [&](const json& b) { return suite(b) == "decode" && is_peer(b) && same(b); });
    if (suite(r) == "prefill")
      add(Cmp::prefill_vs_peer, fmt::format("{} prefill vs transformers", mode(r)),
          [&](const json& b) {
            return suite(b) == "prefill" && is_peer(b) && shape(b) == shape(r) &&
                   num_or(b, "prompts", -1) == num_or(r, "prompts", -2) &&
                   num_or(b, "prompt_len", -1) == num_or(r, "prompt_len", -2);
          });
  }
  return out;
}

std::string config_of(const json& r) {
  if (suite(r) == "prefill")
    return fmt::format("{} x {} tokens", int64_t(num_or(r, "prompts", 0)),
                       int64_t(num_or(r, "prompt_len", 0)));
  return bc(r) + (tp(r) > 1 ? fmt::format(" TP={}", tp(r)) : "");
}

}  // namespace

std::string comparisons_markdown(const std::vector<ResultRow>& rows) {
  const auto cmps = comparisons(rows);
  if (cmps.empty()) return "No two rows of one run compare (same shape, batch and context).\n";
  std::string out =
      "| comparison | shape | configuration | A tok/s | B tok/s | A / B | note | run |\n"
      "|---|---|---|---|---|---|---|---|\n";
  for (const Comparison& c : cmps)
    out += fmt::format("| {} | {} | {} | {} | {} | {:.2f}x | {} | {} |\n", c.what, shape(c.a->row),
                       config_of(c.a->row), fixed(tok_s(c.a->row)), fixed(tok_s(c.b->row)),
                       c.ratio(), c.note, c.a->source->run);
  return out;
}

// ---- attention against PyTorch SDPA, KV beyond HBM ----------------------------------------------

namespace {

std::string ms_or_dash(const json& r, const char* key) {
  auto v = num(r, key);
  return v ? fmt::format("{:.3f}", *v) : "-";
}

// The engine's decode rows of `sdpa`'s run at its shape, batch and context (one rank, KV in HBM),
// the first of each mode.
std::vector<const ResultRow*> engine_decode_rows(const std::vector<ResultRow>& rows,
                                                 const ResultRow& sdpa) {
  std::vector<const ResultRow*> out;
  for (const ResultRow& e : rows) {
    if (e.source->run != sdpa.source->run || suite(e.row) != "decode" || is_sdpa(e.row) ||
        is_peer(e.row) || !measured(e.row) || tp(e.row) != 1 || offloaded(e.row) ||
        shape(e.row) != shape(sdpa.row) || batch(e.row) != batch(sdpa.row) ||
        context(e.row) != context(sdpa.row))
      continue;
    bool seen = false;
    for (const ResultRow* o : out) seen |= mode(o->row) == mode(e.row);
    if (!seen) out.push_back(&e);
  }
  return out;
}

const ResultRow* sdpa_partner(const std::vector<ResultRow>& rows, const ResultRow& a,
                              const std::string& m) {
  for (const ResultRow& b : rows)
    if (b.source->run == a.source->run && mode(b.row) == m && suite(b.row) == suite(a.row) &&
        shape(b.row) == shape(a.row) && batch(b.row) == batch(a.row) &&
        context(b.row) == context(a.row) && !b.row.contains("skipped"))
      return &b;
  return nullptr;
}

}  // namespace

std::string attention_markdown(const std::vector<ResultRow>& rows) {
  std::string out;
  // Decode: one line per engine mode at each (run, shape, batch, context) the SDPA peer measured.
  std::string dec;
  std::vector<const ResultRow*> sources;
  for (const ResultRow& s : rows) {
    if (suite(s.row) != "decode" || mode(s.row) != "sdpa") continue;
    const ResultRow* sp = sdpa_partner(rows, s, "sdpa-sparse");
    sources.push_back(&s);
    auto line = [&](const ResultRow* e) {
      const json none = json::object();
      const json& er = e ? e->row : none;
      const bool sparse = e && mode(er) != "dense";
      // The PyTorch equivalent of the engine's work: SDPA over everything for dense, the
      // selection, the gather and SDPA for the sparse modes.
      std::optional<double> torch_ms =
          s.row.contains("skipped") ? std::nullopt : num(s.row, "attn_step_ms");
      if (sparse) torch_ms = sp ? num(sp->row, "select_step_ms") : std::nullopt;
      const auto eng = e ? num(er, "attention_ms_median") : std::nullopt;
      const std::string ratio =
          torch_ms && eng && *eng > 0 ? fmt::format("{:.2f}x", *torch_ms / *eng) : "-";
      dec += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n", shape(s.row),
                         batch(s.row), tick_label(double(context(s.row))), e ? mode(er) : "-",
                         e ? ms_or_dash(er, "step_ms_median") : "-",
                         e ? ms_or_dash(er, "attention_ms_median") : "-",
                         s.row.contains("skipped") ? "skipped" : ms_or_dash(s.row, "attn_step_ms"),
                         sp ? ms_or_dash(sp->row, "attn_step_ms") : "-",
                         sp ? ms_or_dash(sp->row, "select_step_ms") : "-", ratio, s.source->run);
    };
    const auto engines = engine_decode_rows(rows, s);
    if (engines.empty()) line(nullptr);
    for (const ResultRow* e : engines) line(e);
  }
  if (!dec.empty()) {
    out +=
        "Decode attention of one step, all layers, KV in HBM, one GPU (ms). Engine: the whole "
        "step, and its attention alone (block selection and attention over the selected blocks; "
        "dense: over all blocks). PyTorch: `scaled_dot_product_attention` over the whole context "
        "(GQA), and what a PyTorch user would write for NOSA: gather the 64 selected 64-token "
        "blocks (4096 tokens) then SDPA, and with the block selection (scores of the block keys, "
        "top-k) first. The last ratio is PyTorch's equivalent of the engine's attention (dense: "
        "SDPA; sparse modes: selection + gather + SDPA) over the engine's attention.\n\n"
        "| shape | B | context | engine | step ms | attention ms | SDPA ms | gather + SDPA ms | "
        "select + gather + SDPA ms | PyTorch / engine attention | run |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" +
        dec + "\n";
  }
  // Prefill: SDPA's causal attention alone against the engine's whole prefill.
  std::string pre;
  for (const ResultRow& s : rows) {
    if (suite(s.row) != "prefill" || mode(s.row) != "sdpa") continue;
    sources.push_back(&s);
    const auto secs = num(s.row, "attn_seconds");
    bool any = false;
    for (const ResultRow& e : rows) {
      if (e.source->run != s.source->run || suite(e.row) != "prefill" || is_sdpa(e.row) ||
          !measured(e.row) || shape(e.row) != shape(s.row) ||
          num_or(e.row, "prompts", -1) != num_or(s.row, "prompts", -2) ||
          num_or(e.row, "prompt_len", -1) != num_or(s.row, "prompt_len", -2))
        continue;
      any = true;
      const auto es = num(e.row, "seconds");
      pre += fmt::format(
          "| {} | {} x {} | {} | {} | {} | {} | {} | {} |\n", shape(s.row),
          int64_t(num_or(s.row, "prompts", 0)), tick_label(num_or(s.row, "prompt_len", 0)),
          secs ? fmt::format("{:.3f}", *secs) : "skipped", opt_fixed(s.row, "tflops"),
          is_peer(e.row) ? "transformers" : mode(e.row), es ? fmt::format("{:.2f}", *es) : "-",
          secs && es && *es > 0 ? fmt::format("{:.0f}%", 100 * *secs / *es) : "-", s.source->run);
    }
    if (!any)
      pre += fmt::format("| {} | {} x {} | {} | {} | - | - | - | {} |\n", shape(s.row),
                         int64_t(num_or(s.row, "prompts", 0)),
                         tick_label(num_or(s.row, "prompt_len", 0)),
                         secs ? fmt::format("{:.3f}", *secs) : "skipped",
                         opt_fixed(s.row, "tflops"), s.source->run);
  }
  if (!pre.empty())
    out +=
        "Prefill: PyTorch SDPA's causal attention alone (flash / cuDNN / memory-efficient "
        "backends; one layer timed, times the layer count) against the engine's whole prefill "
        "(every layer's projections, MLP and attention) of the same prompts.\n\n"
        "| shape | prompts x length | SDPA attention s (all layers) | SDPA TFLOP/s | engine | "
        "engine prefill s | SDPA attention / engine prefill | run |\n"
        "|---|---|---|---|---|---|---|---|\n" +
        pre + "\n";
  if (out.empty()) return "No PyTorch SDPA rows (scripts/bench_sdpa.py).\n";
  return out + "Sources (run, file: machine; commit; date; command):\n\n" +
         sources_markdown(sources) + "\n";
}

std::string capacity_markdown(const std::vector<ResultRow>& rows) {
  std::string out;
  std::vector<const ResultRow*> rs;
  for (const ResultRow& r : rows) {
    if (suite(r.row) != "offload" || controlled(r.row)) continue;
    if (offload(r.row) != "host+disk" && num_or(r.row, "disk_gib", 0) <= 0) continue;
    rs.push_back(&r);
    const json& j = r.row;
    out += fmt::format(
        "| {} | {} | B={} C={}{} | {} | {} | {} | {} | {} | {} | {} | {} |\n", shape(j), label(j),
        batch(j), tick_label(double(context(j))), tp_suffix(j),
        j.contains("skipped") ? "skipped: " + str(j, "skipped")
                              : (measured(j) ? fixed(tok_s(j)) : "-"),
        ms_or_dash(j, "step_ms_median"), opt_fixed(j, "host_gib"), opt_fixed(j, "disk_gib"),
        opt_fixed(j, "gpu_cache_gib"), opt_fixed(j, "populate_s"),
        num(j, "miss_rate") ? fmt::format("{:.3f}", *num(j, "miss_rate")) : "-", r.source->run);
  }
  if (rs.empty()) return "No runs with KV on disk.\n";
  return "| shape | mode | configuration | tokens/s | ms/step | host GiB | disk GiB | GPU cache "
         "GiB "
         "| populate s | miss rate | run |\n|---|---|---|---|---|---|---|---|---|---|---|\n" +
         out + "\nSources (run, file: machine; commit; date; command):\n\n" + sources_markdown(rs) +
         "\n";
}

// ---- targets ------------------------------------------------------------------------------------

namespace {

struct TargetLine {
  std::string target, from, measured, status;
};

// "met" when every value passes, "partly met" when some do, "not met" when none, "not run".
std::string status_of(int passed, int total) {
  if (total == 0) return "not run";
  return passed == total ? "met" : passed > 0 ? "partly met" : "not met";
}

std::string runs_of(const std::vector<const ResultRow*>& rs) {
  std::vector<std::string> names;
  for (const ResultRow* r : rs)
    if (std::find(names.begin(), names.end(), r->source->run) == names.end())
      names.push_back(r->source->run);
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", " : "") + names[i];
  return out;
}

}  // namespace

std::string targets_markdown(const std::vector<ResultRow>& rows) {
  using Shapes = std::vector<std::string>;
  const Shapes both = {"nosa-1b-like", "nosa-8b-like"}, big = {"nosa-8b-like"};
  const auto cmps = comparisons(rows);
  std::vector<TargetLine> lines;

  // Rows against a bound on one field, per shape.
  auto bound = [&](const std::string& target, const std::string& from, const Shapes& shapes,
                   const std::function<bool(const json&)>& pred, const char* field, double limit,
                   bool at_most) {
    for (const std::string& sh : shapes) {
      std::vector<const ResultRow*> rs;
      for (const ResultRow& r : rows)
        if (shape(r.row) == sh && measured(r.row) && pred(r.row) && num(r.row, field))
          rs.push_back(&r);
      if (rs.empty()) {
        lines.push_back({target + ", " + sh, from, "no rows", "not run"});
        continue;
      }
      double lo = 1e300, hi = -1e300;
      int pass = 0;
      for (const ResultRow* r : rs) {
        const double v = *num(r->row, field);
        lo = std::min(lo, v), hi = std::max(hi, v);
        pass += at_most ? v <= limit : v >= limit;
      }
      lines.push_back({target + ", " + sh, from,
                       fmt::format("{:.2f}x to {:.2f}x over {} row(s); runs {}", lo, hi, rs.size(),
                                   runs_of(rs)),
                       status_of(pass, int(rs.size()))});
    }
  };
  // Comparisons against a bound on their ratio (or TP efficiency), per shape.
  auto ratio = [&](const std::string& target, const std::string& from, const Shapes& shapes,
                   const std::function<bool(const Comparison&)>& pred, double limit, bool eff) {
    for (const std::string& sh : shapes) {
      std::string text;
      int pass = 0, total = 0;
      for (const Comparison& c : cmps) {
        if (shape(c.a->row) != sh || !pred(c)) continue;
        const double v = eff ? c.ratio() / tp(c.a->row) : c.ratio();
        text += fmt::format("{}{} {} ({}): {:.2f}{}", total ? "; " : "", label(c.a->row),
                            config_of(c.a->row), c.a->source->run, v, eff ? "" : "x");
        pass += v >= limit;
        ++total;
      }
      lines.push_back({target + ", " + sh, from, total ? text : "no rows", status_of(pass, total)});
    }
  };

  bound(
      "NOSA decode, KV in HBM, B=64: step within 1.3x of its floor", "issue 3", both,
      [](const json& r) {
        return suite(r) == "decode" && mode(r) == "nosa" && batch(r) == 64 && tp(r) == 1;
      },
      "ratio_to_floor", 1.3, true);
  ratio(
      "Prefill at least as fast as transformers (SDPA), same run", "issue 3", both,
      [](const Comparison& c) { return c.kind == Cmp::prefill_vs_peer; }, 1.0, false);
  ratio(
      "Dense decode at least 3x transformers generate, same run", "issue 3", both,
      [](const Comparison& c) {
        return c.kind == Cmp::decode_vs_peer && mode(c.a->row) == "dense";
      },
      3.0, false);
  ratio(
      "NOSA decode faster still than dense (NOSA / dense tok/s > 1 where the peer ran)", "issue 3",
      both,
      [&](const Comparison& c) {
        if (c.kind != Cmp::nosa_vs_dense || tp(c.a->row) != 1) return false;
        for (const Comparison& p : cmps)
          if (p.kind == Cmp::decode_vs_peer && p.a == c.a) return true;
        return false;
      },
      1.0 + 1e-9, false);
  bound(
      "NOSA offloaded within 1.25x of its floor across the controlled miss-rate sweep", "issue 4",
      both,
      [](const json& r) { return suite(r) == "offload" && mode(r) == "nosa" && controlled(r); },
      "ratio_to_floor", 1.25, true);
  ratio(
      "NOSA offloaded at least 1.9x InfLLM-V2 offloaded, B=16 x 16K (paper: 1.92x)",
      "issue 4, paper", both,
      [](const Comparison& c) {
        return c.kind == Cmp::nosa_vs_infllmv2 && offloaded(c.a->row) && batch(c.a->row) == 16 &&
               context(c.a->row) == 16384;
      },
      1.9, false);
  {
    std::vector<const ResultRow*> rs;
    for (const ResultRow& r : rows)
      if (suite(r.row) == "offload" && shape(r.row) == "nosa-8b-like" && batch(r.row) >= 32 &&
          context(r.row) >= 131072 && offload(r.row) == "host+disk" && tp(r.row) == 1)
        rs.push_back(&r);
    std::string text = "no rows";
    int pass = 0;
    for (const ResultRow* r : rs) {
      if (measured(r->row)) {
        ++pass;
        text = fmt::format("{} tok/s, host {:.0f} GiB, disk {:.0f} GiB (run {})",
                           fixed(tok_s(r->row)), num_or(r->row, "host_gib", 0),
                           num_or(r->row, "disk_gib", 0), r->source->run);
      } else if (pass == 0) {
        text = "skipped: " + str(r->row, "skipped");
      }
    }
    lines.push_back(
        {"KV beyond HBM: nosa-8b-like, 32 x 128K (128 GiB of KV) on one GPU with "
         "host and disk",
         "issue 4", text, status_of(pass, int(rs.size()))});
  }
  ratio(
      "TP=2 scaling efficiency at least 0.85 (B=64, 16K; offloaded and not)", "issue 5", big,
      [](const Comparison& c) { return c.kind == Cmp::tp_scaling && tp(c.a->row) == 2; }, 0.85,
      true);
  {
    std::string text;
    std::vector<const ResultRow*> rs;
    for (const Comparison& c : cmps)
      if (c.kind == Cmp::tp_scaling && tp(c.a->row) == 4) {
        text += fmt::format("{}{} {} {} ({}): {:.2f}", text.empty() ? "" : "; ", shape(c.a->row),
                            label(c.a->row), bc(c.a->row), c.a->source->run, c.ratio() / 4);
        rs.push_back(c.a);
      }
    lines.push_back({"TP=4 scaling efficiency (B=64, 16K; offloaded and not)", "issue 5",
                     rs.empty() ? "no rows" : text,
                     rs.empty() ? "not run" : "measured (no target)"});
  }
  // The engine's NOSA attention against what a PyTorch user would write (same run).
  for (const std::string& sh : both) {
    std::string text;
    int pass = 0, total = 0;
    for (const ResultRow& e : rows) {
      const json& r = e.row;
      const auto eng = num(r, "attention_ms_median");
      if (shape(r) != sh || suite(r) != "decode" || mode(r) != "nosa" || !measured(r) ||
          tp(r) != 1 || offloaded(r) || !eng || *eng <= 0)
        continue;
      const ResultRow* sp = sdpa_partner(rows, e, "sdpa-sparse");
      const auto torch_ms = sp ? num(sp->row, "select_step_ms") : std::nullopt;
      if (!torch_ms) continue;
      const double v = *torch_ms / *eng;
      text += fmt::format("{}{} ({}): {:.2f}x", total ? "; " : "", bc(r), e.source->run, v);
      pass += v >= 1.0;
      ++total;
    }
    lines.push_back(
        {"NOSA decode attention (selection + sparse attention) faster than PyTorch's "
         "selection + gather + SDPA, same run, " +
             sh,
         "issue 8", total ? text : "no rows", status_of(pass, total)});
  }
  {
    // The paper's full-attention baseline runs in its own system; the nearest here is dense
    // decoding with all KV in HBM at the same batch and context.
    std::string text;
    std::vector<const ResultRow*> rs;
    for (const Comparison& c : cmps)
      if ((c.kind == Cmp::nosa_vs_dense || c.kind == Cmp::nosa_offloaded_vs_dense) &&
          batch(c.a->row) == 16 && context(c.a->row) == 16384 && tp(c.a->row) == 1) {
        text += fmt::format("{}{} {} ({}): {:.2f}x", text.empty() ? "" : "; ", shape(c.a->row),
                            label(c.a->row), c.a->source->run, c.ratio());
        rs.push_back(c.a);
      }
    lines.push_back(
        {"NOSA up to 5.04x the decode throughput of full attention (NOSI, B=16, 16K); "
         "here NOSA vs dense with all KV in HBM",
         "paper", rs.empty() ? "no rows" : text,
         rs.empty() ? "not run" : "for reference (not the paper's baseline)"});
  }
  lines.push_back(
      {"NOSA 1.83x ShadowKV", "paper", "no ShadowKV peer in this repository", "not run"});

  std::string out = "| target | from | measured | status |\n|---|---|---|---|\n";
  for (const TargetLine& l : lines)
    out += fmt::format("| {} | {} | {} | **{}** |\n", l.target, l.from, l.measured, l.status);
  return out;
}

}  // namespace nosa::launcher::bench
