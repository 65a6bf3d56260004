#include "kv/profile.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/file.h"
#include "core/error.h"
#include "kv/cutoff.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace pkv {

namespace {

constexpr double kMeanTolerance = 1e-6;  // |mean(keep) - budget| allowed in calibrated profiles
constexpr double kBudgetMatch = 1e-9;    // two budgets closer than this are the same budget

const char* type_name(const json& j) { return j.type_name(); }

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / double(v.size());
}

std::string fmt(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.10g", v);
  return buf;
}

// ---- reading: typed access with errors "<file>: <field>: <what>" ----

struct Reader {
  std::string file;

  [[noreturn]] void bad(const std::string& field, const std::string& what) const {
    fail(field.empty() ? file : file + ": " + field, what);
  }
  static std::string sub(const std::string& parent, const std::string& key) {
    return parent.empty() ? key : parent + "." + key;
  }
  const json& need(const json& obj, const std::string& parent, const char* key) const {
    if (!obj.contains(key) || obj[key].is_null()) bad(sub(parent, key), "missing required field");
    return obj[key];
  }
  const json& object(const json& obj, const std::string& parent, const char* key) const {
    const json& v = need(obj, parent, key);
    if (!v.is_object()) bad(sub(parent, key), std::string("must be an object (got ") + type_name(v) + ")");
    return v;
  }
  std::string str(const json& obj, const std::string& parent, const char* key) const {
    const json& v = need(obj, parent, key);
    if (!v.is_string()) bad(sub(parent, key), std::string("must be a string (got ") + type_name(v) + ")");
    return v.get<std::string>();
  }
  std::string opt_str(const json& obj, const std::string& parent, const char* key) const {
    if (!obj.contains(key) || obj[key].is_null()) return "";
    return str(obj, parent, key);
  }
  int integer(const json& obj, const std::string& parent, const char* key) const {
    const json& v = need(obj, parent, key);
    if (!v.is_number_integer()) bad(sub(parent, key), std::string("must be an integer (got ") + v.dump() + ")");
    const auto i = v.get<long long>();
    if (i < -(1LL << 30) || i > (1LL << 30)) bad(sub(parent, key), "integer out of range: " + v.dump());
    return int(i);
  }
  double number(const json& obj, const std::string& parent, const char* key) const {
    const json& v = need(obj, parent, key);
    if (!v.is_number()) bad(sub(parent, key), std::string("must be a number (got ") + v.dump() + ")");
    return v.get<double>();
  }
  std::vector<double> numbers(const json& v, const std::string& field) const {
    if (!v.is_array()) bad(field, std::string("must be an array of numbers (got ") + type_name(v) + ")");
    std::vector<double> out;
    out.reserve(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      if (!v[i].is_number()) bad(field + "[" + std::to_string(i) + "]", "must be a number (got " + v[i].dump() + ")");
      out.push_back(v[i].get<double>());
    }
    return out;
  }
  std::vector<double> opt_numbers(const json& obj, const std::string& parent, const char* key) const {
    if (!obj.contains(key) || obj[key].is_null()) return {};
    return numbers(obj[key], sub(parent, key));
  }
};

json read_json_file(const std::string& path) {
  const std::string text = read_file(path, "profile file");
  try {
    return json::parse(text);
  } catch (const std::exception& e) {
    fail(path, std::string("not valid JSON: ") + e.what());
  }
}

// ---- writing: indented JSON with arrays of scalars on one line ----

bool is_flat(const json& j) {
  for (const auto& e : j)
    if (e.is_structured()) return false;
  return true;
}

