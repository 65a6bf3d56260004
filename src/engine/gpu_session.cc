#include "engine/gpu_session.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <numeric>
#include <set>

#include "core/error.h"
#include "core/threads.h"

namespace pkv::cuda {

namespace {
constexpr const char* kWhere = "GPU session";

// The mean over the counted queries (QueryReduce::Mean): the sum the prefill measured over the
// prompt's queries from req.from on, divided by their count, as extended_importance does.
void mean_over_queries(const ImportanceRequest& req, int T, std::vector<std::vector<float>>& imp) {
  if (!req.needed || req.reduce != QueryReduce::Mean) return;
  const float queries = float(T - std::max(0, req.from));
  for (auto& l : imp)
    for (float& x : l) x /= queries;
}

// A plain request for the importance from one query on (prefill_uncompressed's windows).
ImportanceRequest window_request(int from, bool per_kv_head) {
  ImportanceRequest r;
  r.needed = true, r.from = from, r.per_kv_head = per_kv_head;
  return r;
}
}  // namespace

GpuSession::GpuSession(GpuModel& model, GpuKVPool& pool, KVPolicy& policy)
    : model_(model),
      pool_(pool),
      policy_(policy),
      positions_(model.config().text.n_layers, pool.blocks().n_kv_heads()),
      seq_(pool.blocks().add_sequence()) {
  if (pool.stream() != model.stream()) {
    pool.blocks().remove_sequence(seq_);
    fail(kWhere, "the KV pool was made for another GpuModel");
  }
}

GpuSession::~GpuSession() {
  if (pool_.blocks().has_sequence(seq_)) pool_.blocks().remove_sequence(seq_);
}

std::vector<int> GpuSession::entries_per_layer() const {
  std::vector<int> e;
  for (int l = 0; l < pool_.n_layers(); ++l) e.push_back(pool_.blocks().entries(seq_, l));
  return e;
}

size_t GpuSession::kv_bytes() const { return pool_.blocks().bytes_held(seq_); }

std::vector<std::vector<size_t>> GpuSession::kv_bytes_per_head() const { return pool_.blocks().bytes_per_head(seq_); }

// The host positions and the pool must agree on every layer's (and head's) entry count (a
// bookkeeping bug otherwise).
void GpuSession::check_positions() const {
  const BlockPool& bp = pool_.blocks();
  for (int l = 0; l < pool_.n_layers(); ++l) {
    PKV_ASSERT_MSG(positions_.per_head(l) == bp.per_head(seq_, l),
                   "GPU session " + std::to_string(seq_) + " layer " + std::to_string(l) +
                       ": the host and the pool disagree on whether its heads hold their own entries");
    if (positions_.per_head(l)) {
      for (int h = 0; h < bp.n_kv_heads(); ++h)
        PKV_ASSERT_MSG(int(positions_.head_positions(l, h).size()) == bp.head_entries(seq_, l, h),
                       "GPU session " + std::to_string(seq_) + " layer " + std::to_string(l) + " head " +
                           std::to_string(h) + ": the host holds " + std::to_string(positions_.head_positions(l, h).size()) +
                           " positions, the pool " + std::to_string(bp.head_entries(seq_, l, h)) + " entries");
      continue;
    }
    PKV_ASSERT_MSG(positions_.size(l) == pool_.blocks().entries(seq_, l),
                   "GPU session " + std::to_string(seq_) + " layer " + std::to_string(l) + ": the host holds " +
                       std::to_string(positions_.size(l)) + " positions, the pool " +
                       std::to_string(pool_.blocks().entries(seq_, l)) + " entries");
  }
}

void GpuSession::take_plan(KeepPlan plan, std::vector<GpuKVPool::Job>& jobs) {
  check_plan(plan, positions_, policy_.name());
  positions_.apply(plan);
  for (LayerKeep& k : plan.layers) {
    PKV_ASSERT(k.before == pool_.blocks().entries(seq_, k.layer));
    jobs.push_back(GpuKVPool::Job{seq_, k.layer, std::move(k.keep), k.merge, std::move(k.head_keep)});
  }
}

void GpuSession::run_prompt(const PreparedPrompt& p, float* logits, std::vector<std::vector<float>>* importance,
                            const ImportanceRequest& req, Observer* obs) {
  const int T = int(p.ids.size());
  if (T == 0) fail("prompt", "is empty");
  if (pos_ != 0 || pending_) fail(kWhere, "prefill on a session that already holds " + std::to_string(pos_) + " tokens");
  const int D = model_.config().text.hidden;
  std::vector<int32_t> pos(static_cast<size_t>(T));
  std::iota(pos.begin(), pos.end(), 0);
  if (p.device_image) {
    // The image is on the GPU already: every row is built there (the text's from the ids).
    const auto* img = dynamic_cast<const GpuDeviceImage*>(p.device_image.get());
    if (!img) fail(kWhere, "the prompt's image was encoded by another back end");
    if (p.image_offset < 0 || p.image_tokens != img->rows.rows)
      fail(kWhere, "the prompt places " + std::to_string(p.image_tokens) + " image tokens, its image has " +
                       std::to_string(img->rows.rows) + " rows");
    model_.prefill(pool_, seq_, p.ids.data(), &img->rows, p.image_offset, T, pos.data(), logits, importance, req.from,
                   obs, req.per_kv_head, req.weight, req.reduce == QueryReduce::Max);
  } else {
    if (p.embeddings.size() != size_t(T) * D)
      fail(kWhere, "the prompt's embeddings hold " + std::to_string(p.embeddings.size()) + " values, expected " +
                       std::to_string(T) + " x " + std::to_string(D));
    model_.prefill(pool_, seq_, p.embeddings.data(), T, pos.data(), logits, importance, req.from, obs, req.per_kv_head,
                   req.weight, req.reduce == QueryReduce::Max);
  }
  positions_.append_all(pos.data(), T);
  pos_ = T;
  if (importance) mean_over_queries(req, T, *importance);
}

double GpuSession::compress_prompt(const std::vector<std::vector<float>>& importance) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<GpuKVPool::Job> jobs;
  take_plan(policy_.after_prefill(positions_, importance, pos_), jobs);
  const double policy_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const bool compacts = !jobs.empty();
  pool_.compact(std::move(jobs));
  if (compacts) stream_synchronize(pool_.stream());
  check_positions();
  return policy_ms;
}

