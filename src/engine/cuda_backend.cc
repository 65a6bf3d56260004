#include "engine/cuda_backend.h"

#include "core/error.h"
#include "engine/gpu_session.h"
#include "ops/cuda/device.h"

namespace pkv::cuda {

namespace {

class CudaBackend : public Backend {
 public:
  CudaBackend(const Model& model, const CudaBackendOptions& opt)
      : model_(model), gpu_(model, GpuModelOptions{opt.dtype, opt.vision}) {
    GpuKVPoolOptions po;
    if (opt.kv_pool_entries > 0) {
      po = pool_for_one_sequence(gpu_, opt.kv_pool_entries);
    } else {
      po.block_size = opt.block_size;
      po.bytes = opt.kv_pool_bytes ? opt.kv_pool_bytes : size_t(double(device_free_bytes()) * 0.9);
    }
    pool_ = std::make_unique<GpuKVPool>(gpu_, po);
    // One entry of one layer as the pool stores it: K and V in 16 bits and the int32 position.
    entry_bytes_ = pool_->block_bytes() / size_t(pool_->blocks().block_size());
    const std::string weights = gpu_.weights_summary();  // quantised GGUF weights only
    description_ = "cuda " + std::string(dtype_name(opt.dtype)) + " (" + device_summary() +
                   (weights.empty() ? "" : "; " + weights) + ")";
  }

  class CudaSequence : public Sequence {
   public:
    CudaSequence(GpuModel& gpu, GpuKVPool& pool, KVPolicy& policy) : session(gpu, pool, policy), pool_(pool) {}
    int position() const override { return session.position(); }
    const CacheView& entries() const override { return session.positions(); }
    size_t kv_bytes() const override { return session.kv_bytes(); }
    std::vector<size_t> kv_bytes_per_layer() const override {
      std::vector<size_t> b;
      const BlockPool& bp = pool_.blocks();
      for (int l = 0; l < pool_.n_layers(); ++l) {
        size_t n = bp.table(session.sequence(), l).size() * pool_.block_bytes();
        if (bp.per_head(session.sequence(), l))
          for (int h = 0; h < bp.n_kv_heads(); ++h) n += bp.head_table(session.sequence(), l, h).size() * bp.sub_block_bytes();
        b.push_back(n);
      }
      return b;
    }
    std::vector<std::vector<size_t>> kv_bytes_per_head() const override { return session.kv_bytes_per_head(); }
    const KVPolicy& policy() const override { return session.policy(); }
    GpuSession session;

   private:
    GpuKVPool& pool_;
  };

  std::string name() const override { return "cuda"; }
  std::string description() const override { return description_; }
  const Model& model() const override { return model_; }
  std::vector<float> encode_image(const float* pixels, Observer* obs) override {
    if (!gpu_.has_vision()) return model_.encode_image(pixels, obs);  // tower not uploaded: the CPU's
    return gpu_.encode_image(pixels, obs);
  }
  // With the tower uploaded, the image's embeddings stay on the GPU until the prefill splices them in.
  void use_for_images(PromptRequest& req, Observer* obs) override {
    if (!gpu_.has_vision()) return Backend::use_for_images(req, obs);
    req.encode_image = nullptr;
    req.encode_image_on_device = [this, obs](const float* pixels) -> std::shared_ptr<const DeviceImage> {
      auto img = std::make_shared<GpuDeviceImage>();
      img->rows = gpu_.encode_image_on_device(pixels, obs);
      return img;
    };
  }
  std::unique_ptr<Sequence> prefill(const PreparedPrompt& p, KVPolicy& policy, float* logits, Observer* obs) override {
    auto s = std::make_unique<CudaSequence>(gpu_, *pool_, policy);
    s->session.prefill(p, logits, obs);
    return s;
  }
  std::vector<std::unique_ptr<Sequence>> prefill_many(const std::vector<const PreparedPrompt*>& prompts,
                                                      const std::vector<KVPolicy*>& policies, float* logits) override {
    if (prompts.size() != policies.size())
      fail("prefill_many", std::to_string(prompts.size()) + " prompts for " + std::to_string(policies.size()) + " policies");
    std::vector<std::unique_ptr<Sequence>> seqs;
    std::vector<GpuSession*> sessions;
    for (KVPolicy* p : policies) {
      auto s = std::make_unique<CudaSequence>(gpu_, *pool_, *p);
      sessions.push_back(&s->session);
      seqs.push_back(std::move(s));
    }
    GpuSession::prefill_many(sessions, prompts, logits);
    return seqs;
  }
  bool chunked_prefill() const override { return true; }
  std::unique_ptr<Sequence> begin_prefill(const PreparedPrompt& p, KVPolicy& policy) override {
    auto s = std::make_unique<CudaSequence>(gpu_, *pool_, policy);
    s->session.begin_prefill(p);
    return s;
  }
  std::vector<bool> prefill_pieces(const std::vector<Sequence*>& seqs, const std::vector<int>& max_tokens,
                                   float* logits) override {
    std::vector<GpuSession*> sessions;
    for (Sequence* s : seqs) sessions.push_back(&as_cuda(*s).session);
    return GpuSession::prefill_pieces(sessions, max_tokens, logits);
  }
  struct CudaShared : SharedPrefill {
    CudaShared(GpuModel& gpu, GpuKVPool& pool) : session(gpu, pool, full) {}
    FullPolicy full;
    GpuSession session;
  };
  std::unique_ptr<SharedPrefill> prefill_shared(const PreparedPrompt& p, const std::vector<int>& from) override {
    auto sh = std::make_unique<CudaShared>(gpu_, *pool_);
    sh->begin(p, model_.config().text.vocab_size, from);
    sh->importance = sh->session.prefill_uncompressed(p, sh->logits.data(), from);
    return sh;
  }
  void add_head_importance(SharedPrefill& shared, const PreparedPrompt& p, int from, const std::string&) override {
    auto* sh = dynamic_cast<CudaShared*>(&shared);
    PKV_ASSERT_MSG(sh, "a shared prefill of another back end was given to the cuda back end");
    for (int f : shared.head_from)
      if (f == from) return;  // measured already
    GpuSession scratch(gpu_, *pool_, sh->full);  // its blocks go back when it ends
    shared.head_importance.push_back(std::move(scratch.prefill_uncompressed(p, nullptr, {from}, true)[0]));
    shared.head_from.push_back(from);
  }
  void add_extended_importance(SharedPrefill& shared, const PreparedPrompt& p, const ImportanceRequest& req,
                               const std::string&) override {
    auto* sh = dynamic_cast<CudaShared*>(&shared);
    PKV_ASSERT_MSG(sh, "a shared prefill of another back end was given to the cuda back end");
    for (const ImportanceRequest& r : shared.extended_req)
      if (r == req) return;  // measured already
    GpuSession scratch(gpu_, *pool_, sh->full);  // its blocks go back when it ends
    shared.extended_importance.push_back(scratch.measure_importance(p, req));
    shared.extended_req.push_back(req);
  }
  std::unique_ptr<Sequence> adopt(const SharedPrefill& shared, KVPolicy& policy) override {
    auto* sh = dynamic_cast<const CudaShared*>(&shared);
    PKV_ASSERT_MSG(sh, "a shared prefill of another back end was given to the cuda back end");
    auto s = std::make_unique<CudaSequence>(gpu_, *pool_, policy);
    s->session.adopt_prefill(sh->session, shared.importance_for(policy));
    return s;
  }
  void step_many(const std::vector<Sequence*>& seqs, const int32_t* tokens, float* logits) override {
    std::vector<GpuSession*> sessions;
    for (Sequence* s : seqs) sessions.push_back(&as_cuda(*s).session);
    GpuSession::step_many(sessions, tokens, logits);
  }
  void step(Sequence& seq, int32_t token, float* logits, Observer* obs) override {
    as_cuda(seq).session.step(token, logits, obs);
  }
  size_t kv_entry_bytes() const override { return entry_bytes_; }
  int kv_block() const override { return pool_->blocks().block_size(); }
  size_t kv_pool_bytes() const override { return pool_->blocks().stats().total_bytes; }

