#include "launcher/bench/png.h"

#include <algorithm>
#include <array>
#include <fstream>

#include "runtime/core/error.h"

#ifdef NOSA_HAVE_ZLIB
#include <zlib.h>
#endif

namespace nosa::launcher::bench {

namespace {

const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  return table;
}

void put_u32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out += char((v >> shift) & 0xFF);
}

void put_chunk(std::string& out, const char type[4], const std::string& data) {
  put_u32(out, uint32_t(data.size()));
  std::string body(type, 4);
  body += data;
  out += body;
  put_u32(out, crc32(reinterpret_cast<const uint8_t*>(body.data()), body.size()));
}

}  // namespace

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc) {
  const auto& t = crc_table();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = t[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t adler32(const uint8_t* data, size_t n) {
  uint32_t a = 1, b = 0;
  for (size_t i = 0; i < n; ++i) {
    a = (a + data[i]) % 65521;
    b = (b + a) % 65521;
  }
  return (b << 16) | a;
}

std::string zlib_stream(const std::string& data) {
#ifdef NOSA_HAVE_ZLIB
  uLongf size = compressBound(uLong(data.size()));
  std::string out(size, '\0');
  const int rc = compress2(reinterpret_cast<Bytef*>(out.data()), &size,
                           reinterpret_cast<const Bytef*>(data.data()), uLong(data.size()), 9);
  NOSA_CHECK(rc == Z_OK, "zlib compress2 failed ({})", rc);
  out.resize(size);
  return out;
#else
  // Stored blocks: a 1-byte header (BFINAL, BTYPE = 00), LEN and ~LEN little-endian, the bytes.
  std::string out = "\x78\x01";  // deflate, 32K window, no preset dictionary, fastest
  size_t pos = 0;
  do {
    const size_t len = std::min<size_t>(65535, data.size() - pos);
    const bool last = pos + len == data.size();
    out += char(last ? 1 : 0);
    out += char(len & 0xFF);
    out += char(len >> 8);
    out += char(~len & 0xFF);
    out += char((~len >> 8) & 0xFF);
    out.append(data, pos, len);
    pos += len;
  } while (pos < data.size());
  put_u32(out, adler32(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
  return out;
#endif
}

std::string encode_png(const IndexedImage& image) {
  NOSA_CHECK(image.width > 0 && image.height > 0, "empty image");
  NOSA_CHECK(!image.palette.empty() && image.palette.size() <= 256, "palette of {} colours",
             image.palette.size());
  std::string out = "\x89PNG\r\n\x1a\n";
  std::string ihdr;
  put_u32(ihdr, uint32_t(image.width));
  put_u32(ihdr, uint32_t(image.height));
  ihdr +=
      std::string("\x08\x03\x00\x00\x00", 5);  // 8 bits, palette, deflate, filter 0, no interlace
  put_chunk(out, "IHDR", ihdr);
  std::string plte;
  for (const Rgb& c : image.palette) plte += {char(c.r), char(c.g), char(c.b)};
  put_chunk(out, "PLTE", plte);
  // Scanlines, each after filter type 0 (none): palette images compress well without filters.
  std::string raw;
  raw.reserve(size_t(image.height) * (size_t(image.width) + 1));
  for (int y = 0; y < image.height; ++y) {
    raw += '\0';
    raw.append(reinterpret_cast<const char*>(&image.pixels[size_t(y) * image.width]),
               size_t(image.width));
  }
  put_chunk(out, "IDAT", zlib_stream(raw));
  put_chunk(out, "IEND", "");
  return out;
}

void write_png(const std::string& path, const IndexedImage& image) {
  const std::string bytes = encode_png(image);
  std::ofstream out(path, std::ios::binary);
  NOSA_CHECK_CODE(out.good(), ErrorCode::io, "cannot write {}", path);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  NOSA_CHECK_CODE(out.good(), ErrorCode::io, "cannot write {}", path);
}

}  // namespace nosa::launcher::bench
