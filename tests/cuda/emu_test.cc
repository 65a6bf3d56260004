// The attention and paged-KV kernel bodies and their launch plans, run on the CPU by the block
// emulator (emu.h) against their CPU twins: the cases of kernel_cases.cc at smaller sizes. Needs no
// GPU (only CUDA's headers), so it runs in CI; pkv_cuda_tests runs the same cases on the GPU.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "emu.h"  // before the bodies: atomicOr
#include "emu_products.h"
#include "ops/cuda/attention_body.h"
#include "ops/cuda/gemv_body.h"
#include "ops/cuda/paged_body.h"
#include "ops/cuda/plan.h"
#include "kernel_cases.h"
#include "ops/cuda/quant_body.h"
#include "ops/quant.h"
#include "quant_cases.h"

namespace pkv::cuda::test {
namespace {

using detail::DecodeParams;
using detail::PagedParams;
using detail::PrefillParams;

class EmuBackend : public Backend {
 public:
  const char* name() const override { return "emulator"; }
  void* alloc(size_t bytes) override {
    const size_t n = (bytes + 255) / 256 * 256 + 256;
    void* p = std::aligned_alloc(256, n);
    std::memset(p, 0xA5, n);
    mem_.emplace_back(static_cast<char*>(p), &std::free);
    return p;
  }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void fill(void* dst, int byte, size_t bytes) override { std::memset(dst, byte, bytes); }

