#include "rpc/coordinator.h"

// clang-format off
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <array>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <csignal>
#include <map>
#include <random>
#include <set>
#include <unordered_map>

#include "rpc/framing.h"
#include "rpc/metrics.h"
#include "rpc/openai_api.h"
#include "rpc/router.h"
#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::rpc {

namespace beast = boost::beast;
namespace http = beast::http;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string random_hex(size_t n) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) s.push_back(digits[rng() % 16]);
  return s;
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string to_string(beast::string_view v) { return std::string(v.data(), v.size()); }

// The status a replica's error code maps to when nothing has reached the client yet.
ApiError error_from_replica(const pb::Error& e) {
  const std::string& code = e.code();
  if (code == "invalid_argument") return bad_request(e.message());
  if (code == "resource_exhausted") {
    ApiError a = bad_request(e.message());
    a.code = "context_length_exceeded";
    return a;
  }
  if (code == "unavailable") return server_error(503, e.message(), "replica_unavailable");
  return server_error(500, e.message(), code);
}

}  // namespace

class HttpSession;

struct Replica {
  uint64_t id = 0;
  std::shared_ptr<Connection> conn;
  bool hello_done = false;
  bool registered = false;
  pb::Register info;
  pb::Heartbeat last;
  Clock::time_point connected_at, last_seen;
  std::set<uint64_t> outstanding;
  uint64_t last_pick = 0;
};

struct RequestRecord {
  uint64_t id = 0;
  std::string model;
  std::string endpoint;  // for metrics
  pb::Submit submit;
  std::weak_ptr<HttpSession> session;
  uint64_t replica = 0;
  std::vector<uint64_t> tried;
  bool first_token_seen = false;
  Clock::time_point start;
};

struct Coordinator::Impl {
  CoordinatorOptions o;
  std::shared_ptr<spdlog::logger> log = logger("rpc");
  net::io_context io;
  tcp::acceptor http_acceptor{io};
  tcp::acceptor worker_acceptor{io};
  std::optional<net::signal_set> signals;
  net::steady_timer sweep_timer{io};
  std::map<uint64_t, Replica> replicas;  // connections, registered or not yet
  uint64_t next_replica = 1;
  std::unordered_map<uint64_t, RequestRecord> requests;
  uint64_t next_request = 1;
  uint64_t pick_counter = 0;
  std::map<HttpSession*, std::weak_ptr<HttpSession>> sessions;
  bool stopping = false;

  // Metrics.
  Histogram ttft{request_latency_bounds()};
  Histogram e2e{request_latency_bounds()};
  std::map<std::pair<std::string, std::string>, int64_t> requests_total;  // endpoint, outcome
  std::map<unsigned, int64_t> responses_total;                            // by status
  int64_t prompt_tokens_total = 0, generation_tokens_total = 0;
  int64_t retries_total = 0, replicas_lost_total = 0;

  explicit Impl(CoordinatorOptions opt) : o(std::move(opt)) {}

  // --- HTTP side (called by sessions) ---
  std::optional<ApiError> submit(const std::shared_ptr<HttpSession>& session, ApiRequest& api,
                                 uint64_t& id_out, std::string& model_out);
  void cancel(uint64_t id);
  std::vector<std::string> served_models() const;
  size_t registered_count() const;
  std::string metrics_text() const;
  void count_request(const std::string& endpoint, unsigned status, bool client_gone);
  void listen_http();
  void listen_workers();

  // --- replica side ---
  std::optional<ApiError> route(RequestRecord& rec);
  void on_worker_message(uint64_t rid, pb::Envelope& m);
  void on_worker_event(Replica& r, const pb::Event& ev);
  void remove_replica(uint64_t rid, const std::string& reason);
  void sweep();
  void do_stop();
};

// One HTTP connection; at most one API request in flight (HTTP/1.1 without pipelining).
class HttpSession : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(tcp::socket socket, Coordinator::Impl& c) : stream_(std::move(socket)), c_(c) {}

  void start() { read(); }
  void close() {
    boost::system::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.socket().close(ec);
  }

  bool sent_anything() const { return stream_started_; }
  void on_retry() { acc_ = Completion{}; }
  void on_event(const pb::Event& ev);
  void on_failure(const ApiError& e);

 private:
  void read();
  void on_header(boost::system::error_code ec);
  void read_body();
  void on_read(boost::system::error_code ec);
  void handle();
  void respond(unsigned status, std::string body, const std::string& content_type,
               bool close_after = false,
               std::vector<std::pair<std::string, std::string>> extra = {});
  void respond_error(const ApiError& e, bool close_after = false) {
    respond(unsigned(e.status), dump(e.body()), "application/json", close_after);
  }
  void linger_close();
  void watch_disconnect();
  void client_gone(const std::string& why);
  void finish_request(unsigned status);
  // Server-sent events.
  void start_stream();
  void push_sse(const std::string& data);
  void end_stream();
  void write_more();

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  Coordinator::Impl& c_;
  std::shared_ptr<void> response_;  // keeps the response being written alive
  bool keep_alive_ = true;
  unsigned version_ = 11;

  // The API request in flight.
  uint64_t rid_ = 0;
  ApiRequest api_;
  std::string resp_id_, model_;
  int64_t created_ = 0;
  Completion acc_;
  bool stream_started_ = false;
  bool stream_ended_ = false;
  std::deque<std::string> out_;
  bool writing_ = false;
  uint64_t watch_gen_ = 0;
};

