#include "eval/metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace pkv {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

void check_vocab(const char* where, int vocab) {
  if (vocab <= 0) fail(where, "vocabulary size must be positive, got " + std::to_string(vocab));
}

}  // namespace

// ---- ROUGE-L

std::vector<std::string> rouge_tokenize(const std::string& text) {
  // Byte scan of UTF-8: every byte >= 0x80 separates tokens, except the encodings of the two
  // characters whose Python lower() is ASCII. Their lead bytes (E2, C4) always start a character,
  // valid or not, so matching them as byte strings is what decoding first would find.
  std::vector<std::string> tokens;
  std::string cur;
  auto flush = [&] {
    if (!cur.empty()) tokens.push_back(std::move(cur));
    cur.clear();
  };
  const size_t n = text.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = text[i];
    if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) {
      cur.push_back(char(c));
      ++i;
    } else if (c >= 'A' && c <= 'Z') {
      cur.push_back(char(c + 32));
      ++i;
    } else if (c == 0xE2 && i + 2 < n && (unsigned char)text[i + 1] == 0x84 && (unsigned char)text[i + 2] == 0xAA) {
      cur.push_back('k');  // U+212A KELVIN SIGN
      i += 3;
    } else if (c == 0xC4 && i + 1 < n && (unsigned char)text[i + 1] == 0xB0) {
      cur.push_back('i');  // U+0130 -> "i" + U+0307; the combining dot then separates
      flush();
      i += 2;
    } else {
      flush();
      ++i;
    }
  }
  flush();
  return tokens;
}

size_t lcs_length(const std::vector<std::string>& a, const std::vector<std::string>& b) {
  // Row i of the DP table: row[j] = LCS(a[:i], b[:j]).
  std::vector<size_t> row(b.size() + 1, 0);
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = 0;  // LCS(a[:i-1], b[:j-1])
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = a[i - 1] == b[j - 1] ? diag + 1 : std::max(up, row[j - 1]);
      diag = up;
    }
  }
  return row[b.size()];
}

RougeScore rouge_l(const std::string& reference, const std::string& candidate) {
  const auto ref = rouge_tokenize(reference);
  const auto cand = rouge_tokenize(candidate);
  RougeScore s;
  if (ref.empty() && cand.empty()) {
    s.precision = s.recall = s.f = 1;  // identical (empty) texts; rouge-score says 0 here
    return s;
  }
  if (ref.empty() || cand.empty()) return s;
  const double lcs = double(lcs_length(ref, cand));
  s.precision = lcs / double(cand.size());
  s.recall = lcs / double(ref.size());
  // rouge_score.scoring.fmeasure, same operation order: 2 * p * r / (p + r).
  if (s.precision + s.recall > 0) s.f = 2 * s.precision * s.recall / (s.precision + s.recall);
  return s;
}

// ---- next-token distributions

namespace {

// log sum exp(l) as max + log(sum exp(l - max)). Log-probabilities are formed as (l - max) - log_sum,
// never as l - (max + log_sum): with logits near 1e30 the latter loses every digit.
struct LogSumExp {
  double max = 0, log_sum = 0;
  bool ok = true;  // false: a NaN or +inf logit, or all -inf (no distribution)
  double log_prob(float logit) const { return (double(logit) - max) - log_sum; }
};

LogSumExp lse_of(const float* logits, int vocab) {
  LogSumExp r;
  r.max = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < vocab; ++i) {
    const double x = logits[i];
    if (std::isnan(x)) r.ok = false;
    r.max = std::max(r.max, x);
  }
  if (!r.ok || std::isinf(r.max)) {
    r.ok = false;
    return r;
  }
  double s = 0;
  for (int i = 0; i < vocab; ++i) s += std::exp(double(logits[i]) - r.max);
  r.log_sum = std::log(s);
  return r;
}

}  // namespace

double log_sum_exp(const float* logits, int vocab) {
  check_vocab("log_sum_exp", vocab);
  const LogSumExp r = lse_of(logits, vocab);
  if (!r.ok) return r.max == -std::numeric_limits<double>::infinity() ? r.max : kNaN;
  return r.max + r.log_sum;
}

double token_nll(const float* logits, int vocab, int target) {
  check_vocab("token_nll", vocab);
  if (target < 0 || target >= vocab)
    fail("token_nll", "target token " + std::to_string(target) + " outside the vocabulary [0, " +
                          std::to_string(vocab) + ")");
  const LogSumExp r = lse_of(logits, vocab);
  return r.ok ? -r.log_prob(logits[target]) : kNaN;
}

double kl_divergence(const float* ref_logits, const float* logits, int vocab) {
  check_vocab("kl_divergence", vocab);
  const LogSumExp ref = lse_of(ref_logits, vocab);
  const LogSumExp cur = lse_of(logits, vocab);
  if (!ref.ok || !cur.ok) return kNaN;
  double kl = 0;
  for (int i = 0; i < vocab; ++i) {
    const double lp_ref = ref.log_prob(ref_logits[i]);
    if (std::isinf(lp_ref)) continue;  // p_ref = 0: 0 * log(0 / p) = 0
    // Differences of log-probabilities, not ratios of probabilities: no underflow for tiny p.
    kl += std::exp(lp_ref) * (lp_ref - cur.log_prob(logits[i]));
  }
  return std::max(kl, 0.0);
}

int argmax(const float* logits, int vocab) {
  check_vocab("argmax", vocab);
  int best = -1;
  for (int i = 0; i < vocab; ++i) {
    if (std::isnan(logits[i])) continue;
    if (best < 0 || logits[i] > logits[best]) best = i;
  }
  return best < 0 ? 0 : best;
}

// ---- accumulators

void PerplexityAccumulator::add(double nll_sum, int64_t tokens) {
  if (tokens < 0) fail("PerplexityAccumulator", "negative token count " + std::to_string(tokens));
  nll_ += nll_sum;
  tokens_ += tokens;
}

double PerplexityAccumulator::mean_nll() const { return tokens_ > 0 ? nll_ / double(tokens_) : kNaN; }

double PerplexityAccumulator::ppl() const { return std::exp(mean_nll()); }

void MeanAccumulator::add(double x) {
  // Welford's update: the spread is kept about the running mean, not as a difference of big sums.
  max_ = n_ == 0 ? x : std::max(max_, x);
  ++n_;
  sum_ += x;
  const double d = x - mean_;
  mean_ += d / double(n_);
  m2_ += d * (x - mean_);
}

void MeanAccumulator::merge(const MeanAccumulator& o) {
  if (o.n_ == 0) return;
  if (n_ == 0) {
    *this = o;
    return;
  }
  const double na = double(n_), nb = double(o.n_), n = na + nb;
  const double d = o.mean_ - mean_;
  max_ = std::max(max_, o.max_);
  n_ += o.n_;
  sum_ += o.sum_;
  mean_ += d * nb / n;
  m2_ += o.m2_ + d * d * na * nb / n;
}

double MeanAccumulator::mean() const { return n_ > 0 ? sum_ / double(n_) : kNaN; }

double MeanAccumulator::std_error() const {
  if (n_ < 2) return kNaN;
  const double n = double(n_);
  return std::sqrt(m2_ / (n - 1) / n);
}

double MeanAccumulator::max() const { return n_ > 0 ? max_ : kNaN; }

void DistributionComparison::add(const float* ref_logits, const float* logits, int vocab) {
  kld_.add(kl_divergence(ref_logits, logits, vocab));
  top1_.add(top1_agree(ref_logits, logits, vocab) ? 1.0 : 0.0);
}

}  // namespace pkv
