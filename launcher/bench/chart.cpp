#include "launcher/bench/chart.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <set>

namespace nosa::launcher::bench {

namespace {

// 5x7 glyphs of printable ASCII (32..126), drawn for this file: seven rows each, the five low
// bits of a row are its pixels, bit 4 the leftmost.
constexpr uint8_t k_font[95][7] = {
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // ' '
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04},  // '!'
    {0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00},  // '"'
    {0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A},  // '#'
    {0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04},  // '$'
    {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03},  // '%'
    {0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D},  // '&'
    {0x04, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00},  // "'"
    {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02},  // '('
    {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08},  // ')'
    {0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00},  // '*'
    {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00},  // '+'
    {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08},  // ','
    {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00},  // '-'
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C},  // '.'
    {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00},  // '/'
    {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E},  // '0'
    {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E},  // '1'
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F},  // '2'
    {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E},  // '3'
    {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02},  // '4'
    {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E},  // '5'
    {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E},  // '6'
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08},  // '7'
    {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E},  // '8'
    {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C},  // '9'
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00},  // ':'
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08},  // ';'
    {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02},  // '<'
    {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00},  // '='
    {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08},  // '>'
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04},  // '?'
    {0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E},  // '@'
    {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11},  // 'A'
    {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E},  // 'B'
    {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E},  // 'C'
    {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C},  // 'D'
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F},  // 'E'
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10},  // 'F'
    {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F},  // 'G'
    {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11},  // 'H'
    {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E},  // 'I'
    {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C},  // 'J'
    {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11},  // 'K'
    {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F},  // 'L'
    {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11},  // 'M'
    {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11},  // 'N'
    {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E},  // 'O'
    {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10},  // 'P'
    {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D},  // 'Q'
    {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11},  // 'R'
    {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E},  // 'S'
    {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},  // 'T'
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E},  // 'U'
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04},  // 'V'
    {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A},  // 'W'
    {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11},  // 'X'
    {0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04},  // 'Y'
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F},  // 'Z'
    {0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E},  // '['
    {0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00},  // '\\'
    {0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E},  // ']'
    {0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00},  // '^'
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F},  // '_'
    {0x08, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00},  // '`'
    {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F},  // 'a'
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E},  // 'b'
    {0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E},  // 'c'
    {0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F},  // 'd'
    {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E},  // 'e'
    {0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08},  // 'f'
    {0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // 'g'
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11},  // 'h'
    {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E},  // 'i'
    {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C},  // 'j'
    {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12},  // 'k'
    {0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E},  // 'l'
    {0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11},  // 'm'
    {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11},  // 'n'
    {0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E},  // 'o'
    {0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10},  // 'p'
    {0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01},  // 'q'
    {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10},  // 'r'
    {0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E},  // 's'
    {0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06},  // 't'
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D},  // 'u'
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04},  // 'v'
    {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A},  // 'w'
    {0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11},  // 'x'
    {0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // 'y'
    {0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F},  // 'z'
    {0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02},  // '{'
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},  // '|'
    {0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08},  // '}'
    {0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00},  // '~'
};

constexpr int k_glyph_w = 5, k_glyph_h = 7, k_advance = 6;

// Palette: background, ink, grid, then the series colours (Tableau 10).
constexpr uint8_t k_white = 0, k_black = 1, k_grid = 2, k_first_series = 3;
const std::vector<Rgb>& palette() {
  static const std::vector<Rgb> p = {
      {255, 255, 255}, {0, 0, 0},      {222, 222, 222}, {31, 119, 180}, {255, 127, 14},
      {44, 160, 44},   {214, 39, 40},  {148, 103, 189}, {140, 86, 75},  {227, 119, 194},
      {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};
  return p;
}
constexpr int k_series_colours = 10;

void fill_rect(IndexedImage& im, int x0, int y0, int x1, int y1, uint8_t c) {
  for (int y = y0; y <= y1; ++y)
    for (int x = x0; x <= x1; ++x) im.set(x, y, c);
}

// A line two pixels wide (Bresenham with a 2x2 brush).
void draw_line(IndexedImage& im, int x0, int y0, int x1, int y1, uint8_t c) {
  const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
  const int sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
  int err = dx + dy;
  for (;;) {
    fill_rect(im, x0, y0, x0 + 1, y0 + 1, c);
    if (x0 == x1 && y0 == y1) break;
    const int e2 = 2 * err;
    if (e2 >= dy) err += dy, x0 += sx;
    if (e2 <= dx) err += dx, y0 += sy;
  }
}

// Markers tell series apart without colour: square, diamond, triangle, circle.
void draw_marker(IndexedImage& im, int cx, int cy, int shape, uint8_t c) {
  const int r = 4;
  for (int dy = -r; dy <= r; ++dy)
    for (int dx = -r; dx <= r; ++dx) {
      bool in = false;
      switch (shape % 4) {
        case 0:
          in = std::abs(dx) <= r - 1 && std::abs(dy) <= r - 1;
          break;
        case 1:
          in = std::abs(dx) + std::abs(dy) <= r;
          break;
        case 2:
          in = dy >= -r && 2 * std::abs(dx) <= dy + r;
          break;
        default:
          in = dx * dx + dy * dy <= r * r;
          break;
      }
      if (in) im.set(cx + dx, cy + dy, c);
    }
}

std::string clip(const std::string& s, size_t n) {
  return s.size() <= n ? s : s.substr(0, n - 2) + "..";
}

}  // namespace