// ---------------------------------------------------------------------------------------------
// HttpSession

void HttpSession::read() {
  parser_.emplace();
  parser_->body_limit(c_.o.max_body_bytes);
  parser_->header_limit(64 * 1024);
  stream_.expires_after(std::chrono::milliseconds(int64_t(c_.o.idle_timeout_s * 1000)));
  http::async_read_header(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](boost::system::error_code ec, size_t) { self->on_header(ec); });
}

void HttpSession::on_header(boost::system::error_code ec) {
  if (ec) return on_read(ec);
  auto& req = parser_->get();
  if (auto len = parser_->content_length(); len && *len > c_.o.max_body_bytes)
    return on_read(http::error::body_limit);
  // Answer "Expect: 100-continue" so that clients send large bodies without waiting.
  auto expect = req[http::field::expect];
  if (beast::iequals(expect, "100-continue")) {
    auto cont = std::make_shared<std::string>("HTTP/1.1 100 Continue\r\n\r\n");
    net::async_write(stream_, net::buffer(*cont),
                     [self = shared_from_this(), cont](boost::system::error_code ec, size_t) {
                       if (ec) return self->close();
                       self->read_body();
                     });
    return;
  }
  read_body();
}

void HttpSession::read_body() {
  http::async_read(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](boost::system::error_code ec, size_t) { self->on_read(ec); });
}

void HttpSession::on_read(boost::system::error_code ec) {
  stream_.expires_never();
  if (ec == http::error::end_of_stream || ec == net::error::eof ||
      ec == net::error::connection_reset || ec == net::error::operation_aborted ||
      ec == beast::error::timeout)
    return close();
  if (ec == http::error::body_limit) {
    ApiError e = bad_request(fmt::format(
        "The request body is larger than the limit of {} bytes (nosa serve --max-body-bytes)",
        c_.o.max_body_bytes));
    e.status = 413;
    e.code = "request_too_large";
    keep_alive_ = false;
    return respond_error(e, true);
  }
  if (ec) {
    keep_alive_ = false;
    return respond_error(bad_request("Malformed HTTP request: " + ec.message()), true);
  }
  handle();
}

void HttpSession::handle() {
  auto req = parser_->release();
  keep_alive_ = req.keep_alive();
  version_ = req.version();
  std::string target = to_string(req.target());
  if (auto q = target.find('?'); q != std::string::npos) target.resize(q);
  while (target.size() > 1 && target.back() == '/') target.pop_back();
  const auto method = req.method();
  const std::string method_name = to_string(req.method_string());

  struct Route {
    const char* path;
    http::verb verb;
  };
  static const Route routes[] = {{"/health", http::verb::get},
                                 {"/metrics", http::verb::get},
                                 {"/v1/models", http::verb::get},
                                 {"/v1/completions", http::verb::post},
                                 {"/v1/chat/completions", http::verb::post}};
  const Route* route = nullptr;
  for (const auto& r : routes)
    if (target == r.path) route = &r;
  if (!route) return respond_error(not_found_path(method_name, target));
  if (method != route->verb && !(method == http::verb::head && route->verb == http::verb::get)) {
    ApiError e = bad_request(fmt::format("Method {} is not allowed on {} (use {})", method_name,
                                         target, to_string(http::to_string(route->verb))));
    e.status = 405;
    e.code = "method_not_allowed";
    return respond(405, dump(e.body()), "application/json", false,
                   {{"Allow", to_string(http::to_string(route->verb))}});
  }

  if (target == "/health") {
    const size_t n = c_.registered_count();
    json j = {{"status", n > 0 ? "ok" : "no replica registered yet"}, {"replicas", n}};
    return respond(n > 0 ? 200 : 503, dump(j), "application/json");
  }
  if (target == "/metrics")
    return respond(200, c_.metrics_text(), "text/plain; version=0.0.4; charset=utf-8");

  // /v1/*: the API key, when one is set.
  if (!c_.o.api_key.empty()) {
    const std::string auth = to_string(req[http::field::authorization]);
    if (auth != "Bearer " + c_.o.api_key) {
      ApiError e;
      e.status = 401;
      e.message = auth.empty() ? "You didn't provide an API key. Send it in the Authorization "
                                 "header: Authorization: Bearer YOUR_KEY"
                               : "Incorrect API key provided";
      e.code = "invalid_api_key";
      return respond_error(e);
    }
  }
  if (target == "/v1/models") {
    std::vector<std::pair<std::string, int64_t>> models;
    for (auto& name : c_.served_models()) models.emplace_back(name, unix_now());
    return respond(200, dump(models_response(models)), "application/json");
  }

  const Endpoint endpoint =
      target == "/v1/completions" ? Endpoint::completions : Endpoint::chat_completions;
  try {
    api_ = parse_request(endpoint, req.body());
  } catch (const ApiException& e) {
    c_.count_request(target == "/v1/completions" ? "completions" : "chat_completions",
                     unsigned(e.error().status), false);
    return respond_error(e.error());
  }
  uint64_t id = 0;
  std::string model;
  if (auto err = c_.submit(shared_from_this(), api_, id, model)) {
    c_.count_request(endpoint == Endpoint::completions ? "completions" : "chat_completions",
                     unsigned(err->status), false);
    return respond_error(*err);
  }
  rid_ = id;
  model_ = model;
  resp_id_ = (endpoint == Endpoint::completions ? "cmpl-" : "chatcmpl-") + random_hex(24);
  created_ = unix_now();
  acc_ = Completion{};
  stream_started_ = stream_ended_ = false;
  watch_disconnect();
}

