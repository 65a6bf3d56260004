#include "kv/cutoff.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include "core/error.h"
#include "kv/budgeted.h"
#include "kv/prefix_search.h"

namespace pkv {

std::vector<int> cutoff_budgets(const std::vector<std::vector<float>>& scores, int64_t total, const std::vector<int>& base) {
  const int L = int(scores.size());
  PKV_ASSERT(L > 0 && int(base.size()) == L);
  const int N = int(scores[0].size());
  std::vector<int> n(static_cast<size_t>(L));
  int64_t floors = 0;
  for (int l = 0; l < L; ++l) n[size_t(l)] = std::clamp(base[size_t(l)], 0, N), floors += n[size_t(l)];
  total = std::clamp<int64_t>(total, floors, int64_t(L) * N);
  // The candidates: each layer's scores beyond its floor (its n_l highest: a selection, whose order
  // does not matter since only the count per layer is kept; `rank` makes the order total).
  struct Cand {
    float score;
    int layer, rank;
  };
  std::vector<Cand> cand;
  cand.reserve(size_t(L) * size_t(N));
  for (int l = 0; l < L; ++l) {
    PKV_ASSERT(int(scores[size_t(l)].size()) == N);
    std::vector<float> s = scores[size_t(l)];
    const int f = n[size_t(l)];
    if (f > 0 && f < N)
      std::nth_element(s.begin(), s.begin() + f, s.end(), [](float x, float y) { return score_order(x, y) > 0; });
    for (int r = f; r < N; ++r) cand.push_back({s[size_t(r)], l, r});
  }
  const size_t take = size_t(total - floors);
  auto better = [](const Cand& a, const Cand& b) {
    if (const int o = score_order(a.score, b.score)) return o > 0;
    return std::tie(a.layer, a.rank) < std::tie(b.layer, b.rank);
  };
  if (take < cand.size()) std::nth_element(cand.begin(), cand.begin() + ptrdiff_t(take), cand.end(), better);
  for (size_t i = 0; i < take; ++i) ++n[size_t(cand[i].layer)];
  return n;
}

int cutoff_floor(int N, double budget, int protected_count, double layer_floor, double evict_cap) {
  const int c = std::min(N, protected_count);
  const int uniform = std::clamp(int(std::lround(budget * N)), c, N);
  int floor = int(std::lround(layer_floor * uniform));
  if (evict_cap >= 1) floor = std::max<int>(floor, N - int(std::llround(evict_cap * (N - uniform))));
  return std::clamp(floor, c, uniform);
}

std::vector<float> pool_scores(const std::vector<float>& s, int seq_kernel, int grid_kernel, int image_offset,
                               int image_tokens) {
  const int N = int(s.size());
  std::vector<float> out = seq_kernel > 1 ? max_pool_1d(s, seq_kernel) : s;
  const int G = int(std::lround(std::sqrt(double(std::max(0, image_tokens)))));
  if (grid_kernel <= 1 || image_offset < 0 || G * G != image_tokens || G == 0 || image_offset + image_tokens > N)
    return out;
  const int r = grid_kernel / 2;
  for (int y = 0; y < G; ++y)
    for (int x = 0; x < G; ++x) {
      float m = -INFINITY;
      for (int yy = std::max(0, y - r); yy <= std::min(G - 1, y + r); ++yy)
        for (int xx = std::max(0, x - r); xx <= std::min(G - 1, x + r); ++xx)
          m = std::max(m, s[size_t(image_offset + yy * G + xx)]);
      out[size_t(image_offset + y * G + x)] = m;
    }
  return out;
}

const char* value_weight_name(ValueWeight w) {
  switch (w) {
    case ValueWeight::None: return "none";
    case ValueWeight::ValueNorm: return "vnorm";
    case ValueWeight::OutputNorm: return "wov";
    case ValueWeight::OutputNorm2: return "wov2";
  }
  return "?";
}

ValueWeight value_weight_from_name(const std::string& s, const std::string& option) {
  if (s == "none") return ValueWeight::None;
  if (s == "vnorm") return ValueWeight::ValueNorm;
  if (s == "wov") return ValueWeight::OutputNorm;
  if (s == "wov2") return ValueWeight::OutputNorm2;
  fail(option, "unknown value weighting '" + s + "' (none, vnorm, wov, wov2)");
}

const char* query_reduce_name(QueryReduce r) {
  switch (r) {
    case QueryReduce::Sum: return "sum";
    case QueryReduce::Mean: return "mean";
    case QueryReduce::Max: return "max";
  }
  return "?";
}

QueryReduce query_reduce_from_name(const std::string& s, const std::string& option) {
  if (s == "sum") return QueryReduce::Sum;
  if (s == "mean") return QueryReduce::Mean;
  if (s == "max") return QueryReduce::Max;
  fail(option, "unknown query reduce '" + s + "' (sum, mean, max)");
}

std::string policy_base_name(const std::string& spec) { return spec.substr(0, spec.find(':')); }

void apply_policy_spec(const std::string& spec, PolicyOptions& o, const std::string& option) {
  size_t at = spec.find(':');
  while (at != std::string::npos) {
    const size_t next = spec.find(':', at + 1);
    const std::string item = spec.substr(at + 1, next == std::string::npos ? std::string::npos : next - at - 1);
    at = next;
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq), val = eq == std::string::npos ? "" : item.substr(eq + 1);
    const std::string where = option + " " + spec;
    auto integer = [&](int lo) {
      try {
        size_t used = 0;
        const int v = std::stoi(val, &used);
        if (used == val.size() && v >= lo) return v;
      } catch (...) {
      }
      fail(where, "'" + key + "' takes an integer >= " + std::to_string(lo) + ", got '" + val + "'");
    };
    auto real = [&] {  // the value as a number; -1 when it is not one
      double v = -1;
      try {
        size_t used = 0;
        v = std::stod(val, &used);
        if (used != val.size()) v = -1;
      } catch (...) {
      }
      return v;
    };
    if (eq == std::string::npos && (key == "none" || key == "vnorm" || key == "wov" || key == "wov2")) {
      o.value_weight = value_weight_from_name(key, where);
    } else if (key == "w") {
      o.value_weight = value_weight_from_name(val, where);
    } else if (key == "floor") {
      const double v = real();
      if (!(v >= 0 && v <= 1)) fail(where, "'floor' takes a fraction of the uniform budget in [0, 1], got '" + val + "'");
      o.layer_floor = v;
    } else if (key == "cap") {
      const double v = real();
      if (!(v == 0 || (v >= 1 && std::isfinite(v))))
        fail(where, "'cap' takes a multiple of the uniform eviction, 0 (off) or >= 1, got '" + val + "'");
      o.layer_evict_cap = v;
    } else if (key == "grid") {
      o.grid_pool = integer(0);
    } else if (key == "look") {
      o.lookahead = integer(0);
    } else if (key == "reduce") {
      o.query_reduce = query_reduce_from_name(val, where);
    } else if (key == "pool") {
      o.prefix_pool = integer(0);
    } else if (eq == std::string::npos && key == "heads") {
      o.alloc = PolicyOptions::Alloc::Head;
    } else if (key == "alloc") {
      if (val == "head") o.alloc = PolicyOptions::Alloc::Head;
      else if (val == "layer") o.alloc = PolicyOptions::Alloc::Layer;
      else fail(where, "'alloc' takes layer or head, got '" + val + "'");
    } else if (key == "hfloor") {
      const double v = real();
      if (!(v >= 0 && v <= 1)) fail(where, "'hfloor' takes a fraction of the uniform count per head in [0, 1], got '" + val + "'");
      o.head_floor = v;
    } else {
      fail(where, "unknown option '" + item + "' (w=none|vnorm|wov|wov2, floor=F, cap=C, grid=K, look=K, reduce=sum|mean|max, "
                  "pool=K, heads, alloc=layer|head, hfloor=F)");
    }
  }
}

}  // namespace pkv