  // The pool's prefill and step times, the model's decode times and the pool's blocks, as
  // GpuSession and GpuModel keep them; the counters that only grow are read against their values at
  // the last reset.
  Stats stats() const override {
    Stats s;
    const GpuKVPool::PrefillTimes& pt = pool_->prefill_times();
    s.prefills = pt.prefills;
    s.prefill_model_ms = pt.model_ms, s.prefill_policy_ms = pt.policy_ms, s.prefill_compact_ms = pt.compact_ms;
    const GpuModel::DecodeTimes dt = gpu_.decode_times();
    s.steps = dt.steps;
    s.step_device_ms = dt.gpu_ms, s.step_prep_ms = dt.host_ms;
    const GpuKVPool::StepTimes& st = pool_->step_times();
    s.step_embed_ms = st.embed_ms, s.step_model_ms = st.model_ms;
    s.step_policy_ms = st.policy_ms, s.step_compact_ms = st.compact_ms;
    s.graph_captures = gpu_.graph_captures() - graph_captures0_;
    s.compact_device_ms = pool_->compaction_gpu_ms() - compact_gpu0_;
    const BlockPoolStats b = pool_->blocks().stats();
    s.pool_total_bytes = b.total_bytes, s.pool_used_bytes = b.used_bytes;
    s.pool_peak_bytes = size_t(b.peak_used_blocks) * b.bytes_per_block;
    s.device_total_bytes = device_total_bytes(), s.device_free_bytes = device_free_bytes();
    s.weight_bytes = gpu_.weight_bytes();
    return s;
  }
  void reset_stats() override {
    pool_->prefill_times() = {};
    pool_->step_times() = {};
    gpu_.reset_decode_times();
    pool_->blocks().reset_peak();
    graph_captures0_ = gpu_.graph_captures();
    compact_gpu0_ = pool_->compaction_gpu_ms();
  }
  DeviceInfo device_info() const override {
    DeviceInfo d;
    d.summary = device_summary();
    d.switches.push_back({"cuda_graphs", "decode steps as CUDA graphs", gpu_.uses_graphs(), "PKV_CUDA_GRAPHS=0"});
    d.switches.push_back(
        {"gemv", "gemv for <= " + std::to_string(kGemvAutoRows) + " rows", gemv_enabled(), "PKV_GEMV=0"});
    return d;
  }
  double measure_copy_bandwidth() override { return cuda::measure_copy_bandwidth(); }

 private:
  static CudaSequence& as_cuda(Sequence& s) {
    auto* c = dynamic_cast<CudaSequence*>(&s);
    PKV_ASSERT_MSG(c, "a sequence of another back end was given to the cuda back end");
    return *c;
  }
  const Model& model_;
  GpuModel gpu_;
  std::unique_ptr<GpuKVPool> pool_;
  size_t entry_bytes_ = 0;
  std::string description_;
  int graph_captures0_ = 0;   // the counters' values at the last reset_stats()
  double compact_gpu0_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const Model& model, const CudaBackendOptions& opt) {
  return std::make_unique<CudaBackend>(model, opt);
}

}  // namespace pkv::cuda