void HttpSession::watch_disconnect() {
  const uint64_t gen = ++watch_gen_;
  stream_.socket().async_wait(tcp::socket::wait_read,
                              [self = shared_from_this(), gen](boost::system::error_code ec) {
                                if (gen != self->watch_gen_ || self->rid_ == 0) return;
                                boost::system::error_code e2;
                                const size_t n = ec ? 0 : self->stream_.socket().available(e2);
                                if (ec || e2 || n == 0)
                                  self->client_gone("the client closed the connection");
                                // Otherwise the client sent more bytes (a pipelined request): read
                                // after this one.
                              });
}

void HttpSession::client_gone(const std::string& why) {
  if (rid_) {
    c_.log->debug("request {}: {}; cancelling it", rid_, why);
    c_.cancel(rid_);
    c_.count_request(api_.endpoint == Endpoint::completions ? "completions" : "chat_completions",
                     499, true);
    rid_ = 0;
  }
  ++watch_gen_;
  close();
}

void HttpSession::finish_request(unsigned status) {
  c_.count_request(api_.endpoint == Endpoint::completions ? "completions" : "chat_completions",
                   status, false);
  rid_ = 0;
  ++watch_gen_;
}

void HttpSession::on_event(const pb::Event& ev) {
  if (rid_ == 0) return;
  if (!api_.stream) {
    acc_.text += ev.text();
    if (api_.want_logprobs)
      for (const auto& t : ev.tokens()) acc_.tokens.push_back(t);
    if (ev.prompt_tokens()) acc_.prompt_tokens = ev.prompt_tokens();
    if (!ev.finished()) return;
    acc_.completion_tokens = ev.completion_tokens();
    const std::string& reason = ev.finish_reason();
    if (reason == "error") {
      ApiError e = error_from_replica(ev.error());
      finish_request(unsigned(e.status));
      return respond_error(e);
    }
    if (reason != "stop" && reason != "length") {
      ApiError e = server_error(503, "the replica ended the request (" + reason + ")");
      finish_request(503);
      return respond_error(e);
    }
    acc_.finish_reason = reason;
    finish_request(200);
    return respond(200, dump(completion_response(api_, resp_id_, created_, model_, acc_)),
                   "application/json");
  }

  // Streaming: errors before the first byte are plain HTTP errors.
  if (!stream_started_ && ev.finished() && ev.finish_reason() == "error") {
    ApiError e = error_from_replica(ev.error());
    finish_request(unsigned(e.status));
    return respond_error(e);
  }
  if (!stream_started_) start_stream();
  if (ev.prompt_tokens()) acc_.prompt_tokens = ev.prompt_tokens();
  std::vector<pb::Token> tokens;
  if (api_.want_logprobs) tokens.assign(ev.tokens().begin(), ev.tokens().end());
  if (!ev.text().empty() || !tokens.empty())
    push_sse(dump(stream_chunk(api_, resp_id_, created_, model_, ev.text(), tokens, "")));
  if (!ev.finished()) return;
  const std::string& reason = ev.finish_reason();
  if (reason == "stop" || reason == "length") {
    push_sse(dump(stream_chunk(api_, resp_id_, created_, model_, "", {}, reason)));
    if (api_.include_usage)
      push_sse(dump(usage_chunk(api_, resp_id_, created_, model_, acc_.prompt_tokens,
                                ev.completion_tokens())));
    push_sse("[DONE]");
    finish_request(200);
  } else {
    ApiError e = reason == "error"
                     ? error_from_replica(ev.error())
                     : server_error(503, "the replica ended the request (" + reason + ")");
    push_sse(dump(e.body()));
    keep_alive_ = false;
    finish_request(unsigned(e.status));
  }
  end_stream();
}

