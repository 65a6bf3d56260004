// A small dependency-free SVG line-plot writer for the calibrate / eval reports: keep fraction per
// layer (one line per budget) and metric vs budget (one line per policy, panels side by side).
#pragma once
#include <cmath>
#include <string>
#include <vector>

namespace pkv {

// One line. x and y have the same length; points where x or y is NaN / inf (or y <= 0 on a log
// axis) are skipped and the line joins the remaining points.
struct Series {
  std::string label;
  std::vector<double> x, y;
};

// One panel: axes with ticks, grid, title, axis labels, a legend on the right, one polyline per
// series (series without any drawable point are listed in the legend but draw nothing).
struct PlotSpec {
  std::string title, x_label, y_label;
  bool log_y = false;             // logarithmic y axis (ticks 1-2-5 or decades)
  std::vector<Series> series;
  bool markers = true;            // a dot at each point
  bool sequential_colors = false; // colours along a dark-to-light ramp, for ordered series (budgets)
  // Axis ranges; NaN = from the data (a linear axis is widened to whole tick steps).
  double x_min = NAN, x_max = NAN, y_min = NAN, y_max = NAN;
};

// The whole SVG document: the panels side by side, each panel_width x height pixels. Colours: a
// 10-colour qualitative palette (or the ramp); with more than 8 series in a panel the lines also
// cycle through 4 dash patterns. Errors (pkv::fail): a series whose x and y lengths differ, a panel
// smaller than 160 x 120.
std::string render_svg(const std::vector<PlotSpec>& panels, int panel_width = 480, int height = 360);
void write_svg(const std::string& path, const std::vector<PlotSpec>& panels, int panel_width = 480,
               int height = 360);

// Escapes &, <, >, " and ' for SVG text and attributes.
std::string svg_escape(const std::string& s);

}  // namespace pkv
