// prefixkv eval: METHOD.md section 7 on the CPU or the GPU (the measurements: src/eval/evaluate.h).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <thread>

#include <nlohmann/json.hpp>

#include "args.h"
#include "common.h"
#include "core/error.h"
#include "core/threads.h"
#include "engine/make_backend.h"
#include "eval/checker.h"
#include "eval/dataset.h"
#include "eval/evaluate.h"
#include "eval/svg.h"
#include "kv/profile.h"
#include "kv_options.h"
#include "progress.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace pkv::cli {

namespace {

const std::vector<OptionSpec> kEvalOptions = with_options({
    {"model", "DIR", "checkpoint directory (default: the bundled model)"},
    no_mmap_option(),
    {"vision-tower", "DIR", "separate CLIP checkpoint (original LLaVA layout)"},
    {"mmproj", "FILE", "llama.cpp's LLaVA vision file (GGUF) beside a GGUF language model (--model FILE.gguf)"},
    {"data", "FILE", "evaluation data: LLaVA conversation JSON (data/eval/eval.json: descriptions, "
                     "data/eval/questions.json: short questions, detail_1k) or a text testbed (data/text/heldout.json)"},
    {"image-dir", "DIR", "folder the data's image names are relative to (default: the data file's folder)"},
    {"truth", "FILE", "ground truth for the task checker (default: truth.json next to the data, if present)"},
    {"policies", "LIST", "comma-separated policies (default: all but full); a name may carry options, "
                         "NAME:KEY[=VALUE]... (run --help, --kv-policy), e.g. cutoff:wov2:floor=0.5 or "
                         "prefixkv-online:heads (budgets per layer and KV head)"},
    {"budgets", "LIST", "comma-separated kept fractions (default 0.1,...,0.9)"},
    {"estimators", "LIST", "importance estimators for the prefix policies: window (default), paper, normalized, "
                           "answer (an oracle: the reference answer's own teacher-forced attention)"},
    {"no-image-control", "", "also measure the no-image control: every image entry evicted, the text kept"},
    {"text-context", "N", "text testbed: context tokens (default: the data file's)"},
    {"text-continuation", "N", "text testbed: continuation tokens teacher-forced after it (default: the data file's)"},
    {"limit", "N", "evaluate the first N usable samples"},
    {"bootstrap", "B", "95% percentile intervals from B resamples of the samples (fixed seed; default 1000, 0 off): "
                       "each metric's, and paired ones of each config's difference from the full cache and from "
                       "the best uniform-budget baseline at its budget, with a verdict better / worse / tied"},
    {"max-tokens", "N", "greedy answer length limit (default 1024)"},
    {"image-mode", "MODE", "pad or crop (default: the model's)"},
    {"jobs", "N", "samples evaluated in parallel on the CPU, one thread each (default: all cores; the GPU: 1)"},
    {"batch", "N", "policies of a sample decoded together in batched steps (default 32)"},
    {"device", "NAME", "cpu (default) or cuda: the vision tower, projector and decoder on the GPU"},
    {"gpu-dtype", "TYPE", "cuda: bf16 or f16 (default: the checkpoint's 16-bit type, else bf16)"},
    {"answers", "FILE", "also write every greedy answer (tokens, and the top-two logit gap of each) as JSON lines"},
    {"out", "FILE", "results JSON"},
    {"plot", "FILE", "PPL and ROUGE-L (text testbed: top-1 agreement) against budget per policy, as SVG"},
}, kv_option_specs({"kv-window", "kv-protected", "kv-prefix-pool", "kv-decode", "kv-head-floor", "kv-value-weight",
                    "kv-layer-floor", "kv-layer-cap", "kv-grid-pool", "kv-lookahead", "kv-query-reduce", "kv-profile", "kv-dtype"}));

}  // namespace

