// prefixkv run: one prompt (and optionally one image) through the model, answer streamed to stdout.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>

#include <nlohmann/json.hpp>

#include "args.h"
#include "common.h"
#include "core/error.h"
#include "core/npy.h"
#include "core/threads.h"
#include "engine/backend.h"
#include "engine/engine.h"
#include "engine/make_backend.h"
#include "kv_options.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace pkv::cli {

namespace {

const std::vector<OptionSpec> kRunOptions = with_options({
    {"model", "DIR", "checkpoint directory (default: the bundled model, models/prefixkv-llava-tiny)"},
    no_mmap_option(),
    {"vision-tower", "DIR", "separate CLIP checkpoint (original LLaVA layout without the tower inside)"},
    {"mmproj", "FILE", "llama.cpp's LLaVA vision file (GGUF) beside a GGUF language model (--model FILE.gguf)"},
    {"image", "FILE", "PNG or JPEG image"},
    {"prompt", "TEXT", "the prompt (default: \"Describe the image in detail.\" with an image)"},
    {"template", "NAME", "llava (USER: <image>\\n{prompt} ASSISTANT:, default) or raw"},
    {"image-mode", "MODE", "pad or crop (default: from preprocessor_config.json / the layout)"},
    {"max-tokens", "N", "stop after N generated tokens (default 256)"},
    {"temperature", "T", "sampling temperature; 0 = greedy (default 0)"},
    {"top-k", "K", "sample among the K most likely tokens (default 0 = off)"},
    {"top-p", "P", "nucleus sampling threshold in (0, 1] (default 1)"},
    {"seed", "N", "random seed for sampling (default 0)"},
    {"stop", "TEXT", "stop when the answer contains TEXT", true},
    {"ignore-eos", "", "do not stop at the end-of-sequence token"},
    {"threads", "N", "worker threads (default: all cores)"},
    {"json", "", "print one JSON object (answer, token ids, timings, KV bytes per layer) instead of text"},
    {"dump-tensors", "DIR", "write pixel values, vision features, projector output, final hidden states and logits as .npy"},
    {"device", "NAME", "cpu (default) or cuda: the vision tower, projector and decoder on the GPU (builds with -DPREFIXKV_CUDA=ON)"},
    {"gpu-dtype", "TYPE", "cuda: bf16 or f16 weights, activations and KV (default: the checkpoint's 16-bit type, else bf16)"},
}, kv_option_specs({"kv-policy", "kv-budget", "kv-budget-tokens", "kv-importance", "kv-window", "kv-protected",
                                  "kv-prefix-pool", "kv-decode", "kv-head-floor", "kv-value-weight",
                                  "kv-layer-floor", "kv-layer-cap", "kv-grid-pool", "kv-lookahead", "kv-query-reduce", "kv-profile", "kv-dtype"}));

// Writes the first occurrence of each named tensor (the prefill's) as DIR/<name>[.L<layer>].npy.
class DumpObserver : public Observer {
 public:
  explicit DumpObserver(std::string dir) : dir_(std::move(dir)) {}
  bool wants(const std::string& name) const override {
    return name == "pixel_values" || name == "vision_features" || name == "projector_output" ||
           name == "hidden_final" || name == "logits";
  }
  void on_tensor(const std::string& name, int layer, const float* data, const std::vector<int64_t>& shape) override {
    std::string file = name + (layer >= 0 ? ".L" + std::to_string(layer) : "") + ".npy";
    if (!written_.emplace(file, true).second) return;
    write_npy((fs::path(dir_) / file).string(), data, shape);
    files.push_back(file);
  }
  std::vector<std::string> files;

