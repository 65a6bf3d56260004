// prefixkv bench: speed and memory of prefill and batched decoding for model shapes of any size
// (random weights made in memory: no download), batch sizes, prompt / generated lengths, KV
// policies and budgets. Prints a table and writes JSON. Any back end of make_backend (--device cpu,
// or cuda when built with it: one paged KV pool for all sequences); what only a device measures
// (its time breakdowns, memory, copy bandwidth) comes through Backend::stats (docs/PERF.md).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "args.h"
#include "common.h"
#include "core/error.h"
#include "core/threads.h"
#include "engine/backend.h"
#include "engine/engine.h"
#include "engine/make_backend.h"
#include "kv/profile.h"
#include "kv_options.h"

using nlohmann::json;

namespace pkv::cli {

namespace {

const std::vector<OptionSpec> kBenchOptions = with_options({
    {"shape", "NAME", "decoder shape with random weights: llava-1.5-7b (default), llava-1.5-13b, tiny (the bundled "
                      "model's decoder)"},
    {"model", "DIR", "benchmark a real checkpoint's decoder instead of random weights"},
    no_mmap_option(),
    {"dtype", "T", "weights of the random model: f16 (default) or bf16"},
    {"device", "NAME", "cpu (default) or cuda (builds with -DPREFIXKV_CUDA=ON)"},
    {"kv-pool-gb", "G", "cuda: device memory for the paged KV pool (default: 90% of what is free after the weights)"},
    {"block-size", "N", "cuda: KV entries per pool block (default 16)"},
    {"batch", "LIST", "comma-separated batch sizes (default 1)"},
    {"prefill-batched", "", "prefill each batch's prompts in one pass (Backend::prefill_many: on cuda one forward over "
                            "the rows of all of them) instead of one prompt after another"},
    {"prompt", "N", "prompt tokens per sequence (default 672: 576 image tokens + text, as LLaVA-1.5)"},
    {"gen", "N", "generated tokens per sequence (default 256)"},
    {"policies", "LIST", "comma-separated KV policies (default full; prefixkv takes a synthetic profile, layer budgets "
                         "rising linearly with depth from half the budget to 1.5x: the same work as a calibrated one)"},
    {"budgets", "LIST", "kept fractions for the compressing policies (default 0.2)"},
    {"memory-gb", "G", "memory for the largest-batch estimate (default: this machine's RAM)"},
    {"seed", "N", "random seed of the weights and prompts (default 0)"},
    {"threads", "N", "worker threads (default: all cores)"},
    {"json", "FILE", "also write the records as JSON"},
}, kv_option_specs({"kv-importance", "kv-window", "kv-protected", "kv-prefix-pool", "kv-decode", "kv-dtype"}));


ModelConfig shape_config(const std::string& name) {
  ModelConfig c;
  TextConfig& t = c.text;
  if (name == "llava-1.5-7b") {  // Vicuna-7B as LLaVA-1.5 uses it (config of llava-hf/llava-1.5-7b-hf)
    t.vocab_size = 32064, t.hidden = 4096, t.intermediate = 11008, t.n_layers = 32, t.n_heads = 32, t.n_kv_heads = 32;
    t.head_dim = 128, t.max_positions = 4096, t.rms_eps = 1e-5f;
  } else if (name == "llava-1.5-13b") {
    t.vocab_size = 32064, t.hidden = 5120, t.intermediate = 13824, t.n_layers = 40, t.n_heads = 40, t.n_kv_heads = 40;
    t.head_dim = 128, t.max_positions = 4096, t.rms_eps = 1e-5f;
  } else if (name == "tiny") {  // models/prefixkv-llava-tiny's decoder
    t.vocab_size = 4000, t.hidden = 256, t.intermediate = 768, t.n_layers = 12, t.n_heads = 8, t.n_kv_heads = 4;
    t.head_dim = 32, t.max_positions = 2048, t.rms_eps = 1e-5f;
  } else {
    fail("--shape", "unknown shape '" + name + "' (llava-1.5-7b, llava-1.5-13b, tiny)");
  }
  c.dir = "random:" + name;
  return c;
}

size_t machine_memory() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  size_t kb = 0;
  while (f >> key >> kb)
    if (key == "MemTotal:") return kb * 1024;
  return 0;
}

double peak_rss_gib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) / (1024.0 * 1024.0);  // ru_maxrss is in KiB on Linux
}

