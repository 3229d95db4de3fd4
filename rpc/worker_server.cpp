#include "rpc/worker_server.h"

#include <unistd.h>

#include <chrono>
#include <csignal>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "rpc/framing.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"
#include "runtime/text_stream.h"

namespace nosa::rpc {

using Clock = std::chrono::steady_clock;

namespace {
// One request on this worker. Built on the I/O thread; after submit only the loop's thread
// touches the text stream and counters (events of one request arrive in order on that thread).
struct Req {
  uint64_t coord_id = 0;
  uint64_t epoch = 0;  // the connection it came on
  runtime::RequestId loop_id = 0;
  int logprobs = -1;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  std::optional<runtime::TextStream> text;
  bool first = true;
  bool ended = false;
};

std::pair<std::string, std::string> split_host_port(const std::string& s) {
  const size_t colon = s.rfind(':');
  NOSA_CHECK(colon != std::string::npos && colon + 1 < s.size(),
             "--coordinator '{}' must be HOST:PORT", s);
  std::string host = s.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  return {host.empty() ? "127.0.0.1" : host, s.substr(colon + 1)};
}
}  // namespace

struct WorkerServer::Impl {
  // What the loop's callbacks reach the I/O thread through; nulled when run() ends, so a late
  // callback finds nothing instead of a destroyed object.
  struct Outbox {
    std::mutex mutex;
    Impl* impl = nullptr;
  };

  runtime::EngineLoop& loop;
  const runtime::Tokenizer* tok;
  ChatFormat chat;
  ReplicaInfo info;
  WorkerOptions o;
  std::shared_ptr<Histogram> step_hist;
  std::shared_ptr<spdlog::logger> log = logger("rpc");

  net::io_context io;
  net::steady_timer heartbeat_timer{io};
  net::steady_timer retry_timer{io};
  tcp::resolver resolver{io};
  std::optional<net::signal_set> signals;
  std::shared_ptr<Connection> conn;
  std::shared_ptr<Outbox> outbox = std::make_shared<Outbox>();
  uint64_t epoch = 0;
  bool registered = false;
  bool stopping = false;
  bool ever_registered = false;
  Clock::time_point deadline;
  std::exception_ptr fatal;
  std::string host, port;
  std::unordered_map<uint64_t, std::shared_ptr<Req>> reqs;  // by coordinator id; I/O thread

  Impl(runtime::EngineLoop& l, const runtime::Tokenizer* t, ChatFormat c, ReplicaInfo i,
       WorkerOptions opt, std::shared_ptr<Histogram> h)
      : loop(l), tok(t), chat(std::move(c)), info(i), o(std::move(opt)), step_hist(std::move(h)) {}

  void fail(std::exception_ptr e) {
    if (!fatal) fatal = e;
    do_stop("the worker is exiting");
  }

  void connect() {
    if (stopping) return;
    resolver.async_resolve(
        host, port, [this](boost::system::error_code ec, tcp::resolver::results_type results) {
          if (stopping) return;
          if (ec) return retry("cannot resolve " + host + ": " + ec.message());
          auto socket = std::make_shared<tcp::socket>(io);
          net::async_connect(*socket, results,
                             [this, socket](boost::system::error_code ec, const tcp::endpoint&) {
                               if (stopping) return;
                               if (ec) return retry(ec.message());
                               on_connected(std::move(*socket));
                             });
        });
  }

  void retry(const std::string& why) {
    if (Clock::now() > deadline) {
      fail(std::make_exception_ptr(
          Error(ErrorCode::unavailable,
                fmt::format("cannot reach the coordinator at {}:{} ({}); gave up after {} s", host,
                            port, why, o.connect_timeout_s))));
      return;
    }
    log->debug("coordinator {}:{} not reachable yet ({}); retrying", host, port, why);
    retry_timer.expires_after(std::chrono::milliseconds(500));
    retry_timer.async_wait([this](boost::system::error_code ec) {
      if (!ec) connect();
    });
  }

  void on_connected(tcp::socket socket) {
    ++epoch;
    conn = std::make_shared<Connection>(std::move(socket), o.max_frame_bytes);
    const uint64_t my_epoch = epoch;
    conn->start([this](pb::Envelope& m) { on_message(m); },
                [this, my_epoch](const std::string& reason) { on_close(my_epoch, reason); });
    conn->send(make_hello());
  }