void write_pretty(std::string& out, const json& j, int indent) {
  const std::string pad(size_t(indent) * 2, ' '), pad_in(size_t(indent + 1) * 2, ' ');
  if (j.is_object()) {
    if (j.empty()) {
      out += "{}";
      return;
    }
    out += "{\n";
    size_t i = 0;
    for (auto it = j.begin(); it != j.end(); ++it, ++i) {
      out += pad_in + json(it.key()).dump() + ": ";
      write_pretty(out, it.value(), indent + 1);
      out += (i + 1 < j.size()) ? ",\n" : "\n";
    }
    out += pad + "}";
  } else if (j.is_array()) {
    if (is_flat(j)) {
      out += "[";
      for (size_t i = 0; i < j.size(); ++i) out += (i ? ", " : "") + j[i].dump();
      out += "]";
      return;
    }
    out += "[\n";
    for (size_t i = 0; i < j.size(); ++i) {
      out += pad_in;
      write_pretty(out, j[i], indent + 1);
      out += (i + 1 < j.size()) ? ",\n" : "\n";
    }
    out += pad + "]";
  } else {
    out += j.dump();
  }
}

std::string identity_text(const ModelIdentity& m) {
  std::string s = "'" + m.name + "' (";
  s += m.fingerprint.empty() ? std::string("no fingerprint") : "fingerprint " + m.fingerprint;
  s += ", " + std::to_string(m.n_layers) + " layers)";
  return s;
}

}  // namespace

// ------------------------------------------------------------------------------------------------

Profile Profile::load(const std::string& path) {
  Profile p = parse(read_file(path, "profile"), path);
  p.path = path;
  return p;
}

Profile Profile::parse(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    fail(where, std::string("not valid JSON: ") + e.what());
  }
  const Reader r{where};
  if (!j.is_object()) r.bad("", std::string("a profile must be a JSON object (got ") + type_name(j) + ")");

  const std::string format = r.str(j, "", "format");
  if (format != kFormat)
    r.bad("format", "'" + format + "' is not a prefixkv profile (expected '" + kFormat + "')");
  const int version = r.integer(j, "", "version");
  if (version != kVersion)
    r.bad("version", "unsupported version " + std::to_string(version) + " (this build reads version " +
                         std::to_string(kVersion) + ")");

  Profile p;
  p.path = where;
  const json& model = r.object(j, "", "model");
  p.model.name = r.str(model, "model", "name");
  p.model.fingerprint = r.opt_str(model, "model", "fingerprint");
  p.model.n_layers = r.integer(model, "model", "n_layers");

  const json& imp = r.object(j, "", "importance");
  p.estimator = r.str(imp, "importance", "estimator");
  p.window = (imp.contains("window") && !imp["window"].is_null()) ? r.integer(imp, "importance", "window") : 0;
  p.protected_tokens = r.integer(j, "", "protected_tokens");
  p.allocation = imp.contains("allocation") ? r.str(imp, "importance", "allocation") : "prompt";
  p.layer_rule = imp.contains("layer_rule") ? r.str(imp, "importance", "layer_rule") : "prefix";

  const json& src = r.object(j, "", "source");
  p.source = r.str(src, "source", "kind");
  if (p.source == "calibrated") {
    p.samples = r.integer(src, "source", "samples");
    p.data = r.str(src, "source", "data");
    p.date = r.str(src, "source", "date");
    if (src.contains("sample_ids") && !src["sample_ids"].is_null()) {
      const json& ids = src["sample_ids"];
      if (!ids.is_array()) r.bad("source.sample_ids", "must be an array of strings");
      for (size_t i = 0; i < ids.size(); ++i) {
        if (ids[i].is_string()) p.sample_ids.push_back(ids[i].get<std::string>());
        else if (ids[i].is_number_integer()) p.sample_ids.push_back(std::to_string(ids[i].get<long long>()));
        else r.bad("source.sample_ids[" + std::to_string(i) + "]", "must be a string (got " + ids[i].dump() + ")");
      }
    }
  } else if (p.source == "imported") {
    const json& files = r.need(src, "source", "files");
    if (!files.is_array()) r.bad("source.files", "must be an array of objects");
    for (size_t i = 0; i < files.size(); ++i) {
      const std::string fld = "source.files[" + std::to_string(i) + "]";
      if (!files[i].is_object()) r.bad(fld, "must be an object");
      ImportedFile f;
      f.file = r.str(files[i], fld, "file");
      f.evicted = r.number(files[i], fld, "evicted");
      f.mean_evicted = r.number(files[i], fld, "mean_evicted");
      p.imported.push_back(f);
    }
  } else {
    r.bad("source.kind", "'" + p.source + "' is not 'calibrated' or 'imported'");
  }

  const json& budgets = r.need(j, "", "budgets");
  if (!budgets.is_array()) r.bad("budgets", std::string("must be an array (got ") + type_name(budgets) + ")");
  for (size_t i = 0; i < budgets.size(); ++i) {
    const std::string fld = "budgets[" + std::to_string(i) + "]";
    if (!budgets[i].is_object()) r.bad(fld, "must be an object with 'budget' and 'keep'");
    ProfileBudget b;
    b.budget = r.number(budgets[i], fld, "budget");
    b.keep = r.numbers(r.need(budgets[i], fld, "keep"), fld + ".keep");
    b.keep_std = r.opt_numbers(budgets[i], fld, "keep_std");
    b.keep_min = r.opt_numbers(budgets[i], fld, "keep_min");
    b.keep_max = r.opt_numbers(budgets[i], fld, "keep_max");
    if (budgets[i].contains("head_keep") && !budgets[i]["head_keep"].is_null()) {
      const json& t = budgets[i]["head_keep"];
      if (!t.is_array()) r.bad(fld + ".head_keep", std::string("must be an array of per-layer arrays (got ") + type_name(t) + ")");
      for (size_t l = 0; l < t.size(); ++l) b.head_keep.push_back(r.numbers(t[l], fld + ".head_keep[" + std::to_string(l) + "]"));
    }
    p.budgets.push_back(std::move(b));
  }
  p.validate(where);
  return p;
}

