// The bootstrap over samples (src/eval/bootstrap.h) and the comparisons evaluate() derives from it
// (add_bootstrap in src/eval/evaluate.h): percentiles, resampling distributions small enough to
// know, determinism, paired differences, the point estimates, issue 13's verdict rule.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <stdexcept>

#include "core/error.h"
#include "eval/bootstrap.h"
#include "eval/evaluate.h"

using namespace pkv;

namespace {

SampleStats stats(double nll, int64_t tokens, double rouge = 0, double kld = 0, double top1 = 0) {
  SampleStats s;
  s.nll = nll, s.tokens = tokens, s.rouge_l = rouge, s.kld = kld, s.top1 = top1;
  return s;
}

}  // namespace

TEST(Bootstrap, PercentileIsLinearBetweenOrderStatistics) {
  EXPECT_EQ(percentile({4, 1, 3, 2}, 0.0), 1.0);
  EXPECT_EQ(percentile({4, 1, 3, 2}, 1.0), 4.0);
  EXPECT_EQ(percentile({4, 1, 3, 2}, 0.5), 2.5);             // position 1.5
  EXPECT_DOUBLE_EQ(percentile({0, 10}, 0.025), 0.25);        // position 0.025
  EXPECT_EQ(percentile({NAN, 5, NAN, 7}, 0.5), 6.0);         // NaNs left out
  EXPECT_TRUE(std::isnan(percentile({NAN}, 0.5)));
  EXPECT_TRUE(std::isnan(percentile({}, 0.5)));
}

// Two samples: a resample holds both (probability 1/2) or one of them twice (1/4 each), so the mean
// of {0, 1} is 0, 1/2 or 1 and the PPL of NLLs {0, ln 4} over one token each is 1, 2 or 4: the 95%
// interval spans the extremes, the median is the middle value, and about half the resamples hold it.
TEST(Bootstrap, TwoSamplesGiveTheKnownResamplingDistribution) {
  const std::vector<SampleStats> s = {stats(0, 1, 0.0), stats(std::log(4.0), 1, 1.0)};
  const Resamples r(2, 4000, 11);
  const Interval rouge = bootstrap_interval(r, s, Metric::RougeL);
  EXPECT_EQ(rouge.lo, 0.0);
  EXPECT_EQ(rouge.hi, 1.0);
  const Interval ppl = bootstrap_interval(r, s, Metric::Ppl);
  EXPECT_DOUBLE_EQ(ppl.lo, 1.0);
  EXPECT_DOUBLE_EQ(ppl.hi, 4.0);
  std::map<double, int> counts;
  std::vector<double> means;
  for (const auto& idx : r.sets()) {
    ASSERT_EQ(idx.size(), 2u);
    means.push_back(metric_value(s, idx, Metric::RougeL));
    ++counts[means.back()];
  }
  ASSERT_EQ(counts.size(), 3u);
  EXPECT_NEAR(counts[0.0] / 4000.0, 0.25, 0.03);
  EXPECT_NEAR(counts[0.5] / 4000.0, 0.50, 0.03);
  EXPECT_NEAR(counts[1.0] / 4000.0, 0.25, 0.03);
  EXPECT_EQ(percentile(means, 0.5), 0.5);
  // A 40% interval (the 30% and 70% quantiles) lies inside the middle value's half of the mass.
  const Interval mid = bootstrap_interval(r, s, Metric::RougeL, 0.4);
  EXPECT_EQ(mid.lo, 0.5);
  EXPECT_EQ(mid.hi, 0.5);
}

TEST(Bootstrap, EqualSamplesGiveAZeroWidthInterval) {
  const std::vector<SampleStats> s(7, stats(0.7, 13, 0.4, 0.02, 9));
  const Resamples r(7, 500, 3);
  for (Metric m : {Metric::Ppl, Metric::RougeL, Metric::Kld, Metric::Top1}) {
    SCOPED_TRACE(metric_key(m));
    const Interval i = bootstrap_interval(r, s, m);
    EXPECT_EQ(i.lo, i.hi);
    EXPECT_EQ(i.lo, metric_value(s, m));
  }
  // No sample scored: no accuracy, no interval.
  EXPECT_TRUE(std::isnan(metric_value(s, Metric::Accuracy)));
  EXPECT_FALSE(bootstrap_interval(r, s, Metric::Accuracy).valid());
}

TEST(Bootstrap, AFixedSeedGivesTheSameResamples) {
  const Resamples a(10, 100, 7), b(10, 100, 7), c(10, 100, 8);
  EXPECT_EQ(a.sets(), b.sets());
  EXPECT_NE(a.sets(), c.sets());
  for (const auto& idx : a.sets())
    for (uint32_t i : idx) EXPECT_LT(i, 10u);
  std::vector<SampleStats> s;
  for (int i = 0; i < 10; ++i) s.push_back(stats(0.1 * i * i, 5 + i, 0.1 * i));
  const Interval x = bootstrap_interval(a, s, Metric::Ppl), y = bootstrap_interval(b, s, Metric::Ppl);
  EXPECT_EQ(x.lo, y.lo);
  EXPECT_EQ(x.hi, y.hi);
  EXPECT_LT(x.lo, x.hi);
  EXPECT_EQ(Resamples(10, 0, 7).sets().size(), 0u);
  EXPECT_THROW(Resamples(10, -1, 7), Error);
}

