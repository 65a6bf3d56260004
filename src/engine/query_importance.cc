#include "engine/query_importance.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "model/observer.h"
#include "ops/ops.h"

namespace pkv {

namespace {

// Keeps the decoder's per-layer queries of one call ("attn_q": [T, n_heads * head_dim], after RoPE).
class QueryCapture : public Observer {
 public:
  explicit QueryCapture(int layers) : q(size_t(layers)) {}
  bool wants(const std::string& name) const override { return name == "attn_q"; }
  void on_tensor(const std::string&, int layer, const float* data, const std::vector<int64_t>& shape) override {
    q[size_t(layer)].assign(data, data + shape[0] * shape[1]);
  }
  std::vector<std::vector<float>> q;  // [layers][T * n_heads * head_dim]
};

}  // namespace

std::vector<std::vector<float>> value_weights(const Model& model, const KVCache& cache, ValueWeight w, int n) {
  const TextConfig& t = model.config().text;
  const int H = t.n_heads, Hkv = t.n_kv_heads, hd = t.head_dim, group = H / Hkv, D = t.hidden, qd = H * hd;
  const int kvd = Hkv * hd;
  std::vector<std::vector<float>> out(size_t(t.n_layers));
  std::vector<float> vg, y, row, wh;
  for (int l = 0; l < t.n_layers; ++l) {
    const KVLayer& kv = cache.layer(l);
    PKV_ASSERT_MSG(!kv.per_head() && kv.size() >= n, "value weights need a layer whose heads share at least n entries");
    std::vector<float>& o = out[size_t(l)];
    o.assign(size_t(H) * n, 1.f);
    if (w == ValueWeight::None || n == 0) continue;
    std::vector<float> vbuf;
    const float* V = kv.values_f32(vbuf);  // [size, kvd], whatever the cache's storage type
    if (w != ValueWeight::OutputNorm) {  // vnorm, wov2: the one definition, which the GPU's kernel is tested against
      ops::value_weights(V, n, kvd, H, Hkv, hd, w == ValueWeight::OutputNorm2 ? model.output_gram(l).data() : nullptr,
                         o.data());
      continue;
    }
    // L1: W_o^h [D, hd] (W_o's columns h hd ... (h+1) hd - 1) times each value, through BLAS.
    const TensorView& W = *model.weights().lm.layers[size_t(l)].o.w;  // [D, qd]
    row.resize(size_t(qd));
    wh.resize(size_t(H) * D * hd);  // [H][D][hd]
    for (int e = 0; e < D; ++e) {
      ops::weight_row(W, e, qd, row.data());
      for (int h = 0; h < H; ++h)
        std::copy_n(row.data() + size_t(h) * hd, hd, wh.data() + (size_t(h) * D + size_t(e)) * hd);
    }
    TensorView view;  // W_o^h as float32 weights [D, hd], for ops::linear (BLAS)
    view.name = "value weights";
    view.dtype_str = "F32";
    view.supported = true;
    view.dtype = DType::F32;
    view.shape = {D, hd};
    Linear lin;
    lin.w = &view;
    lin.in = hd;
    lin.out = D;
    y.resize(size_t(n) * D);
    vg.resize(size_t(n) * hd);
    for (int g = 0; g < Hkv; ++g) {
      for (int j = 0; j < n; ++j) std::copy_n(V + size_t(j) * kvd + size_t(g) * hd, hd, vg.data() + size_t(j) * hd);
      for (int h = g * group; h < (g + 1) * group; ++h) {
        view.data = wh.data() + size_t(h) * D * hd;
        ops::linear(vg.data(), n, lin, y.data());  // y [n, D] = vg [n, hd] (W_o^h)^T
        for (int j = 0; j < n; ++j) {
          const float* yj = y.data() + size_t(j) * D;
          double s = 0;
          for (int e = 0; e < D; ++e) s += std::fabs(yj[e]);
          o[size_t(h) * n + j] = float(s);
        }
      }
    }
  }
  return out;
}

void query_scores(const Model& model, const KVCache& cache, const std::vector<std::vector<float>>& q,
                  const int32_t* pos, int T, const std::vector<std::vector<float>>& weight, int n,
                  std::vector<std::vector<float>>& out) {
  const TextConfig& t = model.config().text;
  const int H = t.n_heads, hd = t.head_dim;
  out.assign(size_t(t.n_layers), {});
  for (int l = 0; l < t.n_layers; ++l) {
    const KVLayer& kv = cache.layer(l);
    PKV_ASSERT(!kv.per_head() && kv.size() >= n && int(q[size_t(l)].size()) == T * H * hd);
    std::vector<float> kbuf;
    ops::AttentionArgs a;  // the rows of ops::attention's extended importance, the GPU's twin
    a.q = q[size_t(l)].data(), a.n_q = T, a.q_pos = pos;
    a.k = kv.keys_f32(kbuf), a.n_kv = kv.size(), a.kv_pos = kv.positions();
    a.n_heads = H, a.n_kv_heads = t.n_kv_heads, a.head_dim = hd, a.scale = 1.f / std::sqrt(float(hd));
    out[size_t(l)].resize(size_t(T) * n);
    ops::attention_rows(a, weight.empty() ? nullptr : weight[size_t(l)].data(), n, 0, out[size_t(l)].data());
  }
}

std::vector<std::vector<float>> extended_importance(const Model& model, const KVCache& full, const PreparedPrompt& p,
                                                    const float* last_logits, const ImportanceRequest& req,
                                                    QueryImportanceStats* stats) {
  const auto t0 = std::chrono::steady_clock::now();
  const TextConfig& t = model.config().text;
  const int N = int(p.ids.size()), L = t.n_layers, D = t.hidden, V = t.vocab_size;
  if (req.lookahead < 0) fail("--kv-lookahead", "must not be negative");
  if (req.lookahead == 0 && req.from >= N)
    fail("--kv-importance answer", "value weights and query reduces are measured on the prompt's or the lookahead's "
                                   "queries, not on the reference answer's");
  for (int l = 0; l < L; ++l) PKV_ASSERT_MSG(full.size(l) == N, "extended importance needs the prompt's uncompressed cache");
  const std::vector<std::vector<float>> weight =
      req.weight == ValueWeight::None ? std::vector<std::vector<float>>{} : value_weights(model, full, req.weight, N);
  std::vector<std::vector<float>> imp(size_t(L), std::vector<float>(size_t(N), 0.f));
  int queries = 0;
  auto add_rows = [&](const std::vector<std::vector<float>>& rows, int T) {
    for (int l = 0; l < L; ++l)
      for (int i = 0; i < T; ++i)
        for (int j = 0; j < N; ++j) {
          const float x = rows[size_t(l)][size_t(i) * N + j];
          float& acc = imp[size_t(l)][size_t(j)];
          acc = req.reduce == QueryReduce::Max ? std::max(acc, x) : acc + x;
        }
    queries += T;
  };
  QueryCapture cap(L);
  std::vector<std::vector<float>> rows;
  int steps = 0;
  std::vector<int32_t> looked;
  if (req.lookahead > 0) {
    PKV_ASSERT(last_logits);
    KVCache c = full.clone();
    std::vector<float> x(static_cast<size_t>(D)), logits(last_logits, last_logits + V);
    for (int s = 0; s < req.lookahead; ++s) {
      const int32_t tok = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
      if (std::find(t.eos_ids.begin(), t.eos_ids.end(), tok) != t.eos_ids.end()) break;
      looked.push_back(tok);
      model.embed(&tok, 1, x.data());
      const int32_t pos = N + s;
      DecoderCall call;
      call.observer = &cap;
      call.show_queries = true;
      call.logits_rows = {0};
      call.logits_out = logits.data();
      model.decode(x.data(), 1, &pos, c, call);
      ++steps;
      query_scores(model, c, cap.q, &pos, 1, weight, N, rows);
      add_rows(rows, 1);
    }
  } else {
    // The prompt's rows from `from` on, again, over the cache of the rows before them.
    const int from = std::max(0, req.from), T = N - from;
    PKV_ASSERT(p.embeddings.size() == size_t(N) * size_t(D));
    KVCache c = model.make_cache(full.dtype());
    if (from > 0) {
      c = full.clone();
      KeepPlan cut;
      std::vector<int32_t> keep(static_cast<size_t>(from));
      std::iota(keep.begin(), keep.end(), 0);
      for (int l = 0; l < L; ++l) cut.layers.push_back(LayerKeep{l, N, keep});
      c.apply(cut, "query importance");
    }
    std::vector<int32_t> pos(static_cast<size_t>(T));
    std::iota(pos.begin(), pos.end(), from);
    DecoderCall call;
    call.observer = &cap;
    call.show_queries = true;
    model.decode(p.embeddings.data() + size_t(from) * D, T, pos.data(), c, call);
    ++steps;
    query_scores(model, c, cap.q, pos.data(), T, weight, N, rows);
    add_rows(rows, T);
  }
  if (req.reduce == QueryReduce::Mean && queries > 0)
    for (auto& l : imp)
      for (float& x : l) x /= float(queries);
  if (stats) {
    stats->steps += steps;
    stats->ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    stats->lookahead_tokens = looked;
  }
  return imp;
}

}  // namespace pkv