  void attention_prefill(const PrefillAttentionArgs& a) override {
    PrefillAttentionArgs b = a;
    b.kernel = PrefillKernel::CudaCores;  // the tensor-core kernels (mma, ldmatrix) run on a GPU only
    const detail::PrefillPlan plan = detail::plan_attention_prefill(b);
    if (plan.forward.empty()) return;
    if (plan.dtype == DType::F16) prefill_typed<__half>(plan);
    else prefill_typed<__nv_bfloat16>(plan);
  }
  void attention_decode(const DecodeAttentionArgs& a) override {
    const detail::DecodePlan plan = detail::plan_attention_decode(a);
    if (plan.split.empty()) return;
    if (plan.dtype == DType::F16) decode_typed<__half>(plan);
    else decode_typed<__nv_bfloat16>(plan);
  }
  void paged_write(const PagedKV& kv, const PagedRows& rows, DType src_dtype, const void* k, const void* v,
                   int64_t src_stride, const int32_t* pos) override {
    const detail::PagedPlan plan = detail::plan_paged_write(kv, rows, src_dtype, k, v, src_stride, pos);
    if (plan.dtype == DType::F16) write_typed<__half>(plan);
    else write_typed<__nv_bfloat16>(plan);
  }
  void paged_read(const PagedKV& kv, const PagedRows& rows, void* k, void* v, int32_t* pos) override {
    const detail::PagedPlan plan = detail::plan_paged_read(kv, rows, k, v, pos);
    if (plan.dtype == DType::F16) emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_read<__half>(c, plan.params); });
    else emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_read<__nv_bfloat16>(c, plan.params); });
  }
  void paged_rope_write(const PagedKV& kv, const PagedRows& rows, const RopeWriteArgs& a) override {
    const detail::PagedPlan plan = detail::plan_paged_rope_write(kv, rows, a);
    if (plan.dtype == DType::F16) emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_rope_write<__half>(c, plan.params); });
    else emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_rope_write<__nv_bfloat16>(c, plan.params); });
  }
  void paged_compact(const PagedKV& kv, const PagedJobs& jobs) override {
    const detail::PagedPlan plan = detail::plan_paged_compact(kv, jobs);
    emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_compact(c, plan.params); });
  }
  void paged_head_compact(const PagedKV& kv, const PagedHeadJobs& jobs) override {
    const detail::PagedPlan plan = detail::plan_paged_head_compact(kv, jobs);
    emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_head_compact(c, plan.params); });
  }
  void value_weights(const ValueWeightArgs& a) override { emu::value_weights(a, seed_++); }
  void output_gram(const OutputGramArgs& a) override { emu::output_gram(a); }
  void paged_merge(const PagedKV& kv, const PagedJobs& jobs) override {
    const detail::PagedPlan plan = detail::plan_paged_merge(kv, jobs);
    if (plan.dtype == DType::F16) emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_merge<__half>(c, plan.params); });
    else emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_merge<__nv_bfloat16>(c, plan.params); });
  }

 private:
  template <class T, int D>
  void prefill_run(const detail::PrefillPlan& plan) {
    const PrefillParams& p = plan.params;
    emu::run(plan.forward, [&](emu::Ctx& c) { detail::prefill_forward<T, D>(c, p); }, seed_++);
    if (!plan.importance) return;
    if (p.importance_max) {
      emu::run(plan.importance_pass, [&](emu::Ctx& c) { detail::prefill_importance_max<T, D>(c, p); }, seed_++);
      emu::run(plan.reduce, [&](emu::Ctx& c) { detail::prefill_importance_max_reduce(c, p); });
      return;
    }
    emu::run(plan.importance_pass, [&](emu::Ctx& c) { detail::prefill_importance<T, D>(c, p); }, seed_++);
    emu::run(plan.reduce, [&](emu::Ctx& c) { detail::prefill_importance_reduce(c, p); });
  }
  template <class T>
  void prefill_typed(const detail::PrefillPlan& plan) {
    if (plan.D == 32) prefill_run<T, 32>(plan);
    else if (plan.D == 64) prefill_run<T, 64>(plan);
    else prefill_run<T, 128>(plan);
  }
  template <class T, int D>
  void decode_run(const detail::DecodePlan& plan) {
    const DecodeParams& p = plan.params;
    auto split = [&](auto mg) {
      emu::run(plan.split, [&](emu::Ctx& c) { detail::decode_split<T, D, decltype(mg)::value>(c, p); }, seed_++);
    };
    switch (plan.MG) {
      case 1: split(std::integral_constant<int, 1>{}); break;
      case 2: split(std::integral_constant<int, 2>{}); break;
      case 4: split(std::integral_constant<int, 4>{}); break;
      default: split(std::integral_constant<int, 8>{}); break;
    }
    emu::run(plan.combine, [&](emu::Ctx& c) { detail::decode_combine<T>(c, p); });
    if (plan.importance) emu::run(plan.importance_pass, [&](emu::Ctx& c) { detail::decode_importance(c, p); });
  }
  template <class T>
  void decode_typed(const detail::DecodePlan& plan) {
    if (plan.D == 32) decode_run<T, 32>(plan);
    else if (plan.D == 64) decode_run<T, 64>(plan);
    else decode_run<T, 128>(plan);
  }
  template <class T>
  void write_typed(const detail::PagedPlan& plan) {
    const PagedParams& p = plan.params;
    switch (plan.src_dtype) {
      case DType::F32: return emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_write<T, float>(c, p); });
      case DType::F16: return emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_write<T, __half>(c, p); });
      case DType::BF16: return emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_write<T, __nv_bfloat16>(c, p); });
    }
  }

  void gemv(const GemvArgs& a) override {
    const detail::GemvPlan plan = detail::plan_gemv(a);
    namespace b = quant::blocks;
    switch (plan.w_quant) {
      case quant::kQ8_0: return gemv_quant<b::Q8_0>(plan);
      case quant::kQ4_0: return gemv_quant<b::Q4_0>(plan);
      case quant::kQ4_K: return gemv_quant<b::Q4_K>(plan);
      case quant::kQ6_K: return gemv_quant<b::Q6_K>(plan);
    }
    if (plan.w_dtype == DType::F16) gemv_typed<__half>(plan);
    else gemv_typed<__nv_bfloat16>(plan);
  }
  template <class F>
  void gemv_quant(const detail::GemvPlan& plan) {  // y F32 without w_up, x's type with it
    using W = detail::QuantWeights<F>;
    if (plan.w_dtype == DType::F16) {
      if (plan.swiglu) return gemv_rows<__half, __half, true, W>(plan);
      return gemv_rows<__half, float, false, W>(plan);
    }
    if (plan.swiglu) return gemv_rows<__nv_bfloat16, __nv_bfloat16, true, W>(plan);
    return gemv_rows<__nv_bfloat16, float, false, W>(plan);
  }
  void dequantize(const DequantArgs& a) override {
    const detail::DequantPlan plan = detail::plan_dequantize(a);
    namespace b = quant::blocks;
    switch (plan.quant) {
      case quant::kQ8_0: return dequantize_format<b::Q8_0>(plan);
      case quant::kQ4_0: return dequantize_format<b::Q4_0>(plan);
      case quant::kQ4_K: return dequantize_format<b::Q4_K>(plan);
      case quant::kQ6_K: return dequantize_format<b::Q6_K>(plan);
    }
  }
  template <class F>
  void dequantize_format(const detail::DequantPlan& plan) {
    auto run = [&](auto y) {
      using Y = decltype(y);
      emu::run(plan.launch, [&](emu::Ctx& c) { detail::dequantize_rows<F, Y>(c, plan.params); });
    };
    if (plan.out_dtype == DType::F32) run(float{});
    else if (plan.out_dtype == DType::F16) run(__half{});
    else run(__nv_bfloat16{});
  }
  template <class T, class Y, bool S, class W = detail::DenseWeights<T>>
  void gemv_rows(const detail::GemvPlan& plan) {
    const detail::GemvParams& p = plan.params;
    auto run = [&](auto rows) {
      emu::run(plan.launch, [&](emu::Ctx& c) { detail::gemv<T, Y, decltype(rows)::value, S, W>(c, p); }, seed_++);
    };
    switch (p.rows) {
      case 1: return run(std::integral_constant<int, 1>{});
      case 2: return run(std::integral_constant<int, 2>{});
      case 3: return run(std::integral_constant<int, 3>{});
      case 4: return run(std::integral_constant<int, 4>{});
      case 5: return run(std::integral_constant<int, 5>{});
      case 6: return run(std::integral_constant<int, 6>{});
      case 7: return run(std::integral_constant<int, 7>{});
      case 8: return run(std::integral_constant<int, 8>{});
    }
  }
  template <class T>
  void gemv_typed(const detail::GemvPlan& plan) {
    const bool f32 = plan.y_dtype == DType::F32;
    if (plan.swiglu) return f32 ? gemv_rows<T, float, true>(plan) : gemv_rows<T, T, true>(plan);
    return f32 ? gemv_rows<T, float, false>(plan) : gemv_rows<T, T, false>(plan);
  }

  std::vector<std::unique_ptr<char, decltype(&std::free)>> mem_;
  uint32_t seed_ = 1;
};

