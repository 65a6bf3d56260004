// The --kv-* options shared by run, eval and serve.
#pragma once
#include <memory>
#include <string>

#include "args.h"
#include "kv/policy.h"
#include "kv/profile.h"
#include "model/identity.h"
#include "model/model.h"

namespace pkv::cli {

// The --kv-* option specs by name (one help text for every command that takes them), in the order
// given; asserts on an unknown name.
std::vector<OptionSpec> kv_option_specs(const std::vector<std::string>& names);
// Reads --kv-budget, --kv-budget-tokens, --kv-importance, --kv-window, --kv-protected,
// --kv-prefix-pool, --kv-decode (those a command does not take keep their defaults).
PolicyOptions policy_options_from_args(const Args& args);
// Keep fractions for `budget` from a profile file, after checking it against the model.
std::vector<double> load_keep_fractions(const std::string& path, double budget, const Model& model);
// Makes the policy; for prefixkv, loads the profile (--kv-profile, else the model's
// prefixkv_profile.json), checks it against the model and resolves the keep fractions.
std::unique_ptr<KVPolicy> make_policy_for_model(const std::string& name, PolicyOptions opt, const Args& args,
                                                const Model& model);

}  // namespace pkv::cli
