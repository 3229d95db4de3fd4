// PNG files for the plots of `nosa bench`: 8-bit palette images, deflated with zlib where the
// build found it (NOSA_HAVE_ZLIB), else written as stored (uncompressed) deflate blocks, which
// every decoder reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace nosa::launcher::bench {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
};

// An image of palette indices, row-major, top row first.
struct IndexedImage {
  int width = 0, height = 0;
  std::vector<Rgb> palette;     // at most 256 colours
  std::vector<uint8_t> pixels;  // width * height indices into `palette`

  IndexedImage(int w, int h, std::vector<Rgb> pal, uint8_t fill = 0)
      : width(w), height(h), palette(std::move(pal)), pixels(size_t(w) * size_t(h), fill) {}
  // Sets a pixel; points outside the image are ignored (drawing clips).
  void set(int x, int y, uint8_t index) {
    if (x >= 0 && y >= 0 && x < width && y < height) pixels[size_t(y) * width + x] = index;
  }
  uint8_t at(int x, int y) const { return pixels[size_t(y) * width + x]; }
};

// CRC-32 (ISO 3309, as PNG chunks use), continuing from `crc` (0 to start).
uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0);
// Adler-32 (the zlib stream trailer).
uint32_t adler32(const uint8_t* data, size_t n);
// A zlib stream (RFC 1950) of `data`: deflated when built with zlib, else stored blocks.
std::string zlib_stream(const std::string& data);
// The bytes of a PNG file: signature, IHDR (colour type 3), PLTE, IDAT, IEND.
std::string encode_png(const IndexedImage& image);
// Writes encode_png(image) to `path`; throws nosa::Error (io) when it cannot.
void write_png(const std::string& path, const IndexedImage& image);

}  // namespace nosa::launcher::bench