int cmd_eval(int argc, char** argv) {
  Args args("eval", kEvalOptions, argc, argv, 2);
  if (args.help()) {
    std::cout << Args::usage("eval", "Measures KV-cache policies against the full cache (METHOD.md section 7).",
                             kEvalOptions);
    return 0;
  }
  const std::string data = args.str("data", "");
  if (data.empty()) fail("--data", "is required");
  const std::string out = args.str("out", "");
  if (out.empty()) fail("--out", "is required (results JSON)");
  std::vector<std::string> policies = args.has("policies") ? split_list(args.str("policies")) : policy_names();
  // The full cache is the reference every record is measured against, not a policy to evaluate.
  policies.erase(std::remove_if(policies.begin(), policies.end(),
                                [](const std::string& p) { return !policy_info(p, "--policies").compresses; }),
                 policies.end());
  const std::vector<double> budgets = parse_budgets(args.str("budgets", "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"), "--budgets");
  const std::vector<std::string> estimators = split_list(args.str("estimators", "window"));
  for (auto& e : estimators) estimator_from_name(e);
  const DeviceChoice dev = parse_device(args);
  EvalOptions opt;
  opt.base = policy_options_from_args(args);
  const std::string rule = args.str("kv-decode", "proportional");
  opt.limit = size_t(std::max<int64_t>(0, args.integer("limit", 0)));
  opt.max_tokens = args.integer("max-tokens", 1024);
  if (opt.max_tokens < 1) fail("--max-tokens", "must be at least 1");
  opt.image_mode = args.str("image-mode", "");
  opt.batch = args.integer("batch", 32);
  if (opt.batch < 1) fail("--batch", "must be at least 1");
  opt.jobs = args.integer("jobs", std::max(1, int(std::thread::hardware_concurrency())));
  if (opt.jobs < 1) fail("--jobs", "must be at least 1");

  opt.no_image_control = args.flag("no-image-control");
  const int bootstrap = args.integer("bootstrap", 1000);
  if (bootstrap < 0 || bootstrap > 1000000) fail("--bootstrap", "must be a count of resamples from 0 (off) to 1000000");
  opt.bootstrap = int(bootstrap);

  // A text testbed (a JSON object of documents) or conversations (a JSON list).
  const bool text = is_text_set(data);
  std::optional<TextSet> text_set;
  std::vector<Sample> samples;
  std::string truth_path = args.str("truth", "");
  if (text) {
    for (const char* o : {"image-dir", "truth", "image-mode", "answers", "max-tokens"})
      if (args.has(o)) fail(std::string("--") + o, "does not apply to a text testbed (" + data + ")");
    if (opt.no_image_control) fail("--no-image-control", "the text testbed " + data + " has no image to evict");
    text_set = load_text_set(data);
    text_set->context_tokens = args.integer("text-context", text_set->context_tokens);
    text_set->continuation_tokens = args.integer("text-continuation", text_set->continuation_tokens);
  } else {
    for (const char* o : {"text-context", "text-continuation"})
      if (args.has(o)) fail(std::string("--") + o, "applies to a text testbed only, not to " + data);
    samples = load_conversations(data, args.str("image-dir", ""));
    if (truth_path.empty()) truth_path = default_truth_path(data);
  }
  std::optional<TruthSet> truth;
  if (!truth_path.empty()) truth = TruthSet::load(truth_path);

  LoadedModel lm = load_model(args);
  const std::string& model_dir = lm.dir;
  const Model* model = lm.model.get();
  Engine engine(*model, *lm.tok);

  std::optional<Profile> profile;
  for (auto& p : policies)
    if (policy_info(p, "--policies").needs_profile && !profile) {
      const std::string path = args.str("kv-profile", (fs::path(model_dir) / "prefixkv_profile.json").string());
      if (!fs::exists(path)) fail("--policies " + p, "needs a profile: none at " + path + " (--kv-profile)");
      profile = Profile::load(path);
      profile->check_compatible(model_identity(*model));
    }
  opt.profile = profile ? &*profile : nullptr;
  opt.configs = eval_configs(policies, budgets, estimators, opt.profile);
  if (opt.configs.empty()) fail("--policies", "nothing to evaluate");

  BackendOptions bo;
  bo.device = dev.device;
  bo.gpu_dtype = dev.gpu_dtype;
  bo.kv_dtype = dev.kv_dtype;
  const std::unique_ptr<Backend> backend = make_backend(*model, bo);
  if (!backend->thread_safe()) opt.jobs = 1;
  if (opt.jobs > 1) set_num_threads(1);  // parallel over samples; each one single-threaded

  std::ofstream answers;
  if (args.has("answers")) {
    answers.open(args.str("answers"));
    if (!answers) fail("--answers " + args.str("answers"), "cannot write the file");
    opt.on_answer = [&](const std::string& sample, const std::string& config, const std::vector<int32_t>& tokens,
                        const std::vector<float>& margins) {
      answers << json{{"sample", sample}, {"config", config}, {"tokens", tokens}, {"margins", margins}}.dump() << "\n";
    };
  }
  const auto t0 = std::chrono::steady_clock::now();
  opt.on_progress = [&](size_t done, size_t total) {
    progress("eval", done, total, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  };
  opt.on_skip = [](const std::string& id, const std::string& why) {
    std::fprintf(stderr, "\nprefixkv eval: skipping sample '%s': %s\n", id.c_str(), why.c_str());
  };
  const EvalReport rep = text ? evaluate_text(*backend, engine, *text_set, opt)
                              : evaluate(*backend, engine, samples, truth ? &*truth : nullptr, opt);

  json res = report_json(rep);
  res["model"] = model_dir;
  res["data"] = data;
  res["settings"] = eval_settings_json(policies, budgets, estimators, opt, rule, truth_path, text ? &*text_set : nullptr);
  {
    const std::string tmp = out + ".tmp";
    std::ofstream f(tmp);
    if (!f) fail(out, "cannot write the results");
    f << res.dump(1) << "\n";
    f.close();
    fs::rename(tmp, out);
  }
  std::cout << report_table(rep, budgets) << "\nwrote " << out << " (" << rep.device << ", " << rep.seconds << " s)\n";


  if (args.has("plot")) {
    PlotSpec ppl{"PPL of the reference answers", "kept fraction", "PPL", true, {}};
    PlotSpec rl = rep.greedy ? PlotSpec{"ROUGE-L vs full-cache answer", "kept fraction", "ROUGE-L F", false, {}}
                             : PlotSpec{"top-1 agreement with the full cache", "kept fraction", "top-1", false, {}};
    std::map<std::string, size_t> series;  // one per policy[/estimator], points in budget order
    for (auto& [c, sc] : rep.records) {
      if (!sc.samples) continue;
      const std::string name = c.policy + (c.estimator.empty() ? "" : "/" + c.estimator);
      if (!series.count(name)) {
        series[name] = ppl.series.size();
        ppl.series.push_back(Series{name, {}, {}});
        rl.series.push_back(Series{name, {}, {}});
      }
      const size_t k = series[name];
      ppl.series[k].x.push_back(c.budget), ppl.series[k].y.push_back(sc.ppl);
      rl.series[k].x.push_back(c.budget), rl.series[k].y.push_back(rep.greedy ? sc.rouge_l : sc.top1);
    }
    write_svg(args.str("plot"), {ppl, rl}, 520, 380);
    std::cout << "wrote " << args.str("plot") << "\n";
  }
  return 0;
}

}  // namespace pkv::cli