void HttpSession::on_failure(const ApiError& e) {
  if (rid_ == 0) return;
  finish_request(unsigned(e.status));
  if (!stream_started_) return respond_error(e);
  push_sse(dump(e.body()));
  keep_alive_ = false;
  end_stream();
}

void HttpSession::start_stream() {
  stream_started_ = true;
  std::string head = fmt::format(
      "HTTP/1.{} 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
      "X-Accel-Buffering: no\r\n{}\r\n",
      version_ == 10 ? 0 : 1,
      version_ == 10 ? "Connection: close\r\n"
      : keep_alive_  ? "Transfer-Encoding: chunked\r\n"
                     : "Transfer-Encoding: chunked\r\nConnection: close\r\n");
  if (version_ == 10) keep_alive_ = false;
  out_.push_back(std::move(head));
  if (api_.endpoint == Endpoint::chat_completions)
    push_sse(dump(chat_role_chunk(resp_id_, created_, model_)));
  else
    write_more();
}

void HttpSession::push_sse(const std::string& data) {
  std::string event = "data: " + data + "\n\n";
  if (version_ != 10) event = fmt::format("{:x}\r\n{}\r\n", event.size(), event);
  out_.push_back(std::move(event));
  write_more();
}

void HttpSession::end_stream() {
  stream_ended_ = true;
  if (version_ != 10) out_.push_back("0\r\n\r\n");
  write_more();
}

void HttpSession::write_more() {
  if (writing_) return;
  if (out_.empty()) {
    if (stream_ended_) {
      stream_ended_ = false;
      stream_started_ = false;
      if (keep_alive_) return read();
      return linger_close();
    }
    return;
  }
  writing_ = true;
  stream_.expires_after(std::chrono::seconds(60));
  net::async_write(stream_, net::buffer(out_.front()),
                   [self = shared_from_this()](boost::system::error_code ec, size_t) {
                     self->writing_ = false;
                     self->stream_.expires_never();
                     if (ec) {
                       self->out_.clear();
                       self->stream_ended_ = false;
                       return self->client_gone("writing the stream failed: " + ec.message());
                     }
                     self->out_.pop_front();
                     self->write_more();
                   });
}

void HttpSession::respond(unsigned status, std::string body, const std::string& content_type,
                          bool close_after,
                          std::vector<std::pair<std::string, std::string>> extra) {
  auto res = std::make_shared<http::response<http::string_body>>(http::status(status), version_);
  res->set(http::field::server, "nosa");
  res->set(http::field::content_type, content_type);
  for (auto& [k, v] : extra) res->set(k, v);
  res->body() = std::move(body);
  if (close_after) keep_alive_ = false;
  res->keep_alive(keep_alive_);
  res->prepare_payload();
  c_.responses_total[status]++;
  response_ = res;
  stream_.expires_after(std::chrono::seconds(60));
  http::async_write(stream_, *res,
                    [self = shared_from_this(), res](boost::system::error_code ec, size_t) {
                      self->stream_.expires_never();
                      self->response_.reset();
                      if (ec) return self->close();
                      if (self->keep_alive_) return self->read();
                      self->linger_close();
                    });
}

// Half-closes and drains what the client still sends (for example the rest of a body over the
// limit), so that it reads the response instead of a connection reset.
void HttpSession::linger_close() {
  boost::system::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  auto scratch = std::make_shared<std::array<char, 65536>>();
  stream_.expires_after(std::chrono::seconds(2));
  auto drain = std::make_shared<std::function<void()>>();
  *drain = [self = shared_from_this(), scratch, drain] {
    self->stream_.async_read_some(net::buffer(*scratch),
                                  [self, scratch, drain](boost::system::error_code ec, size_t) {
                                    if (ec) {
                                      self->close();
                                      *drain = nullptr;  // break the cycle
                                      return;
                                    }
                                    (*drain)();
                                  });
  };
  (*drain)();
}

// ---------------------------------------------------------------------------------------------
// Coordinator::Impl

std::vector<std::string> Coordinator::Impl::served_models() const {
  std::set<std::string> names;
  for (auto& [id, r] : replicas)
    if (r.registered) names.insert(r.info.model_name());
  return {names.begin(), names.end()};
}

size_t Coordinator::Impl::registered_count() const {
  size_t n = 0;
  for (auto& [id, r] : replicas) n += r.registered;
  return n;
}

void Coordinator::Impl::count_request(const std::string& endpoint, unsigned status,
                                      bool client_gone) {
  std::string outcome = client_gone    ? "cancelled"
                        : status < 400 ? "success"
                        : status < 500 ? "client_error"
                                       : "server_error";
  requests_total[{endpoint, outcome}]++;
}

