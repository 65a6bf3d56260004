// Quality metrics of the evaluation (METHOD.md section 7): ROUGE-L between two generations,
// perplexity of teacher-forced reference answers, KL divergence and top-1 agreement of next-token
// distributions against the full cache. All arithmetic is in double; logits come as float rows
// [vocab] (what the engine returns per position).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace pkv {

// ---- ROUGE-L (as Google's rouge-score package computes rougeL with its defaults)

// rouge-score's default tokenizer without stemming: lower case, every run of characters other than
// [a-z0-9] is a separator (so non-ASCII letters separate too), empty pieces dropped. lower() is
// Python's: the two non-ASCII characters whose lower case is ASCII (KELVIN SIGN -> "k", U+0130 ->
// "i" + a combining dot) count as those letters.
std::vector<std::string> rouge_tokenize(const std::string& text);

// Length of the longest common subsequence of two token sequences. O(|a| |b|) time, O(|b|) memory.
size_t lcs_length(const std::vector<std::string>& a, const std::vector<std::string>& b);

struct RougeScore {
  double precision = 0;  // LCS / candidate tokens
  double recall = 0;     // LCS / reference tokens
  double f = 0;          // 2PR / (P + R), 0 when P + R = 0
};
// ROUGE-L of `candidate` against `reference` (in the evaluation: compressed-cache generation against
// the full-cache generation). Same numbers as rouge_score.RougeScorer(["rougeL"]).score(reference,
// candidate), computed in the same order, except one case: when both texts have no tokens they are
// identical, and this returns 1 for P, R and F, where rouge-score returns 0. One side without
// tokens gives 0, as there.
RougeScore rouge_l(const std::string& reference, const std::string& candidate);
inline double rouge_l_f(const std::string& reference, const std::string& candidate) {
  return rouge_l(reference, candidate).f;
}

// ---- next-token distributions given as logits

// log sum_i exp(logits[i]), in double with the maximum factored out. -inf when every logit is -inf;
// NaN when any logit is NaN or +inf.
double log_sum_exp(const float* logits, int vocab);

// -log softmax(logits)[target] (nats), in double with the maximum factored out. +inf when the
// target's logit is -inf; NaN when the logits are no distribution (a NaN or +inf, or all -inf).
// Throws Error when vocab <= 0 or target is outside [0, vocab).
double token_nll(const float* logits, int vocab, int target);

// KL(P_ref || P) = sum_i p_ref_i (log p_ref_i - log p_i) in nats, P_ref = softmax(ref_logits) (the
// full cache), P = softmax(logits). Terms with p_ref_i = 0 contribute 0; p_i = 0 where p_ref_i > 0
// gives +inf. Clamped at 0 from below (rounding can leave -1e-17 for equivalent distributions);
// exactly 0 for identical logits; NaN when either row is no distribution (as for token_nll).
// Throws Error when vocab <= 0.
double kl_divergence(const float* ref_logits, const float* logits, int vocab);

// Index of the largest logit, the first one on ties (as torch.argmax). NaNs are never chosen unless
// all are NaN (then 0). Throws Error when vocab <= 0.
int argmax(const float* logits, int vocab);
inline bool top1_agree(const float* ref_logits, const float* logits, int vocab) {
  return argmax(ref_logits, vocab) == argmax(logits, vocab);
}

// ---- accumulators over many tokens / samples

// Perplexity of many answers taken together (METHOD.md section 7): PPL = exp(total NLL / total
// tokens) over all answer tokens of all samples, not a mean of per-sample perplexities.
class PerplexityAccumulator {
 public:
  void add_token(double nll) { nll_ += nll, tokens_ += 1; }
  void add(double nll_sum, int64_t tokens);  // a sample's summed NLL over `tokens` tokens (>= 0)
  void merge(const PerplexityAccumulator& o) { nll_ += o.nll_, tokens_ += o.tokens_; }
  double total_nll() const { return nll_; }
  int64_t tokens() const { return tokens_; }
  double mean_nll() const;  // nats per token; NaN when no tokens
  double ppl() const;       // exp(mean_nll()); NaN when no tokens

 private:
  double nll_ = 0;
  int64_t tokens_ = 0;
};

// Mean of a per-token or per-sample quantity (KL divergence, ROUGE-L, accuracy), with its standard
// error and maximum.
class MeanAccumulator {
 public:
  void add(double x);
  void merge(const MeanAccumulator& o);
  int64_t count() const { return n_; }
  double sum() const { return sum_; }
  double mean() const;       // NaN when empty
  double std_error() const;  // sample standard deviation / sqrt(n); NaN when n < 2
  double max() const;        // NaN when empty

 private:
  int64_t n_ = 0;
  double sum_ = 0, max_ = 0;
  double mean_ = 0, m2_ = 0;  // Welford: running mean, sum of squared deviations from it
};

// Per-token comparison of a compressed-cache distribution with the full cache's: mean KL(P_full ||
// P_compressed) and the fraction of positions where both pick the same top token.
class DistributionComparison {
 public:
  void add(const float* ref_logits, const float* logits, int vocab);
  void merge(const DistributionComparison& o) { kld_.merge(o.kld_), top1_.merge(o.top1_); }
  const MeanAccumulator& kld() const { return kld_; }
  const MeanAccumulator& top1() const { return top1_; }  // each token adds 1 (same argmax) or 0
  int64_t tokens() const { return kld_.count(); }

 private:
  MeanAccumulator kld_, top1_;
};

}  // namespace pkv
