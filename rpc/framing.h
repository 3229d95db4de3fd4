// The framed TCP transport between the coordinator and its workers: each frame is a 4-byte
// big-endian length and one serialized pb::Envelope (rpc/nosa_rpc.proto). A frame over the
// maximum size, or bytes that are not an Envelope, end the connection with a clear reason
// (never a crash, never an allocation of the claimed size). The first message each way is the
// version handshake (Hello, HelloReply).
#pragma once

// clang-format off
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp needs std::exchange
// clang-format on

#include <atomic>
#include <boost/asio.hpp>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "nosa_rpc.pb.h"

namespace nosa::rpc {

namespace net = boost::asio;
using tcp = net::ip::tcp;

inline constexpr uint32_t k_protocol_version = 1;
inline constexpr const char* k_magic = "nosa-rpc";
inline constexpr size_t k_frame_header_bytes = 4;
inline constexpr size_t k_default_max_frame_bytes = size_t(64) << 20;

// One frame: header and payload. Throws Error(invalid_argument) when the message is larger
// than max_frame_bytes.
std::string encode_frame(const pb::Envelope& message,
                         size_t max_frame_bytes = k_default_max_frame_bytes);

// Reassembles frames from bytes as they arrive (any split). next() returns the next complete
// message, or nothing until more bytes come; it throws Error(invalid_argument) for a frame over
// the limit or a payload that does not parse, after which the decoder is unusable.
class FrameDecoder {
 public:
  explicit FrameDecoder(size_t max_frame_bytes = k_default_max_frame_bytes)
      : max_(max_frame_bytes) {}
  void feed(const char* data, size_t n) { buffer_.append(data, n); }
  std::optional<pb::Envelope> next();

 private:
  size_t max_;
  std::string buffer_;
};

// Parses a frame header; throws Error(invalid_argument) when the length is over the limit (the
// message says how big, and hints at a peer that is not a nosa worker or coordinator).
uint32_t parse_frame_header(const unsigned char* header, size_t max_frame_bytes);

// The handshake messages, and the check of a peer's Hello: an empty string when it is
// acceptable, else the reason to refuse it.
pb::Envelope make_hello();
std::string check_hello(const pb::Envelope& message);

// One framed connection. Reads run on the socket's executor and hand each message to the
// message handler; send() may be called from any thread. The close handler runs once, on the
// executor, with the reason (peer closed, bad frame, write failure, or close()'s reason).
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using MessageHandler = std::function<void(pb::Envelope&)>;
  using CloseHandler = std::function<void(const std::string& reason)>;

  Connection(tcp::socket socket, size_t max_frame_bytes = k_default_max_frame_bytes);

  void start(MessageHandler on_message, CloseHandler on_close);
  void send(const pb::Envelope& message);
  // Closes after the frames already queued are written (at most a few seconds).
  void close_after_writes(const std::string& reason);
  // Closes now; queued frames are dropped.
  void close(const std::string& reason);
  bool is_open() const { return open_; }
  const std::string& peer() const { return peer_; }

 private:
  void read_header();
  void read_body(uint32_t size);
  void write_next();
  void do_close(const std::string& reason);

  tcp::socket socket_;
  size_t max_frame_bytes_;
  std::string peer_;
  MessageHandler on_message_;
  CloseHandler on_close_;
  unsigned char header_[k_frame_header_bytes];
  std::string body_;
  std::deque<std::string> writes_;
  bool writing_ = false;
  std::atomic<bool> open_{true};
  bool closing_after_writes_ = false;
  std::string pending_close_reason_;
  net::steady_timer close_timer_;
};

}  // namespace nosa::rpc