std::optional<ApiError> Coordinator::Impl::submit(const std::shared_ptr<HttpSession>& session,
                                                  ApiRequest& api, uint64_t& id_out,
                                                  std::string& model_out) {
  if (stopping) return server_error(503, "the server is shutting down", "shutting_down");
  const auto models = served_models();
  std::string model = api.model;
  if (model.empty()) {
    if (models.size() > 1)
      return bad_request(
          fmt::format("model is required: this server serves {}", fmt::join(models, ", ")),
          "model");
    if (models.empty())
      return server_error(503, "no replica is registered yet: start `nosa worker` processes",
                          "no_replica");
    model = models[0];
  }
  int64_t max_context = 0;
  for (auto& [id, r] : replicas)
    if (r.registered && r.info.model_name() == model)
      max_context =
          max_context == 0 ? r.info.max_context() : std::min(max_context, r.info.max_context());
  if (max_context == 0) {
    if (models.empty())
      return server_error(503, "no replica is registered yet: start `nosa worker` processes",
                          "no_replica");
    return model_not_found(model);
  }
  if (api.max_tokens_given && api.submit.max_tokens() >= max_context) {
    ApiError e = bad_request(
        fmt::format("max_tokens is {}, but the context of model '{}' is {} tokens (prompt "
                    "included)",
                    api.submit.max_tokens(), model, max_context),
        "max_tokens");
    e.code = "context_length_exceeded";
    return e;
  }
  if (int64_t(requests.size()) >= o.max_outstanding)
    return server_error(
        429, fmt::format("the server has {} requests in flight; try again later", requests.size()),
        "overloaded");
  const uint64_t id = next_request++;
  RequestRecord rec;
  rec.id = id;
  rec.model = model;
  rec.endpoint = api.endpoint == Endpoint::completions ? "completions" : "chat_completions";
  rec.submit = api.submit;
  rec.submit.set_request_id(id);
  rec.session = session;
  rec.start = Clock::now();
  auto [it, inserted] = requests.emplace(id, std::move(rec));
  if (auto err = route(it->second)) {
    requests.erase(it);
    return err;
  }
  id_out = id;
  model_out = model;
  return std::nullopt;
}

std::optional<ApiError> Coordinator::Impl::route(RequestRecord& rec) {
  if (int(rec.tried.size()) >= o.max_attempts)
    return server_error(
        503, fmt::format("the request failed on {} replicas; giving up", rec.tried.size()),
        "replica_failed");
  std::vector<ReplicaLoad> loads;
  for (auto& [id, r] : replicas) {
    if (!r.registered) continue;
    ReplicaLoad l;
    l.id = id;
    l.model = r.info.model_name();
    l.outstanding = int64_t(r.outstanding.size());
    l.waiting = r.last.waiting();
    l.max_running = r.info.max_running();
    int64_t used = 0, total = 0;
    for (auto& t : r.last.kv_tiers()) {
      used += t.blocks_used();
      total += t.blocks_total();
    }
    l.kv_blocks_total = total;
    l.kv_blocks_free = total - used;
    l.last_pick = r.last_pick;
    loads.push_back(l);
  }
  auto pick = pick_replica(loads, rec.model, rec.tried);
  if (!pick)
    return server_error(503, fmt::format("no replica serving model '{}' is connected", rec.model),
                        "no_replica");
  Replica& r = replicas.at(*pick);
  r.outstanding.insert(rec.id);
  r.last_pick = ++pick_counter;
  rec.replica = *pick;
  rec.tried.push_back(*pick);
  pb::Envelope m;
  *m.mutable_submit() = rec.submit;
  r.conn->send(m);
  return std::nullopt;
}

void Coordinator::Impl::cancel(uint64_t id) {
  auto it = requests.find(id);
  if (it == requests.end()) return;
  RequestRecord& rec = it->second;
  rec.session.reset();
  auto r = replicas.find(rec.replica);
  if (r == replicas.end()) {
    requests.erase(it);
    return;
  }
  pb::Envelope m;
  m.mutable_cancel()->set_request_id(id);
  r->second.conn->send(m);
  // The record stays until the replica's last event, so that its load stays counted.
}

void Coordinator::Impl::on_worker_event(Replica& r, const pb::Event& ev) {
  auto it = requests.find(ev.request_id());
  if (it == requests.end() || it->second.replica != r.id) return;  // stale
  RequestRecord& rec = it->second;
  if (ev.tokens_size() > 0) {
    generation_tokens_total += ev.tokens_size();
    if (!rec.first_token_seen) {
      rec.first_token_seen = true;
      ttft.observe(std::chrono::duration<double>(Clock::now() - rec.start).count());
    }
  }
  auto session = rec.session.lock();
  if (ev.finished()) {
    r.outstanding.erase(rec.id);
    // A replica that is going away refuses with "unavailable": try another one.
    if (ev.finish_reason() == "error" && ev.error().code() == "unavailable" && session &&
        !session->sent_anything()) {
      session->on_retry();
      ++retries_total;
      rec.first_token_seen = false;
      if (auto err = route(rec)) {
        session->on_failure(*err);
        requests.erase(it);
      }
      return;
    }
    if (ev.finish_reason() == "stop" || ev.finish_reason() == "length") {
      prompt_tokens_total += ev.prompt_tokens();
      e2e.observe(std::chrono::duration<double>(Clock::now() - rec.start).count());
    }
    requests.erase(it);
    if (session) session->on_event(ev);
    return;
  }
  if (session) session->on_event(ev);
}