const DType k16[] = {DType::F16, DType::BF16};

TEST(CudaEmu, Prefill) {
  EmuBackend be;
  for (const PrefillCase& c : prefill_cases(false)) check_prefill(be, c);
}

// The extended importance: value weights per (head, key) before the head mean, and the maximum over
// the counted queries, against ops::attention's twin (ops::attention_rows); the value weights
// against ops::value_weights, the CPU engine's own definition.
TEST(CudaEmu, ExtendedImportance) {
  EmuBackend be;
  for (const PrefillCase& c : extended_prefill_cases(false)) check_prefill(be, c);
}

// vnorm's kernel; wov2's plan: the values to float32, the strided batched product over the KV
// heads (emulated with cuBLAS's column-major meaning) and the dots.
TEST(CudaEmu, ValueWeights) {
  EmuBackend be;
  check_value_weights_all(be, false);
}

// The Gram matrices' strided batched product over the query heads, emulated.
TEST(CudaEmu, OutputGram) {
  EmuBackend be;
  check_output_gram_all(be, false);
}

TEST(CudaEmu, PrefillInChunks) {  // the SIMT kernels (the tensor-core ones run on a GPU only)
  EmuBackend be;
  for (DType dt : k16)
    for (int chunk : {16, 37, 150})
      for (int from : {0, 90}) check_prefill_chunks(be, dt, 130, chunk, from, PrefillKernel::CudaCores);
}

TEST(CudaEmu, Decode) {
  EmuBackend be;
  for (const DecodeCase& c : decode_cases(false)) check_decode(be, c);
}