void Profile::validate(const std::string& where) const {
  const Reader r{where.empty() ? std::string("profile") : where};
  if (model.name.empty()) r.bad("model.name", "must not be empty");
  if (model.n_layers < 1) r.bad("model.n_layers", "must be at least 1 (got " + std::to_string(model.n_layers) + ")");
  if (estimator != "paper" && estimator != "window" && estimator != "normalized")
    r.bad("importance.estimator", "'" + estimator + "' is not one of paper, window, normalized");
  if (allocation != "prompt" && allocation != "answer")
    r.bad("importance.allocation", "'" + allocation + "' is not one of prompt, answer");
  if (layer_rule != "prefix") {
    if (policy_base_name(layer_rule) != "cutoff") r.bad("importance.layer_rule", "'" + layer_rule + "' is not prefix or cutoff[:OPTION]...");
    PolicyOptions o;
    try {
      apply_policy_spec(layer_rule, o, "layer_rule");
    } catch (const Error& e) {
      r.bad("importance.layer_rule", e.what());
    }
  }
  if (window < 0) r.bad("importance.window", "must be >= 0 (got " + std::to_string(window) + ")");
  if (estimator == "window" && window < 1) r.bad("importance.window", "the window estimator needs a window of at least 1 query");
  if (protected_tokens < 0) r.bad("protected_tokens", "must be >= 0 (got " + std::to_string(protected_tokens) + ")");
  if (source == "calibrated") {
    if (samples < 1) r.bad("source.samples", "must be at least 1 (got " + std::to_string(samples) + ")");
    if (!sample_ids.empty() && int(sample_ids.size()) != samples)
      r.bad("source.sample_ids", "has " + std::to_string(sample_ids.size()) + " ids but source.samples is " +
                                    std::to_string(samples));
  } else if (source == "imported") {
    if (imported.empty()) r.bad("source.files", "an imported profile must list the files it was made from");
    for (size_t i = 0; i < imported.size(); ++i)
      if (imported[i].file.empty()) r.bad("source.files[" + std::to_string(i) + "].file", "must not be empty");
  } else {
    r.bad("source.kind", "'" + source + "' is not 'calibrated' or 'imported'");
  }
  if (budgets.empty()) r.bad("budgets", "no budgets (at least one is needed)");
  const size_t L = size_t(model.n_layers);
  for (size_t i = 0; i < budgets.size(); ++i) {
    const ProfileBudget& b = budgets[i];
    const std::string fld = "budgets[" + std::to_string(i) + "]";
    if (!(b.budget > 0 && b.budget <= 1)) r.bad(fld + ".budget", "must be in (0, 1] (got " + fmt(b.budget) + ")");
    if (i > 0 && !(b.budget > budgets[i - 1].budget + kBudgetMatch))
      r.bad(fld + ".budget", fmt(b.budget) + " is not above the previous budget " + fmt(budgets[i - 1].budget) +
                                 " (budgets must be distinct and ascending)");
    auto check_list = [&](const std::vector<double>& v, const char* name, bool required, double lo, double hi) {
      if (v.empty() && !required) return;
      const std::string f = fld + "." + name;
      if (v.size() != L)
        r.bad(f, "has " + std::to_string(v.size()) + " values, but the profile has " + std::to_string(L) +
                     " layers (model.n_layers)");
      for (size_t l = 0; l < v.size(); ++l)
        if (!(std::isfinite(v[l]) && v[l] >= lo && v[l] <= hi))
          r.bad(f + "[" + std::to_string(l) + "]", fmt(v[l]) + " is outside [" + fmt(lo) + ", " + fmt(hi) + "]");
    };
    check_list(b.keep, "keep", true, 0.0, 1.0);
    check_list(b.keep_std, "keep_std", false, 0.0, 1.0);
    check_list(b.keep_min, "keep_min", false, 0.0, 1.0);
    check_list(b.keep_max, "keep_max", false, 0.0, 1.0);
    if (b.head_keep.empty() != budgets[0].head_keep.empty())
      r.bad(fld + ".head_keep", "every budget or none must have a per-head table (budgets[0] " +
                                    std::string(budgets[0].head_keep.empty() ? "has none" : "has one") + ")");
    if (!b.head_keep.empty()) {
      if (b.head_keep.size() != L)
        r.bad(fld + ".head_keep", "has " + std::to_string(b.head_keep.size()) + " layers, but the profile has " +
                                      std::to_string(L) + " (model.n_layers)");
      const size_t H = budgets[0].head_keep[0].size();
      std::vector<double> all;
      for (size_t l = 0; l < L; ++l) {
        const std::string f = fld + ".head_keep[" + std::to_string(l) + "]";
        if (b.head_keep[l].empty() || b.head_keep[l].size() != H)
          r.bad(f, "has " + std::to_string(b.head_keep[l].size()) + " KV heads, budgets[0].head_keep[0] has " + std::to_string(H));
        for (size_t h = 0; h < H; ++h)
          if (!(std::isfinite(b.head_keep[l][h]) && b.head_keep[l][h] >= 0 && b.head_keep[l][h] <= 1))
            r.bad(f + "[" + std::to_string(h) + "]", fmt(b.head_keep[l][h]) + " is outside [0, 1]");
        all.insert(all.end(), b.head_keep[l].begin(), b.head_keep[l].end());
      }
      if (source == "calibrated" && std::abs(mean_of(all) - b.budget) > kMeanTolerance)
        r.bad(fld + ".head_keep", "mean over layers and heads is " + fmt(mean_of(all)) + ", not the budget " +
                                      fmt(b.budget) + " (calibrated profiles must match within 1e-6)");
    }
    if (source == "calibrated") {
      const double m = mean_of(b.keep);
      if (std::abs(m - b.budget) > kMeanTolerance)
        r.bad(fld + ".keep", "mean over layers is " + fmt(m) + ", not the budget " + fmt(b.budget) +
                                 " (calibrated profiles must match within 1e-6)");
    }
  }
}