int text_width(const std::string& text, int scale) {
  return text.empty() ? 0 : (int(text.size()) * k_advance - 1) * scale;
}

void draw_text(IndexedImage& im, int x, int y, const std::string& text, int scale, uint8_t colour,
               bool vertical) {
  for (size_t i = 0; i < text.size(); ++i) {
    unsigned char ch = static_cast<unsigned char>(text[i]);
    if (ch < 32 || ch > 126) ch = '?';
    const uint8_t* g = k_font[ch - 32];
    for (int row = 0; row < k_glyph_h; ++row)
      for (int col = 0; col < k_glyph_w; ++col) {
        if (!(g[row] & (1u << (k_glyph_w - 1 - col)))) continue;
        const int u = (int(i) * k_advance + col) * scale, v = row * scale;
        for (int a = 0; a < scale; ++a)
          for (int b = 0; b < scale; ++b) {
            if (vertical)
              im.set(x + v + b, y - u - a, colour);
            else
              im.set(x + u + a, y + v + b, colour);
          }
      }
  }
}

std::string tick_label(double v) {
  if (v == 0) return "0";
  const double a = std::fabs(v);
  if (a >= 1024 && v == std::floor(v)) {
    if (std::fmod(a, 1024.0 * 1024.0) == 0) return fmt::format("{}M", int64_t(v / 1048576));
    if (std::fmod(a, 1024.0) == 0) return fmt::format("{}K", int64_t(v / 1024));
  }
  if (a >= 1e6) return fmt::format("{:.3g}M", v / 1e6);
  if (a >= 1e3) return fmt::format("{:.3g}K", v / 1e3);
  return fmt::format("{:.3g}", v);
}

std::vector<double> nice_ticks(double lo, double hi, int target_count) {
  if (!(hi > lo) || target_count < 1) return {lo};
  const double raw = (hi - lo) / target_count;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  const double step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * mag;
  std::vector<double> ticks;
  for (double k = std::ceil(lo / step - 1e-9); k * step <= hi + 1e-9 * step; k += 1)
    ticks.push_back(k * step);
  return ticks;
}

