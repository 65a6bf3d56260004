// The CUDA back end's statistics through the seam (Backend::stats, reset_stats, device_info), what
// prefixkv bench reads instead of reaching into GpuModel and GpuKVPool: counts of prefills and
// steps, the pool's bytes agreeing with what the sequences hold, and a reset that starts them over.
// Runs on the GPU (pkv_cuda_tests) and on the fake device (pkv_cuda_model_emu_tests).
#include <gtest/gtest.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda_backend.h"
#include "kv/policy.h"

namespace pkv {
namespace {

std::string repo(const std::string& rel) { return std::string(PKV_SOURCE_DIR) + "/" + rel; }

PreparedPrompt prompt_of(const Model& model, int n, int salt) {
  PreparedPrompt p;
  const TextConfig& t = model.config().text;
  for (int i = 0; i < n; ++i) p.ids.push_back(int32_t((i * 37 + salt * 11 + 3) % t.vocab_size));
  p.embeddings.resize(size_t(n) * size_t(t.hidden));
  model.embed(p.ids.data(), n, p.embeddings.data());
  return p;
}

TEST(CudaBackendStats, CountPrefillsAndStepsAndAgreeWithTheSequences) {
  const std::unique_ptr<Model> model = Model::load(repo("models/prefixkv-llava-tiny"));
  cuda::CudaBackendOptions go;
  go.dtype = DType::F16;
  go.vision = false;
  go.kv_pool_bytes = size_t(32) << 20;
  const std::unique_ptr<Backend> backend = cuda::make_cuda_backend(*model, go);
  const int V = model->config().text.vocab_size;

  backend->reset_stats();
  Backend::Stats s = backend->stats();
  EXPECT_EQ(s.prefills, 0);
  EXPECT_EQ(s.steps, 0);
  EXPECT_EQ(s.pool_used_bytes, 0u);
  EXPECT_EQ(s.pool_peak_bytes, 0u);
  EXPECT_EQ(s.pool_total_bytes, backend->kv_pool_bytes());
  EXPECT_GT(s.weight_bytes, 0u);
  EXPECT_GE(s.device_total_bytes, s.device_free_bytes);
  // the weights and the pool are on the device
  EXPECT_GE(s.device_total_bytes - s.device_free_bytes, s.weight_bytes + s.pool_total_bytes);

  // Two sequences, one compressed at its prefill; then three batched steps.
  PolicyOptions po;
  po.budget = 0.5;
  std::unique_ptr<KVPolicy> full = make_policy("full", po), snap = make_policy("snapkv", po);
  std::vector<float> logits(size_t(2) * size_t(V));
  std::vector<std::unique_ptr<Backend::Sequence>> seqs;
  seqs.push_back(backend->prefill(prompt_of(*model, 48, 1), *full, logits.data()));
  seqs.push_back(backend->prefill(prompt_of(*model, 48, 2), *snap, logits.data() + V));
  const Backend::Stats after_prefill = backend->stats();
  EXPECT_EQ(after_prefill.prefills, 2);
  EXPECT_EQ(after_prefill.steps, 0);
  EXPECT_GT(after_prefill.prefill_model_ms, 0);
  EXPECT_GE(after_prefill.prefill_policy_ms, 0);
  EXPECT_GE(after_prefill.prefill_compact_ms, 0);
  EXPECT_EQ(after_prefill.pool_used_bytes, seqs[0]->kv_bytes() + seqs[1]->kv_bytes());
  // snapkv held its whole prompt before it compressed it: the peak saw more than is held now
  EXPECT_GT(after_prefill.pool_peak_bytes, after_prefill.pool_used_bytes);
  EXPECT_LT(seqs[1]->kv_bytes(), seqs[0]->kv_bytes());

  const std::vector<Backend::Sequence*> ptrs = {seqs[0].get(), seqs[1].get()};
  const int32_t tokens[2] = {5, 9};
  for (int i = 0; i < 3; ++i) backend->step_many(ptrs, tokens, logits.data());
  const Backend::Stats end = backend->stats();
  EXPECT_EQ(end.prefills, 2);
  EXPECT_EQ(end.steps, 3);
  EXPECT_GT(end.step_embed_ms + end.step_model_ms, 0);
  EXPECT_GE(end.step_device_ms, 0);
  EXPECT_GE(end.step_prep_ms, 0);
  EXPECT_GE(end.compact_device_ms, after_prefill.compact_device_ms);
  EXPECT_LE(end.graph_captures, end.steps);
  EXPECT_EQ(end.pool_used_bytes, seqs[0]->kv_bytes() + seqs[1]->kv_bytes());
  EXPECT_GE(end.pool_peak_bytes, end.pool_used_bytes);
  EXPECT_GE(end.pool_peak_bytes, after_prefill.pool_peak_bytes);
  EXPECT_EQ(end.pool_total_bytes, after_prefill.pool_total_bytes);

  // Released sequences return their blocks; the peak stays until the reset, which starts every
  // counter over.
  seqs.clear();
  s = backend->stats();
  EXPECT_EQ(s.pool_used_bytes, 0u);
  EXPECT_EQ(s.pool_peak_bytes, end.pool_peak_bytes);
  backend->reset_stats();
  s = backend->stats();
  EXPECT_EQ(s.prefills, 0);
  EXPECT_EQ(s.steps, 0);
  EXPECT_EQ(s.prefill_model_ms, 0);
  EXPECT_EQ(s.step_model_ms, 0);
  EXPECT_EQ(s.graph_captures, 0);
  EXPECT_EQ(s.compact_device_ms, 0);
  EXPECT_EQ(s.pool_peak_bytes, 0u);

  // What the bench prints once: the device and its switches, keyed as the bench's JSON names them.
  const Backend::DeviceInfo info = backend->device_info();
  EXPECT_FALSE(info.summary.empty());
  std::set<std::string> keys;
  for (const Backend::DeviceSwitch& sw : info.switches) {
    keys.insert(sw.key);
    EXPECT_FALSE(sw.what.empty()) << sw.key;
    EXPECT_FALSE(sw.off_by.empty()) << sw.key;
  }
  EXPECT_EQ(keys, (std::set<std::string>{"cuda_graphs", "gemv"}));
  EXPECT_GE(backend->measure_copy_bandwidth(), 0);  // 0 on the fake device
}

// The CPU back end measures none of it: zeros, but the weights it computes with.
TEST(CudaBackendStats, TheCpuBackEndReportsOnlyItsWeights) {
  const std::unique_ptr<Model> model = Model::load(repo("models/prefixkv-llava-tiny"));
  const std::unique_ptr<Backend> backend = make_cpu_backend(*model);
  FullPolicy full;
  std::vector<float> logits(size_t(model->config().text.vocab_size));
  std::unique_ptr<Backend::Sequence> seq = backend->prefill(prompt_of(*model, 16, 0), full, logits.data());
  const Backend::Stats s = backend->stats();
  EXPECT_EQ(s.weight_bytes, model->weight_bytes());
  EXPECT_EQ(s.prefills, 0);
  EXPECT_EQ(s.pool_total_bytes, 0u);
  EXPECT_EQ(s.pool_used_bytes, 0u);
  EXPECT_EQ(s.device_total_bytes, 0u);
  EXPECT_TRUE(backend->device_info().summary.empty());
  EXPECT_TRUE(backend->device_info().switches.empty());
  EXPECT_EQ(backend->measure_copy_bandwidth(), 0);
}

}  // namespace
}  // namespace pkv