std::string Profile::to_json() const {
  json j = json::object();
  j["format"] = kFormat;
  j["version"] = kVersion;
  j["model"] = {{"name", model.name}, {"fingerprint", model.fingerprint}, {"n_layers", model.n_layers}};
  j["importance"] = {{"estimator", estimator}, {"window", window}, {"allocation", allocation}};
  if (layer_rule != "prefix") j["importance"]["layer_rule"] = layer_rule;
  j["protected_tokens"] = protected_tokens;
  json src = json::object();
  src["kind"] = source;
  if (source == "imported") {
    json files = json::array();
    for (const auto& f : imported)
      files.push_back({{"file", f.file}, {"evicted", f.evicted}, {"mean_evicted", f.mean_evicted}});
    src["files"] = files;
  } else {
    src["samples"] = samples;
    src["data"] = data;
    src["date"] = date;
    if (!sample_ids.empty()) src["sample_ids"] = sample_ids;
  }
  j["source"] = src;
  json bs = json::array();
  for (const auto& b : budgets) {
    json e = json::object();
    e["budget"] = b.budget;
    e["keep"] = b.keep;
    if (!b.keep_std.empty()) e["keep_std"] = b.keep_std;
    if (!b.keep_min.empty()) e["keep_min"] = b.keep_min;
    if (!b.keep_max.empty()) e["keep_max"] = b.keep_max;
    if (!b.head_keep.empty()) e["head_keep"] = b.head_keep;
    bs.push_back(e);
  }
  j["budgets"] = bs;
  // nlohmann::json orders object keys alphabetically; write them in the documented order instead.
  static const char* order[] = {"format", "version", "model", "importance", "protected_tokens", "source", "budgets"};
  std::string out = "{\n";
  for (size_t i = 0; i < std::size(order); ++i) {
    out += "  " + json(order[i]).dump() + ": ";
    write_pretty(out, j[order[i]], 1);
    out += (i + 1 < std::size(order)) ? ",\n" : "\n";
  }
  out += "}\n";
  return out;
}