// A member against itself: every resample's difference is exactly 0, while its own intervals are
// not zero-width.
TEST(Bootstrap, PairedDifferenceOfAMemberWithItselfIsExactlyZero) {
  std::vector<SampleStats> s;
  for (int i = 0; i < 12; ++i) {
    SampleStats x = stats(0.3 * (i % 5) + 0.01 * i, 20 + i % 3, 0.05 * i, 0.01 * (i % 4), 10 + i % 7);
    x.scored = true, x.accuracy = (i % 3) / 2.0;
    s.push_back(x);
  }
  const Resamples r(s.size(), 1000, 20261207);
  for (Metric m : {Metric::Ppl, Metric::RougeL, Metric::Accuracy, Metric::Kld, Metric::Top1}) {
    SCOPED_TRACE(metric_key(m));
    const Interval own = bootstrap_interval(r, s, m), self = paired_interval(r, s, s, m);
    EXPECT_LT(own.lo, own.hi);
    EXPECT_EQ(self.lo, 0.0);
    EXPECT_EQ(self.hi, 0.0);
    EXPECT_STREQ(verdict(self, m), "tied");
  }
}

// The point estimates are the report's definitions: PPL is exp of the token-mean NLL over all
// tokens (not a mean of per-sample PPLs), KLD and top-1 per token, ROUGE-L per sample, accuracy over
// the scored samples.
TEST(Bootstrap, PointEstimatesFollowTheReportsDefinitions) {
  std::vector<SampleStats> s = {stats(2.0, 1, 0.2, 0.5, 1), stats(3.0, 3, 0.6, 0.1, 0)};
  s[1].scored = true, s[1].accuracy = 0.75;
  EXPECT_DOUBLE_EQ(metric_value(s, Metric::Ppl), std::exp(5.0 / 4));
  EXPECT_NE(metric_value(s, Metric::Ppl), (std::exp(2.0) + std::exp(1.0)) / 2);
  EXPECT_DOUBLE_EQ(metric_value(s, Metric::Kld), 0.6 / 4);
  EXPECT_DOUBLE_EQ(metric_value(s, Metric::Top1), 0.25);
  EXPECT_DOUBLE_EQ(metric_value(s, Metric::RougeL), 0.4);
  EXPECT_DOUBLE_EQ(metric_value(s, Metric::Accuracy), 0.75);
  EXPECT_DOUBLE_EQ(metric_value(s, {1, 1, 0}, Metric::Ppl), std::exp(8.0 / 7));  // repeats count
}

TEST(Bootstrap, VerdictRule) {
  EXPECT_STREQ(verdict({-0.3, -0.1}, Metric::Ppl), "better");
  EXPECT_STREQ(verdict({0.1, 0.3}, Metric::Ppl), "worse");
  EXPECT_STREQ(verdict({-0.1, 0.1}, Metric::Ppl), "tied");
  EXPECT_STREQ(verdict({0.0, 0.2}, Metric::Kld), "tied");  // touching 0
  EXPECT_STREQ(verdict({0.0, 0.0}, Metric::Ppl), "tied");
  EXPECT_STREQ(verdict({0.05, 0.2}, Metric::Accuracy), "better");
  EXPECT_STREQ(verdict({-0.2, -0.05}, Metric::Accuracy), "worse");
  EXPECT_STREQ(verdict({-0.2, -0.05}, Metric::Top1), "worse");
  EXPECT_STREQ(verdict({0.05, 0.2}, Metric::RougeL), "better");
  EXPECT_STREQ(verdict(Interval{}, Metric::Ppl), "tied");
}

