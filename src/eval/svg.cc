#include "eval/svg.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>

#include "core/error.h"

namespace pkv {

namespace {

constexpr double kCharWidth = 6.3;  // approximate advance of an 11 px sans-serif character

const char* kPalette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
const char* kDashes[] = {"", "7,3", "2,2", "9,3,2,3"};
// viridis, sampled at 10 points
const unsigned kRamp[] = {0x440154, 0x482878, 0x3e4989, 0x31688e, 0x26828e,
                          0x1f9e89, 0x35b779, 0x6ece58, 0xb5de2b, 0xfde725};

std::string num(double v) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

std::string ramp_color(double t) {  // t in [0, 1]
  t = std::clamp(t, 0.0, 1.0) * 9.0;
  const int i = std::min(8, int(t));
  const double f = t - i;
  auto ch = [&](int shift) {
    const double a = (kRamp[i] >> shift) & 0xff, b = (kRamp[i + 1] >> shift) & 0xff;
    return int(std::lround(a + (b - a) * f));
  };
  char buf[16];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", ch(16), ch(8), ch(0));
  return buf;
}

// Trims "1.500" -> "1.5", "2.000" -> "2", and exponents "1e+06" -> "1e6".
std::string tidy(std::string s) {
  const size_t e = s.find_first_of("eE");
  std::string mant = e == std::string::npos ? s : s.substr(0, e);
  std::string exp = e == std::string::npos ? "" : s.substr(e + 1);
  if (mant.find('.') != std::string::npos) {
    while (!mant.empty() && mant.back() == '0') mant.pop_back();
    if (!mant.empty() && mant.back() == '.') mant.pop_back();
  }
  if (!exp.empty()) {
    bool neg = exp[0] == '-';
    size_t p = (exp[0] == '+' || exp[0] == '-') ? 1 : 0;
    while (p + 1 < exp.size() && exp[p] == '0') ++p;
    exp = std::string(neg ? "-" : "") + exp.substr(p);
    return mant + "e" + exp;
  }
  return mant == "-0" ? "0" : mant;
}

std::string tick_label(double v, double step, bool log) {
  char buf[48];
  const double a = std::abs(v);
  if (!log && a < std::abs(step) * 1e-9) return "0";
  if (a != 0 && (a >= 1e6 || a < 1e-4)) {
    std::snprintf(buf, sizeof buf, "%.3g", v);
    return tidy(buf);
  }
  if (log) {
    std::snprintf(buf, sizeof buf, "%.4g", v);
    return tidy(buf);
  }
  const int decimals = std::clamp(int(std::ceil(-std::log10(step) - 1e-9)), 0, 8);
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return tidy(buf);
}

double nice_step(double raw) {
  if (!(raw > 0) || !std::isfinite(raw)) return 1;
  const double e = std::floor(std::log10(raw));
  const double p = std::pow(10.0, e), f = raw / p;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * p;
}

struct Axis {
  double lo = 0, hi = 1;
  bool log = false;
  std::vector<double> ticks;
  double step = 1;  // linear tick step (for the label format)

