// The host's share of a compressing prefill: each policy's decision after the prefill (after_prefill,
// then the plan checked and applied to the positions the host keeps), what GpuSession::compress_prompt
// reports as the prefill's policy_ms, on synthetic importance at a decoder's shape (default the
// LLaVA-1.5-7B decoder's: 32 layers, 32 KV heads, a 1,024-token prompt). The device's share (the
// importance pass, the compaction) is measured by `prefixkv bench --device cuda`.
//
//   cmake --build build-dev --target pkv_bench_policy
//   build-dev/pkv_bench_policy [--layers 32] [--kv-heads 32] [--prompt 1024] [--budget 0.2] [--reps 30]
//                              [--policies NAME,...] [--json FILE]
//
// The importance is heavy-tailed like attention's (log-normal, a large first entry: the sink; seeded,
// the same for every policy), per layer or per KV head as the policy asks. prefixkv takes a profile
// whose keep fractions rise linearly with depth from half the budget to 1.5 times it (its decision
// costs the same for any profile). Each repetition makes a fresh policy and position table (not
// timed) and times the decision; the table shows the median and the fastest repetition.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "kv/keep_plan.h"
#include "kv/policy.h"
#include "kv/profile.h"

namespace {

using namespace pkv;
using Clock = std::chrono::steady_clock;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) out.push_back(x);
  return out;
}

// rows x N log-normal values, the first entry of each row 50 times the row's mean.
std::vector<float> synthetic_rows(int rows, int N, std::mt19937& rng) {
  std::lognormal_distribution<float> d(0.f, 1.5f);
  std::vector<float> v(size_t(rows) * N);
  for (int r = 0; r < rows; ++r) {
    double sum = 0;
    for (int j = 0; j < N; ++j) sum += v[size_t(r) * N + j] = d(rng);
    v[size_t(r) * N] = float(50 * sum / N);
  }
  return v;
}

int arg_int(int argc, char** argv, int& i) {
  if (i + 1 >= argc) fail(argv[i], "needs a value");
  return std::stoi(argv[++i]);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    int L = 32, H = 32, N = 1024, reps = 30;
    double budget = 0.2;
    std::string json_path;
    std::vector<std::string> names = {"streaming", "h2o",
                                      "snapkv", "pyramidkv",
                                      "adakv", "uniform-prefix",
                                      "prefixkv", "prefixkv:reduce=max",
                                      "prefixkv:wov2:reduce=max", "prefixkv-online",
                                      "cutoff:vnorm:floor=0.5:cap=1.5", "cutoff:wov2:floor=0.5:cap=1.5",
                                      "uniform-prefix:heads"};
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--layers") L = arg_int(argc, argv, i);
      else if (a == "--kv-heads") H = arg_int(argc, argv, i);
      else if (a == "--prompt") N = arg_int(argc, argv, i);
      else if (a == "--reps") reps = arg_int(argc, argv, i);
      else if (a == "--budget" && i + 1 < argc) budget = std::stod(argv[++i]);
      else if (a == "--policies" && i + 1 < argc) names = split(argv[++i]);
      else if (a == "--json" && i + 1 < argc) json_path = argv[++i];
      else fail(a, "unknown option (--layers --kv-heads --prompt --budget --reps --policies NAME,... --json FILE)");
    }
    if (L < 1 || H < 1 || N < 2 || reps < 1) fail("options", "--layers, --kv-heads, --reps >= 1 and --prompt >= 2");

    std::mt19937 rng(7);
    std::vector<std::vector<float>> per_layer(static_cast<size_t>(L)), per_head(static_cast<size_t>(L));
    for (int l = 0; l < L; ++l) {
      per_layer[size_t(l)] = synthetic_rows(1, N, rng);
      per_head[size_t(l)] = synthetic_rows(H, N, rng);
    }
    std::vector<int32_t> pos(static_cast<size_t>(N));
    for (int j = 0; j < N; ++j) pos[size_t(j)] = j;

    PolicyOptions base;
    base.budget = budget;
    base.keep_fractions = ramp_keep_fractions(L, budget);

    std::printf("host decision after a %d-token prefill, %d layers x %d KV heads, %.0f%% kept, %d repetitions\n\n", N,
                L, H, budget * 100, reps);
    std::printf("| policy | median ms | fastest ms | kept share |\n|---|---:|---:|---:|\n");
    nlohmann::json rows = nlohmann::json::array();
    for (const std::string& name : names) {
      std::vector<double> ms;
      double kept = 0;  // the share of the prompt's entries kept, over layers (and heads)
      for (int r = 0; r < reps; ++r) {
        std::unique_ptr<KVPolicy> p = make_policy(name, base);
        const ImportanceRequest req = p->prefill_importance(N);
        PositionTable table(L, H);
        table.append_all(pos.data(), N);
        static const std::vector<std::vector<float>> none;
        const std::vector<std::vector<float>>& imp = !req.needed ? none : req.per_kv_head ? per_head : per_layer;
        const auto t0 = Clock::now();
        KeepPlan plan = p->after_prefill(table, imp, N);
        check_plan(plan, table, p->name());
        table.apply(plan);
        ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        kept = 0;
        for (int l = 0; l < L; ++l) kept += table.per_head(l) ? table.held(l) / double(H * N) : table.held(l) / double(N);
        kept /= L;
      }
      std::sort(ms.begin(), ms.end());
      const double median = ms[ms.size() / 2], fastest = ms.front();
      std::printf("| %s | %.3f | %.3f | %.3f |\n", name.c_str(), median, fastest, kept);
      rows.push_back({{"policy", name}, {"median_ms", median}, {"fastest_ms", fastest}, {"kept_fraction", kept}});
    }
    if (!json_path.empty()) {
      nlohmann::json j = {{"layers", L}, {"kv_heads", H}, {"prompt", N}, {"budget", budget}, {"reps", reps},
                          {"policies", rows}};
      std::ofstream f(json_path);
      if (!f) fail(json_path, "cannot be written");
      f << j.dump(1) << "\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pkv_bench_policy: %s\n", e.what());
    return 1;
  }
}
