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
// --kv-prefix-pool, --kv-decode, --kv-head-floor (those a command does not take keep their defaults).
PolicyOptions policy_options_from_args(const Args& args);
// Makes the policy; for prefixkv, with the profile of --kv-profile, else the model's
// prefixkv_profile.json (engine/model_files.h's make_policy_for_model).
std::unique_ptr<KVPolicy> make_policy_for_model(const std::string& name, PolicyOptions opt, const Args& args,
                                                const Model& model);

}  // namespace pkv::cli