  double frac(double v) const {  // 0 at lo, 1 at hi
    if (log) return (std::log10(v) - std::log10(lo)) / (std::log10(hi) - std::log10(lo));
    return (v - lo) / (hi - lo);
  }
};

// Linear axis over [lo, hi] of data; fixed_lo / fixed_hi (not NaN) are kept as given, the other ends
// are widened to whole tick steps.
// tight: keep a data end (plus 2% of the range) where whole tick steps would add more than 5%.
Axis linear_axis(double lo, double hi, double fixed_lo, double fixed_hi, int target, bool tight = false) {
  Axis a;
  if (!std::isnan(fixed_lo)) lo = fixed_lo;
  if (!std::isnan(fixed_hi)) hi = fixed_hi;
  if (!(hi > lo)) {
    const double d = (lo == 0) ? 1.0 : std::abs(lo) * 0.1;
    if (std::isnan(fixed_lo)) lo -= d;
    if (std::isnan(fixed_hi) || !(hi > lo)) hi = lo + 2 * d;
  }
  a.step = nice_step((hi - lo) / target);
  const double range = hi - lo;
  if (std::isnan(fixed_lo)) {
    const double snapped = std::floor(lo / a.step + 1e-9) * a.step;
    lo = (tight && lo - snapped > 0.05 * range) ? lo - 0.02 * range : snapped;
  }
  if (std::isnan(fixed_hi)) {
    const double snapped = std::ceil(hi / a.step - 1e-9) * a.step;
    hi = (tight && snapped - hi > 0.05 * range) ? hi + 0.02 * range : snapped;
  }
  a.lo = lo;
  a.hi = hi;
  const long long k0 = (long long)std::ceil(lo / a.step - 1e-9), k1 = (long long)std::floor(hi / a.step + 1e-9);
  for (long long k = k0; k <= k1 && a.ticks.size() < 64; ++k) a.ticks.push_back(double(k) * a.step);
  return a;
}

Axis log_axis(double lo, double hi, double fixed_lo, double fixed_hi) {
  Axis a;
  a.log = true;
  if (!std::isnan(fixed_lo) && fixed_lo > 0) lo = fixed_lo;
  if (!std::isnan(fixed_hi) && fixed_hi > 0) hi = fixed_hi;
  if (!(lo > 0)) lo = 1;
  if (!(hi > lo)) hi = lo * 10;
  // 4% of the log span as padding on the ends taken from the data
  const double pad = std::pow(hi / lo, 0.04);
  if (std::isnan(fixed_lo)) lo /= pad;
  if (std::isnan(fixed_hi)) hi *= pad;
  a.lo = lo;
  a.hi = hi;
  const int e0 = int(std::floor(std::log10(lo))), e1 = int(std::ceil(std::log10(hi)));
  auto collect = [&](std::initializer_list<double> mults, int every) {
    std::vector<double> t;
    for (int e = e0; e <= e1; ++e) {
      if ((e - e0) % every) continue;
      for (double m : mults) {
        const double v = m * std::pow(10.0, e);
        if (v >= lo * (1 - 1e-12) && v <= hi * (1 + 1e-12)) t.push_back(v);
      }
    }
    return t;
  };
  a.ticks = collect({1, 2, 5}, 1);
  if (a.ticks.size() < 3) a.ticks = collect({1, 2, 3, 4, 5, 6, 7, 8, 9}, 1);
  if (a.ticks.size() > 9) a.ticks = collect({1}, 1);
  if (a.ticks.size() > 9) a.ticks = collect({1}, (e1 - e0 + 7) / 8);
  if (a.ticks.size() < 3) {
    // Less than about a factor 3 in range: evenly stepped ticks read better than 1-2-5 ones.
    const double step = nice_step((hi - lo) / 6);
    a.ticks.clear();
    for (long long k = (long long)std::ceil(lo / step - 1e-9); double(k) * step <= hi * (1 + 1e-12); ++k)
      a.ticks.push_back(double(k) * step);
  }
  return a;
}

void text(std::string& o, double x, double y, const std::string& s, const char* anchor, const std::string& extra = "") {
  o += "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\" text-anchor=\"" + anchor + "\"" + extra + ">" + svg_escape(s) +
       "</text>\n";
}

void render_panel(std::string& o, const PlotSpec& p, int index, double ox, int W, int H) {
  const std::string where = "plot '" + p.title + "'";
  for (const Series& s : p.series)
    if (s.x.size() != s.y.size())
      fail(where + ": series '" + s.label + "'",
           "x has " + std::to_string(s.x.size()) + " values, y has " + std::to_string(s.y.size()));

  // Data ranges over the drawable points.
  auto drawable = [&](double x, double y) { return std::isfinite(x) && std::isfinite(y) && (!p.log_y || y > 0); };
  double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
  for (const Series& s : p.series)
    for (size_t i = 0; i < s.x.size(); ++i)
      if (drawable(s.x[i], s.y[i])) {
        xlo = std::min(xlo, s.x[i]), xhi = std::max(xhi, s.x[i]);
        ylo = std::min(ylo, s.y[i]), yhi = std::max(yhi, s.y[i]);
      }
  if (!(xlo <= xhi)) xlo = 0, xhi = 1;
  if (!(ylo <= yhi)) ylo = p.log_y ? 1 : 0, yhi = p.log_y ? 10 : 1;

  // Layout.
  size_t longest = 0;
  for (const Series& s : p.series) longest = std::max(longest, s.label.size());
  const double legend_w =
      p.series.empty() ? 0 : std::clamp(28 + kCharWidth * double(longest) + 10, 60.0, 0.4 * W);
  const double left = 58 + (p.y_label.empty() ? 0 : 14), right = 12;
  const double top = p.title.empty() ? 14 : 32, bottom = 34 + (p.x_label.empty() ? 0 : 16);
  const double px0 = ox + left, px1 = ox + W - right - legend_w, py0 = top, py1 = H - bottom;

  const Axis ax = linear_axis(xlo, xhi, p.x_min, p.x_max, std::max(3, int((px1 - px0) / 60)), true);
  const Axis ay = p.log_y ? log_axis(ylo, yhi, p.y_min, p.y_max)
                          : linear_axis(ylo, yhi, p.y_min, p.y_max, std::max(3, int((py1 - py0) / 45)));
  auto X = [&](double v) { return px0 + ax.frac(v) * (px1 - px0); };
  auto Y = [&](double v) { return py1 - ay.frac(v) * (py1 - py0); };

  o += "<g class=\"panel\">\n";
  if (!p.title.empty()) text(o, (px0 + px1) / 2, 20, p.title, "middle", " font-size=\"13\" font-weight=\"bold\"");

  // Grid, ticks and tick labels.
  for (double t : ax.ticks) {
    const double x = X(t);
    o += "<line x1=\"" + num(x) + "\" y1=\"" + num(py0) + "\" x2=\"" + num(x) + "\" y2=\"" + num(py1) +
         "\" stroke=\"#e5e5e5\"/>\n";
    o += "<line x1=\"" + num(x) + "\" y1=\"" + num(py1) + "\" x2=\"" + num(x) + "\" y2=\"" + num(py1 + 4) +
         "\" stroke=\"#333\"/>\n";
    text(o, x, py1 + 16, tick_label(t, ax.step, false), "middle");
  }
  for (double t : ay.ticks) {
    const double y = Y(t);
    o += "<line x1=\"" + num(px0) + "\" y1=\"" + num(y) + "\" x2=\"" + num(px1) + "\" y2=\"" + num(y) +
         "\" stroke=\"#e5e5e5\"/>\n";
    o += "<line x1=\"" + num(px0 - 4) + "\" y1=\"" + num(y) + "\" x2=\"" + num(px0) + "\" y2=\"" + num(y) +
         "\" stroke=\"#333\"/>\n";
    text(o, px0 - 7, y + 4, tick_label(t, ay.step, ay.log), "end");
  }
  o += "<rect x=\"" + num(px0) + "\" y=\"" + num(py0) + "\" width=\"" + num(px1 - px0) + "\" height=\"" +
       num(py1 - py0) + "\" fill=\"none\" stroke=\"#333\"/>\n";
  if (!p.x_label.empty()) text(o, (px0 + px1) / 2, py1 + 34, p.x_label, "middle");
  if (!p.y_label.empty()) {
    const double cx = ox + 14, cy = (py0 + py1) / 2;
    text(o, cx, cy, p.y_label, "middle", " transform=\"rotate(-90 " + num(cx) + " " + num(cy) + ")\"");
  }

  // Lines, clipped to the plot area (a little wider, so that end markers stay whole).
  const std::string clip = "pkv-clip-" + std::to_string(index);
  o += "<clipPath id=\"" + clip + "\"><rect x=\"" + num(px0 - 4) + "\" y=\"" + num(py0 - 4) + "\" width=\"" +
       num(px1 - px0 + 8) + "\" height=\"" + num(py1 - py0 + 8) + "\"/></clipPath>\n";
  const size_t n = p.series.size();
  std::vector<std::string> colors(n), dashes(n);
  for (size_t i = 0; i < n; ++i) {
    colors[i] = p.sequential_colors ? ramp_color(n > 1 ? 0.85 * double(i) / double(n - 1) : 0.0)
                                    : std::string(kPalette[i % std::size(kPalette)]);
    dashes[i] = n > 8 ? kDashes[i % std::size(kDashes)] : "";
  }
  o += "<g clip-path=\"url(#" + clip + ")\" fill=\"none\" stroke-width=\"1.8\" stroke-linejoin=\"round\">\n";
  for (size_t i = 0; i < n; ++i) {
    const Series& s = p.series[i];
    std::string pts, dots;
    size_t count = 0;
    for (size_t k = 0; k < s.x.size(); ++k) {
      if (!drawable(s.x[k], s.y[k])) continue;
      const std::string xs = num(X(s.x[k])), ys = num(Y(s.y[k]));
      pts += (count ? " " : "") + xs + "," + ys;
      if (p.markers) dots += "<circle cx=\"" + xs + "\" cy=\"" + ys + "\" r=\"2.6\"/>";
      ++count;
    }
    if (count == 0) continue;
    o += "<polyline data-series=\"" + std::to_string(i) + "\" stroke=\"" + colors[i] + "\"" +
         (dashes[i].empty() ? "" : " stroke-dasharray=\"" + dashes[i] + "\"") + " points=\"" + pts + "\"/>\n";
    if (!dots.empty()) o += "<g fill=\"" + colors[i] + "\" stroke=\"none\">" + dots + "</g>\n";
  }
  o += "</g>\n";

  // Legend.
  if (n > 0) {
    const double lx = px1 + 10;
    const double row = std::min(16.0, (py1 - py0) / double(n));
    o += "<g class=\"legend\">\n";
    for (size_t i = 0; i < n; ++i) {
      const double y = py0 + 6 + row * double(i);
      o += "<line x1=\"" + num(lx) + "\" y1=\"" + num(y) + "\" x2=\"" + num(lx + 20) + "\" y2=\"" + num(y) +
           "\" stroke=\"" + colors[i] + "\" stroke-width=\"2\"" +
           (dashes[i].empty() ? "" : " stroke-dasharray=\"" + dashes[i] + "\"") + "/>\n";
      text(o, lx + 25, y + 4, p.series[i].label, "start");
    }
    o += "</g>\n";
  }
  o += "</g>\n";
}

}  // namespace

std::string svg_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string render_svg(const std::vector<PlotSpec>& panels, int panel_width, int height) {
  if (panel_width < 160 || height < 120)
    fail("plot", "panel size " + std::to_string(panel_width) + " x " + std::to_string(height) +
                     " is too small (at least 160 x 120)");
  const int W = panel_width * int(std::max<size_t>(1, panels.size()));
  std::string o;
  o += "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  o += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + std::to_string(W) + "\" height=\"" +
       std::to_string(height) + "\" viewBox=\"0 0 " + std::to_string(W) + " " + std::to_string(height) +
       "\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"11\" fill=\"#222\">\n";
  o += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (size_t i = 0; i < panels.size(); ++i)
    render_panel(o, panels[i], int(i), double(i) * panel_width, panel_width, height);
  o += "</svg>\n";
  return o;
}

void write_svg(const std::string& path, const std::vector<PlotSpec>& panels, int panel_width, int height) {
  const std::string doc = render_svg(panels, panel_width, height);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail(path, "cannot write plot");
  f << doc;
  f.close();
  if (!f) fail(path, "cannot write plot (write failed)");
}

}  // namespace pkv