void GpuSession::prefill(const PreparedPrompt& p, float* logits, Observer* obs) {
  const int T = int(p.ids.size());
  std::vector<std::vector<float>> importance;
  const ImportanceRequest req = policy_.prefill_importance(T);
  check_gpu_prompt_importance(req, T);
  using clock = std::chrono::steady_clock;
  auto ms = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  const clock::time_point t0 = clock::now();
  run_prompt(p, logits, req.needed ? &importance : nullptr, req, obs);
  const clock::time_point t1 = clock::now();  // the prefill ends synchronised (logits, error flag)
  const double policy_ms = compress_prompt(importance);
  GpuKVPool::PrefillTimes& pt = pool_.prefill_times();
  ++pt.prefills;
  pt.model_ms += ms(t0, t1);
  pt.policy_ms += policy_ms;
  pt.compact_ms += ms(t1, clock::now()) - policy_ms;
}

void GpuSession::begin_prefill(const PreparedPrompt& p) {
  const int T = int(p.ids.size());
  if (T == 0) fail("prompt", "is empty");
  if (pos_ != 0 || pending_) fail(kWhere, "begin_prefill on a session that already holds a prompt");
  const int D = model_.config().text.hidden;
  if (p.device_image) {
    const auto* img = dynamic_cast<const GpuDeviceImage*>(p.device_image.get());
    if (!img) fail(kWhere, "the prompt's image was encoded by another back end");
    if (p.image_offset < 0 || p.image_tokens != img->rows.rows || p.image_offset + img->rows.rows > T)
      fail(kWhere, "the prompt places " + std::to_string(p.image_tokens) + " image tokens at " +
                       std::to_string(p.image_offset) + ", its image has " + std::to_string(img->rows.rows) + " rows");
  } else if (p.embeddings.size() != size_t(T) * D) {
    fail(kWhere, "the prompt's embeddings hold " + std::to_string(p.embeddings.size()) + " values, expected " +
                     std::to_string(T) + " x " + std::to_string(D));
  }
  auto pending = std::make_unique<Pending>();
  pending->request = policy_.prefill_importance(T);
  check_gpu_prompt_importance(pending->request, T);
  pending->prompt = p;
  if (pending->request.needed) {
    const size_t heads = pending->request.per_kv_head ? size_t(model_.config().text.n_kv_heads) : 1;
    pending->importance.assign(size_t(model_.config().text.n_layers), std::vector<float>(heads * size_t(T), 0.f));
  }
  pending_ = std::move(pending);
}

