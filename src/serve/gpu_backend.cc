#include "serve/gpu_backend.h"

#include "core/error.h"
#include "ops/cuda/device.h"
#include "engine/gpu_session.h"

namespace pkv::serve {

namespace {

class GpuBackend : public SequenceBackend {
 public:
  GpuBackend(const Model& model, const GpuBackendOptions& opt) : gpu_(model, opt.model) {
    cuda::GpuKVPoolOptions po;
    po.block_size = opt.block_size;
    po.bytes = opt.pool_bytes ? opt.pool_bytes : size_t(double(cuda::device_free_bytes()) * 0.9);
    pool_ = std::make_unique<cuda::GpuKVPool>(gpu_, po);
    // One entry of one layer as the pool stores it: K and V in 16 bits and the int32 position.
    entry_bytes_ = pool_->block_bytes() / size_t(pool_->blocks().block_size());
  }
  struct GpuSeq : Seq {
    std::unique_ptr<cuda::GpuSession> s;
    int position() const override { return s->position(); }
    size_t kv_bytes() const override { return s->kv_bytes(); }
    std::vector<int> entries_per_layer() const override { return s->entries_per_layer(); }
  };
  std::string name() const override { return "cuda"; }
  std::unique_ptr<Seq> prefill(const PreparedPrompt& p, KVPolicy& policy, float* logits) override {
    auto q = std::make_unique<GpuSeq>();
    q->s = std::make_unique<cuda::GpuSession>(gpu_, *pool_, policy);
    q->s->prefill(p, logits);
    return q;
  }
  void step_many(const std::vector<Seq*>& seqs, const int32_t* tokens, float* logits) override {
    std::vector<cuda::GpuSession*> ss;
    for (Seq* q : seqs) ss.push_back(static_cast<GpuSeq*>(q)->s.get());
    cuda::GpuSession::step_many(ss, tokens, logits);
  }
  size_t kv_entry_bytes() const override { return entry_bytes_; }
  int kv_block() const override { return pool_->blocks().block_size(); }
  std::function<std::vector<float>(const float*)> image_encoder() override {
    if (!gpu_.has_vision()) return {};
    return [this](const float* px) { return gpu_.encode_image(px); };
  }
  size_t pool_bytes() const { return pool_->blocks().stats().total_bytes; }

 private:
  cuda::GpuModel gpu_;
  std::unique_ptr<cuda::GpuKVPool> pool_;
  size_t entry_bytes_ = 0;
};

}  // namespace

std::shared_ptr<SequenceBackend> gpu_backend(const Model& model, const GpuBackendOptions& opt) {
  return std::make_shared<GpuBackend>(model, opt);
}

size_t gpu_backend_pool_bytes(const SequenceBackend& backend) {
  const auto* g = dynamic_cast<const GpuBackend*>(&backend);
  if (!g) fail("serve", "not the GPU back end");
  return g->pool_bytes();
}

}  // namespace pkv::serve
