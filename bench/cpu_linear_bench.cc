// The CPU engine's decode products against the machine's memory bandwidth: ops::linear (1 row) and
// ops::linear_rows (batched decode) on 16-bit weights of the LLaVA-1.5-7B language model's shapes,
// each matrix larger than the caches, so a product is a stream of its weights. Prints, per shape,
// row count, dtype and thread count, the time of one product and the weight bytes per second, beside
// a plain read of the same bytes (the floor a product can reach on this machine). With more rows (a
// short prompt's prefill) the products are bound by arithmetic: the GFLOP/s column, and each of
// linear()'s paths apart (linear_rows, gemm16, blas) to place the thresholds between them.
//
//   cmake --build build-dev --target pkv_bench_cpu_linear
//   build-dev/pkv_bench_cpu_linear [--threads 1,2] [--rows 1,4,16] [--reps 20] [--json out.json]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/tensor.h"
#include "core/threads.h"
#include "ops/ops.h"

namespace {

using Clock = std::chrono::steady_clock;

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');) v.push_back(std::stoi(x));
  return v;
}

// The read floor: the same number of bytes summed as 64-bit words, split over the threads as the
// products split their outputs.
double read_gbs(const std::vector<uint16_t>& buf, int reps) {
  const size_t words = buf.size() / 4;
  const auto* p = reinterpret_cast<const uint64_t*>(buf.data());
  std::vector<uint64_t> sums(size_t(pkv::num_threads()) * 8, 0);
  double best = 1e30;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = Clock::now();
    pkv::parallel_for(words, 4096, [&](size_t b, size_t e, int t) {
      uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      size_t i = b;
      for (; i + 4 <= e; i += 4) s0 += p[i], s1 += p[i + 1], s2 += p[i + 2], s3 += p[i + 3];
      for (; i < e; ++i) s0 += p[i];
      sums[size_t(t) * 8] += s0 + s1 + s2 + s3;
    });
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  uint64_t all = 0;
  for (uint64_t s : sums) all += s;
  if (all == 42) std::printf(" ");  // keeps the sums alive
  return double(buf.size()) * 2 / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> threads = {1, 2}, rows = {1, 4, 16};
  int reps = 20;
  std::string json_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "pkv_bench_cpu_linear: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--threads") threads = parse_list(next());
    else if (a == "--rows") rows = parse_list(next());
    else if (a == "--reps") reps = std::stoi(next());
    else if (a == "--json") json_path = next();
    else {
      std::fprintf(stderr, "usage: pkv_bench_cpu_linear [--threads 1,2] [--rows 1,4,16] [--reps N] [--json FILE]\n");
      return 2;
    }
  }
  struct Shape {
    const char* name;
    int in, out;
  };
  const Shape shapes[] = {{"q/k/v/o 4096x4096", 4096, 4096}, {"gate/up 4096->11008", 4096, 11008},
                          {"down 11008->4096", 11008, 4096}};
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 0.02f);
  nlohmann::json out = nlohmann::json::array();
  std::printf("| shape | path | dtype | rows | threads | ms / product | weight GB/s | read floor GB/s | of the floor | GFLOP/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Shape& sh : shapes) {
    for (pkv::DType dt : {pkv::DType::F16, pkv::DType::BF16}) {
      std::vector<uint16_t> w(size_t(sh.in) * sh.out);
      for (auto& v : w) v = dt == pkv::DType::F16 ? pkv::f32_to_f16(nd(rng)) : pkv::f32_to_bf16(nd(rng));
      pkv::TensorView tv;
      tv.name = sh.name;
      tv.supported = true;
      tv.dtype = dt;
      tv.shape = {sh.out, sh.in};
      tv.data = w.data();
      pkv::Linear L;
      L.w = &tv;
      L.in = sh.in;
      L.out = sh.out;
      for (int nt : threads) {
        pkv::set_num_threads(nt);
        const double floor_gbs = read_gbs(w, reps);
        for (int r : rows) {
          std::vector<float> x(size_t(r) * sh.in), y(size_t(r) * sh.out);
          for (auto& v : x) v = nd(rng) * 50;
          // linear(): the engine's product (whichever path it takes for r rows); then each path
          // apart where more than one row makes them differ: linear_rows (batched decoding's 16-bit
          // dot products, several rows per weight row), gemm16 (a short prompt's register-tiled
          // product) and blas (blocks of W converted to float32 for BLAS).
          for (const std::string path : {"linear", "linear_rows", "gemm16", "blas"}) {
            if (r == 1 && path != "linear") continue;
            if (r > 64 && path == "linear_rows") continue;  // far too slow to be a choice there
            double best = 1e30;
            for (int rep = 0; rep < reps; ++rep) {
              const auto t0 = Clock::now();
              if (path == "linear") pkv::ops::linear(x.data(), r, L, y.data());
              else if (path == "linear_rows") pkv::ops::linear_rows(x.data(), r, L, y.data());
              else if (path == "gemm16") pkv::ops::gemm16(x.data(), r, dt, w.data(), sh.in, sh.out, y.data());
              else pkv::ops::linear_blas(x.data(), r, L, y.data());
              best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
            }
            const double gbs = double(w.size()) * 2 / best / 1e9;
            const double gflops = 2.0 * r * double(w.size()) / best / 1e9;
            std::printf("| %s | %s | %s | %d | %d | %.3f | %.1f | %.1f | %.0f%% | %.1f |\n", sh.name, path.c_str(),
                        pkv::dtype_name(dt), r, nt, best * 1e3, gbs, floor_gbs, 100 * gbs / floor_gbs, gflops);
            out.push_back({{"shape", sh.name}, {"path", path}, {"in", sh.in}, {"out", sh.out},
                           {"dtype", pkv::dtype_name(dt)}, {"rows", r}, {"threads", nt}, {"ms", best * 1e3},
                           {"weight_gbs", gbs}, {"read_floor_gbs", floor_gbs}, {"gflops", gflops}});
          }
        }
      }
    }
  }
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "pkv_bench_cpu_linear: cannot write %s\n", json_path.c_str());
      return 1;
    }
    const std::string s = out.dump(1);
    std::fwrite(s.data(), 1, s.size(), f);
    std::fclose(f);
  }
  return 0;
}