int GpuSession::prefill_left() const { return pending_ ? int(pending_->prompt.ids.size()) - pending_->done : 0; }

GpuPrefillPart GpuSession::next_part(int max_tokens, std::vector<int32_t>& pos) {
  PKV_ASSERT(pending_);
  Pending& pd = *pending_;
  const int T = int(pd.prompt.ids.size()), left = T - pd.done;
  const int n = max_tokens > 0 ? std::min(max_tokens, left) : left;
  pos.resize(size_t(n));
  std::iota(pos.begin(), pos.end(), pd.done);
  GpuPrefillPart part;
  part.seq = seq_, part.past = pd.done, part.n = n, part.pos = pos.data();
  if (pd.prompt.device_image) {
    const auto* img = static_cast<const GpuDeviceImage*>(pd.prompt.device_image.get());
    part.ids = pd.prompt.ids.data() + pd.done;
    part.image = &img->rows;
    part.image_row0 = pd.prompt.image_offset - pd.done;
  } else {
    part.x = pd.prompt.embeddings.data() + size_t(pd.done) * model_.config().text.hidden;
  }
  // The queries from request.from on count: those of this piece, if any.
  if (pd.request.needed && pd.request.from < pd.done + n) {
    part.importance = &pd.importance;
    part.importance_from = std::max(0, pd.request.from - pd.done);
    if (pd.request.per_kv_head) part.importance_head_stride = T;
    part.importance_weight = pd.request.weight;
    part.importance_max = pd.request.reduce == QueryReduce::Max;
  }
  return part;
}

std::vector<bool> GpuSession::prefill_pieces(const std::vector<GpuSession*>& sessions, const std::vector<int>& max_tokens,
                                           float* logits) {
  if (sessions.empty()) return {};
  if (max_tokens.size() != sessions.size())
    fail(kWhere, "prefill_pieces: " + std::to_string(max_tokens.size()) + " token counts for " +
                     std::to_string(sessions.size()) + " sessions");
  GpuModel& model = sessions[0]->model_;
  GpuKVPool& pool = sessions[0]->pool_;
  std::set<const GpuSession*> distinct;
  for (const GpuSession* s : sessions) {
    if (!s) fail(kWhere, "prefill_pieces: a null session");
    if (&s->model_ != &model || &s->pool_ != &pool)
      fail(kWhere, "prefill_pieces: every session must share one GpuModel and one GpuKVPool");
    if (!distinct.insert(s).second) fail(kWhere, "prefill_pieces: session " + std::to_string(s->seq_) + " appears twice");
    if (!s->pending_) fail(kWhere, "prefill_pieces: session " + std::to_string(s->seq_) + " has no prompt (begin_prefill)");
  }
  using clock = std::chrono::steady_clock;
  auto ms = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  const size_t n = sessions.size(), V = size_t(model.config().text.vocab_size);
  std::vector<std::vector<int32_t>> pos(n);
  std::vector<GpuPrefillPart> parts;
  std::vector<bool> ends(n);
  for (size_t i = 0; i < n; ++i) {
    GpuSession& s = *sessions[i];
    parts.push_back(s.next_part(max_tokens[i], pos[i]));
    ends[i] = s.pending_->done + parts.back().n == int(s.pending_->prompt.ids.size());
    if (ends[i] && logits) parts.back().logits = logits + i * V;
  }
  const clock::time_point t0 = clock::now();
  model.prefill_parts(pool, parts);  // throws before any change when out of blocks
  const clock::time_point t1 = clock::now();
  std::vector<GpuKVPool::Job> jobs;
  int finished = 0;
  for (size_t i = 0; i < n; ++i) {
    GpuSession& s = *sessions[i];
    s.positions_.append_all(pos[i].data(), int(pos[i].size()));
    s.pos_ += int(pos[i].size());
    s.pending_->done += int(pos[i].size());
    if (!ends[i]) continue;
    ++finished;
    const std::unique_ptr<Pending> pd = std::move(s.pending_);
    mean_over_queries(pd->request, s.pos_, pd->importance);
    s.take_plan(s.policy_.after_prefill(s.positions_, pd->importance, s.pos_), jobs);
  }
  const clock::time_point t2 = clock::now();
  const bool compacts = !jobs.empty();
  pool.compact(std::move(jobs));
  if (compacts) stream_synchronize(pool.stream());
  for (const GpuSession* s : sessions) s->check_positions();
  GpuKVPool::PrefillTimes& pt = pool.prefill_times();
  pt.prefills += finished;
  pt.model_ms += ms(t0, t1);
  pt.policy_ms += ms(t1, t2);
  pt.compact_ms += ms(t2, clock::now());
  return ends;
}

