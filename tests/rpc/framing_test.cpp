// The framed transport: frames survive any split of the byte stream; a length over the limit or
// bytes that are not a message are refused with a clear reason (and no allocation of the claimed
// size); the handshake refuses other protocols and versions; a live connection pair delivers
// messages both ways and reports a peer that sends garbage.
#include "rpc/framing.h"

#include <gtest/gtest.h>

#include <future>
#include <thread>

#include "runtime/core/error.h"

namespace nosa::rpc {
namespace {

pb::Envelope submit(uint64_t id, const std::string& text) {
  pb::Envelope e;
  e.mutable_submit()->set_request_id(id);
  e.mutable_submit()->set_text(text);
  e.mutable_submit()->set_max_tokens(7);
  return e;
}

TEST(Framing, FramesSurviveAnySplit) {
  std::string bytes;
  for (int i = 0; i < 20; ++i) bytes += encode_frame(submit(i, std::string(i * 37, 'x')));
  for (size_t chunk : {1, 3, 64, 100000}) {
    FrameDecoder d;
    std::vector<pb::Envelope> got;
    for (size_t off = 0; off < bytes.size(); off += chunk) {
      d.feed(bytes.data() + off, std::min(chunk, bytes.size() - off));
      while (auto m = d.next()) got.push_back(*m);
    }
    ASSERT_EQ(got.size(), 20u) << chunk;
    for (int i = 0; i < 20; ++i) {
      EXPECT_EQ(got[i].submit().request_id(), uint64_t(i));
      EXPECT_EQ(got[i].submit().text().size(), size_t(i * 37));
    }
  }
}

TEST(Framing, FrameOverTheLimitIsRefusedWithItsSize) {
  FrameDecoder d(1024);
  std::string http = "GET / HTTP/1.1\r\n";  // someone speaking HTTP to the workers port
  d.feed(http.data(), http.size());
  try {
    d.next();
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(e.message().find("over the limit of 1024 bytes"), std::string::npos) << e.message();
  }
  EXPECT_THROW(encode_frame(submit(1, std::string(2000, 'y')), 1024), Error);
}

TEST(Framing, GarbagePayloadIsRefused) {
  std::string frame = {0, 0, 0, 4, '\xff', '\xff', '\xff', '\xff'};
  FrameDecoder d;
  d.feed(frame.data(), frame.size());
  EXPECT_THROW(d.next(), Error);
}

TEST(Framing, HandshakeChecksMagicAndVersion) {
  EXPECT_EQ(check_hello(make_hello()), "");
  pb::Envelope other = make_hello();
  other.mutable_hello()->set_protocol_version(k_protocol_version + 1);
  EXPECT_NE(check_hello(other).find("protocol version mismatch"), std::string::npos);
  other = make_hello();
  other.mutable_hello()->set_magic("http");
  EXPECT_NE(check_hello(other).find("magic"), std::string::npos);
  EXPECT_NE(check_hello(submit(1, "x")).find("first message"), std::string::npos);
}

// Two connected sockets on loopback, each wrapped in a Connection, on one io_context.
struct Pair {
  net::io_context io;
  std::shared_ptr<Connection> a, b;
  tcp::socket raw_b{io};
  Pair(bool wrap_b = true) {
    tcp::acceptor acc(io, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
    tcp::socket sa(io);
    sa.connect(acc.local_endpoint());
    tcp::socket sb = acc.accept();
    a = std::make_shared<Connection>(std::move(sa), 1 << 20);
    if (wrap_b)
      b = std::make_shared<Connection>(std::move(sb), 1 << 20);
    else
      raw_b = std::move(sb);
  }
};

TEST(Connection, DeliversMessagesBothWaysAndReportsClose) {
  Pair p;
  std::vector<uint64_t> at_b;
  std::string a_closed;
  p.b->start(
      [&](pb::Envelope& m) {
        at_b.push_back(m.submit().request_id());
        if (at_b.size() == 3) p.b->close("done");
      },
      [](const std::string&) {});
  p.a->start([](pb::Envelope&) {}, [&](const std::string& why) { a_closed = why; });
  std::thread sender([&] {  // send() from another thread
    for (int i = 0; i < 3; ++i) p.a->send(submit(i, "hello"));
  });
  sender.join();
  p.io.run_for(std::chrono::seconds(5));
  EXPECT_EQ(at_b, (std::vector<uint64_t>{0, 1, 2}));
  EXPECT_EQ(a_closed, "the peer closed the connection");
}

TEST(Connection, PeerSendingGarbageIsClosedWithAReason) {
  Pair p(false);
  std::string why;
  p.a->start([](pb::Envelope&) {}, [&](const std::string& r) { why = r; });
  net::write(p.raw_b, net::buffer(std::string("POST /v1/completions HTTP/1.1\r\n")));
  p.io.run_for(std::chrono::seconds(5));
  EXPECT_NE(why.find("bad frame"), std::string::npos) << why;
  EXPECT_FALSE(p.a->is_open());
}

}  // namespace
}  // namespace nosa::rpc
