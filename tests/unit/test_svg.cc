#include <gtest/gtest.h>

#include "test_util.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "core/error.h"
#include "eval/svg.h"

namespace fs = std::filesystem;
using namespace pkv;

namespace {

size_t count(const std::string& s, const std::string& needle) {
  size_t n = 0;
  for (size_t p = s.find(needle); p != std::string::npos; p = s.find(needle, p + needle.size())) ++n;
  return n;
}

// Every start tag is closed, in order (self-closing tags count as closed); comments and the XML
// declaration are skipped. Returns "" when balanced, else what went wrong.
std::string check_balanced(const std::string& s) {
  std::vector<std::string> stack;
  size_t p = 0;
  while ((p = s.find('<', p)) != std::string::npos) {
    const size_t e = s.find('>', p);
    if (e == std::string::npos) return "unterminated tag at " + std::to_string(p);
    const std::string tag = s.substr(p + 1, e - p - 1);
    p = e + 1;
    if (tag.empty()) return "empty tag";
    if (tag[0] == '?' || tag[0] == '!') continue;
    if (tag[0] == '/') {
      const std::string name = tag.substr(1);
      if (stack.empty() || stack.back() != name) return "unexpected </" + name + ">";
      stack.pop_back();
      continue;
    }
    if (tag.back() == '/') continue;
    stack.push_back(tag.substr(0, tag.find_first_of(" \n\t")));
  }
  return stack.empty() ? "" : "unclosed <" + stack.back() + ">";
}

// The number of points of each polyline, in order.
std::vector<size_t> polyline_points(const std::string& s) {
  std::vector<size_t> out;
  const std::regex re("<polyline[^>]* points=\"([^\"]*)\"");
  for (auto it = std::sregex_iterator(s.begin(), s.end(), re); it != std::sregex_iterator(); ++it) {
    std::istringstream in((*it)[1].str());
    std::string pt;
    size_t n = 0;
    while (in >> pt) {
      EXPECT_NE(pt.find(','), std::string::npos) << pt;
      ++n;
    }
    out.push_back(n);
  }
  return out;
}

// All polyline coordinates (x, y pairs flattened).
std::vector<double> polyline_coords(const std::string& s) {
  std::vector<double> out;
  const std::regex re("<polyline[^>]* points=\"([^\"]*)\"");
  for (auto it = std::sregex_iterator(s.begin(), s.end(), re); it != std::sregex_iterator(); ++it) {
    std::string pts = (*it)[1].str();
    for (char& c : pts)
      if (c == ',') c = ' ';
    std::istringstream in(pts);
    double v;
    while (in >> v) out.push_back(v);
  }
  return out;
}

PlotSpec budgets_plot(int n_series, int n_layers) {
  PlotSpec p;
  p.title = "Keep fraction per layer";
  p.x_label = "layer";
  p.y_label = "keep fraction";
  p.sequential_colors = true;
  p.markers = false;
  p.y_min = 0;
  p.y_max = 1;
  for (int s = 0; s < n_series; ++s) {
    Series ser;
    ser.label = "b = 0." + std::to_string(s + 1);
    for (int l = 0; l < n_layers; ++l) {
      ser.x.push_back(l);
      ser.y.push_back(std::min(1.0, (s + 1) / 10.0 * (0.5 + double(l) / n_layers)));
    }
    p.series.push_back(ser);
  }
  return p;
}

}  // namespace

TEST(Svg, WellFormedWithOnePolylinePerSeries) {
  const std::string svg = render_svg({budgets_plot(9, 32)});
  EXPECT_EQ(check_balanced(svg), "");
  EXPECT_EQ(count(svg, "<svg "), 1u);
  EXPECT_EQ(count(svg, "</svg>"), 1u);
  EXPECT_EQ(svg.rfind("</svg>\n"), svg.size() - 7);
  EXPECT_EQ(polyline_points(svg), std::vector<size_t>(9, 32));
  EXPECT_EQ(count(svg, "<polyline"), 9u);
  EXPECT_NE(svg.find("Keep fraction per layer"), std::string::npos);
  EXPECT_NE(svg.find(">b = 0.9<"), std::string::npos);  // legend
  EXPECT_NE(svg.find("stroke-dasharray"), std::string::npos);  // > 8 series: dashes too
  EXPECT_EQ(count(svg, "<circle"), 0u);                         // markers off
  // Readable tick labels on [0, 1].
  EXPECT_NE(svg.find(">0.2<"), std::string::npos);
  EXPECT_NE(svg.find(">1<"), std::string::npos);
  EXPECT_EQ(svg.find("0.30000000"), std::string::npos);
}

TEST(Svg, TwoPanelsMetricVsBudgetWithLogPpl) {
  PlotSpec ppl, rouge;
  ppl.title = "PPL";
  ppl.log_y = true;
  ppl.x_label = rouge.x_label = "KV budget kept";
  rouge.title = "ROUGE-L";
  const std::vector<double> b = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9};
  ppl.series = {{"Local", b, {66, 105, 70, 47.5, 33.8, 14.7, 5.5, 4.78, 4.03}},
                {"PrefixKV", b, {4.41, 3.69, 3.48, 3.41, 3.41, 3.41, 3.25, 3.2, 3.2}}};
  rouge.series = {{"Local", b, {0.22, 0.14, 0.18, 0.17, 0.19, 0.3, 0.41, 0.5, 0.55}},
                  {"PrefixKV", b, {0.43, 0.51, 0.55, 0.57, 0.58, 0.59, 0.63, 0.74, 0.76}}};
  const std::string svg = render_svg({ppl, rouge}, 400, 300);
  EXPECT_EQ(check_balanced(svg), "");
  EXPECT_NE(svg.find("width=\"800\""), std::string::npos);
  EXPECT_EQ(polyline_points(svg), std::vector<size_t>(4, 9));
  EXPECT_EQ(count(svg, "<circle"), 36u);
  EXPECT_EQ(count(svg, "class=\"panel\""), 2u);
  // Every point lies inside the document.
  const auto c = polyline_coords(svg);
  for (size_t i = 0; i < c.size(); i += 2) {
    EXPECT_GE(c[i], 0);
    EXPECT_LE(c[i], 800);
    EXPECT_GE(c[i + 1], 0);
    EXPECT_LE(c[i + 1], 300);
  }
  // Decade ticks on the PPL axis (3.2 .. 105).
  EXPECT_NE(svg.find(">10<"), std::string::npos);
  EXPECT_NE(svg.find(">100<"), std::string::npos);
}

