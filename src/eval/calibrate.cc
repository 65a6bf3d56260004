#include "eval/calibrate.h"

#include <algorithm>
#include <cmath>
#include <ctime>

#include "core/error.h"
#include "eval/evaluate.h"
#include "kv/cutoff.h"
#include "kv/prefix_search.h"
#include "model/identity.h"

namespace pkv {

namespace {
std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}
}  // namespace

std::vector<std::vector<float>> calibration_scores(Backend& backend, const Engine& engine, const PreparedPrompt& p,
                                                   const std::string& answer, const CalibrateOptions& opt) {
  const int N = int(p.ids.size());
  if (opt.allocation == "answer") {
    PolicyOptions o;
    if (opt.layer_rule != "prefix") apply_policy_spec(opt.layer_rule, o, "--allocate-by");
    if (o.value_weight != ValueWeight::None)
      fail("--allocate-by " + opt.layer_rule, "value weighting is measured on the prompt's queries, not with --allocate-from answer");
    return answer_importance(backend, engine, p, engine.answer_ids(answer));
  }
  if (opt.allocation != "prompt") fail("--allocate-from", "must be prompt or answer, got '" + opt.allocation + "'");
  ImportanceRequest req = estimator_request(opt.estimator, opt.window, N);
  PKV_ASSERT_MSG(req.needed, "every estimator measures the prefill's attention");
  if (opt.layer_rule != "prefix") {  // a cutoff's value weighting (kv/cutoff.h)
    PolicyOptions o;
    apply_policy_spec(opt.layer_rule, o, "--allocate-by");
    req.weight = o.value_weight;
  }
  check_prompt_importance(req, N, true);  // the answer estimator: --allocate-from answer instead
  if (req.extended()) {
    const std::unique_ptr<Backend::SharedPrefill> sh = backend.prefill_shared(p, {});
    backend.add_extended_importance(*sh, p, req, "--allocate-by " + opt.layer_rule);
    std::vector<std::vector<float>> scores;
    for (const auto& l : sh->extended_importance.back()) scores.push_back(estimator_scores(opt.estimator, l, N));
    return scores;
  }
  const std::unique_ptr<Backend::SharedPrefill> sh = backend.prefill_shared(p, {req.from});
  std::vector<std::vector<float>> scores;
  for (const auto& l : sh->importance_for(req.from)) scores.push_back(estimator_scores(opt.estimator, l, N));
  return scores;
}

