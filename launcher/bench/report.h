// Results of `nosa bench` read back and turned into a report: rows from JSON, JSONL and CSV files
// (and the transformers peer's JSON), the charts they allow, Markdown tables that state the
// machine, commit and command of every figure, comparisons within a run, and the targets of
// issues 3-5 and the NOSA paper checked against the rows.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "launcher/bench/chart.h"

namespace nosa::launcher::bench {

// Where rows came from: one `nosa bench` run (or one run of the peer script).
struct Source {
  std::string file;            // the path given
  std::string run;             // rows are compared only within one run (default: the file's folder)
  std::string commit;          // as stated in the report
  std::string commit_in_file;  // what the file says, when `commit` overrides something else
  std::string machine, command, date;
};

struct ResultRow {
  nlohmann::json row;  // as `nosa bench` writes it: suite, shape, mode, batch, context, tp, ...
  std::shared_ptr<const Source> source;
  int document = 0;  // which run of the file (JSONL line, "runs" entry)
};

// Reads rows from `spec`: PATH, or PATH?key=value&key=value with keys
//   run=NAME      the run the rows belong to (rows compare only within a run)
//   commit=ID     the commit to state (machines without git history write "unknown")
//   machine=TEXT  the machine to state (the files name the backend and CPU threads)
//   commands=LOG  a log whose "$ nosa bench ..." lines give, in order, the commands of the
//                 file's runs that record none; a command followed by a "FAILED" line made no
//                 run; "(N)" at the end of a line means mpirun -np N
//   command=TEXT  the command of the runs that record none (after commands=)
// PATH is .json ({"results": [...], "commit", "machine", ...}: one run; {"runs": [...]}; the peer
// script's {"peer", "results"}), .jsonl (one run a line) or .csv (as `nosa bench --csv` writes).
// Peer rows become rows of mode "transformers" (suites decode and prefill); the SDPA peer's rows
// (modes "sdpa", "sdpa-sparse") are kept as they are: attention times, no tokens/s, so they appear
// only in attention_markdown.
std::vector<ResultRow> load_results(const std::string& spec);

// The rows of a run just made: `meta` is the JSON document `nosa bench --json` writes.
std::vector<ResultRow> rows_of_document(const nlohmann::json& meta, const std::string& file);

struct Figure {
  std::string name;           // file stem, e.g. "decode-batch-nosa-1b-like"
  std::string x_key, x_name;  // the row field on the x axis and its short name
  Chart chart;
  std::vector<std::vector<const ResultRow*>> rows;  // per series, per point (x order)
  int duplicates_dropped = 0;  // rows of a series at an x it already had (the first is kept)
};

// The charts the rows allow, per model shape: decode tokens/s against batch size and against
// context (KV in HBM and offloaded; the transformers peer as points), offloaded decode against
// the controlled miss rate, tokens/s against GPUs (tensor parallelism), prefill against prompt
// length. A chart is made when one of its series has two points or more; series of different
// runs that would share points are told apart by their run's name.
std::vector<Figure> make_figures(const std::vector<ResultRow>& rows);

// Writes DIR/PREFIX<name>.png for each figure (creating DIR); returns the paths.
std::vector<std::string> write_figures(const std::vector<Figure>& figures, const std::string& dir,
                                       const std::string& prefix);

// Markdown: per figure the image (at `image_prefix` + name + ".png"), its points and sources.
std::string figures_markdown(const std::vector<Figure>& figures, const std::string& image_prefix);
// Markdown: ratios between rows of the same run (NOSA vs dense and InfLLM-V2, offloaded vs in
// HBM, TP = n vs 1, the engine vs transformers).
std::string comparisons_markdown(const std::vector<ResultRow>& rows);
// Markdown: the targets of issues 3-5 and 8 and the paper's claims, met, not met or not run.
std::string targets_markdown(const std::vector<ResultRow>& rows);
// Markdown: the engine's decode attention (and step) against PyTorch SDPA rows of the same run
// (scripts/bench_sdpa.py: dense SDPA, gather + SDPA, selection + gather + SDPA), and SDPA's
// causal prefill attention against the engine's prefill.
std::string attention_markdown(const std::vector<ResultRow>& rows);
// Markdown: offloaded runs with KV on disk (beyond HBM and host budgets): throughput and tiers.
std::string capacity_markdown(const std::vector<ResultRow>& rows);

// RFC 4180 CSV: rows of fields (quotes and doubled quotes undone).
std::vector<std::vector<std::string>> parse_csv(const std::string& text);

}  // namespace nosa::launcher::bench
