// The coordinator with scripted fake workers speaking the real protocol: a worker of another
// protocol version is refused with a reason; a request whose replica dies before answering is
// retried on the other replica and the client gets that replica's answer; with no replica left
// the client gets a 503 in OpenAI's error shape.
#include "rpc/coordinator.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <future>
#include <thread>

#include "rpc/framing.h"

namespace nosa::rpc {
namespace {

struct FakeWorker {
  net::io_context io;
  tcp::socket s{io};
  FrameDecoder d;
  explicit FakeWorker(uint16_t port) {
    s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  }
  void send(const pb::Envelope& e) { net::write(s, net::buffer(encode_frame(e))); }
  pb::Envelope recv() {
    while (true) {
      if (auto m = d.next()) return *m;
      char buf[4096];
      size_t n = s.read_some(net::buffer(buf));
      d.feed(buf, n);
    }
  }
  void register_as(const std::string& model) {
    send(make_hello());
    ASSERT_TRUE(recv().hello_reply().accepted());
    pb::Envelope r;
    r.mutable_register_worker()->set_model_name(model);
    r.mutable_register_worker()->set_max_context(1024);
    r.mutable_register_worker()->set_max_running(8);
    send(r);
    ASSERT_TRUE(recv().has_registered());
  }
};

// One request (POST with a body, else GET) on a connection of its own: the whole response.
std::string http_request(uint16_t port, const std::string& path, const std::string* body) {
  net::io_context io;
  tcp::socket s(io);
  s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  std::string req =
      body ? "POST " + path +
                 " HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 "Connection: close\r\nContent-Length: " +
                 std::to_string(body->size()) + "\r\n\r\n" + *body
           : "GET " + path + " HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
  net::write(s, net::buffer(req));
  std::string out;
  boost::system::error_code ec;
  char buf[4096];
  while (size_t n = s.read_some(net::buffer(buf), ec)) out.append(buf, n);
  return out;
}

std::string http_post(uint16_t port, const std::string& path, const std::string& body) {
  return http_request(port, path, &body);
}

struct Running {
  Coordinator c;
  std::thread t;
  explicit Running(CoordinatorOptions o) : c((o.http_port = 0, o.workers_port = 0, o)) {
    c.start();
    t = std::thread([this] { c.run(false); });
  }
  ~Running() {
    c.stop();
    t.join();
  }
};

TEST(Coordinator, RefusesAWorkerOfAnotherProtocolVersion) {
  Running r({});
  FakeWorker w(r.c.workers_port());
  pb::Envelope hello = make_hello();
  hello.mutable_hello()->set_protocol_version(k_protocol_version + 7);
  w.send(hello);
  pb::Envelope reply = w.recv();
  ASSERT_TRUE(reply.has_hello_reply());
  EXPECT_FALSE(reply.hello_reply().accepted());
  EXPECT_NE(reply.hello_reply().error().find("protocol version mismatch"), std::string::npos);
}

TEST(Coordinator, RetriesARequestWhoseReplicaDiedBeforeAnswering) {
  Running r({});
  FakeWorker a(r.c.workers_port()), b(r.c.workers_port());
  a.register_as("m");
  b.register_as("m");
  auto response = std::async(std::launch::async, [&] {
    return http_post(r.c.http_port(), "/v1/completions",
                     R"({"model":"m","prompt":"hi","max_tokens":3})");
  });
  // At equal load the router picks the replica that registered first (a): it dies without a
  // word, and b must get the same request.
  pb::Envelope m = a.recv();
  FakeWorker* first = &a;
  FakeWorker* second = &b;
  ASSERT_TRUE(m.has_submit());
  const uint64_t id = m.submit().request_id();
  EXPECT_EQ(m.submit().text(), "hi");
  first->s.close();
  pb::Envelope again = second->recv();
  while (!again.has_submit()) again = second->recv();
  EXPECT_EQ(again.submit().request_id(), id);
  pb::Envelope ev;
  ev.mutable_event()->set_request_id(id);
  ev.mutable_event()->add_tokens()->set_id(5);
  ev.mutable_event()->set_text("hello");
  ev.mutable_event()->set_prompt_tokens(2);
  second->send(ev);
  pb::Envelope fin;
  fin.mutable_event()->set_request_id(id);
  fin.mutable_event()->set_finished(true);
  fin.mutable_event()->set_finish_reason("length");
  fin.mutable_event()->set_prompt_tokens(2);
  fin.mutable_event()->set_completion_tokens(1);
  second->send(fin);
  const std::string out = response.get();
  EXPECT_EQ(out.rfind("HTTP/1.1 200", 0), 0u) << out;
  EXPECT_NE(out.find("\"text\":\"hello\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"completion_tokens\":1"), std::string::npos) << out;
}

TEST(Coordinator, NoReplicaLeftIsA503WithAnErrorBody) {
  Running r({});
  auto w = std::make_unique<FakeWorker>(r.c.workers_port());
  w->register_as("m");
  auto response = std::async(std::launch::async, [&] {
    return http_post(r.c.http_port(), "/v1/completions", R"({"prompt":"hi"})");
  });
  ASSERT_TRUE(w->recv().has_submit());
  w.reset();  // the only replica dies
  const std::string out = response.get();
  EXPECT_EQ(out.rfind("HTTP/1.1 503", 0), 0u) << out;
  EXPECT_NE(out.find("\"type\":\"service_unavailable\""), std::string::npos) << out;
  EXPECT_NE(out.find("replica"), std::string::npos) << out;
}

// An offloaded replica's KV traffic, as its heartbeat carries it, reaches /metrics: each counter
// under its own name (the values differ, so a swapped field shows).
TEST(Coordinator, MetricsCarryAnOffloadedReplicasKvTraffic) {
  Running r({});
  FakeWorker w(r.c.workers_port());
  w.register_as("m");
  pb::Envelope hb;
  pb::KvTraffic* t = hb.mutable_heartbeat()->mutable_kv_traffic();
  t->set_selected(1000);
  t->set_overlap(800);
  t->set_prefetched(70);
  t->set_prefetch_hits(50);
  t->set_bytes_host_to_device(11);
  t->set_bytes_device_to_host(22);
  t->set_bytes_disk_read(33);
  t->set_bytes_disk_written(44);
  w.send(hb);
  const std::pair<const char*, const char*> expected[] = {
      {"nosa_kv_selected_chunks_total{", "} 1000"},
      {"nosa_kv_selection_overlap_chunks_total{", "} 800"},
      {"nosa_kv_prefetched_chunks_total{", "} 70"},
      {"nosa_kv_prefetch_hits_total{", "} 50"},
      {"nosa_kv_transfer_bytes_total{", "direction=\"host_to_device\"} 11"},
      {"nosa_kv_transfer_bytes_total{", "direction=\"device_to_host\"} 22"},
      {"nosa_kv_transfer_bytes_total{", "direction=\"disk_read\"} 33"},
      {"nosa_kv_transfer_bytes_total{", "direction=\"disk_written\"} 44"}};
  // The heartbeat is read asynchronously: wait until its first counter shows.
  std::string metrics;
  auto has = [&](const char* family, const char* tail) {
    for (size_t at = metrics.find(family); at != std::string::npos;
         at = metrics.find(family, at + 1)) {
      const std::string line = metrics.substr(at, metrics.find('\n', at) - at);
      if (line.size() >= std::strlen(tail) &&
          line.compare(line.size() - std::strlen(tail), std::string::npos, tail) == 0)
        return true;
    }
    return false;
  };
  for (int i = 0; i < 100 && !has(expected[0].first, expected[0].second); ++i) {
    if (i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    metrics = http_request(r.c.http_port(), "/metrics", nullptr);
  }
  for (const auto& [family, tail] : expected) EXPECT_TRUE(has(family, tail)) << family << tail;
}

}  // namespace
}  // namespace nosa::rpc
