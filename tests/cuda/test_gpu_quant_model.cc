// Quantised GGUF language models on the GPU against the CPU on the same file (pkv_cuda_tests on the
// GPU; pkv_cuda_model_emu_tests over the fake device). The files are made here from the bundled
// model: prefixkv's own Q8_0 and Q4_0 exports, and a Q4_K / Q6_K mix written by a small test-only
// K-quantiser (the mix of llama.cpp's Q4_K_M: Q6_K for attn_v, ffn_down and output, Q4_K for the
// rest), so the fused q/k/v product has parts stored differently. The GPU keeps every quantised
// tensor as the file's blocks (its device bytes are the file's bytes) and must give the CPU's
// greedy tokens, with logits within the bound below.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include "core/dtype.h"
#include "engine/cuda_backend.h"
#include "engine/decoding.h"
#include "engine/engine.h"
#include "engine/gpu_session.h"
#include "engine/query_importance.h"
#include "io/gguf.h"
#include "kv/policy.h"
#include "model/gguf_export.h"
#include "model/gpu_model.h"
#include "ops/quant.h"
#include "text/tokenizer.h"
#include "vision/image.h"

namespace pkv::cuda {
namespace {

std::string repo(const std::string& rel) { return std::string(PKV_SOURCE_DIR) + "/" + rel; }

std::string temp_file(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("pkv_gpu_quant_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

void put_half(uint8_t* at, float v) {
  const uint16_t h = f32_to_f16(v);
  std::memcpy(at, &h, 2);
}
float half_back(float v) { return f16_to_f32(f32_to_f16(v)); }

// Test-only quantisers of one 256-element block into the layouts of ops/quant.h (simple min/max
// scales, not ggml's search: the test needs valid blocks close to the weights, not ggml's bytes).
void quantize_q4_k(const float* x, uint8_t* b) {
  float scale[8], min[8];
  for (int j = 0; j < 8; ++j) {
    float lo = 0.f, hi = 0.f;
    for (int l = 0; l < 32; ++l) lo = std::min(lo, x[32 * j + l]), hi = std::max(hi, x[32 * j + l]);
    scale[j] = (hi - lo) / 15.f, min[j] = -lo;
  }
  const float d = half_back(*std::max_element(scale, scale + 8) / 63.f);
  const float dmin = half_back(*std::max_element(min, min + 8) / 63.f);
  put_half(b, d), put_half(b + 2, dmin);
  int sc[8], m[8];
  for (int j = 0; j < 8; ++j) {
    sc[j] = d > 0 ? std::min(63, int(std::lround(scale[j] / d))) : 0;
    m[j] = dmin > 0 ? std::min(63, int(std::lround(min[j] / dmin))) : 0;
  }
  uint8_t* s = b + 4;
  for (int j = 0; j < 4; ++j) {
    s[j] = uint8_t((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = uint8_t((m[j] & 63) | ((m[j + 4] >> 4) << 6));
    s[j + 8] = uint8_t((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
  }
  uint8_t* q = b + 16;
  std::memset(q, 0, 128);
  for (int j = 0; j < 8; ++j) {
    const float ds = d * float(sc[j]), dm = dmin * float(m[j]);
    for (int l = 0; l < 32; ++l) {
      const int v = ds > 0 ? std::clamp(int(std::lround((x[32 * j + l] + dm) / ds)), 0, 15) : 0;
      q[32 * (j / 2) + l] |= uint8_t(v << (4 * (j % 2)));
    }
  }
}

void quantize_q6_k(const float* x, uint8_t* b) {
  // Element e: half h = e / 128, quarter qd = e % 128 / 32, l = e % 32; scale sc[8 h + l / 16 + 2 qd].
  auto scale_of = [](int e) { return 8 * (e / 128) + (e % 32) / 16 + 2 * (e % 128 / 32); };
  float amax[16] = {};
  for (int e = 0; e < 256; ++e) amax[scale_of(e)] = std::max(amax[scale_of(e)], std::fabs(x[e]));
  const float d = half_back(*std::max_element(amax, amax + 16) / 31.f / 127.f);
  put_half(b + 208, d);
  int sc[16];
  for (int s = 0; s < 16; ++s) sc[s] = d > 0 ? std::min(127, int(std::lround(amax[s] / 31.f / d))) : 0;
  for (int s = 0; s < 16; ++s) b[192 + s] = uint8_t(int8_t(sc[s]));
  std::memset(b, 0, 192);
  for (int e = 0; e < 256; ++e) {
    const float step = d * float(sc[scale_of(e)]);
    const int q = (step > 0 ? std::clamp(int(std::lround(x[e] / step)), -32, 31) : 0) + 32;
    const int h = e / 128, qd = e % 128 / 32, l = e % 32;
    b[64 * h + l + 32 * (qd & 1)] |= uint8_t((q & 15) << (4 * (qd >> 1)));
    b[128 + 32 * h + l] |= uint8_t((q >> 4) << (2 * qd));
  }
}

// An F32 GGUF rewritten with its matrices as Q4_K and Q6_K (llama.cpp's Q4_K_M choice of which).
void write_k_mix(const std::string& f32_path, const std::string& out) {
  const auto f = GgufFile::open(f32_path);
  GgufWriter w(f->alignment());
  for (const auto& [key, v] : f->metadata()) w.set(key, v);
  for (const GgufTensor& t : f->tensors()) {
    const bool matrix = t.ne.size() == 2 && t.type == quant::kF32 && t.ne[0] % 256 == 0;
    if (!matrix) {
      w.add_tensor(t.name, t.ne, t.type, std::vector<uint8_t>(t.data, t.data + t.bytes));
      continue;
    }
    const bool six = t.name.find("attn_v") != std::string::npos || t.name.find("ffn_down") != std::string::npos ||
                     t.name == "output.weight";
    const uint32_t type = six ? quant::kQ6_K : quant::kQ4_K;
    const int64_t n = t.numel();
    std::vector<float> x(static_cast<size_t>(n));
    std::memcpy(x.data(), t.data, size_t(n) * 4);
    std::vector<uint8_t> q(quant::row_bytes(type, n));
    for (int64_t blk = 0; blk < n / 256; ++blk)
      (six ? quantize_q6_k : quantize_q4_k)(&x[size_t(blk) * 256], &q[size_t(blk) * quant::block_bytes(type)]);
    // The test-only quantiser is checked here: its blocks give back the weights within a step.
    std::vector<float> back(x.size());
    quant::dequantize_row(type, q.data(), back.data(), n);
    float amax = 0, worst = 0;
    for (size_t i = 0; i < x.size(); ++i) amax = std::max(amax, std::fabs(x[i])), worst = std::max(worst, std::fabs(back[i] - x[i]));
    EXPECT_LE(worst, amax / (six ? 31.f : 7.f)) << t.name << ": the test's K-quantiser";
    w.add_tensor(t.name, t.ne, type, std::move(q));
  }
  w.write(out);
}

struct QuantFile {
  std::string name, path;
  size_t quant_bytes = 0;  // the file's bytes of quantised tensors
};

const std::vector<QuantFile>& quant_files() {
  static const std::vector<QuantFile> files = [] {
    const std::string dir = repo("models/prefixkv-llava-tiny");
    const auto model = Model::load(dir);
    const Tokenizer tok(dir + "/tokenizer.model");
    std::vector<QuantFile> out;
    for (const auto& [name, type] : {std::pair<const char*, uint32_t>{"q8_0", quant::kQ8_0}, {"q4_0", quant::kQ4_0},
                                     {"f32", quant::kF32}}) {
      GgufExportOptions o;
      o.type = type;
      const std::string path = temp_file(std::string("tiny_") + name + ".gguf");
      export_text_gguf(*model, tok, path, o);
      if (type == quant::kF32) {
        const std::string mix = temp_file("tiny_q4_k_m.gguf");
        write_k_mix(path, mix);
        out.push_back({"q4_k/q6_k", mix});
      } else {
        out.push_back({name, path});
      }
    }
    for (QuantFile& q : out)
      for (const GgufTensor& t : GgufFile::open(q.path)->tensors())
        if (t.type != quant::kF32 && t.type != quant::kF16 && t.type != quant::kBF16) q.quant_bytes += t.bytes;
    return out;
  }();
  return files;
}

double norm_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += double(a[i] - b[i]) * (a[i] - b[i]), den += double(b[i]) * b[i];
  return std::sqrt(num / std::max(den, 1e-30));
}
int argmax(const std::vector<float>& x) { return int(std::max_element(x.begin(), x.end()) - x.begin()); }

// The bound: the dense GPU tests hold the bundled model's logits to 2e-3 (F16) / 1e-2 (BF16) norm-wise
// (tests/cuda/test_gpu_model.cc), where each product term carries one 16-bit rounding (of the
// activation; the weights are exact in the compute type). Here the prefill's products read a copy of
// the weights rounded to the compute type too, two roundings per term: twice that, for the prefill
// and for the steps (which attend to the prefill's K/V).
double bound(DType t) { return 2 * (t == DType::F16 ? 2e-3 : 1e-2); }

constexpr int kSteps = 16;

TEST(GpuQuantModel, GgufBlocksStayBlocksAndGiveTheCpusTokens) {
  const std::string dir = repo("models/prefixkv-llava-tiny");
  const Tokenizer tok(dir + "/tokenizer.model");
  for (const QuantFile& f : quant_files()) {
    SCOPED_TRACE(f.name);
    const auto model = Model::load(f.path);
    const Engine engine(*model, tok);
    PromptRequest req;
    req.text = "Describe the image in detail. The scene shows a red circle left of a blue square.";
    req.tmpl = Template::Raw;
    const PreparedPrompt p = engine.prepare(req);
    const int V = model->config().text.vocab_size, T = int(p.ids.size());
    ASSERT_GT(T, kGemvMaxRows) << "the prefill must take the dequantised-copy path";

    // CPU reference: prefill logits and kSteps teacher-forced greedy steps; the extended importance
    // weighted by ||W_o^h v||_2 (wov2: the GPU makes its Gram matrices from a dequantised W_o).
    std::vector<std::vector<float>> cpu;
    std::vector<int32_t> tokens;
    ImportanceRequest wov2;
    wov2.needed = true, wov2.from = T - 16, wov2.weight = ValueWeight::OutputNorm2, wov2.reduce = QueryReduce::Sum;
    std::vector<std::vector<float>> cpu_wov2;
    {
      FullPolicy full;
      Session s(*model, full);
      std::vector<float> lg(size_t(V), 0.f);
      s.prefill(p, lg.data());
      cpu_wov2 = extended_importance(*model, s.cache(), p, lg.data(), wov2);
      cpu.push_back(lg);
      for (int i = 0; i < kSteps; ++i) {
        tokens.push_back(argmax(lg));
        s.step(tokens.back(), lg.data());
        cpu.push_back(lg);
      }
    }
    for (DType dt : {DType::BF16, DType::F16}) {
      SCOPED_TRACE(dtype_name(dt));
      GpuModelOptions o;
      o.dtype = dt;
      GpuModel gm(*model, o);
      // No full-precision copy: the quantised tensors hold exactly the file's bytes on the device.
      EXPECT_EQ(gm.quantised_bytes(), f.quant_bytes);
      EXPECT_GT(f.quant_bytes, 0u);
      std::printf("gpu_quant_model: %-9s %-4s %s\n", f.name.c_str(), dtype_name(dt), gm.weights_summary().c_str());
      GpuKVPoolOptions po;
      po.block_size = 16;
      po.n_blocks = model->config().text.n_layers * ((T + kSteps + 16) / 16 + (T + 15) / 16) + 4;  // + the importance's
      GpuKVPool pool(gm, po);
      FullPolicy full;
      GpuSession s(gm, pool, full);
      std::vector<float> lg(size_t(V), 0.f);
      s.prefill(p, lg.data());
      double worst = 0;
      int differ = 0, unexplained = 0;
      for (int i = 0; i <= kSteps; ++i) {
        const std::vector<float>& ref = cpu[size_t(i)];
        for (float v : lg) ASSERT_TRUE(std::isfinite(v)) << "step " << i;
        worst = std::max(worst, norm_rel(lg, ref));
        const int a = argmax(ref), b = argmax(lg);
        if (a != b) {
          ++differ;
          double noise = 0;
          for (int k = 0; k < V; ++k) noise = std::max(noise, double(std::fabs(lg[size_t(k)] - ref[size_t(k)])));
          const double margin = ref[size_t(a)] - ref[size_t(b)];
          unexplained += margin <= 2 * noise ? 0 : 1;
          std::printf("gpu_quant_model: %-9s %-4s step %2d: top-1 CPU %d GPU %d, CPU margin %.4g, max |diff| %.4g\n",
                      f.name.c_str(), dtype_name(dt), i, a, b, margin, noise);
        }
        if (i == kSteps) break;
        s.step(tokens[size_t(i)], lg.data());
      }
      std::printf("gpu_quant_model: %-9s %-4s T=%d, %d steps: worst norm-rel logit error %.3g (bound %.1e), %d top-1 "
                  "differences (%d beyond the noise)\n",
                  f.name.c_str(), dtype_name(dt), T, kSteps, worst, bound(dt), differ, unexplained);
      EXPECT_LE(worst, bound(dt));
      EXPECT_EQ(unexplained, 0) << "top-1 differs from the CPU's where the CPU's margin exceeds the logit error";
      // The wov2 importance per layer, norm-wise: the dense model's bound (test_gpu_model.cc (k): twice
      // the logit tolerance) doubled for the second rounding of every weight, as bound() does.
      GpuSession scratch(gm, pool, full);
      const std::vector<std::vector<float>> got = scratch.measure_importance(p, wov2);
      ASSERT_EQ(got.size(), cpu_wov2.size());
      double worst_imp = 0;
      for (size_t l = 0; l < got.size(); ++l) worst_imp = std::max(worst_imp, norm_rel(got[l], cpu_wov2[l]));
      std::printf("gpu_quant_model: %-9s %-4s wov2 importance: worst layer norm-rel error %.3g (bound %.1e)\n",
                  f.name.c_str(), dtype_name(dt), worst_imp, 2 * bound(dt));
      EXPECT_LE(worst_imp, 2 * bound(dt)) << "the wov2 importance against the CPU engine's";
    }
  }
}

// A decode step of several sequences (the batched gemv on blocks) equals the same steps one at a time
// within the float32 summation noise of the products (each row's dot products are the same sums;
// only the launch differs), and a prompt of more than kGemvMaxRows tokens in a batch of 9+ rows
// takes the dequantised copy; both on the Q4_K / Q6_K file.
TEST(GpuQuantModel, BatchedStepsOnBlocksEqualSingleSteps) {
  const QuantFile& f = quant_files().back();
  const auto model = Model::load(f.path);
  const std::string dir = repo("models/prefixkv-llava-tiny");
  const Tokenizer tok(dir + "/tokenizer.model");
  const Engine engine(*model, tok);
  PromptRequest req;
  req.text = "A small red circle.";
  req.tmpl = Template::Raw;
  const PreparedPrompt p = engine.prepare(req);
  const int V = model->config().text.vocab_size;
  GpuModelOptions o;
  o.dtype = DType::BF16;
  GpuModel gm(*model, o);
  GpuKVPoolOptions po;
  po.block_size = 16;
  po.n_blocks = 12 * model->config().text.n_layers * 4 + 8;
  GpuKVPool pool(gm, po);
  for (int batch : {3, 12}) {
    SCOPED_TRACE(batch);
    std::vector<std::unique_ptr<FullPolicy>> pol;
    std::vector<std::unique_ptr<GpuSession>> seqs;
    std::vector<float> lg(static_cast<size_t>(V));
    for (int i = 0; i < batch + 1; ++i) {
      pol.push_back(std::make_unique<FullPolicy>());
      seqs.push_back(std::make_unique<GpuSession>(gm, pool, *pol.back()));
      seqs.back()->prefill(p, lg.data());
    }
    std::vector<GpuSession*> many;
    for (int i = 0; i < batch; ++i) many.push_back(seqs[size_t(i)].get());
    std::vector<int32_t> toks(size_t(batch), 17);
    std::vector<float> all(static_cast<size_t>(batch) * V);
    GpuSession::step_many(many, toks.data(), all.data());
    seqs.back()->step(17, lg.data());  // the same step alone
    for (int i = 0; i < batch; ++i) {
      const std::vector<float> row(all.begin() + long(i) * V, all.begin() + long(i + 1) * V);
      // Alone (1 row) and batched (3: gemv; 12: the dequantised copy and cuBLAS) the products sum in
      // other orders (and round w to BF16 at 12 rows): within the bound of the other test.
      EXPECT_LE(norm_rel(row, lg), bound(DType::BF16)) << "sequence " << i;
      EXPECT_EQ(argmax(row), argmax(lg)) << "sequence " << i;
    }
    seqs.clear();
  }
}

// llama.cpp's LLaVA-1.5 pair on the GPU: the bundled model written as a GGUF F16 language model and
// an F16 mmproj vision file (export --gguf --mmproj), loaded back as one model and run through the
// CUDA back end with an image (the vision tower and projector from the mmproj file on the GPU): the
// greedy description is the CPU engine's on the same pair, token for token (F16 compute, whose logits
// stay within 2e-3 of the CPU's on this model: tests/cuda/test_gpu_model.cc), and the image
// embeddings agree within that file's vision bound (4e-3 in F16).
TEST(GpuQuantModel, MmprojPairOnTheCudaBackendGivesTheCpusDescription) {
  const std::string dir = repo("models/prefixkv-llava-tiny");
  const Tokenizer tok(dir + "/tokenizer.model");
  const std::string text = temp_file("pair_f16.gguf"), vision = temp_file("pair_mmproj_f16.gguf");
  {
    const auto ckpt = Model::load(dir);
    GgufExportOptions o;
    o.type = quant::kF16;
    export_text_gguf(*ckpt, tok, text, o);
    export_mmproj_gguf(*ckpt, vision, quant::kF16);
  }
  const auto model = Model::load_gguf(text, vision);
  ASSERT_TRUE(model->has_vision());
  const Engine engine(*model, tok);
  const Image img = load_image(repo("data/example.png"));
  PromptRequest req;
  req.text = "Describe the image in detail.";
  req.tmpl = Template::LlavaV1;
  req.image = &img;
  const PreparedPrompt cpu_prompt = engine.prepare(req);
  SamplingOptions s;
  s.max_tokens = 48;
  FullPolicy cpu_policy;
  const GenerationResult cpu = engine.generate(cpu_prompt, s, cpu_policy);

  cuda::CudaBackendOptions bo;
  bo.dtype = DType::F16;
  bo.kv_pool_entries = int(cpu_prompt.ids.size()) + s.max_tokens + 1;
  const std::unique_ptr<Backend> backend = make_cuda_backend(*model, bo);
  PromptRequest greq = req;
  backend->use_for_images(greq);
  const PreparedPrompt gpu_prompt = engine.prepare(greq);
  ASSERT_EQ(gpu_prompt.ids, cpu_prompt.ids);
  FullPolicy gpu_policy;
  const GenerationResult gpu = generate(*backend, tok, gpu_prompt, s, gpu_policy, nullptr);
  std::printf("gpu_quant_model: mmproj pair F16 on the CUDA back end: %zu tokens, identical to the CPU engine: %s\n",
              gpu.tokens.size(), gpu.tokens == cpu.tokens ? "yes" : "no");
  EXPECT_EQ(gpu.tokens, cpu.tokens) << "GPU: " << gpu.text << "\nCPU: " << cpu.text;

  GpuModelOptions go;
  go.dtype = DType::F16;
  GpuModel gm(*model, go);
  const std::vector<float> ref = model->encode_image(cpu_prompt.pixels.data());
  const std::vector<float> got = gm.encode_image(cpu_prompt.pixels.data());
  ASSERT_EQ(got.size(), ref.size());
  const double e = norm_rel(got, ref);
  std::printf("gpu_quant_model: mmproj pair F16 image embeddings norm-rel error %.3g (bound 4e-3)\n", e);
  EXPECT_LE(e, 4e-3);
}

}  // namespace
}  // namespace pkv::cuda