void Profile::save(const std::string& out_path) const {
  validate(out_path);
  const std::string text = to_json();
  const std::string tmp = out_path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail(out_path, "cannot write profile (cannot create " + tmp + ")");
    f << text;
    f.close();
    if (!f) fail(out_path, "cannot write profile (write to " + tmp + " failed)");
  }
  std::error_code ec;
  fs::rename(tmp, out_path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail(out_path, "cannot write profile (rename failed)");
  }
}

const ProfileBudget* Profile::find(double budget) const {
  for (const auto& b : budgets)
    if (std::abs(b.budget - budget) <= kBudgetMatch) return &b;
  return nullptr;
}

void Profile::set_budget(ProfileBudget entry) {
  for (auto& b : budgets)
    if (std::abs(b.budget - entry.budget) <= kBudgetMatch) {
      b = std::move(entry);
      return;
    }
  auto it = std::lower_bound(budgets.begin(), budgets.end(), entry.budget,
                             [](const ProfileBudget& b, double v) { return b.budget < v; });
  budgets.insert(it, std::move(entry));
}

namespace {
// Profile::keep_fractions' rules on any per-unit list of a budget (`units` of them: its layers, or its
// (layer, head) pairs flattened).
std::vector<double> fractions_for(const Profile& p, double budget, double min_fraction, size_t units,
                                  const std::function<std::vector<double>(const ProfileBudget&)>& of) {
  const std::string where = p.path.empty() ? std::string("profile") : p.path;
  if (!(budget > 0 && budget <= 1)) fail(where, "budget " + fmt(budget) + " is outside (0, 1]");
  if (!(min_fraction >= 0 && min_fraction <= budget))
    fail(where, "minimum keep fraction " + fmt(min_fraction) + " is outside [0, budget " + fmt(budget) + "]");
  if (p.budgets.empty()) fail(where, "profile has no budgets");
  for (const auto& b : p.budgets)
    if (of(b).size() != units) fail(where, "budget " + fmt(b.budget) + " has " + std::to_string(of(b).size()) +
                                               " keep fractions for " + std::to_string(units) + (units == size_t(p.model.n_layers) ? " layers" : " (layer, head) units"));

  std::vector<double> k;
  if (const ProfileBudget* exact = p.find(budget)) {
    k = of(*exact);
  } else {
    const ProfileBudget* lower = nullptr;
    const ProfileBudget* upper = nullptr;
    for (const auto& b : p.budgets) {
      if (b.budget < budget) lower = &b;
      else if (!upper && b.budget > budget) upper = &b;
    }
    if (!lower) {
      k = of(*upper);  // below the smallest budget: its shape, rescaled below
    } else {
      const std::vector<double> lo = of(*lower), hi = upper ? of(*upper) : std::vector<double>(units, 1.0);  // budget 1.0 keeps everything
      const double b_hi = upper ? upper->budget : 1.0;
      const double t = (budget - lower->budget) / (b_hi - lower->budget);
      k.resize(units);
      for (size_t u = 0; u < units; ++u) k[u] = (1 - t) * lo[u] + t * hi[u];
    }
  }
  rescale_to_mean(k, budget, min_fraction, 1.0);
  return k;
}
}  // namespace

