// Batched and chunked prefill on the GPU (issue 14 item 2): GpuModel::prefill_parts and
// GpuSession::begin_prefill / prefill_many (src/engine/gpu_session.h).
//   (A) three prompts of different lengths prefilled in one pass give each sequence the logits,
//       kept entries and later decode steps of its own prefill;
//   (B) a prompt prefilled in pieces (16, 37 and more than its length) gives the whole prompt's
//       logits and importance (the paper's and the window's estimator), and the same kept entries
//       for snapkv and prefixkv at 20%.
// The scheduler's use of both (chunks interleaved with decode steps) is tested in test_gpu_serve.cc.
// Runs on the GPU (pkv_cuda_tests) and over the fake device (pkv_cuda_model_emu_tests, in ctest).
// Measured numbers are printed on lines starting with "gpu_prefill:".
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "engine/backend.h"
#include "engine/cuda_backend.h"
#include "engine/engine.h"
#include "engine/gpu_session.h"
#include "engine/model_files.h"
#include "kv/policy.h"
#include "model/gpu_model.h"
#include "text/tokenizer.h"
#include "vision/image.h"

namespace pkv::cuda {
namespace {

std::string repo(const std::string& rel) { return std::string(PKV_SOURCE_DIR) + "/" + rel; }

double norm_rel(const float* got, const float* ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
int argmax(const float* x, int n) { return int(std::max_element(x, x + n) - x); }

// The bound test_gpu_model.cc's (a) holds a 16-bit prefill's logits to against the float32 CPU
// model (the bundled model: slack 1).
double logit_tol(DType t) { return t == DType::F16 ? 2e-3 : 1e-2; }
const DType kDtypes[] = {DType::BF16, DType::F16};

struct Tiny {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<Engine> engine;
  std::map<DType, std::unique_ptr<GpuModel>> gpu;
  PreparedPrompt image_prompt;  // the image and a question: 576 image rows and the text's
  int V() const { return model->config().text.vocab_size; }
  int L() const { return model->config().text.n_layers; }
  PreparedPrompt prepare(const std::string& text, bool with_image) const {
    PromptRequest req;
    req.text = text;
    Image img;
    if (with_image) {
      img = load_image(repo("data/example.png"));
      req.image = &img;
    }
    return engine->prepare(req);
  }
  GpuModel& on(DType t) {
    auto& g = gpu[t];
    if (!g) {
      GpuModelOptions o;
      o.dtype = t;
      g = std::make_unique<GpuModel>(*model, o);
    }
    return *g;
  }
};

Tiny& tiny() {
  static std::unique_ptr<Tiny> t = [] {
    auto m = std::make_unique<Tiny>();
    m->model = Model::load(repo("models/prefixkv-llava-tiny"));
    m->tok = std::make_unique<Tokenizer>(repo("models/prefixkv-llava-tiny/tokenizer.model"));
    m->engine = std::make_unique<Engine>(*m->model, *m->tok);
    m->image_prompt = m->prepare("Describe the image in detail.", true);
    return m;
  }();
  return *t;
}

GpuKVPoolOptions pool_for(const Tiny& t, int entries, int n_seqs) {
  GpuKVPoolOptions o;
  o.block_size = 16;
  o.n_blocks = n_seqs * t.L() * ((entries + 15) / 16) + 4;
  return o;
}

std::unique_ptr<KVPolicy> make(const Tiny& t, const std::string& name, double budget) {
  PolicyOptions o;
  o.budget = budget;
  return make_policy_for_model(name, o, "", *t.model);  // prefixkv: the bundled model's profile
}

bool same_entries(const GpuSession& a, const GpuSession& b, int layers, std::string* where) {
  for (int l = 0; l < layers; ++l) {
    const auto x = a.positions().positions(l), y = b.positions().positions(l);
    if (!std::equal(x.begin(), x.end(), y.begin(), y.end())) {
      *where = "layer " + std::to_string(l) + ": " + std::to_string(x.size()) + " vs " + std::to_string(y.size()) + " entries";
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// (A) Batched prefill.
//
// Not bit-identical to one prefill per prompt: the products run over the rows of all prompts at
// once (cuBLAS picks its kernels by the number of rows; the head product runs over 3 rows, not 1),
// so float32 sums run in other orders and a 16-bit rounding may come out one unit apart. The
// attention is the same kernel over the same rows per sequence. Both runs are 16-bit evaluations
// of the same float32 computation, each within (a)'s bound (logit_tol) of the CPU's, so by the
// triangle inequality they differ by at most 2 logit_tol after the prefill, and by 4 logit_tol
// over decode steps (as test (e) derives for batched decode steps). A batching fault (a wrong row,
// table or offset) moves the logits by order 1.
TEST(GpuPrefill, BatchedPrefillGivesEachSequenceItsOwnPrefill) {
  Tiny& t = tiny();
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    GpuModel& gm = t.on(dt);
    struct Seq {
      PreparedPrompt prompt;
      std::string policy;
      double budget;
    };
    const std::vector<Seq> seqs = {
        {t.image_prompt, "snapkv", 0.2},
        {t.prepare("What is a cat?", false), "full", 1.0},
        {t.prepare("Name three shapes and three colors, then count to ten slowly, and say which shape is red.", false),
         "h2o", 0.5},
    };
    const int B = int(seqs.size()), V = t.V();
    constexpr int steps = 8;
    GpuKVPool pool(gm, pool_for(t, int(t.image_prompt.ids.size()) + steps + 1, 2 * B));
    std::vector<std::unique_ptr<KVPolicy>> policies;
    std::vector<std::unique_ptr<GpuSession>> batched, single;
    std::vector<float> lb(size_t(B) * V), ls(size_t(B) * V);
    std::vector<const PreparedPrompt*> prompts;
    for (int i = 0; i < B; ++i) {
      const Seq& q = seqs[size_t(i)];
      policies.push_back(make(t, q.policy, q.budget));
      batched.push_back(std::make_unique<GpuSession>(gm, pool, *policies.back()));
      policies.push_back(make(t, q.policy, q.budget));
      single.push_back(std::make_unique<GpuSession>(gm, pool, *policies.back()));
      single.back()->prefill(q.prompt, &ls[size_t(i) * V]);
      prompts.push_back(&q.prompt);
    }
    std::vector<GpuSession*> bptr;
    for (auto& s : batched) bptr.push_back(s.get());
    GpuSession::prefill_many(bptr, prompts, lb.data());

    double worst_prefill = 0, worst_step = 0;
    for (int i = 0; i < B; ++i) {
      const double e = norm_rel(&lb[size_t(i) * V], &ls[size_t(i) * V], size_t(V));
      worst_prefill = std::max(worst_prefill, e);
      EXPECT_LE(e, 2 * logit_tol(dt)) << "sequence " << i << " prefill logits";
      std::string where;
      EXPECT_TRUE(same_entries(*batched[size_t(i)], *single[size_t(i)], t.L(), &where))
          << "sequence " << i << " (" << seqs[size_t(i)].policy << ") keeps other entries after the prefill: " << where;
      EXPECT_EQ(batched[size_t(i)]->position(), int(seqs[size_t(i)].prompt.ids.size()));
    }
    int token_diffs = 0;
    for (int step = 0; step < steps; ++step) {
      std::vector<int32_t> tokens(static_cast<size_t>(B));
      for (int i = 0; i < B; ++i) {
        tokens[size_t(i)] = argmax(&ls[size_t(i) * V], V);
        token_diffs += argmax(&lb[size_t(i) * V], V) != tokens[size_t(i)];
      }
      GpuSession::step_many(bptr, tokens.data(), lb.data());
      for (int i = 0; i < B; ++i) single[size_t(i)]->step(tokens[size_t(i)], &ls[size_t(i) * V]);
      for (int i = 0; i < B; ++i) {
        const double e = norm_rel(&lb[size_t(i) * V], &ls[size_t(i) * V], size_t(V));
        worst_step = std::max(worst_step, e);
        EXPECT_LE(e, 4 * logit_tol(dt)) << "sequence " << i << " step " << step;
      }
    }
    for (int i = 0; i < B; ++i) {
      std::string where;
      EXPECT_TRUE(same_entries(*batched[size_t(i)], *single[size_t(i)], t.L(), &where))
          << "sequence " << i << " after " << steps << " steps: " << where;
    }
    EXPECT_EQ(token_diffs, 0) << "greedy tokens of the batched prefill's sequences";
    std::printf("gpu_prefill: (A) %-4s 3 prompts (T = %zu, %zu, %zu) in one pass vs one at a time: prefill logits "
                "norm-rel %.3g (bound %.0e), %d steps %.3g (bound %.0e), %d greedy-token differences\n",
                dtype_name(dt), seqs[0].prompt.ids.size(), seqs[1].prompt.ids.size(), seqs[2].prompt.ids.size(),
                worst_prefill, 2 * logit_tol(dt), steps, worst_step, 4 * logit_tol(dt), token_diffs);
    pool.blocks().check_invariants();
  }
}

// ---------------------------------------------------------------------------------------------
// (B) Chunked prefill.

// The prompt through GpuModel::prefill_parts in pieces of `chunk` rows (0: whole) into a new
// sequence of `pool`: the last row's logits and the importance over the queries from `from` on.
void prefill_in_pieces(GpuModel& gm, GpuKVPool& pool, const PreparedPrompt& p, int chunk, int from,
                       std::vector<float>& logits, std::vector<std::vector<float>>& imp) {
  const int T = int(p.ids.size()), D = gm.config().text.hidden;
  const BlockPool::SeqId seq = pool.blocks().add_sequence();
  imp.assign(size_t(gm.config().text.n_layers), std::vector<float>(size_t(T), 0.f));
  std::vector<int32_t> pos(static_cast<size_t>(T));
  std::iota(pos.begin(), pos.end(), 0);
  const int step = chunk > 0 ? chunk : T;
  for (int s = 0; s < T; s += step) {
    GpuPrefillPart part;
    part.seq = seq, part.past = s, part.n = std::min(step, T - s), part.pos = pos.data() + s;
    part.x = p.embeddings.data() + size_t(s) * D;
    if (s + part.n == T) part.logits = logits.data();
    if (from < s + part.n) part.importance = &imp, part.importance_from = std::max(0, from - s);
    gm.prefill_parts(pool, {part});
  }
  pool.blocks().remove_sequence(seq);
}

// The arithmetic. Both runs compute the same float32 computation with 16-bit roundings at the same
// places; the pieces change only float32 summation orders: the products run over fewer rows (other
// cuBLAS kernels, other orders), and each piece's importance is summed apart and then added. So:
//   logits: each run within (a)'s logit_tol of the float32 CPU's, hence within 2 logit_tol of
//     each other (triangle inequality);
//   importance: per layer, the sum over keys of |difference| against the sum of the importance
//     (the counted queries: each query's head-mean probabilities sum to 1). Given the same
//     probabilities, summing m = queries x heads non-negative terms in two orders differs by at most
//     2 gamma_m (gamma_m = m u / (1 - m u), u = 2^-24) plus a rounding per piece (the divisions by
//     the heads, the additions): CudaAttention/CudaEmu.PrefillInChunks hold the kernels to exactly
//     that with identical inputs. Here the probabilities come from 16-bit q and k that may differ
//     by a rounding where a product's order changed, like the logits: each run's probabilities
//     within logit_tol of the float32 ones, in the mean over queries and heads of their L1 distance
//     (what this norm measures), so 2 logit_tol between the runs, plus the summation term.
//   kept entries: the policies rank by these sums; a difference can only reorder entries whose
//     scores lie within it: none did for snapkv and prefixkv at 20% here (checked exactly; a
//     near-tie would show as a failure naming the layer).
// The prompt: text of about 110 tokens (a later piece reads its earlier entries back from the pool;
// over the fake device that read runs the real kernel body emulated, which a 590-token image prompt
// in pieces of 16 would make minutes long). Image rows in pieces: the scheduler's test.
TEST(GpuPrefill, ChunkedPrefillEqualsTheWholePrompt) {
  Tiny& t = tiny();
  std::string words = "Look at the picture and tell me about the shapes.";
  for (int i = 0; i < 6; ++i) words += " A red circle sits beside a blue square and a green triangle.";
  const PreparedPrompt p = t.prepare(words, false);
  const int T = int(p.ids.size()), V = t.V(), H = t.model->config().text.n_heads;
  ASSERT_GT(T, 80);
  ASSERT_LT(T, 200);
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    GpuModel& gm = t.on(dt);
    GpuKVPool pool(gm, pool_for(t, T + 8, 3));
    for (const int from : {0, T - 32}) {  // the paper's estimator (all queries) and the window's
      std::vector<float> lw(static_cast<size_t>(V)), lc(lw.size());
      std::vector<std::vector<float>> iw, ic;
      prefill_in_pieces(gm, pool, p, 0, from, lw, iw);
      for (const int chunk : {16, 37, T + 5}) {
        SCOPED_TRACE("chunk " + std::to_string(chunk) + " from " + std::to_string(from));
        prefill_in_pieces(gm, pool, p, chunk, from, lc, ic);
        const double el = norm_rel(lc.data(), lw.data(), size_t(V));
        EXPECT_LE(el, 2 * logit_tol(dt)) << "logits";
        const int pieces = (T + chunk - 1) / chunk;
        const double m = double(T - from) * H + pieces, u = std::ldexp(1.0, -24);
        const double bound = 2 * logit_tol(dt) + 2 * m * u / (1 - m * u) + (pieces + 1) * u;
        double worst = 0;
        for (int l = 0; l < t.L(); ++l) {
          double diff = 0, sum = 0;
          for (int j = 0; j < T; ++j) {
            diff += std::fabs(double(ic[size_t(l)][size_t(j)]) - iw[size_t(l)][size_t(j)]);
            sum += iw[size_t(l)][size_t(j)];
          }
          EXPECT_NEAR(sum, double(T - from), 1e-3 * T) << "layer " << l << ": each counted query adds 1";
          worst = std::max(worst, diff / sum);
          EXPECT_LE(diff / sum, bound) << "layer " << l << " importance";
        }
        std::printf("gpu_prefill: (B) %-4s T=%d pieces of %3d, importance from %3d: logits norm-rel %.3g (bound %.0e), "
                    "importance L1-rel worst layer %.3g (bound %.3g)\n",
                    dtype_name(dt), T, chunk, from, el, 2 * logit_tol(dt), worst, bound);
      }
    }
    pool.blocks().check_invariants();
    EXPECT_EQ(pool.blocks().used_blocks(), 0);

    // Sessions: the same entries kept after the last piece, and the same logits (pieces of 37: the
    // window's 32 queries span two of them).
    // adakv: per-KV-head importance over the pieces; the cutoffs: value weights over the pieces'
    // keys and the window's queries reduced by their sum, mean and maximum across two pieces.
    for (const char* name : {"snapkv", "prefixkv", "adakv", "cutoff:wov2:floor=0.5:cap=1.5", "cutoff:vnorm:reduce=max",
                             "cutoff:wov2:floor=0.5:reduce=mean"}) {
      auto pw = make(t, name, 0.2);
      GpuSession whole(gm, pool, *pw);
      std::vector<float> lw(static_cast<size_t>(V));
      whole.prefill(p, lw.data());
      for (const int chunk : {37}) {
        SCOPED_TRACE(std::string(name) + " chunk " + std::to_string(chunk));
        auto pc = make(t, name, 0.2);
        GpuSession s(gm, pool, *pc);
        std::vector<float> lc(static_cast<size_t>(V), 0.f);
        s.begin_prefill(p);
        int calls = 0;
        while (s.prefilling()) {
          EXPECT_EQ(s.position(), std::min(T, calls * chunk));
          const std::vector<bool> done = GpuSession::prefill_pieces({&s}, {chunk}, lc.data());
          ++calls;
          EXPECT_EQ(done[0], !s.prefilling());
        }
        EXPECT_EQ(calls, (T + chunk - 1) / chunk);
        EXPECT_LE(norm_rel(lc.data(), lw.data(), size_t(V)), 2 * logit_tol(dt));
        // The entries kept: the same, up to what (d) of test_gpu_model.cc allows the GPU against the
        // CPU (1% of the entries): the ranking may part where two entries' sums lie within the
        // importance difference above of each other (a near-tie).
        int mismatch = 0, kept = 0, entries = 0;
        const int KH = t.model->config().text.n_kv_heads;
        for (int l = 0; l < t.L(); ++l) {
          ASSERT_EQ(s.positions().per_head(l), whole.positions().per_head(l)) << "layer " << l;
          const int heads = whole.positions().per_head(l) ? KH : 1;  // per-head layers: each head's own list
          for (int h = 0; h < heads; ++h) {
            const auto a = s.positions().head_positions(l, h), b = whole.positions().head_positions(l, h);
            const std::set<int32_t> sa(a.begin(), a.end()), sb(b.begin(), b.end());
            int only_a = 0, only_b = 0;
            for (int32_t x : sa) only_a += sb.count(x) ? 0 : 1;
            for (int32_t x : sb) only_b += sa.count(x) ? 0 : 1;
            mismatch += std::max(only_a, only_b);
            kept += int(sb.size());
            entries += T;
          }
        }
        std::printf("gpu_prefill: (B) %-4s %-8s at 20%%, pieces of %d: kept %d of %d entries, %d differ from the whole "
                    "prompt's\n",
                    dtype_name(dt), name, chunk, kept, entries, mismatch);
        EXPECT_LE(mismatch, std::max(1, entries / 100)) << "kept entries";
        EXPECT_LT(s.entries_per_layer()[0], T) << "compressed after the last piece";
      }
    }
  }
}

// A session mid-prompt takes no decode step, and pieces of several sessions share one call.
TEST(GpuPrefill, PiecesOfSeveralPromptsInOneCall) {
  Tiny& t = tiny();
  GpuModel& gm = t.on(DType::F16);
  const PreparedPrompt& img = t.image_prompt;
  const PreparedPrompt text = t.prepare("What is a cat?", false);
  GpuKVPool pool(gm, pool_for(t, int(img.ids.size()) + 4, 4));
  FullPolicy f1, f2, f3;
  GpuSession a(gm, pool, f1), b(gm, pool, f2), ref(gm, pool, f3);
  const int V = t.V();
  std::vector<float> logits(size_t(2) * V, 0.f), lr(static_cast<size_t>(V));
  ref.prefill(img, lr.data());
  a.begin_prefill(img);
  b.begin_prefill(text);
  EXPECT_THROW(a.begin_prefill(img), pkv::Error);
  int32_t tok = 5;
  EXPECT_THROW(GpuSession::step_many({&a}, &tok, logits.data()), pkv::Error) << "a prefilling session";
  // 100 rows of the image prompt and all of the text in one call; then the rest of the image's.
  std::vector<bool> done = GpuSession::prefill_pieces({&a, &b}, {100, 0}, logits.data());
  EXPECT_FALSE(done[0]);
  EXPECT_TRUE(done[1]);
  EXPECT_EQ(a.position(), 100);
  EXPECT_EQ(a.prefill_left(), int(img.ids.size()) - 100);
  EXPECT_EQ(b.position(), int(text.ids.size()));
  done = GpuSession::prefill_pieces({&a}, {0}, logits.data());
  EXPECT_TRUE(done[0]);
  EXPECT_LE(norm_rel(logits.data(), lr.data(), size_t(V)), 2 * logit_tol(DType::F16));
  GpuSession::step_many({&a, &b}, std::vector<int32_t>{5, 6}.data(), logits.data());
  EXPECT_EQ(a.position(), int(img.ids.size()) + 1);
  pool.blocks().check_invariants();
}

// The backend seam: Backend::prefill_many on the cuda back end (one pass) gives each prompt the
// sequence Backend::prefill gives it (logits within (A)'s bound, the same entries); the CPU back
// end's default prefills each in turn (bit for bit its own prefill).
TEST(GpuPrefill, BackendPrefillManyEqualsPrefillEach) {
  Tiny& t = tiny();
  CudaBackendOptions bo;
  bo.dtype = DType::F16;
  bo.kv_pool_bytes = size_t(32) << 20;
  const std::unique_ptr<Backend> cuda = make_cuda_backend(*t.model, bo);
  const std::unique_ptr<Backend> cpu = make_cpu_backend(*t.model);
  const PreparedPrompt a = t.prepare("What is a cat?", false), b = t.prepare("Name three shapes and three colors.", false);
  const int V = t.V();
  for (Backend* be : {cuda.get(), cpu.get()}) {
    SCOPED_TRACE(be->name());
    auto p1 = make(t, "snapkv", 0.5), p2 = make(t, "h2o", 0.5), q1 = make(t, "snapkv", 0.5), q2 = make(t, "h2o", 0.5);
    std::vector<float> many(size_t(2) * V), each(size_t(2) * V);
    auto seqs = be->prefill_many({&a, &b}, {p1.get(), p2.get()}, many.data());
    ASSERT_EQ(seqs.size(), 2u);
    auto s1 = be->prefill(a, *q1, each.data());
    auto s2 = be->prefill(b, *q2, each.data() + V);
    const double tol = be == cpu.get() ? 0.0 : 2 * logit_tol(DType::F16);
    EXPECT_LE(norm_rel(many.data(), each.data(), size_t(2) * V), tol);
    EXPECT_EQ(seqs[0]->entries_per_layer(), s1->entries_per_layer());
    EXPECT_EQ(seqs[1]->entries_per_layer(), s2->entries_per_layer());
    for (int l = 0; l < t.L(); ++l) {
      const auto x = seqs[1]->entries().positions(l), y = s2->entries().positions(l);
      EXPECT_TRUE(std::equal(x.begin(), x.end(), y.begin(), y.end())) << "layer " << l;
    }
  }
  EXPECT_TRUE(cuda->chunked_prefill());
  EXPECT_FALSE(cpu->chunked_prefill());
  auto f = make(t, "full", 1.0);
  EXPECT_THROW(cpu->begin_prefill(a, *f), pkv::Error);
}

}  // namespace
}  // namespace pkv::cuda