  void on_message(pb::Envelope& m) {
    switch (m.body_case()) {
      case pb::Envelope::kHelloReply: {
        if (!m.hello_reply().accepted()) {
          fail(std::make_exception_ptr(
              Error(ErrorCode::invalid_argument,
                    "the coordinator refused this worker: " + m.hello_reply().error())));
          return;
        }
        pb::Envelope r;
        auto* reg = r.mutable_register_worker();
        reg->set_model_name(o.model_name);
        reg->set_max_context(info.max_context);
        reg->set_vocab_size(info.vocab_size);
        reg->set_kv_blocks_total(info.kv_blocks_total);
        reg->set_kv_block_tokens(info.kv_block_tokens);
        reg->set_max_running(info.max_running);
        reg->set_tp(info.tp);
        reg->set_device(info.device);
        char hostname[256] = {0};
        ::gethostname(hostname, sizeof(hostname) - 1);
        reg->set_worker_name(fmt::format("{}:{}", hostname, ::getpid()));
        reg->set_has_tokenizer(tok != nullptr);
        reg->set_chat_format(chat.name());
        reg->set_created_unix(std::chrono::duration_cast<std::chrono::seconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count());
        conn->send(r);
        break;
      }
      case pb::Envelope::kRegistered:
        if (m.registered().heartbeat_interval_ms() > 0)
          o.heartbeat_ms = m.registered().heartbeat_interval_ms();
        registered = true;
        ever_registered = true;
        log->info("registered with the coordinator at {}:{} as replica {} (model '{}')", host, port,
                  m.registered().replica_id(), o.model_name);
        send_heartbeat();
        break;
      case pb::Envelope::kSubmit:
        submit(m.submit());
        break;
      case pb::Envelope::kCancel: {
        auto it = reqs.find(m.cancel().request_id());
        if (it != reqs.end()) loop.cancel(it->second->loop_id);
        break;
      }
      case pb::Envelope::kGoodbye:
        log->warn("the coordinator is closing the connection: {}", m.goodbye().reason());
        break;
      default:
        log->debug("ignoring an unexpected message ({}) from the coordinator", int(m.body_case()));
    }
  }

  void on_close(uint64_t closed_epoch, const std::string& reason) {
    if (closed_epoch != epoch) return;
    conn.reset();
    registered = false;
    heartbeat_timer.cancel();
    // The coordinator retries or fails these requests itself; free their capacity here.
    for (auto& [id, r] : reqs) loop.cancel(r->loop_id);
    reqs.clear();
    if (stopping) return;
    log->warn("lost the coordinator at {}:{} ({}); reconnecting for up to {} s", host, port, reason,
              o.connect_timeout_s);
    deadline = Clock::now() + std::chrono::milliseconds(int64_t(o.connect_timeout_s * 1000));
    retry("connection lost");
  }

  void send_heartbeat() {
    if (!registered || !conn) return;
    const auto s = loop.stats();
    if (s.failed) {
      fail(std::make_exception_ptr(
          Error(ErrorCode::internal, "the engine failed; this worker cannot serve any more")));
      return;
    }
    pb::Envelope m;
    auto* h = m.mutable_heartbeat();
    h->set_waiting(s.engine.waiting);
    h->set_running(s.engine.running);
    h->set_in_flight(s.in_flight);
    const auto& t = s.engine.tiers;
    if (t.device_slots > 0) {
      // Offloaded: the device block cache (in chunks), host memory and disk (in blocks).
      auto* device = h->add_kv_tiers();
      device->set_name(info.device);
      device->set_blocks_used(t.device_slots_used);
      device->set_blocks_total(t.device_slots);
      device->set_hits(t.hits);
      device->set_misses(t.misses);
      auto* traffic = h->mutable_kv_traffic();
      traffic->set_selected(t.selected);
      traffic->set_overlap(t.overlap);
      traffic->set_prefetched(t.prefetched);
      traffic->set_prefetch_hits(t.prefetch_hits);
      traffic->set_bytes_host_to_device(t.bytes_host_to_device);
      traffic->set_bytes_device_to_host(t.bytes_device_to_host);
      traffic->set_bytes_disk_read(t.bytes_disk_read);
      traffic->set_bytes_disk_written(t.bytes_disk_written);
      auto* host = h->add_kv_tiers();
      host->set_name("host");
      host->set_blocks_used(t.host_blocks_used);
      host->set_blocks_total(t.host_blocks);
      if (t.disk_blocks > 0) {
        auto* disk = h->add_kv_tiers();
        disk->set_name("disk");
        disk->set_blocks_used(t.disk_blocks_used);
        disk->set_blocks_total(t.disk_blocks);
      }
    } else {
      auto* tier = h->add_kv_tiers();
      tier->set_name(info.device);
      tier->set_blocks_used(s.engine.kv_blocks_used);
      tier->set_blocks_total(s.engine.kv_blocks_total);
    }
    h->set_prompt_tokens_total(s.engine.prompt_tokens);
    h->set_generated_tokens_total(s.engine.generated_tokens);
    h->set_steps_total(s.engine.steps);
    h->set_preemptions_total(s.engine.preemptions);
    if (step_hist) *h->mutable_step_seconds() = step_hist->snapshot();
    conn->send(m);
    heartbeat_timer.expires_after(std::chrono::milliseconds(o.heartbeat_ms));
    heartbeat_timer.async_wait([this](boost::system::error_code ec) {
      if (!ec) send_heartbeat();
    });
  }