CalibrateResult calibrate(Backend& backend, const Engine& engine, const std::vector<Sample>& samples,
                          const CalibrateOptions& opt) {
  if (opt.budgets.empty()) fail("--budgets", "no budget to calibrate");
  if (opt.allocation != "prompt" && opt.allocation != "answer")
    fail("--allocate-from", "must be prompt or answer, got '" + opt.allocation + "'");
  if (opt.layer_rule != "prefix") {
    if (policy_base_name(opt.layer_rule) != "cutoff") fail("--allocate-by", "must be prefix or cutoff[:OPTION]..., got '" + opt.layer_rule + "'");
    PolicyOptions o;
    apply_policy_spec(opt.layer_rule, o, "--allocate-by");
  }
  if (opt.heads && (opt.layer_rule != "prefix" || opt.allocation != "prompt"))
    fail("--heads", "the per-head table is PrefixKV's search on each KV head's prompt importance: it needs "
                    "--allocate-by prefix and --allocate-from prompt");
  const Model& model = engine.model();
  const int L = model.config().text.n_layers, H = model.config().text.n_kv_heads;
  const size_t B = opt.budgets.size();
  // Per budget, per (layer, head) unit l * H + h: the sum of the per-sample k_lh.
  std::vector<std::vector<double>> head_sum(opt.heads ? B : 0, std::vector<double>(size_t(L) * size_t(H), 0.0));
  // Per budget, per layer: sum, sum of squares, min and max of the per-sample k_l.
  std::vector<std::vector<double>> sum(B, std::vector<double>(size_t(L), 0.0)), sq = sum,
                                   mn(B, std::vector<double>(size_t(L), 1e9)), mx(B, std::vector<double>(size_t(L), -1e9));
  std::vector<double> top10(size_t(L), 0.0), first(size_t(L), 0.0);
  std::vector<std::string> ids;
  const size_t target = opt.limit > 0 ? std::min(samples.size(), opt.limit) : samples.size();
  for (const Sample& s : samples) {
    if (ids.size() >= target) break;
    std::string why;
    std::optional<PreparedPrompt> p = prepare_sample(engine, s, opt.image_mode, &why, &backend);
    if (!p) {
      if (opt.on_skip) opt.on_skip(s.id, why);
      continue;
    }
    if (opt.allocation == "answer" && s.answer.empty()) {
      if (opt.on_skip) opt.on_skip(s.id, "no reference answer");
      continue;
    }
    const int N = int(p->ids.size());
    const std::vector<std::vector<float>> scores = calibration_scores(backend, engine, *p, s.answer, opt);
    if (opt.on_scores) opt.on_scores(s.id, scores);
    for (int l = 0; l < L; ++l) {
      std::vector<float> sc = scores[size_t(l)];
      std::sort(sc.begin(), sc.end(), std::greater<float>());
      double tot = 0, top = 0;
      const size_t k = size_t(std::ceil(0.1 * N));
      for (size_t i = 0; i < sc.size(); ++i) tot += sc[i], top += i < k ? sc[i] : 0.0;
      top10[size_t(l)] += tot > 0 ? top / tot : 0.0;
      first[size_t(l)] += tot > 0 && N > 0 ? scores[size_t(l)][0] / tot : 0.0;
    }
    // The cutoff's ranking scores (pooled, the protected entries first) and its floor.
    PolicyOptions co;
    std::vector<std::vector<float>> ranked;
    if (opt.layer_rule != "prefix") {
      apply_policy_spec(opt.layer_rule, co, "--allocate-by");
      for (int l = 0; l < L; ++l) {
        ranked.push_back(pool_scores(scores[size_t(l)], co.prefix_pool, co.grid_pool, p->image_offset, p->image_tokens));
        if (opt.protected_count >= 1) ranked.back()[0] = INFINITY;
        if (opt.protected_count >= 2) ranked.back()[size_t(N - 1)] = INFINITY;
      }
    }
    for (size_t bi = 0; bi < B; ++bi) {
      const int c = std::min(N, opt.protected_count);
      const std::vector<int> n =
          opt.layer_rule == "prefix"
              ? prefix_budgets(scores, std::llround(opt.budgets[bi] * N * L), c)
              : cutoff_budgets(ranked, std::llround(opt.budgets[bi] * N * L),
                               std::vector<int>(size_t(L), cutoff_floor(N, opt.budgets[bi], opt.protected_count,
                                                                        co.layer_floor, co.layer_evict_cap)));
      for (int l = 0; l < L; ++l) {
        const double k = double(n[size_t(l)]) / N;
        sum[bi][size_t(l)] += k;
        sq[bi][size_t(l)] += k * k;
        mn[bi][size_t(l)] = std::min(mn[bi][size_t(l)], k);
        mx[bi][size_t(l)] = std::max(mx[bi][size_t(l)], k);
      }
    }
    if (opt.heads) {  // each KV head's own scores: the search over the L x H units
      const ImportanceRequest req = estimator_request(opt.estimator, opt.window, N);
      check_prompt_importance(req, N);
      const std::unique_ptr<Backend::SharedPrefill> sh = backend.prefill_shared(*p, {});
      backend.add_head_importance(*sh, *p, req.from, "prefixkv calibrate --heads");
      std::vector<std::vector<float>> units;
      for (const auto& l : sh->head_importance_for(req.from))
        for (int h = 0; h < H; ++h)
          units.push_back(estimator_scores(opt.estimator, std::vector<float>(l.begin() + ptrdiff_t(h) * N, l.begin() + ptrdiff_t(h + 1) * N), N));
      for (size_t bi = 0; bi < B; ++bi) {
        const std::vector<int> n = prefix_budgets(units, std::llround(opt.budgets[bi] * N * L * H), std::min(N, opt.protected_count));
        for (size_t u = 0; u < n.size(); ++u) head_sum[bi][u] += double(n[u]) / N;
      }
    }
    ids.push_back(s.id);
    if (opt.on_progress) opt.on_progress(ids.size(), target);
  }
  const int used = int(ids.size());
  if (used == 0) fail(opt.data.empty() ? "calibration data" : opt.data, "no usable calibration sample (every image was missing or broken)");
  CalibrateResult r;
  for (int l = 0; l < L; ++l) {
    r.concentration.push_back(top10[size_t(l)] / used);
    r.first_token_share.push_back(first[size_t(l)] / used);
  }
  Profile& profile = r.profile;
  profile.model = model_identity(model);
  profile.estimator = estimator_name(opt.estimator);
  profile.window = opt.estimator == Estimator::Window ? opt.window : 0;
  profile.protected_tokens = opt.protected_count;
  profile.allocation = opt.allocation;
  profile.layer_rule = opt.layer_rule;
  profile.source = "calibrated";
  profile.samples = used;
  profile.data = opt.data;
  profile.date = utc_now();
  profile.sample_ids = ids;
  for (size_t bi = 0; bi < B; ++bi) {
    ProfileBudget pb;
    pb.budget = opt.budgets[bi];
    for (int l = 0; l < L; ++l) {
      const double m = sum[bi][size_t(l)] / used;
      pb.keep.push_back(m);
      pb.keep_std.push_back(std::sqrt(std::max(0.0, sq[bi][size_t(l)] / used - m * m)));
      pb.keep_min.push_back(mn[bi][size_t(l)]);
      pb.keep_max.push_back(mx[bi][size_t(l)]);
    }
    // The mean over samples of exact per-sample totals is already b up to rounding of b N L; make
    // it exact (METHOD.md section 3).
    rescale_to_mean(pb.keep, opt.budgets[bi], 0.0, 1.0);
    if (opt.heads) {
      std::vector<double> k = head_sum[bi];
      for (double& x : k) x /= used;
      rescale_to_mean(k, opt.budgets[bi], 0.0, 1.0);
      for (int l = 0; l < L; ++l) pb.head_keep.emplace_back(k.begin() + ptrdiff_t(l) * H, k.begin() + ptrdiff_t(l + 1) * H);
    }
    profile.set_budget(std::move(pb));
  }
  return r;
}

}  // namespace pkv
