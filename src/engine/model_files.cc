#include "engine/model_files.h"

#include <filesystem>

#include "core/error.h"
#include "model/gguf_load.h"
#include "model/identity.h"

namespace fs = std::filesystem;

namespace pkv {

LoadedModel load_model(const std::string& path, const LoadOptions& opt) {
  LoadedModel m;
  m.dir = path;
  m.model = Model::load(path, opt);
  m.tok = is_gguf_path(path) ? gguf_tokenizer(path)
                             : std::make_unique<Tokenizer>((fs::path(path) / "tokenizer.model").string());
  return m;
}

std::string default_profile_path(const Model& model) {
  return (fs::path(model.config().dir) / "prefixkv_profile.json").string();
}

Profile load_profile_for_model(const std::string& path, const Model& model) {
  Profile p = Profile::load(path);
  p.check_compatible(model_identity(model));
  return p;
}

std::unique_ptr<KVPolicy> make_policy_for_model(const std::string& name, PolicyOptions opt, const Profile& profile,
                                                const Model& model) {
  if (policy_info(name).needs_profile) {
    profile.check_compatible(model_identity(model));
    opt.keep_fractions = profile.keep_fractions(opt.budget);
    opt.head_keep_fractions = profile.head_keep_fractions(opt.budget);
  }
  return make_policy(name, opt);
}

std::unique_ptr<KVPolicy> make_policy_for_model(const std::string& name, PolicyOptions opt,
                                                const std::string& profile_path, const Model& model) {
  if (!policy_info(name).needs_profile) return make_policy(name, opt);
  std::string path = profile_path;
  if (path.empty()) {
    path = default_profile_path(model);
    if (!fs::exists(path))
      fail("--kv-policy " + name, "needs a profile: none at " + path +
                                      "; make one with 'prefixkv calibrate' and pass it with --kv-profile");
  }
  return make_policy_for_model(name, opt, load_profile_for_model(path, model), model);
}

}  // namespace pkv
