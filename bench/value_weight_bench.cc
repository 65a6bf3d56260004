// The cost of the value weights of the extended importance (engine/query_importance.h,
// value_weights): per layer and query head, each entry's ||v||_1 (vnorm), ||W_o^h v||_1 (wov, BLAS
// products) or ||W_o^h v||_2 through the model's Gram matrices (wov2), on a cache of N entries per
// layer with random values, beside the scalar loop `wov` was before (kept here as the baseline: for
// each entry and head, hidden x head_dim multiply-adds into an output row, then its L1 norm). The
// Gram matrices are computed once per model; their time is reported separately ("gram").
//
//   cmake --build build-h2 --target pkv_bench_value_weights
//   build-h2/pkv_bench_value_weights [--model DIR | --shape llava-1.5-7b] [--layers L] [--entries 590]
//                                    [--reps 10] [--threads N] [--no-scalar]
// --shape llava-1.5-7b: random float16 weights of that decoder's layer shape (hidden 4096, 32 heads of
// 128), --layers of them (default 2: the per-layer time is what counts). --no-scalar leaves the scalar
// loop out (at that shape it takes seconds per layer).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/threads.h"
#include "engine/query_importance.h"
#include "model/model.h"
#include "ops/ops.h"

namespace {

using Clock = std::chrono::steady_clock;
using namespace pkv;

// The weighting `wov` used before it went through BLAS (the loop as it was, for the baseline).
std::vector<std::vector<float>> wov_scalar(const Model& model, const KVCache& cache, int n) {
  const TextConfig& t = model.config().text;
  const int H = t.n_heads, Hkv = t.n_kv_heads, hd = t.head_dim, group = H / Hkv, D = t.hidden, qd = H * hd;
  const int kvd = Hkv * hd;
  std::vector<std::vector<float>> out(size_t(t.n_layers));
  for (int l = 0; l < t.n_layers; ++l) {
    const float* V = cache.layer(l).values();
    std::vector<float>& o = out[size_t(l)];
    o.assign(size_t(H) * n, 1.f);
    std::vector<float> eye(size_t(qd) * qd, 0.f), wt(size_t(qd) * D);
    for (int i = 0; i < qd; ++i) eye[size_t(i) * qd + i] = 1.f;
    const Linear& o_proj = model.weights().lm.layers[size_t(l)].o;
    ops::linear(eye.data(), qd, o_proj, wt.data());
    if (!o_proj.b.empty())
      for (int i = 0; i < qd; ++i)
        for (int e = 0; e < D; ++e) wt[size_t(i) * D + e] -= o_proj.b[size_t(e)];
    std::vector<float> y(static_cast<size_t>(D));
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < n; ++j) {
        const float* v = V + size_t(j) * kvd + size_t(h / group) * hd;
        std::fill(y.begin(), y.end(), 0.f);
        for (int d = 0; d < hd; ++d) {
          const float vd = v[d];
          const float* row = wt.data() + size_t(h * hd + d) * D;
          for (int e = 0; e < D; ++e) y[size_t(e)] += vd * row[e];
        }
        double s = 0;
        for (float x : y) s += std::fabs(x);
        o[size_t(h) * n + j] = float(s);
      }
  }
  return out;
}

template <class F>
double best_ms(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "models/prefixkv-llava-tiny", shape;
  int layers = 2, N = 590, reps = 10, threads = 0;
  bool scalar_loop = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--model") dir = next();
    else if (a == "--shape") shape = next();
    else if (a == "--layers") layers = std::stoi(next());
    else if (a == "--entries") N = std::stoi(next());
    else if (a == "--reps") reps = std::stoi(next());
    else if (a == "--threads") threads = std::stoi(next());
    else if (a == "--no-scalar") scalar_loop = false;
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (threads > 0) set_num_threads(threads);
  std::unique_ptr<Model> model;
  if (shape == "llava-1.5-7b") {
    ModelConfig c;
    TextConfig& t = c.text;
    t.vocab_size = 256, t.hidden = 4096, t.intermediate = 256, t.n_layers = layers, t.n_heads = 32, t.n_kv_heads = 32;
    t.head_dim = 128, t.max_positions = 4096, t.rms_eps = 1e-5f;
    c.dir = "random:llava-1.5-7b-layers";
    model = Model::random(c, DType::F16, 0);
  } else if (!shape.empty()) {
    std::fprintf(stderr, "unknown --shape %s (llava-1.5-7b)\n", shape.c_str());
    return 2;
  } else {
    model = Model::load(dir);
  }
  const TextConfig& t = model->config().text;
  KVCache cache = model->make_cache();
  const int kvd = t.n_kv_heads * t.head_dim;
  std::mt19937 rng(1);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> k(size_t(N) * kvd), v(size_t(N) * kvd);
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (int j = 0; j < N; ++j) pos[size_t(j)] = j;
  for (int l = 0; l < t.n_layers; ++l) {
    for (float& x : k) x = g(rng);
    for (float& x : v) x = g(rng);
    cache.layer(l).append(k.data(), v.data(), pos.data(), N);
  }
  std::printf("model %s: %d layers, hidden %d, %d query heads of %d (%d KV heads), %d entries, %d threads\n",
              model->config().dir.c_str(), t.n_layers, t.hidden, t.n_heads, t.head_dim, t.n_kv_heads, N,
              num_threads());
  const auto t0 = Clock::now();
  (void)model->output_gram(0);
  const double gram = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  std::printf("%-28s %10.2f ms (once per model)\n", "gram", gram);
  std::vector<std::vector<float>> sink;
  if (scalar_loop) {
    const double scalar = best_ms(std::max(1, reps / 5), [&] { sink = wov_scalar(*model, cache, N); });
    std::printf("%-28s %10.2f ms\n", "wov, scalar loop (before)", scalar);
  }
  for (ValueWeight w : {ValueWeight::ValueNorm, ValueWeight::OutputNorm, ValueWeight::OutputNorm2}) {
    const double ms = best_ms(reps, [&] { sink = value_weights(*model, cache, w, N); });
    std::printf("%-28s %10.2f ms\n", value_weight_name(w), ms);
  }
  return 0;
}