std::vector<double> Profile::keep_fractions(double budget, double min_fraction) const {
  return fractions_for(*this, budget, min_fraction, size_t(model.n_layers), [](const ProfileBudget& b) { return b.keep; });
}

std::vector<std::vector<double>> Profile::head_keep_fractions(double budget, double min_fraction) const {
  if (!has_head_table()) return {};
  const size_t L = size_t(model.n_layers), H = budgets[0].head_keep[0].size();
  const std::vector<double> k = fractions_for(*this, budget, min_fraction, L * H, [&](const ProfileBudget& b) {
    std::vector<double> flat;
    for (const auto& l : b.head_keep) flat.insert(flat.end(), l.begin(), l.end());
    return flat;
  });
  std::vector<std::vector<double>> t(L);
  for (size_t l = 0; l < L; ++l) t[l].assign(k.begin() + ptrdiff_t(l * H), k.begin() + ptrdiff_t((l + 1) * H));
  return t;
}

void Profile::check_compatible(const ModelIdentity& m) const {
  const std::string where = path.empty() ? std::string("profile") : path;
  const std::string both =
      "the profile is for " + identity_text(model) + ", but the model is " + identity_text(m);
  if (m.n_layers != model.n_layers) fail(where, "layer count differs: " + both);
  if (model.fingerprint.empty()) return;
  if (!m.fingerprint.empty()) {
    if (m.fingerprint != model.fingerprint) fail(where, "model fingerprint differs: " + both);
  } else if (m.name != model.name) {
    fail(where, "model name differs: " + both);
  }
}

std::string Profile::table() const {
  std::string out;
  char buf[64];
  out += "layer";
  for (const auto& b : budgets) {
    std::snprintf(buf, sizeof buf, "  b=%-5.3g", b.budget);
    out += buf;
  }
  out += "\n";
  for (int l = 0; l < model.n_layers; ++l) {
    std::snprintf(buf, sizeof buf, "%5d", l);
    out += buf;
    for (const auto& b : budgets) {
      std::snprintf(buf, sizeof buf, "  %7.3f", size_t(l) < b.keep.size() ? b.keep[size_t(l)] : NAN);
      out += buf;
    }
    out += "\n";
  }
  out += " mean";
  for (const auto& b : budgets) {
    std::snprintf(buf, sizeof buf, "  %7.3f", mean_of(b.keep));
    out += buf;
  }
  out += "\nspread";  // the most kept layer's fraction over the least kept's (issue 13's measure of how layers differ)
  for (const auto& b : budgets) {
    const auto [lo, hi] = std::minmax_element(b.keep.begin(), b.keep.end());
    if (b.keep.empty() || !(*lo > 0)) std::snprintf(buf, sizeof buf, "  %7s", b.keep.empty() ? "-" : "inf");
    else std::snprintf(buf, sizeof buf, " %7.2fx", *hi / *lo);
    out += buf;
  }
  out += "\n";
  return out;
}

