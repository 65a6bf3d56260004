#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "core/error.h"
#include "eval/metrics.h"

using namespace pkv;

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
using Tokens = std::vector<std::string>;
}  // namespace

TEST(Metrics, RougeTokenizeLikeRougeScore) {
  EXPECT_EQ(rouge_tokenize("The cat's hat, 2nd-BEST!"), (Tokens{"the", "cat", "s", "hat", "2nd", "best"}));
  EXPECT_EQ(rouge_tokenize("  a_b\tc\n\nd  "), (Tokens{"a", "b", "c", "d"}));
  // Non-ASCII letters separate (rouge-score keeps [a-z0-9] only), except the two whose lower()
  // is ASCII: KELVIN SIGN -> k, and U+0130 -> "i" + a combining dot (which then separates).
  EXPECT_EQ(rouge_tokenize("caf\xC3\xA9 au lait"), (Tokens{"caf", "au", "lait"}));
  EXPECT_EQ(rouge_tokenize("blac\xE2\x84\xAA cat"), (Tokens{"black", "cat"}));
  EXPECT_EQ(rouge_tokenize("P\xC4\xB0NK"), (Tokens{"pi", "nk"}));
  EXPECT_TRUE(rouge_tokenize("").empty());
  EXPECT_TRUE(rouge_tokenize(" ... \xE2\x80\x94 !").empty());
}

TEST(Metrics, LcsLength) {
  auto chars = [](const std::string& s) {
    Tokens t;
    for (char c : s) t.push_back(std::string(1, c));
    return t;
  };
  EXPECT_EQ(lcs_length(chars("ABCBDAB"), chars("BDCABA")), 4u);  // the textbook example
  EXPECT_EQ(lcs_length(chars("ABC"), chars("ABC")), 3u);
  EXPECT_EQ(lcs_length(chars("ABC"), chars("DEF")), 0u);
  EXPECT_EQ(lcs_length(chars(""), chars("DEF")), 0u);
  EXPECT_EQ(lcs_length(chars("AXBXC"), chars("ABC")), 3u);
}

TEST(Metrics, RougeLKnownPairs) {
  // rouge-score's README example: rougeL P = 5/8, R = 5/9, F = 10/17.
  auto s = rouge_l("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log.");
  EXPECT_DOUBLE_EQ(s.precision, 0.625);
  EXPECT_DOUBLE_EQ(s.recall, 5.0 / 9);
  EXPECT_DOUBLE_EQ(s.f, 10.0 / 17);
  // LCS 5 of 6 reference and 5 candidate tokens: P = 1, R = 5/6, F = 10/11.
  s = rouge_l("the cat sat on the mat", "The cat, on the mat.");
  EXPECT_DOUBLE_EQ(s.precision, 1.0);
  EXPECT_DOUBLE_EQ(s.recall, 5.0 / 6);
  EXPECT_DOUBLE_EQ(s.f, 10.0 / 11);
  // F is symmetric, P and R swap.
  const auto t = rouge_l("The cat, on the mat.", "the cat sat on the mat");
  EXPECT_DOUBLE_EQ(t.f, s.f);
  EXPECT_DOUBLE_EQ(t.precision, s.recall);
  // Order matters (a subsequence, not a bag of words): LCS of "a b c d" and "d c b a" is 1.
  EXPECT_DOUBLE_EQ(rouge_l_f("a b c d", "d c b a"), 0.25);
  EXPECT_DOUBLE_EQ(rouge_l_f("Same text here.", "same TEXT here"), 1.0);
  EXPECT_DOUBLE_EQ(rouge_l_f("alpha beta", "gamma delta"), 0.0);
  // One side without tokens: 0 (as rouge-score). Both without tokens: identical, 1 (rouge-score: 0).
  EXPECT_DOUBLE_EQ(rouge_l_f("alpha beta", ""), 0.0);
  EXPECT_DOUBLE_EQ(rouge_l_f("", "alpha beta"), 0.0);
  EXPECT_DOUBLE_EQ(rouge_l_f("", ""), 1.0);
  EXPECT_DOUBLE_EQ(rouge_l_f("...", "!"), 1.0);
}