void Coordinator::Impl::remove_replica(uint64_t rid, const std::string& reason) {
  auto node = replicas.extract(rid);
  if (node.empty()) return;
  Replica& r = node.mapped();
  if (r.registered) {
    ++replicas_lost_total;
    log->warn("replica {} ({}, model '{}') removed: {}; {} requests in flight on it", rid,
              r.info.worker_name(), r.info.model_name(), reason, r.outstanding.size());
  } else {
    log->warn("worker connection from {} closed before registering: {}", r.conn->peer(), reason);
  }
  if (r.conn->is_open()) r.conn->close(reason);
  for (uint64_t id : r.outstanding) {
    auto it = requests.find(id);
    if (it == requests.end()) continue;
    RequestRecord& rec = it->second;
    auto session = rec.session.lock();
    if (!session) {
      requests.erase(it);
      continue;
    }
    if (!session->sent_anything()) {
      session->on_retry();
      rec.first_token_seen = false;
      ++retries_total;
      log->info("retrying request {} on another replica", id);
      if (auto err = route(rec)) {
        session->on_failure(server_error(
            503,
            fmt::format("the replica serving this request failed ({}) and no other replica could "
                        "take it: {}",
                        reason, err->message),
            "replica_failed"));
        requests.erase(it);
      }
      continue;
    }
    session->on_failure(server_error(
        503,
        fmt::format("the replica serving this request failed after streaming part of the answer "
                    "({}); the request cannot be resumed",
                    reason),
        "replica_failed"));
    requests.erase(it);
  }
}

void Coordinator::Impl::on_worker_message(uint64_t rid, pb::Envelope& m) {
  auto it = replicas.find(rid);
  if (it == replicas.end()) return;
  Replica& r = it->second;
  r.last_seen = Clock::now();
  if (!r.hello_done) {
    pb::Envelope reply;
    const std::string why = check_hello(m);
    reply.mutable_hello_reply()->set_protocol_version(k_protocol_version);
    if (!why.empty()) {
      log->warn("refusing worker connection from {}: {}", r.conn->peer(), why);
      reply.mutable_hello_reply()->set_accepted(false);
      reply.mutable_hello_reply()->set_error(why);
      r.conn->send(reply);
      r.conn->close_after_writes(why);
      return;
    }
    r.hello_done = true;
    reply.mutable_hello_reply()->set_accepted(true);
    r.conn->send(reply);
    return;
  }
  switch (m.body_case()) {
    case pb::Envelope::kRegisterWorker: {
      const auto& reg = m.register_worker();
      if (r.registered || reg.model_name().empty() || reg.max_context() <= 0) {
        r.conn->close_after_writes("bad registration");
        return;
      }
      r.info = reg;
      r.registered = true;
      pb::Envelope reply;
      reply.mutable_registered()->set_replica_id(rid);
      reply.mutable_registered()->set_heartbeat_interval_ms(o.heartbeat_interval_ms);
      r.conn->send(reply);
      log->info("replica {} registered: model '{}' from {} ({}, tp {}, context {}, {} KV blocks)",
                rid, reg.model_name(), reg.worker_name(), reg.device(), reg.tp(), reg.max_context(),
                reg.kv_blocks_total());
      break;
    }
    case pb::Envelope::kHeartbeat:
      r.last = m.heartbeat();
      break;
    case pb::Envelope::kEvent:
      if (r.registered) on_worker_event(r, m.event());
      break;
    case pb::Envelope::kGoodbye:
      log->info("replica {} is leaving: {}", rid, m.goodbye().reason());
      break;
    default:
      log->debug("ignoring message {} from replica {}", int(m.body_case()), rid);
  }
}

void Coordinator::Impl::sweep() {
  const auto now = Clock::now();
  std::vector<std::pair<uint64_t, std::string>> dead;
  for (auto& [id, r] : replicas) {
    const double quiet = std::chrono::duration<double>(now - r.last_seen).count();
    if (r.registered && quiet > o.worker_timeout_s)
      dead.emplace_back(id, fmt::format("no heartbeat for {:.1f} s", quiet));
    else if (!r.registered && quiet > 10.0)
      dead.emplace_back(id, "did not register within 10 s");
  }
  for (auto& [id, why] : dead) remove_replica(id, why);
  sweep_timer.expires_after(std::chrono::milliseconds(100));
  sweep_timer.async_wait([this](boost::system::error_code ec) {
    if (!ec && !stopping) sweep();
  });
}

