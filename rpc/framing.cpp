#include "rpc/framing.h"

#include "runtime/core/error.h"
#include "runtime/core/logging.h"

namespace nosa::rpc {

namespace {
void put_u32(std::string& out, uint32_t v) {
  out.push_back(char((v >> 24) & 0xff));
  out.push_back(char((v >> 16) & 0xff));
  out.push_back(char((v >> 8) & 0xff));
  out.push_back(char(v & 0xff));
}
}  // namespace

std::string encode_frame(const pb::Envelope& message, size_t max_frame_bytes) {
  const size_t size = message.ByteSizeLong();
  NOSA_CHECK(size <= max_frame_bytes && size <= UINT32_MAX,
             "message of {} bytes is over the frame limit of {} bytes", size, max_frame_bytes);
  std::string out;
  out.reserve(k_frame_header_bytes + size);
  put_u32(out, uint32_t(size));
  out.resize(k_frame_header_bytes + size);
  message.SerializeWithCachedSizesToArray(
      reinterpret_cast<uint8_t*>(out.data() + k_frame_header_bytes));
  return out;
}

uint32_t parse_frame_header(const unsigned char* h, size_t max_frame_bytes) {
  const uint32_t size =
      (uint32_t(h[0]) << 24) | (uint32_t(h[1]) << 16) | (uint32_t(h[2]) << 8) | uint32_t(h[3]);
  NOSA_CHECK(size <= max_frame_bytes,
             "bad frame: length {} is over the limit of {} bytes (is the peer a nosa worker or "
             "coordinator? this port speaks the nosa RPC protocol, not HTTP)",
             size, max_frame_bytes);
  return size;
}

std::optional<pb::Envelope> FrameDecoder::next() {
  if (buffer_.size() < k_frame_header_bytes) return std::nullopt;
  const uint32_t size =
      parse_frame_header(reinterpret_cast<const unsigned char*>(buffer_.data()), max_);
  if (buffer_.size() < k_frame_header_bytes + size) return std::nullopt;
  pb::Envelope message;
  NOSA_CHECK(message.ParseFromArray(buffer_.data() + k_frame_header_bytes, int(size)),
             "bad frame: {} bytes that are not a nosa RPC message", size);
  buffer_.erase(0, k_frame_header_bytes + size);
  return message;
}

pb::Envelope make_hello() {
  pb::Envelope e;
  auto* h = e.mutable_hello();
  h->set_magic(k_magic);
  h->set_protocol_version(k_protocol_version);
  h->set_software_version("0.1.0");
  return e;
}

std::string check_hello(const pb::Envelope& message) {
  if (!message.has_hello())
    return "the first message of a connection must be the version handshake (Hello)";
  const auto& h = message.hello();
  if (h.magic() != k_magic) return fmt::format("bad handshake magic '{}'", h.magic());
  if (h.protocol_version() != k_protocol_version)
    return fmt::format(
        "protocol version mismatch: the peer speaks version {}, this side speaks version {} "
        "(run the same nosa release on the coordinator and the workers)",
        h.protocol_version(), k_protocol_version);
  return {};
}

Connection::Connection(tcp::socket socket, size_t max_frame_bytes)
    : socket_(std::move(socket)),
      max_frame_bytes_(max_frame_bytes),
      close_timer_(socket_.get_executor()) {
  boost::system::error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  peer_ = ec ? "?" : ep.address().to_string() + ":" + std::to_string(ep.port());
  socket_.set_option(tcp::no_delay(true), ec);
}

void Connection::start(MessageHandler on_message, CloseHandler on_close) {
  on_message_ = std::move(on_message);
  on_close_ = std::move(on_close);
  net::post(socket_.get_executor(), [self = shared_from_this()] { self->read_header(); });
}

void Connection::read_header() {
  if (!open_) return;
  net::async_read(socket_, net::buffer(header_, k_frame_header_bytes),
                  [self = shared_from_this()](boost::system::error_code ec, size_t) {
                    if (ec) {
                      self->do_close(ec == net::error::eof ? "the peer closed the connection"
                                                           : "read failed: " + ec.message());
                      return;
                    }
                    uint32_t size = 0;
                    try {
                      size = parse_frame_header(self->header_, self->max_frame_bytes_);
                    } catch (const Error& e) {
                      self->do_close(e.message());
                      return;
                    }
                    self->read_body(size);
                  });
}

void Connection::read_body(uint32_t size) {
  body_.resize(size);
  net::async_read(
      socket_, net::buffer(body_.data(), size),
      [self = shared_from_this(), size](boost::system::error_code ec, size_t) {
        if (ec) {
          self->do_close("read failed inside a frame: " + ec.message());
          return;
        }
        pb::Envelope message;
        if (!message.ParseFromArray(self->body_.data(), int(size))) {
          self->do_close(fmt::format("bad frame: {} bytes that are not a nosa RPC message", size));
          return;
        }
        if (!self->open_) return;
        try {
          self->on_message_(message);
        } catch (const std::exception& e) {
          self->do_close(std::string("message handler failed: ") + e.what());
          return;
        }
        self->read_header();
      });
}

void Connection::send(const pb::Envelope& message) {
  std::string frame;
  try {
    frame = encode_frame(message, max_frame_bytes_);
  } catch (const Error& e) {
    logger("rpc")->error("dropping a message to {}: {}", peer_, e.message());
    return;
  }
  net::post(socket_.get_executor(), [self = shared_from_this(), f = std::move(frame)]() mutable {
    if (!self->open_ || self->closing_after_writes_) return;
    self->writes_.push_back(std::move(f));
    if (!self->writing_) self->write_next();
  });
}

void Connection::write_next() {
  if (writes_.empty()) {
    writing_ = false;
    if (closing_after_writes_) do_close(pending_close_reason_);
    return;
  }
  writing_ = true;
  net::async_write(socket_, net::buffer(writes_.front()),
                   [self = shared_from_this()](boost::system::error_code ec, size_t) {
                     if (ec) {
                       self->do_close("write failed: " + ec.message());
                       return;
                     }
                     self->writes_.pop_front();
                     self->write_next();
                   });
}

void Connection::close_after_writes(const std::string& reason) {
  net::post(socket_.get_executor(), [self = shared_from_this(), reason] {
    if (!self->open_ || self->closing_after_writes_) return;
    self->closing_after_writes_ = true;
    self->pending_close_reason_ = reason;
    if (!self->writing_) {
      self->do_close(reason);
      return;
    }
    self->close_timer_.expires_after(std::chrono::seconds(3));
    self->close_timer_.async_wait([self](boost::system::error_code ec) {
      if (!ec) self->do_close(self->pending_close_reason_);
    });
  });
}

void Connection::close(const std::string& reason) {
  net::post(socket_.get_executor(),
            [self = shared_from_this(), reason] { self->do_close(reason); });
}

void Connection::do_close(const std::string& reason) {
  if (!open_.exchange(false)) return;
  boost::system::error_code ec;
  close_timer_.cancel();
  socket_.shutdown(tcp::socket::shutdown_both, ec);
  socket_.close(ec);
  writes_.clear();
  auto handler = std::move(on_close_);
  on_message_ = nullptr;
  if (handler) handler(reason);
}

}  // namespace nosa::rpc