 private:
  std::string dir_;
  std::map<std::string, bool> written_;
};

double elapsed_ms(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int cmd_run(int argc, char** argv) {
  Args args("run", kRunOptions, argc, argv, 2);
  if (args.help()) {
    std::cout << Args::usage("run", "Generates an answer with a LLaVA or LLaMA checkpoint (safetensors).", kRunOptions);
    return 0;
  }
  if (args.has("threads")) {
    const int n = args.integer("threads", 1);
    if (n < 1 || n > 1024) fail("--threads", "must be between 1 and 1024");
    set_num_threads(n);
  }
  SamplingOptions s;
  s.max_tokens = args.integer("max-tokens", 256);
  if (s.max_tokens < 1) fail("--max-tokens", "must be at least 1");
  s.temperature = float(args.number("temperature", 0.0));
  if (s.temperature < 0) fail("--temperature", "must not be negative");
  s.top_k = args.integer("top-k", 0);
  if (s.top_k < 0) fail("--top-k", "must not be negative");
  s.top_p = float(args.number("top-p", 1.0));
  if (!(s.top_p > 0 && s.top_p <= 1)) fail("--top-p", "must be in (0, 1]");
  s.seed = uint64_t(args.integer("seed", 0));
  s.stop = args.all("stop");
  s.ignore_eos = args.flag("ignore-eos");
  const std::string tmpl = args.str("template", "llava");
  if (tmpl != "llava" && tmpl != "raw") fail("--template", "must be llava or raw, got '" + tmpl + "'");
  const std::string mode = args.str("image-mode", "");
  if (!mode.empty() && mode != "pad" && mode != "crop") fail("--image-mode", "must be pad or crop, got '" + mode + "'");
  const DeviceChoice dev = parse_device(args);
  const std::string policy_name = args.str("kv-policy", "full");
  PolicyOptions popt = policy_options_from_args(args);
  const std::string dump_dir = args.str("dump-tensors", "");
  if (!dump_dir.empty()) {
    std::error_code ec;
    fs::create_directories(dump_dir, ec);
    if (ec) fail("--dump-tensors " + dump_dir, "cannot create the folder: " + ec.message());
  }

  // Read the image before loading the model: bad input fails fast.
  Image image;
  const bool has_image = args.has("image");
  if (has_image) image = load_image(args.str("image"));
  const std::string prompt = args.str("prompt", has_image ? "Describe the image in detail." : "");
  if (prompt.empty() && !has_image) fail("--prompt", "is required when no image is given");

  auto t0 = std::chrono::steady_clock::now();
  LoadedModel lm = load_model(args);
  const double load_ms = elapsed_ms(t0);
  const std::string& model_dir = lm.dir;
  const Model* model = lm.model.get();

  Engine engine(*model, *lm.tok);
  PromptRequest req;
  req.text = prompt;
  req.tmpl = tmpl == "raw" ? Template::Raw : Template::LlavaV1;
  req.image = has_image ? &image : nullptr;
  req.image_mode = mode;
  DumpObserver dump(dump_dir);
  Observer* obs = dump_dir.empty() ? nullptr : &dump;
  if (has_image) {  // where the image's entries are (grid pooling)
    const std::vector<int32_t> ids = engine.prompt_ids(req);
    popt.image_offset = int(std::find(ids.begin(), ids.end(), -1) - ids.begin());
    popt.image_tokens = model->config().image_tokens();
  }
  std::unique_ptr<KVPolicy> policy_ptr = make_policy_for_model(policy_name, popt, args, *model);
  KVPolicy& policy = *policy_ptr;
  const bool as_json = args.flag("json");
  auto stream = [&](const std::string& piece) {
    if (as_json) return;
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
  };
  // The device: the model's copy there (the GPU's vision tower when there is an image) and KV
  // memory for this one sequence: the prompt's tokens (counted before the image is encoded, which
  // needs the device) and max_tokens more, at most the model's context. prompt_ids builds the
  // prompt as prepare() will (and refuses an image for a text-only model).
  const ModelConfig& cfg = model->config();
  const std::vector<int32_t> marked = engine.prompt_ids(req);
  const int prompt_tokens = int(marked.size()) + (has_image ? cfg.image_tokens() - 1 : 0);
  BackendOptions bo;
  bo.device = dev.device;
  bo.gpu_dtype = dev.gpu_dtype;
  bo.kv_dtype = dev.kv_dtype;
  bo.vision = has_image;
  bo.kv_pool_entries = int(std::min<int64_t>(int64_t(prompt_tokens) + s.max_tokens + 1, cfg.text.max_positions + 1));
  const std::unique_ptr<Backend> backend = make_backend(*model, bo);
  if (has_image) backend->use_for_images(req, obs);
  const PreparedPrompt p = engine.prepare(req, obs);
  const GenerationResult r = generate(*backend, *lm.tok, p, s, policy, stream, obs);
  const std::string device_desc = backend->description();
  const int n_gen = int(r.tokens.size());
  const double decode_tps = r.decode_ms > 0 && n_gen > 1 ? (n_gen - 1) / (r.decode_ms / 1000.0) : 0.0;
  const double prefill_tps = r.prefill_ms > 0 ? r.prompt_tokens / (r.prefill_ms / 1000.0) : 0.0;
  if (as_json) {
    json j;
    j["text"] = r.text;
    j["tokens"] = r.tokens;
    j["prompt_tokens"] = r.prompt_tokens;
    j["image_tokens"] = p.image_tokens;
    j["stop_reason"] = r.stop_reason;
    j["model"] = {{"dir", model_dir},
                  {"architecture", model->config().architecture},
                  {"layout", layout_name(model->config().layout)},
                  {"names", model->weights().scheme},
                  {"weight_bytes", model->weight_bytes()}};
    j["timings"] = {{"load_ms", load_ms},           {"vision_ms", p.vision_ms},
                    {"prefill_ms", r.prefill_ms},   {"prefill_tokens_per_s", prefill_tps},
                    {"decode_ms", r.decode_ms},     {"decode_tokens_per_s", decode_tps},
                    {"threads", num_threads()}};
    j["device"] = device_desc;
    j["kv"] = {{"policy", policy.name()},
               {"dtype", dtype_option_name(dev.cuda ? gpu_compute_dtype(dev.gpu_dtype, *model) : kv_dtype_from_name(dev.kv_dtype))},
               {"budget", policy_info(policy.name()).compresses ? popt.budget : 1.0},
               {"prefill_kept_per_layer", policy.prefill_kept()},
               {"bytes", r.kv_bytes},
               {"bytes_per_layer", r.kv_bytes_per_layer},
               {"entries_per_layer", r.kv_entries_per_layer},
               {"entries_per_head", r.kv_entries_per_head},
               {"bytes_per_head", r.kv_bytes_per_head}};
    if (!dump_dir.empty()) j["dumped"] = dump.files;
    std::cout << j.dump(2) << "\n";
  } else {
    std::printf("\n");
    std::fprintf(stderr,
                 "\n[prefixkv] model %s (%s, %s) | prompt %d tokens (%d image) | %d generated (%s)\n"
                 "[prefixkv] load %.0f ms | vision %.0f ms | prefill %.0f ms (%.1f tok/s) | decode %.1f tok/s | %d threads | %s\n"
                 "[prefixkv] KV cache (%s): %.2f MiB over %d layers\n",
                 model_dir.c_str(), model->config().architecture.c_str(), layout_name(model->config().layout),
                 r.prompt_tokens, p.image_tokens, n_gen, r.stop_reason.c_str(), load_ms, p.vision_ms, r.prefill_ms,
                 prefill_tps, decode_tps, num_threads(), device_desc.c_str(), policy.name().c_str(), double(r.kv_bytes) / (1 << 20),
                 model->config().text.n_layers);
    // Per-head budgets: each KV head's entries, layer by layer, where the heads of a layer differ.
    std::string heads;
    for (size_t l = 0; l < r.kv_entries_per_head.size(); ++l) {
      const std::vector<int>& e = r.kv_entries_per_head[l];
      if (std::adjacent_find(e.begin(), e.end(), std::not_equal_to<int>()) == e.end()) continue;
      heads += (heads.empty() ? "" : " | ") + std::to_string(l) + ":";
      for (size_t h = 0; h < e.size(); ++h) heads += (h ? "/" : " ") + std::to_string(e[h]);
    }
    if (!heads.empty()) std::fprintf(stderr, "[prefixkv] KV entries per KV head (layer: heads): %s\n", heads.c_str());
  }
  return 0;
}

}  // namespace pkv::cli
