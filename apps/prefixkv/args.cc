#include "args.h"

#include <cstdint>
#include <sstream>

#include "core/error.h"

namespace pkv::cli {

Args::Args(const std::string& command, const std::vector<OptionSpec>& specs, int argc, char** argv, int first)
    : command_(command) {
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      help_ = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) fail(command + " " + a, "unexpected argument (options start with --; see --help)");
    std::string name = a.substr(2), value;
    bool inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    const OptionSpec* spec = nullptr;
    for (auto& s : specs)
      if (s.name == name) spec = &s;
    if (!spec) fail("--" + name, "unknown option for '" + command + "' (see prefixkv " + command + " --help)");
    if (spec->value_name.empty()) {
      if (inline_value) fail("--" + name, "is a flag and takes no value");
      value = "1";
    } else if (!inline_value) {
      if (i + 1 >= argc) fail("--" + name, "needs a value (" + spec->value_name + ")");
      value = argv[++i];
    }
    std::vector<std::string> more;
    while (spec->multi && i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) more.push_back(argv[++i]);
    if (values_.count(name) && !spec->repeatable && !spec->multi) fail("--" + name, "given more than once");
    values_[name].push_back(value);
    for (auto& m : more) values_[name].push_back(m);
  }
}

std::string Args::str(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second.back();
}

std::vector<std::string> Args::all(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

int Args::integer(const std::string& name, int def) const {
  if (!has(name)) return def;
  const std::string v = str(name);
  try {
    size_t used = 0;
    long long x = std::stoll(v, &used);
    if (used != v.size() || x < INT32_MIN || x > INT32_MAX) throw std::invalid_argument(v);
    return int(x);
  } catch (const std::exception&) {
    fail("--" + name, "expects an integer, got '" + v + "'");
  }
}

double Args::number(const std::string& name, double def) const {
  if (!has(name)) return def;
  const std::string v = str(name);
  try {
    size_t used = 0;
    double x = std::stod(v, &used);
    if (used != v.size()) throw std::invalid_argument(v);
    return x;
  } catch (const std::exception&) {
    fail("--" + name, "expects a number, got '" + v + "'");
  }
}

std::string Args::usage(const std::string& command, const std::string& summary, const std::vector<OptionSpec>& specs) {
  std::ostringstream o;
  o << "usage: prefixkv " << command << " [options]\n\n" << summary << "\n\noptions:\n";
  for (auto& s : specs) {
    std::string left = "  --" + s.name + (s.value_name.empty() ? "" : " " + s.value_name);
    o << left;
    if (left.size() < 28) o << std::string(28 - left.size(), ' ');
    else o << "\n" << std::string(28, ' ');
    o << s.help << (s.multi ? " (one or more)" : s.repeatable ? " (repeatable)" : "") << "\n";
  }
  o << "  --help                    show this help\n";
  return o.str();
}

}  // namespace pkv::cli
