// PrefixKV's calibration (METHOD.md sections 2-3) on any back end: per sample, the per-layer
// importance of the prompt's tokens (the estimator's scores over the prompt's own queries, or the
// attention the reference answer pays them, teacher-forced over the full cache), then for every
// budget the prefix search's per-layer keep fractions, averaged over the samples into a profile.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "eval/dataset.h"
#include "kv/budgeted.h"
#include "kv/profile.h"

namespace pkv {

struct CalibrateOptions {
  std::vector<double> budgets;        // kept fractions in (0, 1]
  Estimator estimator = Estimator::Window;
  int window = 32;                    // the window estimator's last queries
  int protected_count = 0;            // tokens every layer keeps (the prefix search's minimum)
  std::string allocation = "prompt";  // prompt (the estimator) | answer (the reference answer's attention)
  // How the layer budgets follow from the scores: "prefix" (METHOD.md section 2) or a cutoff spec
  // "cutoff[:OPTION]..." (kv/cutoff.h: value weighting, pooling, floor; the offline form of the
  // cutoff policy).
  std::string layer_rule = "prefix";
  // Also a per-(layer, KV head) table (ProfileBudget::head_keep): per sample, PrefixKV's search over
  // the L x H units on each KV head's own scores (kv/prefix_policy.h), averaged like the layers'.
  // With the prompt's estimator and the prefix rule only.
  bool heads = false;
  size_t limit = 0;                   // the first `limit` usable samples (0: all)
  std::string image_mode;             // "" = the model's
  std::string data;                   // the data file's name, recorded in the profile
  // Optional: each sample's scores [layers][prompt tokens], as the prefix search sees them.
  std::function<void(const std::string& sample, const std::vector<std::vector<float>>& scores)> on_scores;
  std::function<void(size_t done, size_t total)> on_progress;
  std::function<void(const std::string& sample, const std::string& why)> on_skip;
};

struct CalibrateResult {
  Profile profile;
  // Per layer: the share of the importance held by the top 10% of the prompt's tokens, averaged over
  // the samples (PrefixKV's premise is that this concentration differs by layer).
  std::vector<double> concentration;
  // Per layer: the first prompt token's share of the importance, averaged over the samples (an
  // attention sink's mark: LLaMA-2's deep layers put most of their attention there).
  std::vector<double> first_token_share;
};

// The importance scores of one prepared prompt (see CalibrateOptions::allocation); `answer` is the
// sample's reference answer (used by allocation "answer" only).
std::vector<std::vector<float>> calibration_scores(Backend& backend, const Engine& engine, const PreparedPrompt& p,
                                                   const std::string& answer, const CalibrateOptions& opt);

CalibrateResult calibrate(Backend& backend, const Engine& engine, const std::vector<Sample>& samples,
                          const CalibrateOptions& opt);

}  // namespace pkv