  void send_error(uint64_t coord_id, ErrorCode code, const std::string& message) {
    pb::Envelope m;
    auto* e = m.mutable_event();
    e->set_request_id(coord_id);
    e->set_finished(true);
    e->set_finish_reason("error");
    e->mutable_error()->set_code(error_code_name(code));
    e->mutable_error()->set_message(message);
    if (conn) conn->send(m);
  }

  std::vector<int32_t> encode(const std::string& text) const {
    NOSA_CHECK(tok != nullptr,
               "model '{}' has no tokenizer (no tokenizer.model): give the prompt as token ids",
               o.model_name);
    std::vector<int32_t> ids = tok->encode(text);
    if (tok->bos_id() >= 0) ids.insert(ids.begin(), tok->bos_id());
    return ids;
  }

  runtime::GenerationRequest build(const pb::Submit& s, Req& r) const {
    runtime::GenerationRequest g;
    std::vector<std::string> stops(s.stop().begin(), s.stop().end());
    switch (s.prompt_case()) {
      case pb::Submit::kText:
        g.prompt = encode(s.text());
        break;
      case pb::Submit::kTokenIds:
        g.prompt.assign(s.token_ids().ids().begin(), s.token_ids().ids().end());
        break;
      case pb::Submit::kChat: {
        std::vector<runtime::ChatMessage> messages;
        for (const auto& m : s.chat().messages()) messages.push_back({m.role(), m.content()});
        g.prompt = encode(chat.render(messages));
        for (const auto& stop : chat.stop_strings()) stops.push_back(stop);
        break;
      }
      default:
        NOSA_FAIL(ErrorCode::invalid_argument, "the request has no prompt");
    }
    const int64_t n_prompt = int64_t(g.prompt.size());
    const int64_t limit = loop.max_context();
    if (s.max_tokens() > 0) {
      NOSA_CHECK(n_prompt + s.max_tokens() <= limit,
                 "This model's maximum context length is {} tokens. However, you requested {} "
                 "tokens ({} in the prompt, {} for the completion). Please reduce the length of "
                 "the prompt or of the completion (max_tokens).",
                 limit, n_prompt + s.max_tokens(), n_prompt, s.max_tokens());
      g.max_tokens = s.max_tokens();
    } else {
      NOSA_CHECK(n_prompt < limit,
                 "This model's maximum context length is {} tokens. However, the prompt has {} "
                 "tokens. Please reduce the length of the prompt.",
                 limit, n_prompt);
      g.max_tokens = limit - n_prompt;
    }
    NOSA_CHECK(s.stop().empty() || tok != nullptr,
               "stop strings need a tokenizer; model '{}' has none (use stop_token_ids)",
               o.model_name);
    g.sampling.temperature = s.temperature();
    g.sampling.top_p = s.top_p();
    g.sampling.top_k = s.top_k();
    g.sampling.seed = s.seed();
    g.sampling.logprobs = std::max(0, s.logprobs());
    g.ignore_eos = s.ignore_eos();
    g.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
    r.prompt_tokens = n_prompt;
    r.logprobs = s.logprobs();
    if (tok) r.text.emplace(*tok, stops);
    return g;
  }

  void submit(const pb::Submit& s) {
    const uint64_t id = s.request_id();
    if (reqs.count(id)) {
      send_error(id, ErrorCode::internal, "duplicate request id");
      return;
    }
    auto r = std::make_shared<Req>();
    r->coord_id = id;
    r->epoch = epoch;
    try {
      runtime::GenerationRequest g = build(s, *r);
      reqs[id] = r;
      // The callback reaches this object only through the outbox, which run() empties before
      // it returns: the loop may outlive this server (and ends its requests when it stops).
      r->loop_id = loop.submit(std::move(g), [r, box = outbox](const runtime::LoopEvent& e) {
        std::lock_guard lock(box->mutex);
        if (box->impl) box->impl->on_loop_event(*r, e, r);
      });
    } catch (const Error& e) {
      reqs.erase(id);
      send_error(id, e.code(), e.message());
    } catch (const std::exception& e) {
      reqs.erase(id);
      send_error(id, ErrorCode::internal, e.what());
    }
  }

