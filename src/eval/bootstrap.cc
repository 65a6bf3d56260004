#include "eval/bootstrap.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace pkv {

const char* metric_key(Metric m) {
  switch (m) {
    case Metric::Ppl: return "ppl";
    case Metric::RougeL: return "rouge_l";
    case Metric::Accuracy: return "accuracy";
    case Metric::Kld: return "kld";
    case Metric::Top1: return "top1_agreement";
  }
  return "?";
}

bool higher_is_better(Metric m) { return m == Metric::RougeL || m == Metric::Accuracy || m == Metric::Top1; }

double metric_value(const std::vector<SampleStats>& s, const std::vector<uint32_t>& idx, Metric m) {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  double sum = 0;
  int64_t tokens = 0, count = 0;
  for (uint32_t i : idx) {
    const SampleStats& x = s[i];
    switch (m) {
      case Metric::Ppl: sum += x.nll; break;
      case Metric::Kld: sum += x.kld; break;
      case Metric::Top1: sum += x.top1; break;
      case Metric::RougeL: sum += x.rouge_l; break;
      case Metric::Accuracy:
        if (x.scored) sum += x.accuracy, ++count;
        break;
    }
    tokens += x.tokens;
  }
  switch (m) {
    case Metric::Ppl: return tokens ? std::exp(sum / double(tokens)) : kNaN;
    case Metric::Kld:
    case Metric::Top1: return tokens ? sum / double(tokens) : kNaN;
    case Metric::RougeL: return idx.empty() ? kNaN : sum / double(idx.size());
    case Metric::Accuracy: return count ? sum / double(count) : kNaN;
  }
  return kNaN;
}

double metric_value(const std::vector<SampleStats>& s, Metric m) {
  std::vector<uint32_t> all(s.size());
  std::iota(all.begin(), all.end(), 0u);
  return metric_value(s, all, m);
}

double percentile(std::vector<double> v, double q) {
  v.erase(std::remove_if(v.begin(), v.end(), [](double x) { return std::isnan(x); }), v.end());
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const double pos = std::clamp(q, 0.0, 1.0) * double(v.size() - 1);
  const size_t lo = size_t(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  const double frac = pos - double(lo);
  if (frac == 0 || v[lo] == v[hi]) return v[lo];  // exact at an order statistic, and between equal ones
  return v[lo] + frac * (v[hi] - v[lo]);
}

Resamples::Resamples(size_t n, int B, uint64_t seed) : n_(n) {
  if (B < 0) fail("--bootstrap", "needs a count of resamples >= 0");
  if (n > 0xffffffffu) fail("--bootstrap", "too many samples");
  uint64_t state = seed;
  auto next = [&state]() {  // splitmix64
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  sets_.assign(size_t(B), std::vector<uint32_t>(n));
  for (auto& set : sets_)
    for (uint32_t& i : set) i = uint32_t((static_cast<unsigned __int128>(next()) * n) >> 64);
}

namespace {
Interval quantiles(const std::vector<double>& values, double level) {
  if (!(level > 0 && level < 1)) fail("bootstrap", "the interval's level must lie in (0, 1)");
  const double tail = (1 - level) / 2;
  return Interval{percentile(values, tail), percentile(values, 1 - tail)};
}
}  // namespace

Interval bootstrap_interval(const Resamples& r, const std::vector<SampleStats>& a, Metric m, double level) {
  PKV_ASSERT(a.size() == r.samples());
  std::vector<double> v;
  v.reserve(r.sets().size());
  for (const auto& idx : r.sets()) v.push_back(metric_value(a, idx, m));
  return quantiles(v, level);
}

Interval paired_interval(const Resamples& r, const std::vector<SampleStats>& a, const std::vector<SampleStats>& b,
                         Metric m, double level) {
  PKV_ASSERT(a.size() == r.samples() && b.size() == r.samples());
  std::vector<double> v;
  v.reserve(r.sets().size());
  for (const auto& idx : r.sets()) v.push_back(metric_value(a, idx, m) - metric_value(b, idx, m));
  return quantiles(v, level);
}

const char* verdict(const Interval& diff, Metric m) {
  if (!diff.valid()) return "tied";
  const bool up = higher_is_better(m);
  if (up ? diff.lo > 0 : diff.hi < 0) return "better";
  if (up ? diff.hi < 0 : diff.lo > 0) return "worse";
  return "tied";
}

}  // namespace pkv