TEST(Svg, LogScaleSpanningDecadesIsEvenlySpaced) {
  PlotSpec p;
  p.log_y = true;
  p.markers = false;
  Series s{"wide", {}, {}};
  for (int i = 0; i <= 8; ++i) {
    s.x.push_back(i);
    s.y.push_back(std::pow(10.0, i - 2));  // 0.01 .. 1e6
  }
  p.series = {s};
  const std::string svg = render_svg({p});
  EXPECT_EQ(check_balanced(svg), "");
  const auto c = polyline_coords(svg);
  ASSERT_EQ(c.size(), 18u);
  // Equal ratios are equal steps in y, and larger values are higher (smaller y).
  const double step = c[3] - c[1];
  EXPECT_LT(step, 0);
  for (size_t i = 1; i + 2 < c.size(); i += 2) EXPECT_NEAR(c[i + 2] - c[i], step, 0.02);
  EXPECT_NE(svg.find(">0.01<"), std::string::npos);
  EXPECT_NE(svg.find(">1e6<"), std::string::npos);
  EXPECT_EQ(svg.find("e+"), std::string::npos);
}

TEST(Svg, SkipsNanInfAndNonPositiveOnLogAxis) {
  PlotSpec p;
  p.log_y = true;
  p.series = {{"gaps", {1, 2, 3, 4, 5, 6}, {1.0, NAN, 10.0, INFINITY, -1.0, 0.0}},
              {"x missing", {NAN, 2, 3}, {5, 6, 7}}};
  const std::string svg = render_svg({p});
  EXPECT_EQ(check_balanced(svg), "");
  EXPECT_EQ(polyline_points(svg), (std::vector<size_t>{2, 2}));
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  EXPECT_EQ(svg.find("inf"), std::string::npos);
  p.log_y = false;
  EXPECT_EQ(polyline_points(render_svg({p})), (std::vector<size_t>{4, 2}));
}

TEST(Svg, EmptySeriesAndPanelsDoNotCrash) {
  PlotSpec p;
  p.title = "empty";
  p.series = {{"nothing", {}, {}}, {"all nan", {1, 2}, {NAN, NAN}}, {"one", {0.5}, {2.0}}};
  std::string svg = render_svg({p});
  EXPECT_EQ(check_balanced(svg), "");
  EXPECT_EQ(polyline_points(svg), std::vector<size_t>{1});
  EXPECT_NE(svg.find(">nothing<"), std::string::npos);  // still in the legend
  PlotSpec none;
  none.log_y = true;
  svg = render_svg({none, PlotSpec{}});
  EXPECT_EQ(check_balanced(svg), "");
  EXPECT_EQ(count(svg, "<polyline"), 0u);
  svg = render_svg({});
  EXPECT_EQ(check_balanced(svg), "");
  // A constant series gets a non-degenerate axis.
  PlotSpec flat;
  flat.series = {{"flat", {1, 2, 3}, {5, 5, 5}}};
  svg = render_svg({flat});
  EXPECT_EQ(check_balanced(svg), "");
  EXPECT_EQ(svg.find("nan"), std::string::npos);
}

TEST(Svg, LabelsAreEscaped) {
  PlotSpec p;
  p.title = "A & B <test>";
  p.x_label = "x > 0";
  p.y_label = "\"quoted\" 'y'";
  p.series = {{"<script>&", {0, 1}, {0, 1}}};
  const std::string svg = render_svg({p});
  EXPECT_EQ(check_balanced(svg), "");
  EXPECT_NE(svg.find("A &amp; B &lt;test&gt;"), std::string::npos);
  EXPECT_NE(svg.find("x &gt; 0"), std::string::npos);
  EXPECT_NE(svg.find("&quot;quoted&quot; &apos;y&apos;"), std::string::npos);
  EXPECT_NE(svg.find("&lt;script&gt;&amp;"), std::string::npos);
  EXPECT_EQ(svg.find("<script>"), std::string::npos);
  EXPECT_EQ(svg.find("<test>"), std::string::npos);
}

TEST(Svg, BadInputAndWriteFile) {
  PlotSpec p;
  p.title = "T";
  p.series = {{"bad", {1, 2, 3}, {1, 2}}};
  try {
    render_svg({p});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'bad'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(render_svg({PlotSpec{}}, 50, 50), Error);
  const std::string path = test::temp_path("plot.svg");
  write_svg(path, {budgets_plot(3, 12)});
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  EXPECT_EQ(ss.str(), render_svg({budgets_plot(3, 12)}));
  fs::remove(path);
  EXPECT_THROW(write_svg("/nonexistent-dir/x.svg", {budgets_plot(1, 2)}), Error);
}