// add_bootstrap on a made-up report: per budget and metric the best baseline is the one with the
// best point estimate; configs are better, worse or tied against it, and the goal asks for
// "better" only where that baseline is off the full cache.
TEST(Bootstrap, ComparisonsAgainstTheBestBaseline) {
  const int n = 24;
  EvalReport r;
  r.greedy = true;
  auto member = [&](auto nll_of, double acc) {
    EvalScores s;
    for (int i = 0; i < n; ++i) {
      SampleStats x = stats(nll_of(i), 10, 0.5, 0.01 * (i % 3), 8);
      x.scored = true, x.accuracy = acc + 0.02 * (i % 5);
      s.per_sample.push_back(x);
    }
    s.samples = n;
    s.ppl = metric_value(s.per_sample, Metric::Ppl);
    return s;
  };
  auto full_nll = [](int i) { return 1.0 + 0.3 * (i % 7); };
  r.full = member(full_nll, 0.9);
  auto add = [&](const std::string& policy, double budget, double extra, double wobble, double acc) {
    // wobble: +-wobble alternating per sample, so a difference against a config without it straddles 0
    r.records.emplace_back(EvalConfig{policy, policy == "uniform-prefix" ? "window" : "", budget},
                           member([&](int i) { return full_nll(i) + extra + (i % 2 ? wobble : -wobble); }, acc));
  };
  add("snapkv", 0.2, 2.5, 0, 0.6);          // the best accuracy baseline at 20%
  add("uniform-prefix", 0.2, 2.0, 0, 0.5);  // the best PPL baseline at 20%
  add("cutoff:wov2", 0.2, 1.0, 0, 0.7);     // better in both
  add("cutoff:worse", 0.2, 3.0, 0, 0.3);    // worse in both
  add("cutoff:tied", 0.2, 2.0, 0.4, 0.6);   // tied in both
  add("snapkv", 0.9, 0.0, 0, 0.9);          // the full cache itself
  add("cutoff:tied", 0.9, 0.0, 0.4, 0.9);   // tied with it
  add("uniform-prefix:look=8", 0.5, 0.5, 0, 0.8);  // a variant, no baseline: nothing to compare with
  add_bootstrap(r, 1000, 5);
  ASSERT_EQ(r.bootstrap, 1000);
  auto rec = [&](const std::string& p, double b) -> const EvalScores& {
    for (auto& [c, s] : r.records)
      if (c.policy == p && c.budget == b) return s;
    throw std::runtime_error("no record " + p);
  };
  EXPECT_TRUE(is_uniform_baseline(r.records[0].first));
  EXPECT_TRUE(is_uniform_baseline(r.records[1].first));
  EXPECT_FALSE(is_uniform_baseline(r.records[2].first));
  EXPECT_FALSE(is_uniform_baseline(EvalConfig{"uniform-prefix", "answer", 0.2}));  // the oracle
  EXPECT_FALSE(is_uniform_baseline(EvalConfig{"uniform-prefix:look=8", "window", 0.2}));

  const EvalScores& better = rec("cutoff:wov2", 0.2);
  EXPECT_EQ(better.vs_best.at("ppl").against, "uniform-prefix/window");
  EXPECT_EQ(better.vs_best.at("accuracy").against, "snapkv");
  EXPECT_EQ(better.vs_best.at("ppl").diff, better.ppl - rec("uniform-prefix", 0.2).ppl);
  for (const char* m : {"ppl", "accuracy"}) {
    SCOPED_TRACE(m);
    EXPECT_EQ(better.vs_best.at(m).verdict, "better");
    EXPECT_TRUE(better.vs_best.at(m).against_off_full);
    EXPECT_TRUE(better.vs_best.at(m).meets_goal);
    EXPECT_EQ(rec("cutoff:worse", 0.2).vs_best.at(m).verdict, "worse");
    EXPECT_FALSE(rec("cutoff:worse", 0.2).vs_best.at(m).meets_goal);
    // Tied with a baseline that is off the full cache: not the goal.
    EXPECT_EQ(rec("cutoff:tied", 0.2).vs_best.at(m).verdict, "tied");
    EXPECT_FALSE(rec("cutoff:tied", 0.2).vs_best.at(m).meets_goal);
    // Tied with a baseline that the full cache cannot be told from: the goal.
    EXPECT_EQ(rec("snapkv", 0.9).vs_full.at(m).verdict, "tied");
    EXPECT_EQ(rec("cutoff:tied", 0.9).vs_best.at(m).verdict, "tied");
    EXPECT_FALSE(rec("cutoff:tied", 0.9).vs_best.at(m).against_off_full);
    EXPECT_TRUE(rec("cutoff:tied", 0.9).vs_best.at(m).meets_goal);
  }
  // The best baseline against itself: exactly 0; the other baseline against it: its real difference.
  const Comparison& self = rec("uniform-prefix", 0.2).vs_best.at("ppl");
  EXPECT_EQ(self.diff, 0.0);
  EXPECT_EQ(self.ci.lo, 0.0);
  EXPECT_EQ(self.ci.hi, 0.0);
  EXPECT_FALSE(self.meets_goal);  // a baseline meets no goal against the baselines
  EXPECT_EQ(rec("snapkv", 0.2).vs_best.at("ppl").verdict, "worse");
  // Where no baseline was measured at a budget: intervals, but no comparison with a baseline.
  EXPECT_TRUE(rec("uniform-prefix:look=8", 0.5).vs_best.empty());
  EXPECT_FALSE(rec("uniform-prefix:look=8", 0.5).ci.empty());
  EXPECT_EQ(rec("uniform-prefix:look=8", 0.5).vs_full.at("ppl").verdict, "worse");
  // The full cache: intervals of PPL and accuracy only; 0 resamples clears everything.
  EXPECT_EQ(r.full.ci.size(), 2u);
  add_bootstrap(r, 0, 5);
  EXPECT_EQ(r.bootstrap, 0);
  EXPECT_TRUE(r.full.ci.empty());
  EXPECT_TRUE(better.vs_best.empty());
}