void Coordinator::Impl::listen_http() {
  http_acceptor.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
    if (stopping) return;
    if (!ec) {
      boost::system::error_code e2;
      socket.set_option(tcp::no_delay(true), e2);
      auto s = std::make_shared<HttpSession>(std::move(socket), *this);
      // Forget sessions that have ended (their weak pointers expired).
      for (auto it = sessions.begin(); it != sessions.end();)
        it = it->second.expired() ? sessions.erase(it) : std::next(it);
      sessions[s.get()] = s;
      s->start();
    } else {
      log->warn("accepting an HTTP connection failed: {}", ec.message());
    }
    listen_http();
  });
}

void Coordinator::Impl::listen_workers() {
  worker_acceptor.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
    if (stopping) return;
    if (!ec) {
      const uint64_t id = next_replica++;
      Replica& r = replicas[id];
      r.id = id;
      r.conn = std::make_shared<Connection>(std::move(socket), o.max_frame_bytes);
      r.connected_at = r.last_seen = Clock::now();
      r.conn->start([this, id](pb::Envelope& m) { on_worker_message(id, m); },
                    [this, id](const std::string& reason) { remove_replica(id, reason); });
    } else {
      log->warn("accepting a worker connection failed: {}", ec.message());
    }
    listen_workers();
  });
}

std::string Coordinator::Impl::metrics_text() const {
  PrometheusWriter w;
  w.family("nosa_requests_total", "counter",
           "Completion requests by endpoint and outcome (success, client_error, server_error, "
           "cancelled)");
  for (auto& [key, n] : requests_total)
    w.sample("nosa_requests_total", {{"endpoint", key.first}, {"outcome", key.second}}, double(n));
  w.family("nosa_http_responses_total", "counter", "HTTP responses by status code");
  for (auto& [status, n] : responses_total)
    w.sample("nosa_http_responses_total", {{"code", std::to_string(status)}}, double(n));
  w.family("nosa_prompt_tokens_total", "counter", "Prompt tokens of completed requests");
  w.sample("nosa_prompt_tokens_total", {}, double(prompt_tokens_total));
  w.family("nosa_generation_tokens_total", "counter", "Tokens generated and streamed back");
  w.sample("nosa_generation_tokens_total", {}, double(generation_tokens_total));
  w.family("nosa_requests_in_flight", "gauge", "Requests routed to a replica and not finished");
  w.sample("nosa_requests_in_flight", {}, double(requests.size()));
  w.family("nosa_retries_total", "counter",
           "Requests retried on another replica after theirs failed");
  w.sample("nosa_retries_total", {}, double(retries_total));
  w.family("nosa_replicas", "gauge", "Registered replicas");
  w.sample("nosa_replicas", {}, double(registered_count()));
  w.family("nosa_replicas_lost_total", "counter",
           "Replicas removed (connection closed or heartbeats stopped)");
  w.sample("nosa_replicas_lost_total", {}, double(replicas_lost_total));
  w.family("nosa_time_to_first_token_seconds", "histogram",
           "From the request's arrival to its first generated token");
  w.histogram("nosa_time_to_first_token_seconds", {}, ttft.snapshot());
  w.family("nosa_request_duration_seconds", "histogram",
           "From the request's arrival to its last token (successful requests)");
  w.histogram("nosa_request_duration_seconds", {}, e2e.snapshot());

  w.family("nosa_queue_depth", "gauge", "Requests waiting in a replica's queue");
  w.family("nosa_running_batch_size", "gauge", "Sequences in a replica's running batch");
  w.family("nosa_replica_outstanding", "gauge", "Requests the coordinator has on a replica");
  w.family("nosa_kv_blocks", "gauge", "KV blocks per replica and tier (state: used or total)");
  w.family("nosa_kv_cache_hits_total", "counter", "KV block lookups served by a tier");
  w.family("nosa_kv_cache_misses_total", "counter", "KV block lookups a tier had to fetch");
  w.family("nosa_kv_selected_chunks_total", "counter",
           "KV chunks (a block of one KV head) the sparse attention selected, offloaded replicas");
  w.family("nosa_kv_selection_overlap_chunks_total", "counter",
           "Selected KV chunks that the step before selected too");
  w.family("nosa_kv_prefetched_chunks_total", "counter",
           "KV chunks copied to the device on a guess of the next layer's selection");
  w.family("nosa_kv_prefetch_hits_total", "counter",
           "Prefetched KV chunks that the layer then selected");
  w.family("nosa_kv_transfer_bytes_total", "counter",
           "Bytes moved between KV tiers (direction: host_to_device, device_to_host, disk_read, "
           "disk_written)");
  w.family("nosa_replica_generated_tokens_total", "counter", "Tokens generated by a replica");
  w.family("nosa_replica_preemptions_total", "counter",
           "Sequences a replica paused for lack of KV blocks");
  w.family("nosa_step_duration_seconds", "histogram", "Engine step latency per replica");
  for (auto& [id, r] : replicas) {
    if (!r.registered) continue;
    const Labels l = {{"replica", std::to_string(id)}, {"model", r.info.model_name()}};
    w.sample("nosa_queue_depth", l, double(r.last.waiting()));
    w.sample("nosa_running_batch_size", l, double(r.last.running()));
    w.sample("nosa_replica_outstanding", l, double(r.outstanding.size()));
    for (auto& t : r.last.kv_tiers()) {
      Labels lt = l;
      lt.emplace_back("tier", t.name());
      Labels used = lt, total = lt;
      used.emplace_back("state", "used");
      total.emplace_back("state", "total");
      w.sample("nosa_kv_blocks", used, double(t.blocks_used()));
      w.sample("nosa_kv_blocks", total, double(t.blocks_total()));
      w.sample("nosa_kv_cache_hits_total", lt, double(t.hits()));
      w.sample("nosa_kv_cache_misses_total", lt, double(t.misses()));
    }
    if (r.last.has_kv_traffic()) {
      const auto& k = r.last.kv_traffic();
      w.sample("nosa_kv_selected_chunks_total", l, double(k.selected()));
      w.sample("nosa_kv_selection_overlap_chunks_total", l, double(k.overlap()));
      w.sample("nosa_kv_prefetched_chunks_total", l, double(k.prefetched()));
      w.sample("nosa_kv_prefetch_hits_total", l, double(k.prefetch_hits()));
      const std::pair<const char*, int64_t> moved[] = {
          {"host_to_device", k.bytes_host_to_device()},
          {"device_to_host", k.bytes_device_to_host()},
          {"disk_read", k.bytes_disk_read()},
          {"disk_written", k.bytes_disk_written()}};
      for (const auto& [direction, bytes] : moved) {
        Labels ld = l;
        ld.emplace_back("direction", direction);
        w.sample("nosa_kv_transfer_bytes_total", ld, double(bytes));
      }
    }
    w.sample("nosa_replica_generated_tokens_total", l, double(r.last.generated_tokens_total()));
    w.sample("nosa_replica_preemptions_total", l, double(r.last.preemptions_total()));
    if (r.last.has_step_seconds())
      w.histogram("nosa_step_duration_seconds", l, r.last.step_seconds());
  }
  return w.text();
}

