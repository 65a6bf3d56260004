// The one list of policies. Adding a policy: one file in policies/ and one line here.
#include <cmath>
#include <functional>
#include <map>

#include "core/error.h"
#include "kv/policy.h"

namespace pkv {

std::unique_ptr<KVPolicy> make_streaming_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_h2o_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_snapkv_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_pyramidkv_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_elastic_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_uniform_prefix_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_prefixkv_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_prefixkv_online_policy(const PolicyOptions&);

namespace {
using Factory = std::function<std::unique_ptr<KVPolicy>(const PolicyOptions&)>;
const std::vector<std::pair<std::string, Factory>>& registry() {
  static const std::vector<std::pair<std::string, Factory>> r = {
      {"full", [](const PolicyOptions&) { return std::make_unique<FullPolicy>(); }},
      {"streaming", make_streaming_policy},
      {"h2o", make_h2o_policy},
      {"snapkv", make_snapkv_policy},
      {"pyramidkv", make_pyramidkv_policy},
      {"elastic", make_elastic_policy},
      {"uniform-prefix", make_uniform_prefix_policy},
      {"prefixkv", make_prefixkv_policy},
      {"prefixkv-online", make_prefixkv_online_policy},
  };
  return r;
}
}  // namespace

const std::vector<std::string>& policy_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (auto& [name, f] : registry()) n.push_back(name);
    return n;
  }();
  return names;
}

const char* estimator_name(Estimator e) {
  switch (e) {
    case Estimator::Paper: return "paper";
    case Estimator::Window: return "window";
    case Estimator::Normalized: return "normalized";
  }
  return "?";
}

Estimator estimator_from_name(const std::string& s) {
  if (s == "paper") return Estimator::Paper;
  if (s == "window") return Estimator::Window;
  if (s == "normalized") return Estimator::Normalized;
  fail("--kv-importance", "unknown estimator '" + s + "' (paper, window, normalized)");
}

std::unique_ptr<KVPolicy> make_policy(const std::string& name, const PolicyOptions& opt) {
  if (!(opt.budget > 0 && opt.budget <= 1) || std::isnan(opt.budget))
    fail("--kv-budget", "must be in (0, 1], got " + std::to_string(opt.budget));
  if (opt.budget_tokens < 0) fail("--kv-budget-tokens", "must be positive");
  if (opt.window < 1) fail("--kv-window", "must be at least 1");
  if (opt.protected_count < 0) fail("--kv-protected", "must not be negative");
  for (auto& [n, f] : registry())
    if (n == name) return f(opt);
  std::string all;
  for (auto& n : policy_names()) all += (all.empty() ? "" : ", ") + n;
  fail("--kv-policy", "unknown policy '" + name + "' (available: " + all + ")");
}

}  // namespace pkv
