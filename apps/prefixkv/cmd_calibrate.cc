// prefixkv calibrate: per-layer keep fractions for budgets 0.1 ... 0.9 from a few calibration samples
// (METHOD.md sections 2-3), or an import of the authors' profile files.
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>

#include "args.h"
#include "common.h"
#include "core/error.h"
#include "core/npy.h"
#include "core/threads.h"
#include "engine/make_backend.h"
#include "eval/calibrate.h"
#include "eval/dataset.h"
#include "eval/svg.h"
#include "kv/profile.h"
#include "kv_options.h"
#include "progress.h"

namespace fs = std::filesystem;

namespace pkv::cli {

namespace {

const std::vector<OptionSpec> kCalibrateOptions = with_options({
    {"model", "DIR", "checkpoint directory (default: the bundled model)"},
    no_mmap_option(),
    {"vision-tower", "DIR", "separate CLIP checkpoint (original LLaVA layout)"},
    {"mmproj", "FILE", "llama.cpp's LLaVA vision file (GGUF) beside a GGUF language model (--model FILE.gguf)"},
    {"data", "FILE", "calibration data in LLaVA conversation JSON (e.g. data/calib/calib.json)"},
    {"image-dir", "DIR", "folder the data's image names are relative to (default: the data file's folder)"},
    {"samples", "N", "use the first N usable samples (default: all)"},
    {"budgets", "LIST", "comma-separated kept fractions (default 0.1,0.2,...,0.9)"},
    {"image-mode", "MODE", "pad or crop (default: the model's)"},
    {"out", "FILE", "profile to write (JSON, docs/FORMATS.md)"},
    {"plot", "FILE", "also draw keep fraction per layer for each budget as SVG"},
    {"allocate-from", "WHAT", "whose attention sets the layer budgets: prompt (the estimator, default) or answer "
                              "(each sample's reference answer, teacher-forced over the full cache)"},
    {"allocate-by", "RULE", "how the layer budgets follow from the scores: prefix (PrefixKV's equal retention, "
                            "default) or cutoff[:OPTION]... (one threshold across layers, e.g. cutoff:wov:floor=0.5: "
                            "options as in a policy name, docs/RESULTS.md)"},
    {"heads", "", "also store a per-(layer, KV head) table (budgets[].head_keep, docs/FORMATS.md): PrefixKV's search "
                  "over the layers' KV heads on each head's own importance; prefixkv then allocates per head"},
    {"dump-importance", "DIR", "write each sample's per-layer importance [layers, tokens] as .npy"},
    {"import-official", "FILE", "build the profile from the authors' prefixkv_<model>_<r>.json files instead", true, true},
    {"threads", "N", "worker threads (default: all cores)"},
    {"device", "NAME", "cpu (default) or cuda: the vision tower, projector and decoder on the GPU"},
    {"gpu-dtype", "TYPE", "cuda: bf16 or f16 (default: the checkpoint's 16-bit type, else bf16)"},
}, kv_option_specs({"kv-importance", "kv-window", "kv-protected", "kv-dtype"}));

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
      apply_no_mmap(args);
      model = Model::load(args.str("model"));
      layers = model->config().text.n_layers;
    }
    profile = import_official(args.all("import-official"), layers);
  } else {
    const std::string data = args.str("data", "");
    if (data.empty()) fail("--data", "is required (calibration conversations), or give --import-official");
    CalibrateOptions opt;
    opt.budgets = args.has("budgets") ? parse_budgets(args.str("budgets"), "--budgets") : calibrate_budgets_default();
    const PolicyOptions popt = policy_options_from_args(args);
    opt.estimator = popt.estimator;
    opt.window = popt.window;
    opt.protected_count = popt.protected_count;
    opt.allocation = args.str("allocate-from", "prompt");
    opt.layer_rule = args.str("allocate-by", "prefix");
    opt.heads = args.has("heads");
    if (opt.allocation != "prompt" && opt.allocation != "answer")
      fail("--allocate-from", "must be prompt or answer, got '" + opt.allocation + "'");
    const int limit = args.integer("samples", 0);
    if (args.has("samples") && limit < 1) fail("--samples", "must be at least 1");
    opt.limit = size_t(std::max(0, limit));
    opt.image_mode = args.str("image-mode", "");
    opt.data = data;
    const DeviceChoice dev = parse_device(args);
    const std::string dump = args.str("dump-importance", "");
    if (!dump.empty()) fs::create_directories(dump);

    std::vector<Sample> samples = load_conversations(data, args.str("image-dir", ""));
    LoadedModel lm = load_model(args);
    const Model* model = lm.model.get();
    Engine engine(*model, *lm.tok);
    BackendOptions bo;
    bo.device = dev.device;
    bo.gpu_dtype = dev.gpu_dtype;
    bo.kv_dtype = dev.kv_dtype;
    const std::unique_ptr<Backend> backend = make_backend(*model, bo);
    if (!dump.empty())
      opt.on_scores = [&](const std::string& id, const std::vector<std::vector<float>>& scores) {
        std::vector<float> flat;
        for (auto& l : scores) flat.insert(flat.end(), l.begin(), l.end());
        write_npy((fs::path(dump) / (id + ".npy")).string(), flat.data(), {int(scores.size()), int(scores[0].size())});
      };
    const auto t0 = std::chrono::steady_clock::now();
    opt.on_progress = [&](size_t done, size_t total) {
      progress("calibrate", done, total, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    };
    opt.on_skip = [](const std::string& id, const std::string& why) {
      std::fprintf(stderr, "\nprefixkv calibrate: skipping sample '%s': %s\n", id.c_str(), why.c_str());
    };
    const CalibrateResult r = calibrate(*backend, engine, samples, opt);
    std::cout << "attention concentration (" << (opt.allocation == "answer" ? "reference-answer" : estimator_name(opt.estimator))
              << " importance): share of the mass on the top 10% of prompt tokens, and on the first token (a sink), "
              << "mean over " << r.profile.samples << " samples (" << backend->description() << ")\n";
    for (size_t l = 0; l < r.concentration.size(); ++l)
      std::printf("  layer %2zu  top 10%% %.3f  first token %.3f\n", l, r.concentration[l], r.first_token_share[l]);
    profile = r.profile;
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
