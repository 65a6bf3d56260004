// Command-line option parsing shared by the subcommands: --name VALUE, --name=VALUE, flags.
#pragma once
#include <map>
#include <string>
#include <vector>

namespace pkv::cli {

struct OptionSpec {
  std::string name;  // without dashes
  std::string value_name;  // empty for flags
  std::string help;
  bool repeatable = false;
  bool multi = false;  // takes every following argument up to the next --option
};

// a followed by b (a command's own options, then shared ones).
inline std::vector<OptionSpec> with_options(std::vector<OptionSpec> a, const std::vector<OptionSpec>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

class Args {
 public:
  // Throws Error for unknown options or missing values.
  Args(const std::string& command, const std::vector<OptionSpec>& specs, int argc, char** argv, int first);

  bool has(const std::string& name) const { return values_.count(name) > 0; }
  bool flag(const std::string& name) const { return has(name); }
  std::string str(const std::string& name, const std::string& def = "") const;
  std::vector<std::string> all(const std::string& name) const;
  int integer(const std::string& name, int def) const;
  double number(const std::string& name, double def) const;
  bool help() const { return help_; }

  static std::string usage(const std::string& command, const std::string& summary, const std::vector<OptionSpec>& specs);

 private:
  std::string command_;
  std::map<std::string, std::vector<std::string>> values_;
  bool help_ = false;
};

}  // namespace pkv::cli