// ------------------------------------------------------------------------------------------------

void rescale_to_mean(std::vector<double>& k, double target, double lo, double hi) {
  const char* where = "rescale_to_mean";
  const size_t n = k.size();
  if (n == 0) fail(where, "no values");
  if (!(lo >= 0 && lo <= hi && std::isfinite(hi))) fail(where, "bounds [" + fmt(lo) + ", " + fmt(hi) + "] are invalid");
  if (!(target >= lo - 1e-12 && target <= hi + 1e-12))
    fail(where, "target mean " + fmt(target) + " is outside [" + fmt(lo) + ", " + fmt(hi) + "]");
  target = std::clamp(target, lo, hi);
  for (size_t i = 0; i < n; ++i)
    if (!(std::isfinite(k[i]) && k[i] >= 0)) fail(where, "value " + std::to_string(i) + " is " + fmt(k[i]) + " (must be >= 0)");

  const std::vector<double> x = k;
  const double T = target * double(n);
  auto f = [&](double s) {
    double sum = 0;
    for (double v : x) sum += std::clamp(s * v, lo, hi);
    return sum;
  };
  size_t n_zero = 0;
  for (double v : x) n_zero += (v == 0);
  const double f_inf = double(n_zero) * lo + double(n - n_zero) * hi;

  if (T > f_inf) {
    // Scaling alone cannot reach the target: every positive value goes to hi, the zeros share the rest.
    const double v = n_zero ? std::clamp((T - double(n - n_zero) * hi) / double(n_zero), lo, hi) : hi;
    for (size_t i = 0; i < n; ++i) k[i] = x[i] > 0 ? hi : v;
  } else {
    // f(s) is continuous, nondecreasing and linear between the breakpoints lo/x_i and hi/x_i.
    std::vector<double> bp = {0.0};
    for (double v : x)
      if (v > 0) {
        bp.push_back(lo / v);
        bp.push_back(hi / v);
      }
    std::sort(bp.begin(), bp.end());
    bp.erase(std::unique(bp.begin(), bp.end()), bp.end());
    size_t j = 0;
    while (j < bp.size() && f(bp[j]) < T) ++j;
    double s;
    if (j == 0) {
      s = 0;
    } else if (j == bp.size()) {
      s = bp.back();  // only reachable through rounding: f(last) is f_inf >= T
    } else {
      // The clamped set is constant inside (bp[j-1], bp[j]): solve the linear piece exactly.
      const double mid = 0.5 * (bp[j - 1] + bp[j]);
      double fixed = 0, free_x = 0;
      for (double v : x) {
        const double y = mid * v;
        if (y <= lo) fixed += lo;
        else if (y >= hi) fixed += hi;
        else free_x += v;
      }
      s = free_x > 0 ? std::clamp((T - fixed) / free_x, bp[j - 1], bp[j]) : bp[j];
    }
    for (size_t i = 0; i < n; ++i) k[i] = std::clamp(s * x[i], lo, hi);
  }

  // Spread the floating-point remainder over the values strictly inside (lo, hi).
  for (int pass = 0; pass < 4; ++pass) {
    double sum = 0;
    for (double v : k) sum += v;
    const double rem = T - sum;
    if (rem == 0) break;
    size_t n_free = 0;
    for (double v : k) n_free += (v > lo && v < hi);
    if (n_free == 0) break;
    const double d = rem / double(n_free);
    for (double& v : k)
      if (v > lo && v < hi) v = std::clamp(v + d, lo, hi);
  }
}

// ------------------------------------------------------------------------------------------------

