#include "kv_options.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "engine/model_files.h"
#include "kv/cutoff.h"

namespace fs = std::filesystem;

namespace pkv::cli {

std::vector<OptionSpec> kv_option_specs(const std::vector<std::string>& names) {
  static const std::string policy_help = [] {
    std::string h = "KV-cache policy (default full):";
    for (const PolicyInfo& p : policy_infos()) h += "\n      " + p.name + ": " + p.help;
    h += "\n    A name may carry options, NAME:KEY[=VALUE]... (e.g. cutoff:wov:floor=0.5; keys w, floor, cap, grid, "
         "look, reduce, pool as the options below). uniform-prefix, prefixkv-online and prefixkv take heads "
         "(= alloc=head; alloc=layer is the default): budgets per (layer, KV head), each head ranking by its own "
         "attention and the retention search run over heads (prefixkv: the profile's per-head table, used by "
         "default when it has one), and hfloor=F, each head's floor as a share of the uniform count (default "
         "--kv-head-floor; hfloor=0: the plain search). The head form needs the window, paper or normalized sum";
    return h;
  }();
  static const std::vector<OptionSpec> all = {
      {"kv-policy", "NAME", policy_help},
      {"kv-budget", "B", "kept fraction of the prompt's KV entries, in (0, 1] (default 0.2)"},
      {"kv-budget-tokens", "N", "KV entries per layer on average, instead of --kv-budget"},
      {"kv-importance", "NAME", "importance estimator for the prefix policies: window (default), paper, normalized"},
      {"kv-window", "W", "query window of the window estimator and SnapKV (default 32)"},
      {"kv-protected", "C", "tokens never evicted: the first and the last prompt token (default 2)"},
      {"kv-prefix-pool", "K", "prefix policies: max-pool the importance over K neighbouring tokens before ranking "
                              "(as SnapKV does; default 7, measured best; 0 = off, METHOD.md's plain ranking)"},
      {"kv-decode", "RULE", "decode-time length: proportional (METHOD.md section 4, default) or cap"},
      {"kv-head-floor", "ALPHA", "adakv: each KV head keeps at least this share of its even share of the layer's "
                                 "selected entries, in [0, 1] (Ada-KV's alpha, default 0.2); the prefix policies' "
                                 "heads form: at least this share of the uniform count per head (hfloor=F)"},
      {"kv-value-weight", "W", "prefix policies and cutoff: weight each entry's attention by its value, none "
                               "(default), vnorm (||v||_1), wov (||W_o v||_1 per query head) or wov2 (||W_o v||_2 through "
                               "per-head Gram matrices: the same ranking measured, cheaper; the GPU measures none, vnorm "
                               "and wov2)"},
      {"kv-layer-floor", "F", "cutoff: each layer keeps at least this fraction of the uniform budget, in [0, 1] "
                              "(default 0: one threshold decides alone; 0.8: 80% uniform + 20% by the threshold)"},
      {"kv-layer-cap", "C", "cutoff: no layer evicts more than C times the uniform eviction (0 = off, the default, "
                            "or >= 1; 1.5 measured best near the full cache; the policy name's cap=C does the same)"},
      {"kv-grid-pool", "K", "prefix policies and cutoff: max-pool image entries over K x K neighbouring patches of "
                            "the image grid before ranking (text entries keep --kv-prefix-pool; default 0 = off)"},
      {"kv-lookahead", "K", "prefix policies and cutoff: rank by the attention of the first K greedy answer tokens "
                            "decoded over the full cache (K extra decode steps; CPU only; default 0 = off)"},
      {"kv-query-reduce", "R", "prefix policies and cutoff: how the queries' attention combines: sum (default), "
                               "mean or max"},
      {"kv-profile", "FILE", "PrefixKV profile (default: the model's prefixkv_profile.json)"},
      {"kv-dtype", "TYPE", "CPU engine: the KV cache's storage type, f32 (default), f16 or bf16 (keys and values "
                           "rounded once when written; half the memory; attention computes in float32)"},
  };
  std::vector<OptionSpec> out;
  for (const std::string& n : names) {
    auto it = std::find_if(all.begin(), all.end(), [&](const OptionSpec& s) { return s.name == n; });
    PKV_ASSERT(it != all.end());
    out.push_back(*it);
  }
  return out;
}

PolicyOptions policy_options_from_args(const Args& args) {
  PolicyOptions o;
  o.budget = args.number("kv-budget", 0.2);
  if (!(o.budget > 0 && o.budget <= 1)) fail("--kv-budget", "must be in (0, 1], got " + args.str("kv-budget"));
  if (args.has("kv-budget-tokens")) {
    o.budget_tokens = args.integer("kv-budget-tokens", 0);
    if (o.budget_tokens < 1) fail("--kv-budget-tokens", "must be at least 1");
    if (args.has("kv-budget")) fail("--kv-budget-tokens", "give either --kv-budget or --kv-budget-tokens, not both");
  }
  o.estimator = estimator_from_name(args.str("kv-importance", "window"));
  if (o.estimator == Estimator::Answer) refuse_answer_estimator();  // no reference answer here
  o.window = args.integer("kv-window", 32);
  if (o.window < 1) fail("--kv-window", "must be at least 1");
  o.protected_count = args.integer("kv-protected", 2);
  if (o.protected_count < 0) fail("--kv-protected", "must not be negative");
  o.prefix_pool = args.integer("kv-prefix-pool", PolicyOptions{}.prefix_pool);
  if (o.prefix_pool < 0) fail("--kv-prefix-pool", "must not be negative");
  o.head_floor = args.number("kv-head-floor", PolicyOptions{}.head_floor);
  if (!(o.head_floor >= 0 && o.head_floor <= 1)) fail("--kv-head-floor", "must be in [0, 1], got " + args.str("kv-head-floor"));
  o.value_weight = value_weight_from_name(args.str("kv-value-weight", "none"), "--kv-value-weight");
  o.layer_floor = args.number("kv-layer-floor", 0.0);
  if (!(o.layer_floor >= 0 && o.layer_floor <= 1)) fail("--kv-layer-floor", "must be in [0, 1], got " + args.str("kv-layer-floor"));
  o.layer_evict_cap = args.number("kv-layer-cap", 0.0);
  if (!(o.layer_evict_cap == 0 || (o.layer_evict_cap >= 1 && std::isfinite(o.layer_evict_cap))))
    fail("--kv-layer-cap", "must be 0 (off) or a multiple >= 1 of the uniform eviction, got " + args.str("kv-layer-cap"));
  o.grid_pool = args.integer("kv-grid-pool", 0);
  if (o.grid_pool < 0) fail("--kv-grid-pool", "must not be negative");
  o.lookahead = args.integer("kv-lookahead", 0);
  if (o.lookahead < 0) fail("--kv-lookahead", "must not be negative");
  o.query_reduce = query_reduce_from_name(args.str("kv-query-reduce", "sum"), "--kv-query-reduce");
  const std::string rule = args.str("kv-decode", "proportional");
  if (rule == "proportional") o.decode_rule = DecodeRule::Proportional;
  else if (rule == "cap") o.decode_rule = DecodeRule::FixedCap;
  else fail("--kv-decode", "must be proportional or cap, got '" + rule + "'");
  return o;
}

std::unique_ptr<KVPolicy> make_policy_for_model(const std::string& name, PolicyOptions opt, const Args& args,
                                                const Model& model) {
  return pkv::make_policy_for_model(name, std::move(opt), args.str("kv-profile", ""), model);
}

}  // namespace pkv::cli
