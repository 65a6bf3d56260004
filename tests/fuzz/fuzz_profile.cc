// libFuzzer target: the PrefixKV profile JSON (docs/FORMATS.md "KV profiles"), through the
// in-memory entry point Profile::parse. An accepted profile must also give keep fractions for any
// budget, print its table, and survive to_json() -> parse() unchanged. Documented errors: pkv::Error.
#include <cmath>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "kv/profile.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  pkv::Profile p;
  if (!pkv::fuzz::expect_only<pkv::Error>([&] { p = pkv::Profile::parse(text, "fuzz"); })) return 0;

  // Accepted: the rest must work (or fail only with pkv::Error where the header documents it).
  const std::string js = p.to_json();
  pkv::Profile again;
  if (!pkv::fuzz::expect_only<pkv::Error>([&] { again = pkv::Profile::parse(js, "fuzz-roundtrip"); }))
    pkv::fuzz::finding("a profile that parse() accepted does not parse back from to_json()");
  if (again.to_json() != js) pkv::fuzz::finding("to_json() -> parse() -> to_json() changed the profile");
  (void)p.table();
  for (double b : {1e-6, 0.05, 0.2, 0.5, 0.999, 1.0}) {
    for (double lo : {0.0, 0.01}) {
      if (lo > b) continue;
      pkv::fuzz::expect_only<pkv::Error>([&] {
        const std::vector<double> k = p.keep_fractions(b, lo);
        if (int(k.size()) != p.n_layers()) pkv::fuzz::finding("keep_fractions has the wrong length");
        double s = 0;
        for (double x : k) {
          if (!(std::isfinite(x) && x >= lo - 1e-9 && x <= 1 + 1e-9))
            pkv::fuzz::finding("keep_fractions gave a value outside [min_fraction, 1]: " + std::to_string(x));
          s += x;
        }
        if (std::fabs(s / double(k.size()) - b) > 1e-6)
          pkv::fuzz::finding("keep_fractions' mean " + std::to_string(s / double(k.size())) + " is not the budget " +
                             std::to_string(b));
      });
    }
  }
  for (const auto& e : p.budgets)
    if (p.find(e.budget) != &e) pkv::fuzz::finding("find() does not return a stored budget");
  if (!pkv::fuzz::expect_only<pkv::Error>(
          [&] { p.check_compatible({p.model.name, p.model.fingerprint, p.model.n_layers}); }))
    pkv::fuzz::finding("a profile is not compatible with its own model identity");
  return 0;
}