void GpuSession::prefill_many(const std::vector<GpuSession*>& sessions, const std::vector<const PreparedPrompt*>& prompts,
                              float* logits) {
  if (prompts.size() != sessions.size())
    fail(kWhere, "prefill_many: " + std::to_string(prompts.size()) + " prompts for " + std::to_string(sessions.size()) +
                     " sessions");
  size_t begun = 0;
  try {
    for (; begun < sessions.size(); ++begun) {
      if (!sessions[begun] || !prompts[begun]) fail(kWhere, "prefill_many: a null session or prompt");
      sessions[begun]->begin_prefill(*prompts[begun]);
    }
    prefill_pieces(sessions, std::vector<int>(sessions.size(), 0), logits);
  } catch (...) {
    for (size_t i = 0; i < begun; ++i) sessions[i]->pending_.reset();  // nothing ran: they stay empty
    throw;
  }
}

std::vector<std::vector<std::vector<float>>> GpuSession::prefill_uncompressed(const PreparedPrompt& p, float* logits,
                                                                              const std::vector<int>& importance_from,
                                                                              bool per_kv_head) {
  const int T = int(p.ids.size());
  for (int f : importance_from)
    if (f < 0 || f >= std::max(T, 1))
      fail(kWhere, "importance from query " + std::to_string(f) + " of a " + std::to_string(T) + "-token prompt");
  std::vector<std::vector<std::vector<float>>> imp(importance_from.size());
  run_prompt(p, logits, imp.empty() ? nullptr : &imp[0], window_request(imp.empty() ? 0 : importance_from[0], per_kv_head));
  for (size_t i = 1; i < importance_from.size(); ++i) {
    GpuSession scratch(model_, pool_, policy_);  // its blocks go back when it ends
    scratch.run_prompt(p, nullptr, &imp[i], window_request(importance_from[i], per_kv_head));
  }
  return imp;
}

std::vector<std::vector<float>> GpuSession::measure_importance(const PreparedPrompt& p, const ImportanceRequest& req) {
  const int T = int(p.ids.size());
  check_gpu_prompt_importance(req, T);
  std::vector<std::vector<float>> imp;
  run_prompt(p, nullptr, req.needed ? &imp : nullptr, req);
  return imp;
}

void GpuSession::adopt_prefill(const GpuSession& full, const std::vector<std::vector<float>>& importance) {
  if (&full.model_ != &model_ || &full.pool_ != &pool_) fail(kWhere, "adopt_prefill: another model's or pool's session");
  if (pos_ != 0 || pending_) fail(kWhere, "adopt_prefill on a session that already holds " + std::to_string(pos_) + " tokens");
  pool_.copy_sequence(full.seq_, seq_);
  positions_ = full.positions_;
  pos_ = full.pos_;
  compress_prompt(importance);
}

void GpuSession::step(int32_t token, float* logits, Observer* obs) { step_many({this}, &token, logits, obs); }