struct Record {
  std::string policy;
  double budget = 1;
  int batch = 0;
  double prefill_ms = 0, decode_ms = 0;
  double decode_tok_s = 0, throughput = 0;
  size_t kv_bytes_end = 0, kv_bytes_full = 0;
  double peak_rss_gib = 0, gpu_used_gib = 0;
  long largest_batch = 0;
  size_t kv_bytes_prefill = 0;  // held right after the prefills (GPU: the pool's blocks)
  double floor_tok_s = 0;       // GPU: batch x bandwidth / bytes read per step (0: not measured)
  double step_ms = 0, step_gpu_ms = 0;  // per decode step: wall time, and GPU time of the model's work
  // per decode step (GPU): host work before the launch, the policies on the host positions, the
  // compaction's host part and its GPU time
  double step_prep_ms = 0, step_policy_ms = 0, step_compact_ms = 0, step_compact_gpu_ms = 0;
  double prefill_policy_ms = 0, prefill_compact_ms = 0;  // GPU: of prefill_ms, the policy and the compaction
  double prefill_prompts_s = 0;  // prompts prefilled per second (batch / prefill time)
};

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  Args args("bench", kBenchOptions, argc, argv, 2);
  if (args.help()) {
    std::cout << Args::usage("bench",
                             "Measures prefill and batched decoding speed and memory on random weights of any "
                             "shape (or a real checkpoint), for batch sizes, KV policies and budgets.",
                             kBenchOptions);
    return 0;
  }
  if (args.has("threads")) set_num_threads(args.integer("threads", 1));
  const std::string device = args.str("device", "cpu");
  const std::string kv_dtype = args.str("kv-dtype", "");
  check_device_options(device, "", kv_dtype);  // an unknown device, cuda in a build without it, a bad --kv-dtype
  const int prompt = args.integer("prompt", 672), gen = args.integer("gen", 256);
  if (prompt < 1) fail("--prompt", "must be at least 1");
  if (gen < 1) fail("--gen", "must be at least 1");
  std::vector<int> batches;
  for (const std::string& b : split_list(args.str("batch", "1"))) {
    int v = 0;
    try {
      v = std::stoi(b);
    } catch (...) {
      v = 0;
    }
    if (v < 1) fail("--batch", "'" + b + "' is not a positive batch size");
    batches.push_back(v);
  }
  const std::vector<std::string> policies = split_list(args.str("policies", "full"));
  if (policies.empty()) fail("--policies", "is empty");
  for (const std::string& p : policies) policy_info(p, "--policies");  // known names only
  const std::vector<double> budgets = parse_budgets(args.str("budgets", "0.2"), "--budgets");
  const uint64_t seed = uint64_t(args.integer("seed", 0));

  // The random weights' type, also the GPU's compute type: f16 unless --dtype bf16.
  DType dtype = DType::F16;
  const std::string dt = args.str("dtype", "f16");
  if (!dtype_from_option(dt, dtype) || dtype == DType::F32) fail("--dtype", "must be f16 or bf16, got '" + dt + "'");
  std::unique_ptr<Model> model;
  std::string what;
  const auto t_load = std::chrono::steady_clock::now();
  if (args.has("model")) {
    apply_no_mmap(args);
    model = Model::load(args.str("model"));
    what = model->config().dir;
  } else {
    const std::string shape = args.str("shape", "llava-1.5-7b");
    model = Model::random(shape_config(shape), dtype, seed);
    what = shape + " (random " + dtype_option_name(dtype) + ")";
  }
  const TextConfig& t = model->config().text;
  if (prompt + gen > t.max_positions)
    fail("--prompt + --gen", std::to_string(prompt + gen) + " tokens exceed the model's " +
                                 std::to_string(t.max_positions) + " positions");
  const double load_s = ms_since(t_load) / 1000;
  const size_t memory = args.has("memory-gb") ? size_t(args.number("memory-gb", 0) * double(1ull << 30)) : machine_memory();
  std::printf("bench: %s, %d layers, %.2f GiB of weights (made in %.1f s); %d threads; prompt %d + %d generated\n",
              what.c_str(), t.n_layers, double(model->weight_bytes()) / double(1ull << 30), load_s, num_threads(),
              prompt, gen);

  BackendOptions bo;
  bo.device = device;
  bo.vision = false;  // the prompts are token embeddings: no image tower needed
  bo.kv_dtype = kv_dtype;
  if (device == "cuda") {
    bo.gpu_dtype = dtype_option_name(dtype);
    bo.block_size = args.integer("block-size", 16);
    if (bo.block_size < 1) fail("--block-size", "must be at least 1");
    if (args.has("kv-pool-gb")) {
      const double gb = args.number("kv-pool-gb", 0);
      if (!(gb > 0)) fail("--kv-pool-gb", "must be positive");
      bo.kv_pool_bytes = size_t(gb * double(1ull << 30));
    }  // else 90% of what is free after the weights
  }
  const std::unique_ptr<Backend> backend = make_backend(*model, bo);
  // One token's entries in every layer as the backend stores them (CPU: K and V in --kv-dtype; GPU: 16-bit
  // K and V and the position), for the uncompressed size and the room for one prompt.
  const size_t entry_bytes = backend->kv_entry_bytes() * size_t(t.n_layers);
  const Backend::DeviceInfo info = backend->device_info();
  const Backend::Stats st = backend->stats();
  const bool has_device_memory = st.device_total_bytes > 0;  // a GPU's, not the host's
  if (has_device_memory)
    std::printf("bench: %s: weights and runtime %.2f GiB, KV pool %.2f GiB in blocks of %d entries\n",
                backend->description().c_str(),
                double(st.device_total_bytes - st.device_free_bytes - st.pool_total_bytes) / double(1ull << 30),
                double(st.pool_total_bytes) / double(1ull << 30), backend->kv_block());
  const double bandwidth = backend->measure_copy_bandwidth();  // bytes/s, for the decode floor (0: not measured)
  // The importance pass's cost: one prompt prefilled with and without METHOD.md's importance, over
  // every query (the paper's estimator) and over the last 32 (the window estimator, the default of
  // the policies); best of 3 each, the sequence released after each run. Not on the CPU, where
  // these nine prefills would take longer than the rest of a short run.
  double importance_ms = 0, importance_window_ms = 0, prefill_alone_ms = 0;
  if (device != "cpu") {
    PreparedPrompt p;
    p.ids.resize(size_t(prompt));
    std::mt19937_64 r0(seed + 7);
    for (int32_t& id : p.ids) id = int32_t(r0() % uint64_t(t.vocab_size));
    p.embeddings.resize(size_t(prompt) * size_t(t.hidden));
    model->embed(p.ids.data(), prompt, p.embeddings.data());
    // One uncompressed prefill measuring the importance over the queries from `from` on (none when
    // from < 0): Backend::prefill_shared, as evaluation uses it.
    auto once = [&](int from) {
      const auto t0 = std::chrono::steady_clock::now();
      const std::unique_ptr<Backend::SharedPrefill> sh =
          backend->prefill_shared(p, from < 0 ? std::vector<int>{} : std::vector<int>{from});  // synchronous
      const double ms = ms_since(t0);
      return ms;  // the prompt's blocks go back after the timing
    };
    const int window_from = std::max(0, prompt - 32);
    double all = 1e30, window = 1e30, without = 1e30;
    for (int rep = 0; rep < 3; ++rep)
      without = std::min(without, once(-1)), all = std::min(all, once(0)), window = std::min(window, once(window_from));
    importance_ms = all - without;
    importance_window_ms = window - without;
    prefill_alone_ms = without;
    std::printf("bench: one %d-token prefill %.1f ms without importance; the importance pass over all queries "
                "%.1f ms (%.1f%% of the prefill), over the last 32 %.1f ms (%.1f%%)\n",
                prompt, without, all - without, 100 * (all - without) / all, window - without,
                100 * (window - without) / window);
  }
  if (!info.summary.empty()) {
    std::printf("bench: device copy bandwidth %.0f GB/s (read + written)", bandwidth / 1e9);
    for (const Backend::DeviceSwitch& sw : info.switches)
      std::printf("; %s: %s", sw.what.c_str(), sw.on ? "on" : ("off (" + sw.off_by + ")").c_str());
    std::printf("\n");
  }
  PolicyOptions base = policy_options_from_args(args);
  const bool prefill_batched = args.flag("prefill-batched");
  std::vector<Record> records;
  std::mt19937_64 rng(seed + 1);
  const int V = t.vocab_size;
  for (const std::string& pname : policies) {
    const std::vector<double> bl = policy_info(pname).compresses ? budgets : std::vector<double>{1.0};
    for (double budget : bl)
      for (int B : batches) {
        PolicyOptions o = base;
        o.budget = budget;
        // Random weights have no calibrated profile: a policy that needs one gets ramp_keep_fractions
        // (its prefill does the same work for any profile: the budgets only say how many to keep).
        if (policy_info(pname, "--policies").needs_profile) o.keep_fractions = ramp_keep_fractions(t.n_layers, budget);
        std::vector<std::unique_ptr<KVPolicy>> pols;  // declared first: the sequences go before their policies
        std::vector<std::unique_ptr<Backend::Sequence>> seqs;
        std::vector<Backend::Sequence*> ptrs;
        std::vector<float> logits(size_t(B) * size_t(V));
        Record r;
        r.policy = pname, r.budget = budget, r.batch = B;
        backend->reset_stats();  // the times of this run, and the pool's peak from here
        // Prefill: one sequence after another (prefill), or all of them in one pass
        // (--prefill-batched: prefill_many). Both synchronous: the logits are copied back.
        std::vector<PreparedPrompt> prompts(static_cast<size_t>(B));
        for (int b = 0; b < B; ++b) {
          PreparedPrompt& p = prompts[size_t(b)];
          p.ids.resize(size_t(prompt));
          for (int32_t& id : p.ids) id = int32_t(rng() % uint64_t(V));
          p.embeddings.resize(size_t(prompt) * size_t(t.hidden));
          model->embed(p.ids.data(), prompt, p.embeddings.data());
          pols.push_back(make_policy(pname, o));
        }
        if (prefill_batched) {
          std::vector<const PreparedPrompt*> pp;
          std::vector<KVPolicy*> pk;
          for (int b = 0; b < B; ++b) pp.push_back(&prompts[size_t(b)]), pk.push_back(pols[size_t(b)].get());
          const auto t0 = std::chrono::steady_clock::now();
          seqs = backend->prefill_many(pp, pk, logits.data());
          r.prefill_ms += ms_since(t0);
        } else {
          for (int b = 0; b < B; ++b) {
            const auto t0 = std::chrono::steady_clock::now();
            seqs.push_back(backend->prefill(prompts[size_t(b)], *pols[size_t(b)], &logits[size_t(b) * size_t(V)]));
            r.prefill_ms += ms_since(t0);
          }
        }
        for (auto& s : seqs) ptrs.push_back(s.get());
        r.prefill_prompts_s = r.prefill_ms > 0 ? 1000.0 * B / r.prefill_ms : 0;
        prompts.clear();
        for (auto& s : seqs) r.kv_bytes_prefill += s->kv_bytes();
        const Backend::Stats after_prefill = backend->stats();
        r.prefill_policy_ms = after_prefill.prefill_policy_ms, r.prefill_compact_ms = after_prefill.prefill_compact_ms;
        // Decode: every step one batched pass over all sequences (greedy tokens).
        std::vector<int32_t> tokens(static_cast<size_t>(B));
        const auto t1 = std::chrono::steady_clock::now();
        for (int s = 0; s < gen; ++s) {
          parallel_for(size_t(B), 1, [&](size_t b0, size_t b1, int) {  // greedy tokens (batches of hundreds)
            for (size_t b = b0; b < b1; ++b) {
              const float* l = &logits[b * size_t(V)];
              tokens[b] = int32_t(std::max_element(l, l + V) - l);
            }
          });
          backend->step_many(ptrs, tokens.data(), logits.data());
        }
        r.decode_ms = ms_since(t1);
        r.step_ms = gen > 0 ? r.decode_ms / gen : 0;
        // The decode steps' parts (a device's breakdown; 0 on the CPU, which measures none): what
        // the counters gained since the prefills, per step.
        const Backend::Stats end = backend->stats();
        if (const int n = end.steps - after_prefill.steps; n > 0) {
          r.step_gpu_ms = (end.step_device_ms - after_prefill.step_device_ms) / n;
          r.step_prep_ms = (end.step_prep_ms - after_prefill.step_prep_ms) / n;
          r.step_policy_ms = (end.step_policy_ms - after_prefill.step_policy_ms) / n;
          r.step_compact_ms = (end.step_compact_ms - after_prefill.step_compact_ms) / n;
          r.step_compact_gpu_ms = (end.compact_device_ms - after_prefill.compact_device_ms) / n;
        }
        r.decode_tok_s = double(B) * gen / (r.decode_ms / 1000);
        r.throughput = double(B) * gen / ((r.prefill_ms + r.decode_ms) / 1000);
        // The caches as the backend stores them (CPU: float32 entries; GPU: the pool blocks held).
        for (auto& s : seqs) r.kv_bytes_end += s->kv_bytes();
        r.kv_bytes_full = size_t(B) * size_t(prompt + gen) * entry_bytes;
        r.peak_rss_gib = peak_rss_gib();
        if (has_device_memory) {
          // Peak device memory of this run: everything but the pool (weights, activations,
          // workspaces) plus the most pool blocks its sequences held at once (the pool itself is
          // allocated whole).
          const double outside_pool =
              double(end.device_total_bytes - end.device_free_bytes) - double(end.pool_total_bytes);
          r.gpu_used_gib = (outside_pool + double(end.pool_peak_bytes)) / double(1ull << 30);
        }
        if (bandwidth > 0) {
          // The bandwidth floor: a step reads every weight but the embedding table once, and the
          // KV entries the sequences hold (on average over the run: midway between after the
          // prefills and the end).
          const double streamed = double(end.weight_bytes) -
                                  (t.tie_embeddings ? 0.0 : double(t.vocab_size) * t.hidden * double(dtype_size(dtype)));
          const double per_step = streamed + (double(r.kv_bytes_prefill) + double(r.kv_bytes_end)) / 2;
          r.floor_tok_s = double(B) * bandwidth / per_step;
        }
        // Largest batch: what is left of the memory (the backend's KV pool where it has one, else
        // this machine's after the weights) over one sequence's cache at its end, keeping room for
        // one uncompressed prompt (prefills run one at a time).
        const double per_seq = double(r.kv_bytes_end) / B;
        const double one_prompt = double(prompt) * double(entry_bytes);
        const double left = backend->kv_pool_bytes() > 0
                                ? double(backend->kv_pool_bytes()) - one_prompt
                                : double(memory) - double(model->weight_bytes()) - one_prompt;
        r.largest_batch = per_seq > 0 && left > 0 ? long(left / per_seq) : 0;
        records.push_back(r);
        std::fprintf(stderr, "  %s %.2f batch %d: prefill %.0f ms (%s, %.1f prompts/s; policy %.1f ms, compaction %.1f ms), "
                     "decode %.1f tok/s "
                     "(%.2f ms a step: the model's kernels %.2f on the GPU; host: %.2f before the launch, policies "
                     "%.2f, compaction %.2f + %.3f on the GPU)\n",
                     pname.c_str(), budget, B, r.prefill_ms, prefill_batched ? "one pass" : "one prompt at a time",
                     r.prefill_prompts_s, r.prefill_policy_ms, r.prefill_compact_ms, r.decode_tok_s,
                     r.step_ms, r.step_gpu_ms, r.step_prep_ms, r.step_policy_ms, r.step_compact_ms, r.step_compact_gpu_ms);
      }
  }

  const bool on_gpu = has_device_memory;
  std::printf("\n| policy | kept | batch | prefill ms | decode tok/s | floor tok/s | of floor | throughput tok/s "
              "| KV MiB at end | KV MiB full | %s | largest batch (%s) |\n",
              on_gpu ? "peak GPU GiB" : "peak RSS GiB",
              on_gpu ? "the KV pool" : (std::to_string(int(double(memory) / double(1ull << 30))) + " GiB").c_str());
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Record& r : records) {
    char floor[32] = "-", pct[32] = "-";
    if (r.floor_tok_s > 0) {
      std::snprintf(floor, sizeof floor, "%.1f", r.floor_tok_s);
      std::snprintf(pct, sizeof pct, "%.0f%%", 100 * r.decode_tok_s / r.floor_tok_s);
    }
    std::printf("| %s | %.0f%% | %d | %.0f | %.2f | %s | %s | %.2f | %.1f | %.1f | %.2f | %ld |\n", r.policy.c_str(),
                r.budget * 100, r.batch, r.prefill_ms, r.decode_tok_s, floor, pct, r.throughput,
                double(r.kv_bytes_end) / double(1 << 20), double(r.kv_bytes_full) / double(1 << 20),
                on_gpu ? r.gpu_used_gib : r.peak_rss_gib, r.largest_batch);
  }
  if (args.has("json")) {
    json j;
    j["model"] = what;
    j["device"] = device;
    if (device == "cpu") j["kv_dtype"] = dtype_option_name(kv_dtype_from_name(kv_dtype));
    j["threads"] = num_threads();
    j["prompt"] = prompt;
    j["gen"] = gen;
    j["prefill_batched"] = prefill_batched;
    j["weight_bytes"] = model->weight_bytes();
    j["memory_bytes"] = memory;
    j["copy_bandwidth_bytes_per_s"] = bandwidth;
    j["prefill_ms_without_importance"] = prefill_alone_ms;
    j["importance_pass_ms"] = importance_ms;
    j["importance_pass_window32_ms"] = importance_window_ms;
    if (!info.summary.empty()) {  // the device and its switches ("cuda_graphs", "gemv")
      j["gpu"] = info.summary;
      for (const Backend::DeviceSwitch& sw : info.switches) j[sw.key] = sw.on;
    }
    j["records"] = json::array();
    for (const Record& r : records)
      j["records"].push_back({{"policy", r.policy}, {"budget", r.budget}, {"batch", r.batch},
                              {"prefill_ms", r.prefill_ms}, {"decode_ms", r.decode_ms},
                              {"decode_tokens_per_s", r.decode_tok_s}, {"throughput_tokens_per_s", r.throughput},
                              {"kv_bytes_end", r.kv_bytes_end}, {"kv_bytes_full", r.kv_bytes_full},
                              {"peak_rss_gib", r.peak_rss_gib}, {"peak_gpu_gib", r.gpu_used_gib},
                              {"largest_batch", r.largest_batch}, {"kv_bytes_prefill", r.kv_bytes_prefill},
                              {"floor_tokens_per_s", r.floor_tok_s},
                              {"step_ms", r.step_ms}, {"step_gpu_ms", r.step_gpu_ms},
                              {"step_prep_ms", r.step_prep_ms}, {"step_policy_ms", r.step_policy_ms},
                              {"step_compact_ms", r.step_compact_ms}, {"step_compact_gpu_ms", r.step_compact_gpu_ms},
                              {"prefill_policy_ms", r.prefill_policy_ms}, {"prefill_compact_ms", r.prefill_compact_ms},
                              {"prefill_prompts_per_s", r.prefill_prompts_s}});
    const std::string out = args.str("json");
    std::ofstream f(out);
    if (!f) fail(out, "cannot write the results");
    f << j.dump(1) << "\n";
    std::printf("wrote %s\n", out.c_str());
  }
  return 0;
}

}  // namespace pkv::cli