TEST(Metrics, TokenNllKnownValues) {
  // logits (1, 2, 3): -log softmax[2] = log(e + e^2 + e^3) - 3.
  const float l[3] = {1.f, 2.f, 3.f};
  const double want = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)) - 3.0;
  EXPECT_NEAR(token_nll(l, 3, 2), want, 1e-15);
  EXPECT_NEAR(token_nll(l, 3, 0), want + 2.0, 1e-14);
  EXPECT_NEAR(log_sum_exp(l, 3), want + 3.0, 1e-14);
  // Huge logits do not overflow; a -inf logit is probability 0.
  const float big[2] = {1e30f, 1e30f};
  EXPECT_NEAR(token_nll(big, 2, 1), std::log(2.0), 1e-12);
  const float far[2] = {-1e4f, 0.f};
  EXPECT_NEAR(token_nll(far, 2, 0), 1e4, 1e-9);
  EXPECT_NEAR(token_nll(far, 2, 1), 0.0, 1e-15);
  const float masked[3] = {kNegInf, 0.f, 0.f};
  EXPECT_NEAR(token_nll(masked, 3, 1), std::log(2.0), 1e-15);
  EXPECT_TRUE(std::isinf(token_nll(masked, 3, 0)));
  EXPECT_THROW(token_nll(l, 3, 3), Error);
  EXPECT_THROW(token_nll(l, 3, -1), Error);
  EXPECT_THROW(token_nll(l, 0, 0), Error);
}

TEST(Metrics, PerplexityOfUniformLogitsIsVocabSize) {
  for (int vocab : {2, 1000, 32000}) {
    std::vector<float> logits(vocab, 0.25f);
    PerplexityAccumulator acc;
    for (int t = 0; t < 50; ++t) acc.add_token(token_nll(logits.data(), vocab, (t * 7919) % vocab));
    EXPECT_EQ(acc.tokens(), 50);
    EXPECT_NEAR(acc.mean_nll(), std::log(double(vocab)), 1e-12);
    EXPECT_NEAR(acc.ppl() / vocab, 1.0, 1e-12) << vocab;
  }
  // Pooled over tokens, not a mean of per-sample perplexities: samples of 1 token at NLL 1 and of
  // 3 tokens at NLL 3 in all give exp(4 / 4) = e.
  PerplexityAccumulator a, b;
  a.add(1.0, 1);
  b.add(3.0, 3);
  a.merge(b);
  EXPECT_EQ(a.tokens(), 4);
  EXPECT_DOUBLE_EQ(a.total_nll(), 4.0);
  EXPECT_NEAR(a.ppl(), std::exp(1.0), 1e-15);
  EXPECT_TRUE(std::isnan(PerplexityAccumulator().ppl()));
  EXPECT_THROW(a.add(1.0, -1), Error);
}

TEST(Metrics, KlDivergenceKnownDistributions) {
  // P_ref = (1/2, 1/2), P = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3); the other way round differs.
  const float ref[2] = {std::log(0.5f), std::log(0.5f)};
  const float p[2] = {std::log(0.25f), std::log(0.75f)};
  EXPECT_NEAR(kl_divergence(ref, p, 2), 0.5 * std::log(2.0) + 0.5 * std::log(2.0 / 3), 1e-7);
  EXPECT_NEAR(kl_divergence(p, ref, 2), 0.25 * std::log(0.5) + 0.75 * std::log(1.5), 1e-7);
  // Logits are unnormalised: adding a constant changes nothing.
  const float ref_shift[2] = {ref[0] + 7.f, ref[1] + 7.f};
  EXPECT_NEAR(kl_divergence(ref_shift, p, 2), kl_divergence(ref, p, 2), 1e-7);
  // A token the reference never picks costs nothing; one the compressed model rules out is infinite.
  const float ref_masked[3] = {0.f, 0.f, kNegInf};
  const float any[3] = {0.f, 0.f, 5.f};
  EXPECT_NEAR(kl_divergence(ref_masked, any, 3), std::log((2.0 + std::exp(5.0)) / 2.0), 1e-12);
  const float p_masked[3] = {kNegInf, 0.f, 0.f};
  EXPECT_TRUE(std::isinf(kl_divergence(any, p_masked, 3)));
  EXPECT_THROW(kl_divergence(ref, p, 0), Error);
}