IndexedImage render_chart(const Chart& chart, int width, int height) {
  width = std::max(width, 320);
  height = std::max(height, 240);
  IndexedImage im(width, height, palette(), k_white);
  const int s = width >= 800 ? 2 : 1;  // text scale
  const int th = k_glyph_h * s;        // text height

  // Data ranges. The x axis maps log2(x) on a log2 axis (x > 0 only).
  const bool log_x = chart.x_axis == Axis::log2;
  auto fx = [&](double x) { return log_x ? std::log2(x) : x; };
  std::set<double> xs;
  double y_max = 0;
  for (const Series& se : chart.series)
    for (auto [x, y] : se.points) {
      if (log_x && !(x > 0)) continue;
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      xs.insert(x);
      y_max = std::max(y_max, y);
    }
  double x_lo = xs.empty() ? 0 : fx(*xs.begin()), x_hi = xs.empty() ? 1 : fx(*xs.rbegin());
  if (x_hi - x_lo <= 0) {
    const double half = log_x ? 0.5 : std::max(std::fabs(x_lo) * 0.5, 0.5);
    x_lo -= half, x_hi += half;
  }
  std::vector<double> x_ticks;  // in data units
  if (log_x && xs.size() <= 12) {
    x_ticks.assign(xs.begin(), xs.end());
  } else if (log_x) {
    for (double e = std::ceil(x_lo); e <= x_hi; e += 1) x_ticks.push_back(std::exp2(e));
  } else {
    x_ticks = nice_ticks(x_lo, x_hi, 6);
  }
  const double pad = (x_hi - x_lo) * 0.05;
  x_lo -= pad, x_hi += pad;
  if (y_max <= 0) y_max = 1;
  std::vector<double> y_ticks = nice_ticks(0, y_max, 5);
  const double y_step = y_ticks.size() > 1 ? y_ticks[1] - y_ticks[0] : y_max;
  // Head room above the highest point, so that no marker sits on the frame.
  while (y_ticks.back() < y_max * 1.03) y_ticks.push_back(y_ticks.back() + y_step);
  const double y_hi = y_ticks.back();

  // Layout: title on top, y label and tick labels on the left, x ticks and label below, the
  // legend on the right.
  int legend_scale = s;
  size_t longest = 0;
  for (const Series& se : chart.series) longest = std::max(longest, clip(se.name, 40).size());
  int legend_w = chart.series.empty() ? 0 : 24 + 8 + text_width(std::string(longest, 'x'), s) + 16;
  if (legend_w > width * 2 / 5 && s > 1) {
    legend_scale = 1;
    legend_w = 24 + 8 + text_width(std::string(longest, 'x'), 1) + 16;
  }
  int y_label_w = 0;
  for (double t : y_ticks) y_label_w = std::max(y_label_w, text_width(tick_label(t), s));
  const int left = 10 + th + 10 + y_label_w + 8;
  const int top = 12 + th + 14;
  const int bottom = height - (8 + th + 10 + th + 12);
  const int right = width - 12 - legend_w;
  auto px = [&](double x) {
    return left + int(std::lround((fx(x) - x_lo) / (x_hi - x_lo) * (right - left)));
  };
  auto py = [&](double y) { return bottom - int(std::lround(y / y_hi * (bottom - top))); };

  // Grid, frame, ticks and their labels.
  for (double t : y_ticks) {
    const int y = py(t);
    fill_rect(im, left, y, right, y, k_grid);
    fill_rect(im, left - 5, y, left - 1, y, k_black);
    const std::string l = tick_label(t);
    draw_text(im, left - 8 - text_width(l, s), y - th / 2, l, s, k_black);
  }
  for (double t : x_ticks) {
    const int x = px(t);
    if (x < left || x > right) continue;
    fill_rect(im, x, top, x, bottom, k_grid);
    fill_rect(im, x, bottom + 1, x, bottom + 5, k_black);
    const std::string l = tick_label(t);
    draw_text(im, x - text_width(l, s) / 2, bottom + 8, l, s, k_black);
  }
  fill_rect(im, left, top, right, top, k_black);
  fill_rect(im, left, bottom, right, bottom, k_black);
  fill_rect(im, left, top, left, bottom, k_black);
  fill_rect(im, right, top, right, bottom, k_black);

  // The series: joined points in x order, a marker on each.
  for (size_t i = 0; i < chart.series.size(); ++i) {
    const uint8_t c = uint8_t(k_first_series + i % k_series_colours);
    std::vector<std::pair<double, double>> pts;
    for (auto p : chart.series[i].points)
      if ((!log_x || p.first > 0) && std::isfinite(p.first) && std::isfinite(p.second))
        pts.push_back(p);
    std::sort(pts.begin(), pts.end());
    for (size_t k = 1; k < pts.size(); ++k)
      draw_line(im, px(pts[k - 1].first), py(pts[k - 1].second), px(pts[k].first),
                py(pts[k].second), c);
    for (auto [x, y] : pts) draw_marker(im, px(x), py(y), int(i / k_series_colours + i), c);
  }

  // Legend, title, axis labels.
  const int lth = k_glyph_h * legend_scale;
  for (size_t i = 0; i < chart.series.size(); ++i) {
    const uint8_t c = uint8_t(k_first_series + i % k_series_colours);
    const int y = top + 4 + int(i) * (lth + 8);
    const int x = right + 14;
    draw_line(im, x, y + lth / 2, x + 22, y + lth / 2, c);
    draw_marker(im, x + 11, y + lth / 2, int(i / k_series_colours + i), c);
    draw_text(im, x + 32, y, clip(chart.series[i].name, 40), legend_scale, k_black);
  }
  const int title_scale = text_width(chart.title, s) <= width - 20 ? s : 1;
  const int title_x = (width - text_width(chart.title, title_scale)) / 2;
  for (int bold = 0; bold < 2; ++bold)
    draw_text(im, title_x + bold, 12, chart.title, title_scale, k_black);
  draw_text(im, (left + right - text_width(chart.x_label, s)) / 2, height - 12 - th, chart.x_label,
            s, k_black);
  draw_text(im, 10, (top + bottom + text_width(chart.y_label, s)) / 2, chart.y_label, s, k_black,
            true);
  return im;
}

}  // namespace nosa::launcher::bench
