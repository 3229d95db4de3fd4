#include "launcher/batch/batch_job.h"

#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <map>
#include <optional>
#include <unordered_map>

#include "launcher/batch/input_reader.h"
#include "launcher/batch/progress.h"
#include "launcher/batch/result_file.h"
#include "parallel/mpi.h"
#include "rpc/chat_format.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"
#include "runtime/model_config.h"
#include "runtime/text_stream.h"

namespace nosa::launcher::batch {

namespace fs = std::filesystem;

namespace {

volatile std::sig_atomic_t g_signal = 0;

extern "C" void on_stop_signal(int sig) {
  if (g_signal != 0) ::_exit(128 + sig);  // a second signal: every written line is whole
  g_signal = sig;
}

// Catches SIGINT and SIGTERM for its lifetime (the job stops after the current step).
class StopSignals {
 public:
  StopSignals() {
    g_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
  }
  ~StopSignals() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }
  static int caught() { return g_signal; }

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

bool same_file(const fs::path& a, const fs::path& b) {
  std::error_code ec;
  if (fs::exists(a, ec) && fs::exists(b, ec)) return fs::equivalent(a, b, ec);
  return fs::weakly_canonical(a, ec) == fs::weakly_canonical(b, ec);
}

bool runs_on_gpu(const EngineFlags& f) {
  return f.device == "cuda" || (f.device == "auto" && runtime::cuda_available());
}

// KV tier traffic for the summary, as "name: value" lines (none without offloading).
std::vector<std::pair<std::string, std::string>> kv_tier_summary(const EngineSetup& setup) {
  if (!setup.cache->tiers()) return {};
  try {
    setup.cache->sync_stats();  // the last step's device-side counters
  } catch (const std::exception& e) {
    logger("batch")->warn("KV tier counters of the last step are missing: {}", e.what());
  }
  return kv_tier_lines(setup.cache->stats());
}

// The checkpoint's chat format, the one the service's /v1/chat/completions uses (chatml, llama3
// or the plain default), with the stop strings that end the assistant's turn.
ChatPrompts chat_prompts_for(const std::string& model_dir) {
  auto format = std::make_shared<rpc::ChatFormat>(rpc::ChatFormat::for_model(model_dir));
  ChatPrompts chat;
  chat.render = [format](const std::vector<runtime::ChatMessage>& m) { return format->render(m); };
  chat.stop_strings = format->stop_strings();
  return chat;
}

// A request queued in the engine.
struct InFlight {
  BatchRequest request;
  std::vector<runtime::SampledToken> tokens;
  std::optional<runtime::TextStream> stream;  // only with stop strings
  int64_t reserved_blocks = 0;
};

void check_options(const BatchOptions& o) {
  NOSA_CHECK(!o.input.empty(), "--input is required");
  NOSA_CHECK(!o.output.empty(), "--output is required");
  NOSA_CHECK(o.engine.tp >= 1, "--tp must be at least 1, got {}", o.engine.tp);
  NOSA_CHECK_CODE(fs::is_regular_file(o.input), ErrorCode::not_found, "{}: no such input file",
                  o.input.string());
  const fs::path errors = o.errors.empty() ? default_errors_path(o.output) : o.errors;
  NOSA_CHECK(!same_file(o.input, o.output), "--output must differ from --input");
  NOSA_CHECK(!same_file(errors, o.output), "--errors must differ from --output");
  NOSA_CHECK(!same_file(errors, o.input), "--errors must differ from --input");
  const auto& d = o.defaults;
  NOSA_CHECK(d.max_tokens >= 1, "--max-tokens must be at least 1, got {}", d.max_tokens);
  NOSA_CHECK(d.temperature >= 0, "--temperature must be >= 0, got {}", d.temperature);
  NOSA_CHECK(d.top_p > 0 && d.top_p <= 1, "--top-p must be in (0, 1], got {}", d.top_p);
  NOSA_CHECK(d.top_k >= 0, "--top-k must be >= 0, got {}", d.top_k);
  NOSA_CHECK(d.logprobs >= -1 && d.logprobs <= 20, "--logprobs must be between 0 and 20");
  for (const auto& s : d.stop) NOSA_CHECK(!s.empty(), "--stop strings must not be empty");
  NOSA_CHECK(o.lookahead >= 0, "--lookahead must be >= 0");
  NOSA_CHECK(o.kv_overcommit > 0, "--kv-overcommit must be positive");
  NOSA_CHECK(
      o.progress == "auto" || o.progress == "bar" || o.progress == "lines" || o.progress == "off",
      "--progress must be auto, bar, lines or off, got '{}'", o.progress);
  NOSA_CHECK(o.progress_interval_s > 0, "--progress-interval must be positive");
}

// The job's counters summed over the replica leaders; printed by world rank 0.
void report_job_totals(MPI_Comm leaders, const BatchSummary& mine, const std::string& prefix) {
  if (leaders == MPI_COMM_NULL) return;
  int n = 0, rank = 0;
  MPI_Comm_size(leaders, &n);
  MPI_Comm_rank(leaders, &rank);
  if (n <= 1) return;
  const auto& c = mine.counts;
  int64_t in[9] = {c.total,        c.written,         c.resumed,
                   c.errors,       c.prompt_tokens,   c.completion_tokens,
                   mine.abandoned, mine.engine_steps, mine.preemptions};
  int64_t sum[9] = {};
  double wall = mine.wall_seconds, wall_max = 0;
  int interrupted = mine.interrupted ? 1 : 0, any_interrupted = 0;
  MPI_Reduce(in, sum, 9, MPI_INT64_T, MPI_SUM, 0, leaders);
  MPI_Reduce(&wall, &wall_max, 1, MPI_DOUBLE, MPI_MAX, 0, leaders);
  MPI_Reduce(&interrupted, &any_interrupted, 1, MPI_INT, MPI_MAX, 0, leaders);
  if (rank != 0) return;
  BatchSummary all;
  all.counts = {sum[0], sum[1], sum[2], sum[3], 0, sum[4], sum[5]};
  all.abandoned = sum[6];
  all.engine_steps = sum[7];
  all.preemptions = sum[8];
  all.wall_seconds = wall_max;
  all.interrupted = any_interrupted != 0;
  std::fputs(format_summary(all, prefix).c_str(), stderr);
  std::fflush(stderr);
}

}  // namespace

fs::path default_errors_path(const fs::path& output) {
  return fs::path(output.string() + ".errors.jsonl");
}

int run_batch(const BatchOptions& o) {
  check_options(o);
  auto log = logger("batch");
  const fs::path errors_path = o.errors.empty() ? default_errors_path(o.output) : o.errors;

  parallel::MpiContext& mpi = parallel::MpiContext::get();
  // This rank's place in the job (EngineSetup::create makes the same split again).
  parallel::Replica replica = parallel::make_replica(o.engine.tp);
  if (replica.comm != MPI_COMM_NULL) MPI_Comm_free(&replica.comm);
  // The replica leaders, for the job's totals at the end (followers take no part).
  MPI_Comm leaders = MPI_COMM_NULL;
  if (mpi.active())
    MPI_Comm_split(MPI_COMM_WORLD, replica.leader() ? 0 : MPI_UNDEFINED, mpi.world_rank(),
                   &leaders);
  struct CommGuard {
    MPI_Comm& comm;
    ~CommGuard() {
      if (comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
    }
  } leaders_guard{leaders};

  // A bad checkpoint fails before the shared files are touched.
  const runtime::ModelConfig config = runtime::ModelConfig::load(o.engine.model);

  // One process repairs the shared files before anyone reads or appends.
  int64_t dropped_bytes = 0;
  if (mpi.world_rank() == 0) {
    fs::path parent = fs::absolute(o.output).parent_path();
    NOSA_CHECK_CODE(fs::is_directory(parent), ErrorCode::not_found, "{}: no such directory",
                    parent.string());
    dropped_bytes = drop_partial_tail(o.output);
    truncate_file(errors_path);
    AppendFile create_output(o.output);
  }
  if (mpi.active()) MPI_Barrier(MPI_COMM_WORLD);
  if (dropped_bytes > 0)
    log->warn("{}: dropped a cut-short last line ({} bytes) left by an interrupted run",
              o.output.string(), dropped_bytes);

  const std::string prefix =
      replica.count > 1 ? fmt::format("[replica {}/{}] ", replica.index, replica.count) : "";
  const int max_running = std::max(1, o.engine.max_running);
  const int64_t lookahead =
      o.lookahead > 0 ? o.lookahead : std::max<int64_t>(1024, 4 * int64_t(max_running));

  // Leader: read the existing output, start reading the input, size the KV cache from it.
  std::optional<InputReader> reader;
  std::unique_ptr<runtime::Tokenizer> tokenizer;
  std::optional<AppendFile> out, errs;
  BatchCounts counts;
  // Requests read ahead, keyed by their worst-case KV tokens (prompt + max_tokens).
  std::multimap<int64_t, BatchRequest> ready;
  PromptLimits limits;
  ChatPrompts chat;
  auto report_error = [&](int64_t line, const nlohmann::json& id, const std::string& message) {
    errs->append(error_line(line, id, message));
    ++counts.errors;
  };
  auto fill = [&](int64_t target) {
    while (int64_t(ready.size()) < target) {
      std::optional<InputItem> item = reader->next();
      if (!item) return;
      switch (item->kind) {
        case InputItem::Kind::error:
          report_error(item->line, item->id, item->error);
          break;
        case InputItem::Kind::resumed:
          ++counts.resumed;
          break;
        case InputItem::Kind::request: {
          BatchRequest& r = item->request;
          std::string problem = prepare_prompt(r, tokenizer.get(), limits, &chat);
          if (!problem.empty()) {
            report_error(item->line, item->id, problem);
            break;
          }
          const int64_t tokens = std::min(r.prompt_tokens + r.max_tokens, limits.max_context);
          ready.emplace(tokens, std::move(r));
          break;
        }
      }
    }
  };

  int64_t tokens_hint = 0;
  if (replica.leader()) {
    ExistingResults existing = read_existing_results(o.output);
    if (existing.bad_lines > 0)
      log->warn("{}: {} lines are not results (no JSON object with an id): ignored",
                o.output.string(), existing.bad_lines);
    if (!existing.keys.empty())
      log->info("{}: {} results already there: those ids are skipped", o.output.string(),
                existing.keys.size());
    const InputShare share{replica.index, replica.count};
    counts.total = count_owned_lines(o.input, share);
    reader.emplace(o.input, share, o.defaults, std::move(existing.keys));
    out.emplace(o.output);
    errs.emplace(errors_path);
    tokenizer = EngineSetup::load_tokenizer(o.engine.model);
    chat = chat_prompts_for(o.engine.model);
    limits.vocab_size = config.vocab_size;
    limits.max_context = o.engine.max_context > 0
                             ? std::min(o.engine.max_context, config.max_position_embeddings)
                             : config.max_position_embeddings;
    fill(lookahead);
    // On a GPU the KV cache takes the whole budget; on the CPU (where the cache is allocated
    // and zeroed up front) enough for a full batch of the longest requests read so far, plus
    // one sequence of the full context so that any later valid request fits.
    if (!runs_on_gpu(o.engine)) {
      const int64_t longest = ready.empty() ? 0 : std::prev(ready.end())->first;
      tokens_hint = int64_t(max_running) * longest + limits.max_context;
    }
  }
  // The leader's KV size decides for the replica (create() broadcasts it).
  EngineSetup setup = EngineSetup::create(o.engine, tokens_hint);
  if (!setup.leader()) {
    setup.run_follower();  // until the leader's setup is destroyed
    return 0;
  }
  runtime::Engine& engine = *setup.engine;

  const int64_t block_tokens = setup.cache->layout().block_size;
  const int64_t budget_blocks =
      std::max<int64_t>(1, int64_t(double(setup.cache->pool().capacity()) * o.kv_overcommit));
  int64_t reserved_blocks = 0;
  std::unordered_map<runtime::RequestId, InFlight> flight;

  const bool bar = o.progress == "bar" || (o.progress == "auto" && ::isatty(STDERR_FILENO));
  Progress progress(stderr, bar, std::chrono::duration<double>(o.progress_interval_s), prefix);
  const bool show_progress = o.progress != "off";
  StopSignals signals;

  // Admits requests largest-first while their worst-case KV blocks fit.
  auto admit = [&] {
    while (int64_t(flight.size()) < max_running && !ready.empty()) {
      const int64_t free_tokens =
          std::max<int64_t>(0, budget_blocks - reserved_blocks) * block_tokens;
      auto it = ready.upper_bound(free_tokens);
      if (it == ready.begin()) {
        if (!flight.empty()) return;
        it = ready.end();  // nothing fits an empty engine: run the largest alone
      }
      --it;
      const int64_t blocks = (it->first + block_tokens - 1) / block_tokens;
      BatchRequest r = std::move(it->second);
      ready.erase(it);
      runtime::GenerationRequest g;
      g.prompt = std::move(r.prompt_ids);
      g.max_tokens = r.max_tokens;
      g.sampling = r.sampling;
      g.ignore_eos = r.ignore_eos;
      runtime::RequestId id = 0;
      try {
        id = engine.submit(std::move(g));
      } catch (const Error& e) {
        if (e.code() != ErrorCode::invalid_argument && e.code() != ErrorCode::resource_exhausted)
          throw;
        report_error(r.line, r.id, e.message());
        continue;
      }
      InFlight f;
      if (!r.stop.empty()) f.stream.emplace(*tokenizer, r.stop);
      f.request = std::move(r);
      f.reserved_blocks = blocks;
      reserved_blocks += blocks;
      flight.emplace(id, std::move(f));
    }
  };

  auto complete = [&](runtime::RequestId id, InFlight& f, const std::string& reason) {
    std::optional<std::string> text;
    if (f.stream) {
      f.stream->finish();
      text = f.stream->text();
    } else if (tokenizer) {
      std::vector<int32_t> ids;
      ids.reserve(f.tokens.size());
      for (const auto& t : f.tokens) ids.push_back(t.token);
      text = tokenizer->decode(ids);
    }
    out->append(result_line(f.request, text, f.tokens, reason));
    ++counts.written;
    counts.prompt_tokens += f.request.prompt_tokens;
    counts.completion_tokens += int64_t(f.tokens.size());
    reserved_blocks -= f.reserved_blocks;
    flight.erase(id);
  };

  auto handle = [&](runtime::TokenEvent& e) {
    auto it = flight.find(e.id);
    if (it == flight.end()) return;  // ended by a stop string; this is its cancel
    InFlight& f = it->second;
    if (e.has_token) {
      f.tokens.push_back(std::move(e.token));
      if (f.stream) {
        f.stream->push(f.tokens.back().token);
        if (f.stream->stopped()) {
          if (e.finish == runtime::FinishReason::none) engine.cancel(e.id);
          complete(e.id, f, "stop");
          return;
        }
      }
    }
    switch (e.finish) {
      case runtime::FinishReason::none:
        return;
      case runtime::FinishReason::stop:
      case runtime::FinishReason::length:
        complete(e.id, f, runtime::finish_reason_name(e.finish));
        return;
      case runtime::FinishReason::cancelled:
      case runtime::FinishReason::error:
        report_error(f.request.line, f.request.id,
                     e.error.empty() ? std::string("the request was cancelled") : e.error);
        reserved_blocks -= f.reserved_blocks;
        flight.erase(it);
        return;
    }
  };

  log->info("{}{} lines for this process; KV cache {} blocks of {} tokens; up to {} running",
            prefix, counts.total, setup.cache->pool().capacity(), block_tokens, max_running);
  for (;;) {
    if (StopSignals::caught()) break;
    if (int64_t(ready.size()) < lookahead / 2) fill(lookahead);
    admit();
    if (flight.empty()) {
      if (ready.empty() && reader->at_end()) break;
      continue;
    }
    for (auto& e : engine.step()) handle(e);
    counts.in_flight = int64_t(flight.size());
    counts.generated_tokens = engine.stats().generated_tokens;
    if (show_progress) progress.update(counts);
  }
  counts.in_flight = int64_t(flight.size());
  if (show_progress) {
    progress.update(counts, /*force=*/true);
    progress.finish();
  }

  BatchSummary summary;
  summary.counts = counts;
  summary.wall_seconds = progress.elapsed_seconds();
  const runtime::EngineStats stats = engine.stats();
  summary.engine_steps = stats.steps;
  summary.preemptions = stats.preemptions;
  summary.interrupted = StopSignals::caught() != 0;
  summary.abandoned = int64_t(flight.size());
  summary.extra = kv_tier_summary(setup);
  if (counts.errors > 0) summary.extra.emplace_back("errors file", errors_path.string());
  std::fputs(format_summary(summary, prefix).c_str(), stderr);
  std::fflush(stderr);
  report_job_totals(leaders, summary, "[all replicas] ");

  switch (StopSignals::caught()) {
    case 0:
      return 0;
    case SIGINT:
      return 130;
    case SIGTERM:
      return 143;
    default:
      return 128 + StopSignals::caught();
  }
}

}  // namespace nosa::launcher::batch
