// How noisy the evaluation's means are: per-sample statistics of one member of an evaluation (the
// full cache, a config, the no-image control), each metric recomputed from any multiset of samples
// exactly as the report computes it from all of them, and a percentile bootstrap over samples:
// intervals of a metric, and paired intervals of the difference between two members, both sides on
// the same resampled sample indices.
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace pkv {

// One sample's sums for one member: what every metric of the report needs.
struct SampleStats {
  double nll = 0;       // summed NLL of the reference continuation's tokens
  double kld = 0;       // summed KL(full || member) over those tokens (0 for the full cache)
  double top1 = 0;      // positions where the top tokens agree (all of them for the full cache)
  double rouge_l = 0;   // ROUGE-L F against the full cache's greedy answer (1 for the full cache)
  double accuracy = 0;  // the checker's score, when `scored`
  bool scored = false;  // whether the truth set scores this sample
  int64_t tokens = 0;   // the reference continuation's tokens
};

enum class Metric { Ppl, RougeL, Accuracy, Kld, Top1 };
const char* metric_key(Metric m);  // as in the results JSON: ppl, rouge_l, accuracy, kld, top1_agreement
bool higher_is_better(Metric m);   // ROUGE-L, accuracy, top-1: higher; PPL, KLD: lower

// The metric over the samples `idx` (indices into `s`, repeats counted), as the report computes it
// from all samples (idx = 0 ... n-1): PPL = exp(sum NLL / sum tokens) over all tokens of all samples,
// KLD and top-1 likewise per token, ROUGE-L a mean over samples, accuracy a mean over the scored
// samples. Sums run in the order of idx. NaN where undefined (no tokens, no scored sample).
double metric_value(const std::vector<SampleStats>& s, const std::vector<uint32_t>& idx, Metric m);
// The same over every sample in order: the report's point estimate.
double metric_value(const std::vector<SampleStats>& s, Metric m);

struct Interval {
  double lo = std::numeric_limits<double>::quiet_NaN(), hi = std::numeric_limits<double>::quiet_NaN();
  bool valid() const { return lo == lo && hi == hi; }
};

// The q-quantile (0 <= q <= 1) of `v`, linear between order statistics (numpy's default: position
// q (m - 1) of the m sorted values). NaNs are left out; NaN when nothing is left.
double percentile(std::vector<double> v, double q);

// B resamples of n sample indices, each drawn uniformly with replacement, from a fixed generator
// (splitmix64 and a multiply-shift to [0, n)): the same seed gives the same resamples on every
// platform. All members and metrics of one report use one set, so differences are paired.
class Resamples {
 public:
  Resamples(size_t n, int B, uint64_t seed);
  size_t samples() const { return n_; }
  const std::vector<std::vector<uint32_t>>& sets() const { return sets_; }

 private:
  size_t n_;
  std::vector<std::vector<uint32_t>> sets_;
};

// The percentile interval at `level` (0.95: the 2.5% and 97.5% quantiles) of a metric over the
// resamples; resamples where it is undefined are left out.
Interval bootstrap_interval(const Resamples& r, const std::vector<SampleStats>& a, Metric m, double level = 0.95);
// Of metric(a) - metric(b), both on each resample's indices (paired).
Interval paired_interval(const Resamples& r, const std::vector<SampleStats>& a, const std::vector<SampleStats>& b,
                         Metric m, double level = 0.95);

// Issue 13's rule on a paired interval of (this - other): "better" when it lies entirely on the good
// side of 0 (below for PPL and KLD, above for the others), "worse" entirely on the bad side, else
// "tied" (an interval touching 0, or an undefined one).
const char* verdict(const Interval& diff, Metric m);

}  // namespace pkv
