// prefixkv calibrate: per-layer keep fractions for budgets 0.1 ... 0.9 from a few calibration samples
// (METHOD.md sections 2-3), or an import of the authors' profile files.
#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <iostream>

#include "args.h"
#include "common.h"
#include "core/error.h"
#include "core/npy.h"
#include "core/threads.h"
#include "eval/dataset.h"
#include "eval/svg.h"
#include "kv/budgeted.h"
#include "kv/prefix_search.h"
#include "kv/profile.h"
#include "kv_options.h"
#include "sample_prompt.h"

namespace fs = std::filesystem;

namespace pkv::cli {

namespace {

const std::vector<OptionSpec> kCalibrateOptions = with_options({
    {"model", "DIR", "checkpoint directory (default: the bundled model)"},
    {"vision-tower", "DIR", "separate CLIP checkpoint (original LLaVA layout)"},
    {"data", "FILE", "calibration data in LLaVA conversation JSON (e.g. data/calib/calib.json)"},
    {"image-dir", "DIR", "folder the data's image names are relative to (default: the data file's folder)"},
    {"samples", "N", "use the first N usable samples (default: all)"},
    {"budgets", "LIST", "comma-separated kept fractions (default 0.1,0.2,...,0.9)"},
    {"image-mode", "MODE", "pad or crop (default: the model's)"},
    {"out", "FILE", "profile to write (JSON, docs/FORMATS.md)"},
    {"plot", "FILE", "also draw keep fraction per layer for each budget as SVG"},
    {"allocate-from", "WHAT", "whose attention sets the layer budgets: prompt (the estimator, default) or answer "
                              "(each sample's reference answer, teacher-forced over the full cache)"},
    {"dump-importance", "DIR", "write each sample's per-layer importance [layers, tokens] as .npy"},
    {"import-official", "FILE", "build the profile from the authors' prefixkv_<model>_<r>.json files instead", true, true},
    {"threads", "N", "worker threads (default: all cores)"},
}, kv_option_specs({"kv-importance", "kv-window", "kv-protected"}));

// Records the prefill importance (and compresses nothing).
class ImportanceProbe : public KVPolicy {
 public:
  ImportanceProbe(Estimator e, int window) : est_(e), window_(window) {}
  std::string name() const override { return "probe"; }
  ImportanceRequest prefill_importance(int N) const override { return estimator_request(est_, window_, N); }
  KeepPlan after_prefill(const CacheView&, const std::vector<std::vector<float>>& imp, int N) override {
    scores.clear();
    for (auto& l : imp) scores.push_back(estimator_scores(est_, l, N));
    return {};
  }
  std::vector<std::vector<float>> scores;

