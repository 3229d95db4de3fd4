// Line charts for the plots of `nosa bench`: a title, axes with tick labels, grid lines and a
// legend, drawn into a palette image with a built-in 5x7 bitmap font (printable ASCII).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "launcher/bench/png.h"

namespace nosa::launcher::bench {

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> points;  // (x, y); drawn joined in x order
};

enum class Axis { linear, log2 };  // log2: batch sizes, contexts, GPU counts

struct Chart {
  std::string title, x_label, y_label;
  Axis x_axis = Axis::linear;
  std::vector<Series> series;
};

// Renders `chart`. The y axis starts at 0, so that heights compare as ratios; a log2 x axis puts
// its ticks at the x values of the data. Each series has its own colour and marker.
IndexedImage render_chart(const Chart& chart, int width = 960, int height = 600);

// The pieces, exposed for tests.
// Pixel width of `text` in the 5x7 font at `scale` (6 x scale pixels a character).
int text_width(const std::string& text, int scale);
// Draws `text` with its top-left corner at (x, y); `vertical` runs it upwards from (x, y) as the
// bottom-left corner (a y-axis label).
void draw_text(IndexedImage& image, int x, int y, const std::string& text, int scale,
               uint8_t colour, bool vertical = false);
// A short tick label: "16K" for 16384 (multiples of 1024), "1.5K" for 1500, "0.25", "0".
std::string tick_label(double v);
// Evenly spaced round values (steps of 1, 2, 2.5 or 5 x 10^k), about `target_count` of them,
// from the first multiple of the step at or above `lo` to the last at or below `hi`.
std::vector<double> nice_ticks(double lo, double hi, int target_count);

}  // namespace nosa::launcher::bench
