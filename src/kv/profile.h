// The PrefixKV profile (METHOD.md section 3): for one model, per-layer KEEP fractions k_l for each of
// several budgets b (kept fraction over all layers), with mean over layers = b. One JSON file per
// model holds every budget; the format is written down in docs/FORMATS.md ("KV profiles").
#pragma once
#include <string>
#include <vector>

namespace pkv {

// Which model a profile belongs to. `name` is a human-readable identity (e.g. the model directory
// name), `fingerprint` a caller-computed digest of the checkpoint (may be empty: imported profiles
// have none), `n_layers` the decoder layer count.
struct ModelIdentity {
  std::string name;
  std::string fingerprint;
  int n_layers = 0;
};

// One budget of a profile.
struct ProfileBudget {
  double budget = 0;          // kept fraction over all layers, in (0, 1]
  std::vector<double> keep;   // per-layer keep fraction k_l in [0, 1], n_layers values
  // Optional per-layer statistics over the calibration samples (each empty, or n_layers values):
  std::vector<double> keep_std;  // standard deviation of the per-sample k_l
  std::vector<double> keep_min;  // smallest per-sample k_l
  std::vector<double> keep_max;  // largest per-sample k_l
  // Optional per-(layer, KV head) keep fractions k_lh ([n_layers][kv heads]; `prefixkv calibrate
  // --heads`: the retention search over heads, kv/prefix_policy.h), mean over all = budget. Either
  // every budget of a profile has one (with the same head count) or none has.
  std::vector<std::vector<double>> head_keep;
};

// One file an imported profile was made from (`prefixkv_<model>_<r>.json`).
struct ImportedFile {
  std::string file;           // file name as given (no directory)
  double evicted = 0;         // r parsed from the name
  double mean_evicted = 0;    // mean of the array as stored (r minus the authors' truncation)
};

struct Profile {
  static constexpr const char* kFormat = "prefixkv-profile";
  static constexpr int kVersion = 1;

  ModelIdentity model;                   // model.n_layers is the profile's layer count
  std::string estimator = "paper";       // importance estimator: "paper" | "window" | "normalized"
  int window = 0;                        // query window of the "window" estimator (0 otherwise)
  int protected_tokens = 2;              // tokens always kept (first token, last prompt token)
  // Whose attention set the layer budgets: "prompt" (the estimator above, METHOD.md section 3) or
  // "answer" (the calibration answers' own queries, teacher-forced over the full cache). Either
  // way, `estimator` ranks the tokens within a layer at inference.
  std::string allocation = "prompt";
  // How the budgets were allocated across layers: "prefix" (PrefixKV's equal retention, METHOD.md
  // section 2) or a cutoff spec "cutoff[:OPTION]..." (one score threshold across layers on the
  // ranking scores those options make, kv/cutoff.h; `prefixkv calibrate --allocate-by`).
  std::string layer_rule = "prefix";

  std::string source = "calibrated";     // how it was made: "calibrated" | "imported"
  // source == "calibrated":
  int samples = 0;                       // calibration samples used
  std::string data;                      // calibration data file
  std::string date;                      // when (ISO 8601, as given by the caller)
  std::vector<std::string> sample_ids;   // optional: ids of the samples used
  // source == "imported":
  std::vector<ImportedFile> imported;

  std::vector<ProfileBudget> budgets;    // ascending by budget, budgets distinct

  // Where this profile was loaded from ("" when built in memory); used in error messages.
  std::string path;

  // Reads and validates a profile file. Every problem is one pkv::Error naming the file and the
  // field ("<path>: budgets[2].keep[7]: ...").
  static Profile load(const std::string& path);
  // Parses profile JSON text; `where` names the source in errors.
  static Profile parse(const std::string& text, const std::string& where);
  // Validates, then writes the file (written to <path>.tmp, then renamed).
  void save(const std::string& path) const;
  std::string to_json() const;
  // Throws pkv::Error("<where>: <field>: <what>") on the first problem (rules in docs/FORMATS.md).
  void validate(const std::string& where) const;