 private:
  Estimator est_;
  int window_;
};

// Per layer, for each prompt token: the attention the reference answer pays it, summed over the
// answer's tokens (teacher-forced, full cache) of the head mean: what the generation will read.
std::vector<std::vector<float>> answer_attention(const Model& model, const Engine& engine, const PreparedPrompt& p,
                                                 const std::string& answer) {
  const int N = int(p.ids.size()), H = model.config().text.hidden;
  std::vector<int32_t> a = engine.answer_ids(answer);
  const int T = N + int(a.size());
  std::vector<float> x(size_t(T) * size_t(H));
  std::copy(p.embeddings.begin(), p.embeddings.end(), x.begin());
  model.embed(a.data(), int(a.size()), x.data() + size_t(N) * size_t(H));
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (int i = 0; i < T; ++i) pos[size_t(i)] = i;
  KVCache cache = model.make_cache();
  std::vector<std::vector<float>> imp;
  DecoderCall call;
  call.importance = &imp;
  call.importance_from = N;
  model.decode(x.data(), T, pos.data(), cache, call);
  for (auto& l : imp) l.resize(size_t(N));
  return imp;
}

void write_plot(const Profile& p, const std::string& path) {
  PlotSpec spec;
  spec.title = "PrefixKV keep fraction per layer (" + p.model.name + ")";
  spec.x_label = "layer";
  spec.y_label = "keep fraction";
  spec.sequential_colors = true;
  for (auto& b : p.budgets) {
    Series s;
    char label[32];
    std::snprintf(label, sizeof label, "b = %.2g", b.budget);
    s.label = label;
    for (size_t l = 0; l < b.keep.size(); ++l) s.x.push_back(double(l)), s.y.push_back(b.keep[l]);
    spec.series.push_back(std::move(s));
  }
  write_svg(path, {spec}, 640, 400);
}

std::string today() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

}  // namespace

std::vector<double> calibrate_budgets_default() { return {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}; }

int cmd_calibrate(int argc, char** argv) {
  Args args("calibrate", kCalibrateOptions, argc, argv, 2);
  if (args.help()) {
    std::cout << Args::usage("calibrate",
                             "Estimates PrefixKV's per-layer keep fractions from calibration samples (or imports the "
                             "authors' files) and writes one profile for all budgets.",
                             kCalibrateOptions);
    return 0;
  }
  if (args.has("threads")) set_num_threads(args.integer("threads", 1));
  const std::string out = args.str("out", "");
  if (out.empty()) fail("--out", "is required (the profile file to write)");
  Profile profile;
  if (args.has("import-official")) {
    int layers = 0;
    std::unique_ptr<Model> model;
    if (args.has("model")) {
      model = Model::load(args.str("model"));
      layers = model->config().text.n_layers;
    }
    profile = import_official(args.all("import-official"), layers);
  } else {
    const std::string data = args.str("data", "");
    if (data.empty()) fail("--data", "is required (calibration conversations), or give --import-official");
    const std::vector<double> budgets =
        args.has("budgets") ? parse_budgets(args.str("budgets"), "--budgets") : calibrate_budgets_default();
    const PolicyOptions popt = policy_options_from_args(args);
    const Estimator est = popt.estimator;
    const int window = popt.window, protect = popt.protected_count;
    const std::string allocation = args.str("allocate-from", "prompt");
    if (allocation != "prompt" && allocation != "answer")
      fail("--allocate-from", "must be prompt or answer, got '" + allocation + "'");
    const int limit = args.integer("samples", 0);
    if (args.has("samples") && limit < 1) fail("--samples", "must be at least 1");
    const std::string dump = args.str("dump-importance", "");
    if (!dump.empty()) fs::create_directories(dump);

    std::vector<Sample> samples = load_conversations(data, args.str("image-dir", ""));
    LoadedModel lm = load_model(args);
    const Model* model = lm.model.get();
    Engine engine(*model, *lm.tok);
    const int L = model->config().text.n_layers;

    // Per budget, per layer: sum, sum of squares, min and max of the per-sample k_l.
    struct Acc {
      std::vector<double> sum, sq, mn, mx;
    };
    std::vector<Acc> acc(budgets.size(), Acc{std::vector<double>(size_t(L), 0.0), std::vector<double>(size_t(L), 0.0),
                                             std::vector<double>(size_t(L), 1e9), std::vector<double>(size_t(L), -1e9)});
    int used = 0;
    std::vector<std::string> ids;
    // Attention concentration per layer: the share of the importance mass held by the top 10% of
    // the prompt's tokens, averaged over the samples (PrefixKV's premise: it differs by layer).
    std::vector<double> top10(size_t(L), 0.0);
    const size_t target = limit > 0 ? std::min(samples.size(), size_t(limit)) : samples.size();
    auto t0 = std::chrono::steady_clock::now();
    for (const Sample& s : samples) {
      if (used >= int(target)) break;
      std::string why;
      auto p = prepare_sample(engine, s, args.str("image-mode", ""), &why);
      if (!p) {
        std::fprintf(stderr, "\nprefixkv calibrate: skipping sample '%s': %s\n", s.id.c_str(), why.c_str());
        continue;
      }
      const int N = int(p->ids.size());
      ImportanceProbe probe(est, window);
      if (allocation == "answer") {
        if (s.answer.empty()) {
          std::fprintf(stderr, "\nprefixkv calibrate: skipping sample '%s': no reference answer\n", s.id.c_str());
          continue;
        }
        probe.scores = answer_attention(*model, engine, *p, s.answer);
      } else {
        Session sess(*model, probe);
        std::vector<float> logits(size_t(model->config().text.vocab_size));
        sess.prefill(*p, logits.data());
      }
      if (!dump.empty()) {
        std::vector<float> flat;
        for (auto& l : probe.scores) flat.insert(flat.end(), l.begin(), l.end());
        write_npy((fs::path(dump) / (s.id + ".npy")).string(), flat.data(), {L, N});
      }
      for (int l = 0; l < L; ++l) {
        std::vector<float> sc = probe.scores[size_t(l)];
        std::sort(sc.begin(), sc.end(), std::greater<float>());
        double tot = 0, top = 0;
        const size_t k = size_t(std::ceil(0.1 * N));
        for (size_t i = 0; i < sc.size(); ++i) tot += sc[i], top += i < k ? sc[i] : 0.0;
        top10[size_t(l)] += tot > 0 ? top / tot : 0.0;
      }
      for (size_t bi = 0; bi < budgets.size(); ++bi) {
        std::vector<int> n = prefix_budgets(probe.scores, std::llround(budgets[bi] * N * L), std::min(N, protect));
        for (int l = 0; l < L; ++l) {
          const double k = double(n[size_t(l)]) / N;
          acc[bi].sum[size_t(l)] += k;
          acc[bi].sq[size_t(l)] += k * k;
          acc[bi].mn[size_t(l)] = std::min(acc[bi].mn[size_t(l)], k);
          acc[bi].mx[size_t(l)] = std::max(acc[bi].mx[size_t(l)], k);
        }
      }
      ids.push_back(s.id);
      ++used;
      progress("calibrate", size_t(used), target,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    if (used == 0) fail(data, "no usable calibration sample (every image was missing or broken)");
    std::cout << "attention concentration (" << (allocation == "answer" ? "reference-answer" : estimator_name(est))
              << " importance): share of the mass on the top 10% of prompt tokens, mean over " << used << " samples\n";
    for (int l = 0; l < L; ++l) std::printf("  layer %2d  %.3f\n", l, top10[size_t(l)] / used);
    profile.model = model_identity(*model);
    profile.estimator = estimator_name(est);
    profile.window = est == Estimator::Window ? window : 0;
    profile.protected_tokens = protect;
    profile.allocation = allocation;
    profile.source = "calibrated";
    profile.samples = used;
    profile.data = data;
    profile.date = today();
    profile.sample_ids = ids;
    for (size_t bi = 0; bi < budgets.size(); ++bi) {
      ProfileBudget pb;
      pb.budget = budgets[bi];
      for (int l = 0; l < L; ++l) {
        const double m = acc[bi].sum[size_t(l)] / used;
        pb.keep.push_back(m);
        pb.keep_std.push_back(std::sqrt(std::max(0.0, acc[bi].sq[size_t(l)] / used - m * m)));
        pb.keep_min.push_back(acc[bi].mn[size_t(l)]);
        pb.keep_max.push_back(acc[bi].mx[size_t(l)]);
      }
      // The mean over samples of exact per-sample totals is already b up to rounding of b N L;
      // make it exact (METHOD.md section 3).
      rescale_to_mean(pb.keep, budgets[bi], 0.0, 1.0);
      profile.set_budget(std::move(pb));
    }
  }
  profile.save(out);
  std::cout << profile.table();
  std::cout << "wrote " << out << " (" << profile.budgets.size() << " budgets, " << profile.n_layers() << " layers";
  if (profile.source == "calibrated") std::cout << ", " << profile.samples << " samples, estimator " << profile.estimator;
  std::cout << ")\n";
  if (args.has("plot")) {
    write_plot(profile, args.str("plot"));
    std::cout << "wrote " << args.str("plot") << "\n";
  }
  return 0;
}

}  // namespace pkv::cli