// Every case of the GPU run (minutes on 2 cores): PKV_EMU_FULL=1 pkv_cuda_emu_tests
TEST(CudaEmu, FullGpuCaseList) {
  const char* full = std::getenv("PKV_EMU_FULL");
  if (!full || std::string(full) != "1") GTEST_SKIP() << "set PKV_EMU_FULL=1 to run the GPU case list emulated";
  EmuBackend be;
  check_value_weights_all(be, true);
  check_output_gram_all(be, true);
  for (const PrefillCase& c : prefill_cases(true)) check_prefill(be, c);
  for (const PrefillCase& c : extended_prefill_cases(true)) check_prefill(be, c);
  for (const DecodeCase& c : decode_cases(true)) check_decode(be, c);
}

TEST(CudaEmu, Gemv) {
  EmuBackend be;
  for (const GemvCase& c : gemv_cases(false)) check_gemv(be, c);
  check_gemv_refusals(be);
}

// The block-quantised gemv bodies (every format, 1-8 rows, tails, SwiGLU) and dequantisation, emulated.
TEST(CudaEmu, QuantGemv) {
  EmuBackend be;
  for (const QuantGemvCase& c : quant_gemv_cases(false)) check_quant_gemv(be, c);
  check_quant_gemv_refusals(be);
}

TEST(CudaEmu, Dequantize) {
  EmuBackend be;
  check_dequantize_all(be, 5, 512, 1800);
}

TEST(CudaEmu, Compaction) {
  EmuBackend be;
  uint32_t seed = 300;
  for (DType t : k16)
    for (int bs : {16, 5}) check_compact(be, t, bs, t == DType::F16 ? 64 : 258, seed++);
}

TEST(CudaEmu, RopeWrite) {
  EmuBackend be;
  uint32_t seed = 350;
  for (DType t : k16) {
    check_rope_write(be, t, 16, 4, 2, 32, seed++);
    check_rope_write(be, t, 5, 2, 2, 16, seed++);
  }
}

TEST(CudaEmu, ElasticMerge) {
  EmuBackend be;
  uint32_t seed = 400;
  for (DType t : k16) {
    check_merge(be, t, 16, 64, 2, 100, 0.2, seed++);
    check_merge(be, t, 7, 32, 1, 10, 0.3, seed++);
  }
}

TEST(CudaEmu, HeadTables) {
  EmuBackend be;
  uint32_t seed = 450;
  for (DType t : k16) {
    check_head_tables(be, t, 16, 8, 4, 32, seed++);  // GQA, the bundled model's shape
    check_head_tables(be, t, 5, 4, 4, 16, seed++);   // MHA, a head narrower than the kernel's tile
  }
}

TEST(CudaEmu, BadTablesAreFlaggedNotFaults) {
  EmuBackend be;
  check_paged_errors(be);
}

TEST(CudaEmu, PlansRejectBadArguments) {
  PrefillAttentionArgs p;
  p.dtype = DType::BF16, p.n_q = 4, p.n_kv = 4, p.n_heads = 2, p.n_kv_heads = 2, p.head_dim = 200;
  EXPECT_THROW(detail::plan_attention_prefill(p), Error);
  p.head_dim = 64;
  p.importance = reinterpret_cast<float*>(16);
  EXPECT_THROW(detail::plan_attention_prefill(p), Error);  // q, k, v unset
  // The decode workspace layout grows with the splits and covers every key of max_len.
  for (int len : {1, 255, 256, 257, 5000})
    for (int batch : {1, 3, 64}) {
      const auto w = detail::decode_workspace_layout(batch, 32, 8, 128, len, true);
      EXPECT_GE(int64_t(w.n_splits) * w.chunk, len);
      EXPECT_GE(w.n_splits, 1);
      EXPECT_EQ(w.chunk % detail::kDecodeTK, 0);
      EXPECT_EQ(w.G, 4);
    }
  EXPECT_EQ(detail::decode_workspace_layout(1, 12, 1, 64, 10, false).G, 6);
  EXPECT_EQ(detail::decode_workspace_layout(1, 16, 1, 64, 10, false).G, 8);
  EXPECT_EQ(detail::decode_workspace_layout(1, 7, 1, 64, 10, false).G, 7);
  EXPECT_EQ(detail::decode_workspace_layout(1, 11, 1, 64, 10, false).G, 1);
}

}  // namespace
}  // namespace pkv::cuda::test