Profile import_official(const std::vector<std::string>& files, int expected_layers) {
  if (files.empty()) fail("--import-official", "no files given");
  Profile p;
  p.estimator = "paper";
  p.window = 0;
  p.protected_tokens = 2;  // the reference code: start_size 1 (first token) + the last prompt token
  p.source = "imported";
  std::string first_file, first_model;
  int n_layers = expected_layers > 0 ? expected_layers : 0;
  std::map<double, std::string> seen;  // budget -> file

  for (const std::string& file : files) {
    const std::string base = fs::path(file).filename().string();
    const std::string prefix = "prefixkv_", suffix = ".json";
    const bool shaped = base.size() > prefix.size() + suffix.size() && base.rfind(prefix, 0) == 0 &&
                        base.compare(base.size() - suffix.size(), suffix.size(), suffix) == 0;
    const std::string stem = shaped ? base.substr(prefix.size(), base.size() - prefix.size() - suffix.size()) : "";
    const size_t us = stem.rfind('_');
    if (!shaped || us == std::string::npos || us == 0 || us + 1 == stem.size())
      fail(file, "name is not prefixkv_<model>_<r>.json (r = evicted fraction)");
    const std::string model = stem.substr(0, us), r_text = stem.substr(us + 1);
    char* end = nullptr;
    const double r = std::strtod(r_text.c_str(), &end);
    if (end != r_text.c_str() + r_text.size() || !(r >= 0 && r < 1))
      fail(file, "cannot parse the evicted fraction r from '" + r_text + "' in the name (need 0 <= r < 1)");
    if (first_model.empty()) {
      first_model = model;
      first_file = file;
    } else if (model != first_model) {
      fail(file, "is for model '" + model + "', but " + first_file + " is for '" + first_model +
                     "': files of different models mixed");
    }

    const json j = read_json_file(file);
    if (!j.is_array())
      fail(file, std::string("not a JSON array of per-layer eviction fractions (got ") + j.type_name() + ")");
    if (j.empty()) fail(file, "empty array (no layers)");
    const int count = int(j.size());
    if (n_layers == 0) {
      n_layers = count;
    } else if (count != n_layers) {
      if (expected_layers > 0)
        fail(file, "has " + std::to_string(count) + " layers, the model has " + std::to_string(expected_layers));
      fail(file, "has " + std::to_string(count) + " layers, but " + first_file + " has " + std::to_string(n_layers) +
                     ": files of different models mixed");
    }
    ProfileBudget b;
    b.budget = std::round((1.0 - r) * 1e9) / 1e9;
    double sum = 0;
    for (size_t l = 0; l < j.size(); ++l) {
      if (!j[l].is_number()) fail(file, "[" + std::to_string(l) + "]: not a number (" + j[l].dump() + ")");
      const double e = j[l].get<double>();
      if (!(e >= 0 && e <= 1))
        fail(file, "[" + std::to_string(l) + "]: eviction fraction " + fmt(e) + " is outside [0, 1]");
      b.keep.push_back(1.0 - e);
      sum += e;
    }
    if (auto it = seen.find(b.budget); it != seen.end())
      fail(file, "evicted fraction " + r_text + " given twice (also " + it->second + ")");
    seen[b.budget] = file;
    p.imported.push_back({base, r, sum / double(count)});
    p.set_budget(std::move(b));
  }
  std::sort(p.imported.begin(), p.imported.end(),
            [](const ImportedFile& a, const ImportedFile& b) { return a.evicted > b.evicted; });
  p.model.name = first_model;
  p.model.fingerprint = "";
  p.model.n_layers = n_layers;
  p.validate(first_file);
  return p;
}

std::vector<double> ramp_keep_fractions(int n_layers, double budget) {
  std::vector<double> k;
  for (int l = 0; l < n_layers; ++l) k.push_back(budget * (0.5 + (n_layers > 1 ? double(l) / (n_layers - 1) : 0.5)));
  return k;
}

}  // namespace pkv
