// One decode step's attention over one layer of the CPU KV cache (ops::attention, 1 query, causal),
// with the cache's keys and values in float32, f16 or bf16 (--kv-dtype, kv/kv_cache.h): the part of
// a decode step the cache's storage type changes. Shapes: the bundled model's layer (8 query heads,
// 4 KV heads of 32) and LLaVA-1.5-7B's (32 / 32 of 128), with `entries` cached entries. The types
// run interleaved, ROUNDS rounds; prints the median time per call, the cache bytes it reads and the
// rate. With them, interleaved too, the read floor: the float32 cache's keys and values summed as
// integers by the same threads (parallel_for), the least time that reading those bytes takes.
//
//   cmake --build build --target pkv_bench_cpu_attention
//   build/pkv_bench_cpu_attention [--entries 700] [--rounds 5] [--threads 2]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/threads.h"
#include "ops/ops.h"

using namespace pkv;

int main(int argc, char** argv) {
  int entries = 700, rounds = 5, threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 < argc && a == "--entries") entries = std::stoi(argv[++i]);
    else if (i + 1 < argc && a == "--rounds") rounds = std::stoi(argv[++i]);
    else if (i + 1 < argc && a == "--threads") threads = std::stoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: pkv_bench_cpu_attention [--entries N] [--rounds R] [--threads T]\n");
      return 2;
    }
  }
  if (threads > 0) set_num_threads(threads);
  struct Shape {
    const char* name;
    int heads, kv_heads, head_dim;
  };
  const Shape shapes[] = {{"bundled (8 / 4 x 32)", 8, 4, 32}, {"llava-1.5-7b (32 / 32 x 128)", 32, 32, 128}};
  const DType types[] = {DType::F32, DType::F16, DType::BF16};
  std::printf("decode attention, 1 query over %d entries, %d threads, %d interleaved rounds (median)\n", entries,
              num_threads(), rounds);
  std::printf("| layer | KV dtype | us / call | cache MiB read | GB/s | vs f32 |\n|---|---|---|---|---|---|\n");
  std::mt19937 rng(1);
  uint64_t sink = 0;
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (const Shape& s : shapes) {
    const int kvd = s.kv_heads * s.head_dim;
    std::vector<float> q(size_t(s.heads) * s.head_dim), k(size_t(entries) * kvd), v(k.size()), out(q.size());
    for (float* x : {q.data(), k.data(), v.data()})
      for (size_t i = 0; i < (x == q.data() ? q.size() : k.size()); ++i) x[i] = u(rng);
    std::vector<uint16_t> k16[3], v16[3];
    std::vector<int32_t> pos(static_cast<size_t>(entries));
    std::iota(pos.begin(), pos.end(), 0);
    const int32_t qpos = entries;
    // About 0.2 s of calls per measurement.
    const int calls = std::max(10, int(2e8 / (double(entries) * kvd * 2 * s.heads / s.kv_heads)));
    std::vector<std::vector<double>> us(4);
    for (int r = 0; r < rounds; ++r)
      for (int ti = 0; ti < 4; ++ti) {
        if (ti == 3) {  // the read floor
          const uint32_t* kw = reinterpret_cast<const uint32_t*>(k.data());
          const uint32_t* vw = reinterpret_cast<const uint32_t*>(v.data());
          std::vector<uint64_t> part(size_t(num_threads()), 0);
          auto pass = [&] {
            parallel_for(k.size(), 4096, [&](size_t b, size_t e, int tid) {
              uint32_t s = 0;
              for (size_t x = b; x < e; ++x) s += kw[x] + vw[x];
              part[size_t(tid)] += s;
            });
          };
          pass();
          const int n = std::max(3, calls / 4);
          const auto t0 = std::chrono::steady_clock::now();
          for (int c = 0; c < n; ++c) pass();
          us[3].push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n);
          for (uint64_t x : part) sink += x;
          continue;
        }
        const DType t = types[ti];
        ops::AttentionArgs a;
        a.q = q.data();
        a.n_q = 1;
        a.q_pos = &qpos;
        a.kv_pos = pos.data();
        a.n_kv = entries;
        a.kv_stride = kvd;
        a.n_heads = s.heads;
        a.n_kv_heads = s.kv_heads;
        a.head_dim = s.head_dim;
        a.scale = 1.f / std::sqrt(float(s.head_dim));
        a.out = out.data();
        if (t == DType::F32) {
          a.k = k.data();
          a.v = v.data();
        } else {
          if (k16[ti].empty()) {
            k16[ti].resize(k.size());
            v16[ti].resize(v.size());
            from_f32(t, k.data(), k16[ti].data(), k.size());
            from_f32(t, v.data(), v16[ti].data(), v.size());
          }
          a.kv_dtype = t;
          a.k16 = k16[ti].data();
          a.v16 = v16[ti].data();
        }
        ops::attention(a);  // warm
        const auto t0 = std::chrono::steady_clock::now();
        for (int c = 0; c < calls; ++c) ops::attention(a);
        us[size_t(ti)].push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / calls);
      }
    double base = 0;
    for (int ti = 0; ti < 4; ++ti) {
      std::vector<double> x = us[size_t(ti)];
      std::nth_element(x.begin(), x.begin() + ptrdiff_t(x.size() / 2), x.end());
      const double med = x[x.size() / 2];
      if (ti == 0) base = med;
      const double bytes = double(entries) * kvd * 2 * (ti == 3 ? 4 : dtype_size(types[ti]));
      std::printf("| %s | %s | %.1f | %.2f | %.1f | %.2fx |\n", s.name, ti == 3 ? "read floor (f32 bytes)" : dtype_name(types[ti]),
                  med, bytes / double(1 << 20), bytes / med * 1e-3, med / base);
    }
  }
  volatile uint64_t keep = sink;  // the floor's sums are used
  (void)keep;
  return 0;
}