  int n_layers() const { return model.n_layers; }
  // The stored entry for exactly this budget (within 1e-9), or nullptr.
  const ProfileBudget* find(double budget) const;
  // Inserts or replaces the entry for entry.budget, keeping `budgets` sorted.
  void set_budget(ProfileBudget entry);

  // Per-layer keep fractions for `budget` in (0, 1], with mean over layers equal to `budget`
  // (up to rounding) and every value in [min_fraction, 1]:
  //  1. the stored fractions when the budget is present; otherwise linear interpolation between the
  //     two nearest stored budgets, where budget 1.0 (every k_l = 1) is always an implicit point;
  //     below the smallest stored budget, the smallest budget's fractions;
  //  2. then rescale_to_mean(k, budget, min_fraction, 1). For a calibrated profile at a stored budget
  //     this changes nothing beyond 1e-6; for an imported one it removes the authors' truncation.
  // The raw stored values stay available through find(). Errors: budget outside (0, 1],
  // min_fraction outside [0, budget], an empty profile.
  std::vector<double> keep_fractions(double budget, double min_fraction = 0.0) const;
  // The per-head table's keep fractions for `budget` ([n_layers][kv heads]), by the same rules over
  // all (layer, head) units (stored, interpolated, then rescaled to the mean `budget`); empty when
  // the profile has no per-head table.
  std::vector<std::vector<double>> head_keep_fractions(double budget, double min_fraction = 0.0) const;
  bool has_head_table() const { return !budgets.empty() && !budgets[0].head_keep.empty(); }

  // Throws pkv::Error naming both identities when the profile does not fit `m`:
  //  - the layer counts must be equal;
  //  - when both have a fingerprint, the fingerprints must be equal;
  //  - when the profile has a fingerprint and the model none, the names must be equal;
  //  - a profile without a fingerprint (imported) is checked on the layer count only.
  void check_compatible(const ModelIdentity& m) const;

  // A plain-text table: one row per layer, one column per budget (keep fractions, 3 decimals),
  // and a last row with the means. For the terminal; the library does not print it.
  std::string table() const;
};

// Rescales keep fractions to an exact mean while clamping to [lo, hi]: the result is
// k_l = clamp(s * x_l, lo, hi) with the one scale s >= 0 for which mean(k) == target. This is what
// "scale the unclamped values, clamp the ones that leave [lo, hi], repeat" converges to; it is
// solved exactly (the mean is piecewise linear and nondecreasing in s). When even s -> infinity
// does not reach the target (some x_l are 0), the values at 0 are raised equally to make up the
// rest. A final pass spreads the floating-point remainder over the unclamped values, so the mean
// equals target to rounding. Errors (pkv::fail): x_l < 0 or not finite, lo > hi, lo < 0, target
// outside [lo, hi], empty k.
void rescale_to_mean(std::vector<double>& k, double target, double lo, double hi);

// Builds a profile from the authors' files (JSON arrays of per-layer EVICTION fractions named
// prefixkv_<model>_<r>.json, r = evicted fraction). Keeps the values as given, k_l = 1 - e_l, at
// budget b = 1 - r (rounded to 9 decimals; r = 0.0 gives budget 1.0), and records the file names
// and the original means. Estimator "paper", 2 protected tokens (the reference code's defaults),
// model name <model>, no fingerprint. `expected_layers` = 0 accepts the first file's length.
// Errors, each naming the file: unreadable or non-array JSON, a value that is not a number in
// [0, 1], a wrong layer count, a name without a parsable r in [0, 1), files of different models or
// layer counts mixed, the same r twice, no files.
Profile import_official(const std::vector<std::string>& files, int expected_layers = 0);

// Keep fractions for a model without a calibrated profile, where only the work counts (benchmarks):
// rising linearly with depth from half of `budget` to 1.5 times it (mean `budget`; one layer: `budget`).
std::vector<double> ramp_keep_fractions(int n_layers, double budget);

}  // namespace pkv