void GpuSession::step_many(const std::vector<GpuSession*>& sessions, const int32_t* tokens, float* logits,
                           Observer* obs) {
  if (sessions.empty()) return;
  GpuModel& model = sessions[0]->model_;
  GpuKVPool& pool = sessions[0]->pool_;
  const int B = int(sessions.size());
  std::set<const GpuSession*> distinct;
  for (const GpuSession* s : sessions) {
    if (!s) fail(kWhere, "step_many: a null session");
    if (&s->model_ != &model || &s->pool_ != &pool)
      fail(kWhere, "step_many: every session must share one GpuModel and one GpuKVPool");
    if (!distinct.insert(s).second) fail(kWhere, "step_many: session " + std::to_string(s->seq_) + " appears twice");
    if (s->pending_) fail(kWhere, "step_many: session " + std::to_string(s->seq_) + " is still prefilling its prompt");
  }

  using clock = std::chrono::steady_clock;
  auto ms = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  const clock::time_point t0 = clock::now();
  // The tokens' embeddings are gathered on the device from its copy of the embedding table
  // (GpuModel::decode checks the ids first): nothing of the step's input goes through the host but
  // the ids and positions.
  GpuDecodeBatch batch;
  std::vector<int32_t> positions(static_cast<size_t>(B));
  bool any_importance = false;
  for (int i = 0; i < B; ++i) {
    GpuSession& s = *sessions[size_t(i)];
    positions[size_t(i)] = s.pos_;
    batch.seqs.push_back(s.seq_);
    const bool want = s.policy_.needs_decode_importance();
    batch.want_importance.push_back(want);
    any_importance = any_importance || want;
  }
  std::vector<std::vector<std::vector<float>>> importance;
  batch.tokens = tokens;
  batch.positions = positions.data();
  batch.observer = obs;
  batch.logits = logits;
  if (any_importance) batch.importance = &importance;
  else batch.want_importance.clear();
  // The policies, one sequence per task (each touches only its own positions and policy): on the
  // host this is O(entries changed) per sequence, and batches of dozens of sequences add up. Then
  // one compaction call for the whole batch.
  double policy_ms = 0, compact_ms = 0;
  auto evict = [&] {
    const clock::time_point p0 = clock::now();
    std::vector<std::vector<GpuKVPool::Job>> per(static_cast<size_t>(B));
    std::vector<std::exception_ptr> errors(static_cast<size_t>(B));
    parallel_for(size_t(B), 1, [&](size_t begin, size_t end, int) {
      for (size_t i = begin; i < end; ++i) {
        try {
          GpuSession& s = *sessions[i];
          const int32_t position = s.pos_;
          s.positions_.append_all(&position, 1);
          ++s.pos_;
          const bool want = s.policy_.needs_decode_importance();
          const std::vector<std::vector<float>>* step_imp = want ? &importance[i] : nullptr;
          s.take_plan(s.policy_.after_decode_step(s.positions_, s.pos_, step_imp), per[i]);
        } catch (...) {
          errors[i] = std::current_exception();
        }
      }
    });
    for (const std::exception_ptr& e : errors)
      if (e) std::rethrow_exception(e);
    const clock::time_point p1 = clock::now();
    std::vector<GpuKVPool::Job> jobs;
    for (auto& v : per)
      for (auto& j : v) jobs.push_back(std::move(j));
    pool.compact(std::move(jobs));
    policy_ms = ms(p0, p1);
    compact_ms = ms(p1, clock::now());
  };
  // Without decode-time importance the policies need nothing the step computes (positions and
  // counts only), so they run, and the compaction is enqueued behind the step, while the GPU works.
  if (!any_importance) batch.while_running = evict;
  const clock::time_point t1 = clock::now();
  model.decode(pool, batch);  // throws before any change when out of blocks
  const clock::time_point t2 = clock::now();
  if (any_importance) evict();
  for (const GpuSession* s : sessions) s->check_positions();
  GpuKVPool::StepTimes& st = pool.step_times();
  ++st.steps;
  st.embed_ms += ms(t0, t1);
  st.model_ms += ms(t1, t2) - (any_importance ? 0.0 : policy_ms + compact_ms);
  st.policy_ms += policy_ms;
  st.compact_ms += compact_ms;
}

GpuKVPoolOptions pool_for_one_sequence(const GpuModel& model, int entries) {
  GpuKVPoolOptions o;
  o.block_size = 16;
  const int L = model.config().text.n_layers;
  const int per_layer = (std::max(entries, 1) + o.block_size - 1) / o.block_size;
  // Beyond the sequence's blocks: one layer's (a per-head plan splits a layer into head tables
  // beside its shared table before that one is released) and one per layer (head tables round up
  // each head to block_size entries: at most n_kv_heads - 1 parts, under a block, per layer more).
  o.n_blocks = L * per_layer + per_layer + L;
  return o;
}

}  // namespace pkv::cuda