void Coordinator::Impl::do_stop() {
  if (stopping) return;
  stopping = true;
  log->info("stopping the coordinator");
  boost::system::error_code ec;
  http_acceptor.close(ec);
  worker_acceptor.close(ec);
  sweep_timer.cancel();
  if (signals) signals->cancel(ec);
  for (auto& [id, r] : replicas) {
    pb::Envelope bye;
    bye.mutable_goodbye()->set_reason("the coordinator is stopping");
    r.conn->send(bye);
    r.conn->close_after_writes("the coordinator is stopping");
  }
  for (auto& [ptr, weak] : sessions)
    if (auto s = weak.lock()) s->close();
  sessions.clear();
}

// ---------------------------------------------------------------------------------------------
// Coordinator

Coordinator::Coordinator(CoordinatorOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {}

Coordinator::~Coordinator() = default;

namespace {
void open_acceptor(tcp::acceptor& a, const std::string& host, uint16_t port, const char* what) {
  boost::system::error_code ec;
  auto address = net::ip::make_address(host, ec);
  NOSA_CHECK(!ec, "--host '{}' is not an IP address ({})", host, ec.message());
  tcp::endpoint ep(address, port);
  a.open(ep.protocol(), ec);
  if (!ec) a.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) a.bind(ep, ec);
  if (!ec) a.listen(net::socket_base::max_listen_connections, ec);
  NOSA_CHECK_CODE(!ec, ErrorCode::io, "cannot listen for {} on {}:{}: {}", what, host, port,
                  ec.message());
}
}  // namespace

void Coordinator::start() {
  Impl& c = *impl_;
  open_acceptor(c.http_acceptor, c.o.host, c.o.http_port, "HTTP");
  open_acceptor(c.worker_acceptor, c.o.host, c.o.workers_port, "workers");
  c.log->info("listening for HTTP on {}:{} and for workers on {}:{}", c.o.host, http_port(),
              c.o.host, workers_port());
  c.listen_http();
  c.listen_workers();
  c.sweep();
}

uint16_t Coordinator::http_port() const { return impl_->http_acceptor.local_endpoint().port(); }
uint16_t Coordinator::workers_port() const {
  return impl_->worker_acceptor.local_endpoint().port();
}

void Coordinator::run(bool handle_signals) {
  Impl& c = *impl_;
  if (handle_signals) {
    c.signals.emplace(c.io, SIGINT, SIGTERM);
    c.signals->async_wait([&c](boost::system::error_code ec, int sig) {
      if (ec) return;
      c.log->info("signal {}", sig);
      c.do_stop();
    });
  }
  c.io.run();
}

void Coordinator::stop() {
  net::post(impl_->io, [c = impl_.get()] { c->do_stop(); });
}

}  // namespace nosa::rpc
