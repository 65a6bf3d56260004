#include "emu_products.h"

#include <string>

#include "core/dtype.h"
#include "core/error.h"
#include "emu.h"  // before the bodies: atomicOr
#include "ops/cuda/attention_body.h"

namespace pkv::cuda::emu {

float load(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.f;
}

void strided_gemm(const detail::StridedGemm& g) {
  if (g.m < 1 || g.n < 1 || g.k < 1 || g.batch < 1) return;
  // Stored shapes: A is [m, k] (trans_a: [k, m]), B [k, n] (trans_b: [n, k]), column-major.
  const int64_t a_rows = g.trans_a ? g.k : g.m, b_rows = g.trans_b ? g.n : g.k;
  if (g.lda < a_rows || g.ldb < b_rows || g.ldc < g.m)
    fail("emulated strided gemm", "a leading dimension is smaller than its matrix's rows (cuBLAS refuses it)");
  if (!g.a || !g.b || !g.c) fail("emulated strided gemm", "A, B and C must be set");
  for (int b = 0; b < g.batch; ++b)
    for (int j = 0; j < g.n; ++j)
      for (int i = 0; i < g.m; ++i) {
        double s = 0;
        for (int l = 0; l < g.k; ++l) {
          const int64_t ai = g.trans_a ? l + int64_t(i) * g.lda : i + int64_t(l) * g.lda;
          const int64_t bi = g.trans_b ? j + int64_t(l) * g.ldb : l + int64_t(j) * g.ldb;
          s += double(load(g.ab_dtype, g.a, b * g.stride_a + ai)) * load(g.ab_dtype, g.b, b * g.stride_b + bi);
        }
        g.c[b * g.stride_c + i + int64_t(j) * g.ldc] = float(s);
      }
}

void value_weights(const ValueWeightArgs& a, uint32_t seed) {
  const detail::ValueWeightPlan plan = detail::plan_value_weights(a);
  auto run = [&](auto t) {
    using T = decltype(t);
    if (!a.gram) {
      if (plan.launch.empty()) return;
      if (plan.D == 32) emu::run(plan.launch, [&](Ctx& c) { detail::value_weights<T, 32>(c, plan.params); }, seed);
      else if (plan.D == 64) emu::run(plan.launch, [&](Ctx& c) { detail::value_weights<T, 64>(c, plan.params); }, seed);
      else emu::run(plan.launch, [&](Ctx& c) { detail::value_weights<T, 128>(c, plan.params); }, seed);
      return;
    }
    emu::run(plan.split_launch, [&](Ctx& c) { detail::gram_split<T>(c, plan.split); }, seed);
    for (const detail::ValueWeightChunk& ch : plan.chunks) {
      emu::run(ch.rows_launch, [&](Ctx& c) { detail::value_rows<T>(c, ch.rows); }, seed);
      strided_gemm(ch.gemm);
      emu::run(ch.dots_launch, [&](Ctx& c) { detail::value_weight_dots(c, ch.dots); }, seed);
    }
  };
  if (plan.dtype == DType::F16) run(__half{});
  else run(__nv_bfloat16{});
}

void output_gram(const OutputGramArgs& a) { strided_gemm(detail::plan_output_gram(a)); }

}  // namespace pkv::cuda::emu
