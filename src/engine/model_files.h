// What sits in or beside a model's files, for every front end (the prefixkv program, the Python
// module): the model with its tokenizer from a checkpoint folder or a GGUF file, and the PrefixKV
// profile a policy that needs one reads (by default prefixkv_profile.json in the model's folder).
#pragma once
#include <memory>
#include <string>

#include "kv/policy.h"
#include "kv/profile.h"
#include "model/model.h"
#include "text/tokenizer.h"

namespace pkv {

struct LoadedModel {
  std::string dir;  // the path it was loaded from
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
};
// The model at `path` (a checkpoint folder, or a GGUF file with opt.mmproj for its vision tower) and
// its tokenizer: a GGUF file carries its own, a folder holds tokenizer.model beside the weights.
LoadedModel load_model(const std::string& path, const LoadOptions& opt = {});

// Where a model's PrefixKV profile is looked for when none is given.
std::string default_profile_path(const Model& model);
// Reads a profile and checks that it was made for this model.
Profile load_profile_for_model(const std::string& path, const Model& model);
// Makes the policy `name`; one that needs a profile (prefixkv) gets the keep fractions for
// opt.budget from `profile_path`, else from the model's default profile (missing: an Error that
// says how to make one).
std::unique_ptr<KVPolicy> make_policy_for_model(const std::string& name, PolicyOptions opt,
                                                const std::string& profile_path, const Model& model);
// The same with a profile already in memory (checked against the model).
std::unique_ptr<KVPolicy> make_policy_for_model(const std::string& name, PolicyOptions opt, const Profile& profile,
                                                const Model& model);

}  // namespace pkv