  // On the loop's thread: turns an engine event into an RPC event and hands it to the I/O
  // thread.
  // (Called with the outbox locked and this object alive.)
  void on_loop_event(Req& r, const runtime::LoopEvent& le, const std::shared_ptr<Req>& keep) {
    if (r.ended) return;  // a stop string ended it; the engine's cancel event follows
    const auto& e = le.event;
    pb::Envelope m;
    auto* ev = m.mutable_event();
    ev->set_request_id(r.coord_id);
    if (r.first) {
      ev->set_prompt_tokens(r.prompt_tokens);
      r.first = false;
    }
    bool stopped_by_string = false;
    if (e.has_token) {
      ++r.completion_tokens;
      auto* t = ev->add_tokens();
      t->set_id(e.token.token);
      if (r.logprobs >= 0) {
        if (tok) t->set_text(tok->piece_text(e.token.token));
        t->set_logprob(e.token.logprob);
        for (auto& [id, lp] : e.token.top) {
          auto* a = t->add_top();
          a->set_token(id);
          if (tok) a->set_text(tok->piece_text(id));
          a->set_logprob(lp);
        }
      }
      if (r.text) {
        ev->set_text(r.text->push(e.token.token));
        stopped_by_string = r.text->stopped();
      }
    }
    if (stopped_by_string || e.finish != runtime::FinishReason::none) {
      r.ended = true;
      ev->set_finished(true);
      ev->set_prompt_tokens(r.prompt_tokens);
      ev->set_completion_tokens(r.completion_tokens);
      if (stopped_by_string) {
        ev->set_finish_reason("stop");
        if (e.finish == runtime::FinishReason::none) loop.cancel(e.id);
      } else {
        ev->set_finish_reason(runtime::finish_reason_name(e.finish));
        if (r.text &&
            (e.finish == runtime::FinishReason::stop || e.finish == runtime::FinishReason::length))
          *ev->mutable_text() += r.text->finish();
        if (e.finish == runtime::FinishReason::error) {
          ev->mutable_error()->set_code(error_code_name(le.error_code));
          ev->mutable_error()->set_message(e.error);
        }
      }
    }
    const bool finished = ev->finished();
    net::post(io, [this, m = std::move(m), keep, finished] {
      auto it = reqs.find(keep->coord_id);
      if (it == reqs.end() || it->second != keep) return;  // cancelled by a lost connection
      if (conn && keep->epoch == epoch) conn->send(m);
      if (finished) reqs.erase(it);
    });
  }

  void do_stop(const std::string& reason) {
    if (stopping) return;
    stopping = true;
    heartbeat_timer.cancel();
    retry_timer.cancel();
    resolver.cancel();
    if (signals) {
      boost::system::error_code ec;
      signals->cancel(ec);
    }
    for (auto& [id, r] : reqs) loop.cancel(r->loop_id);
    reqs.clear();
    if (conn) {
      pb::Envelope bye;
      bye.mutable_goodbye()->set_reason(reason);
      conn->send(bye);
      conn->close_after_writes(reason);
    }
  }
};

WorkerServer::WorkerServer(runtime::EngineLoop& loop, const runtime::Tokenizer* tokenizer,
                           ChatFormat chat, ReplicaInfo info, WorkerOptions options,
                           std::shared_ptr<Histogram> step_seconds)
    : impl_(std::make_unique<Impl>(loop, tokenizer, std::move(chat), info, std::move(options),
                                   std::move(step_seconds))) {}

WorkerServer::~WorkerServer() = default;

void WorkerServer::run() {
  Impl& w = *impl_;
  std::tie(w.host, w.port) = split_host_port(w.o.coordinator);
  {
    std::lock_guard lock(w.outbox->mutex);
    w.outbox->impl = &w;
  }
  // However run() ends, loop callbacks stop reaching this object.
  struct Detach {
    Impl& w;
    ~Detach() {
      std::lock_guard lock(w.outbox->mutex);
      w.outbox->impl = nullptr;
    }
  } detach{w};
  if (w.o.handle_signals) {
    w.signals.emplace(w.io, SIGINT, SIGTERM);
    w.signals->async_wait([&w](boost::system::error_code ec, int sig) {
      if (ec) return;
      w.log->info("signal {}: stopping", sig);
      w.do_stop("the worker is stopping");
    });
  }
  w.deadline = Clock::now() + std::chrono::milliseconds(int64_t(w.o.connect_timeout_s * 1000));
  w.log->info("connecting to the coordinator at {}:{}", w.host, w.port);
  w.connect();
  w.io.run();
  if (w.fatal) std::rethrow_exception(w.fatal);
}

void WorkerServer::stop() {
  net::post(impl_->io, [w = impl_.get()] { w->do_stop("the worker is stopping"); });
}

}  // namespace nosa::rpc