TEST(Metrics, KlOfADistributionWithItselfIsZero) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.f, 4.f);
  std::vector<float> a(32000), b(32000);
  for (auto& x : a) x = n(rng);
  EXPECT_EQ(kl_divergence(a.data(), a.data(), int(a.size())), 0.0);
  for (size_t i = 0; i < a.size(); ++i) b[i] = a[i] + 3.5f;  // same distribution, shifted logits
  EXPECT_NEAR(kl_divergence(a.data(), b.data(), int(a.size())), 0.0, 1e-6);
  // Against a direct double computation on a perturbed copy, and never negative.
  for (size_t i = 0; i < a.size(); ++i) b[i] = a[i] + 0.3f * n(rng);
  double za = 0, zb = 0, direct = 0;
  for (size_t i = 0; i < a.size(); ++i) za += std::exp(double(a[i])), zb += std::exp(double(b[i]));
  for (size_t i = 0; i < a.size(); ++i) {
    const double pa = std::exp(double(a[i])) / za, pb = std::exp(double(b[i])) / zb;
    direct += pa * std::log(pa / pb);
  }
  const double kl = kl_divergence(a.data(), b.data(), int(a.size()));
  EXPECT_GT(kl, 0.0);
  EXPECT_NEAR(kl, direct, 1e-9 + 1e-9 * direct);
  // Stable at scales where exp overflows in double.
  std::vector<float> big(a), big2(b);
  for (auto& x : big) x = x * 100.f + 1e4f;
  for (auto& x : big2) x = x * 100.f + 1e4f;
  const double kb = kl_divergence(big.data(), big2.data(), int(big.size()));
  EXPECT_TRUE(std::isfinite(kb));
  EXPECT_GE(kb, 0.0);
}

TEST(Metrics, ArgmaxAndTopOneAgreement) {
  const float a[5] = {0.f, 3.f, 1.f, 3.f, -2.f};
  EXPECT_EQ(argmax(a, 5), 1);  // first of the tied maxima
  const float nan_first[3] = {std::nanf(""), -1.f, -2.f};
  EXPECT_EQ(argmax(nan_first, 3), 1);
  const float b[5] = {0.f, 2.f, 1.f, 3.f, -2.f};
  EXPECT_FALSE(top1_agree(a, b, 5));
  EXPECT_TRUE(top1_agree(a, a, 5));
  EXPECT_THROW(argmax(a, 0), Error);
}

TEST(Metrics, MeanAccumulatorAndDistributionComparison) {
  MeanAccumulator m;
  EXPECT_TRUE(std::isnan(m.mean()));
  for (double x : {1.0, 2.0, 3.0, 4.0}) m.add(x);
  EXPECT_EQ(m.count(), 4);
  EXPECT_DOUBLE_EQ(m.mean(), 2.5);
  EXPECT_DOUBLE_EQ(m.sum(), 10.0);
  EXPECT_DOUBLE_EQ(m.max(), 4.0);
  EXPECT_NEAR(m.std_error(), std::sqrt((5.0 / 3) / 4), 1e-15);  // sample variance 5/3
  MeanAccumulator a, b;
  a.add(1.0), a.add(2.0);
  b.add(3.0), b.add(4.0);
  a.merge(b);
  EXPECT_DOUBLE_EQ(a.mean(), m.mean());
  EXPECT_NEAR(a.std_error(), m.std_error(), 1e-15);
  EXPECT_DOUBLE_EQ(a.max(), 4.0);
  // Large offsets do not cancel the spread away.
  MeanAccumulator off;
  for (double x : {1.0, 2.0, 3.0, 4.0}) off.add(1e9 + x);
  EXPECT_NEAR(off.std_error(), m.std_error(), 1e-6);

  DistributionComparison same, diff;
  const float ref[3] = {1.f, 2.f, 3.f};
  const float other[3] = {3.f, 2.f, 1.f};
  same.add(ref, ref, 3);
  same.add(other, other, 3);
  EXPECT_EQ(same.tokens(), 2);
  EXPECT_EQ(same.kld().mean(), 0.0);
  EXPECT_EQ(same.top1().mean(), 1.0);
  diff.add(ref, ref, 3);
  diff.add(ref, other, 3);
  EXPECT_NEAR(diff.kld().mean(), kl_divergence(ref, other, 3) / 2, 1e-15);
  EXPECT_EQ(diff.top1().mean(), 0.5);
  same.merge(diff);
  EXPECT_EQ(same.tokens(), 4);
  EXPECT_EQ(same.top1().mean(), 0.75);
}
