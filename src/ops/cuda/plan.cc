#include "ops/cuda/plan.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "ops/quant.h"
#include "ops/quant_blocks.h"

namespace pkv::cuda::detail {

namespace {

constexpr float kLog2e = 1.4426950408889634f;

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

[[noreturn]] void bad(const char* op, const std::string& what) { fail(std::string("cuda::") + op, what); }

void require_16bit(const char* op, const char* name, DType t) {
  if (t != DType::F16 && t != DType::BF16) bad(op, std::string(name) + " must be F16 or BF16, got " + dtype_name(t));
}

void require_heads(const char* op, int n_heads, int n_kv_heads, int head_dim) {
  if (n_heads < 1 || n_kv_heads < 1 || n_heads % n_kv_heads != 0)
    bad(op, "n_heads (" + std::to_string(n_heads) + ") must be a positive multiple of n_kv_heads (" +
                std::to_string(n_kv_heads) + ")");
  if (head_dim < 1 || head_dim > 128) bad(op, "head_dim must be in [1, 128], got " + std::to_string(head_dim));
  if (n_heads > 65535) bad(op, "n_heads " + std::to_string(n_heads) + " exceeds 65535");
}

void check_paged(const char* op, const PagedKV& kv) {
  require_16bit(op, "the paged pool's dtype", kv.dtype);
  if (!kv.pool || !kv.positions) bad(op, "the paged pool and its positions must be set");
  if (reinterpret_cast<uintptr_t>(kv.pool) % 16 != 0) bad(op, "the paged pool must be 16-byte aligned");
  if (kv.n_blocks < 1 || kv.block_size < 1) bad(op, "the paged pool needs n_blocks >= 1 and block_size >= 1");
  if (kv.kv_dim < 2 || kv.kv_dim % 2 != 0) bad(op, "kv_dim must be even and >= 2, got " + std::to_string(kv.kv_dim));
  if (!kv.tables || kv.table_stride < 1) bad(op, "the block tables must be set (table_stride >= 1)");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
PrefillWorkspaceLayout prefill_workspace_layout(int n_q, int n_kv, int n_heads) {
  PrefillWorkspaceLayout w;
  w.lse = 0;
  w.partial = align256(size_t(n_heads) * size_t(std::max(n_q, 0)) * sizeof(float));
  w.total = w.partial + align256(size_t(n_heads) * size_t(std::max(n_kv, 0)) * sizeof(float));
  return w;
}

PrefillPlan plan_attention_prefill(const PrefillAttentionArgs& a) {
  const char* op = "attention_prefill";
  PrefillPlan plan;
  require_16bit(op, "dtype", a.dtype);
  require_heads(op, a.n_heads, a.n_kv_heads, a.head_dim);
  if (a.n_q < 0 || a.n_kv < 0) bad(op, "n_q and n_kv must be >= 0");
  if ((a.q_pos == nullptr) != (a.kv_pos == nullptr))
    bad(op, "give both q_pos and kv_pos (causal by position) or neither (every key visible)");
  const int64_t qd = int64_t(a.n_heads) * a.head_dim, kvd = int64_t(a.n_kv_heads) * a.head_dim;
  const int64_t q_stride = a.q_stride ? a.q_stride : qd, kv_stride = a.kv_stride ? a.kv_stride : kvd,
                out_stride = a.out_stride ? a.out_stride : qd;
  if (q_stride < qd || out_stride < qd || kv_stride < kvd) bad(op, "a row stride is smaller than the row");
  plan.dtype = a.dtype;
  plan.D = padded_head_dim(a.head_dim);
  plan.importance = a.importance != nullptr;
  if (a.n_q == 0) return plan;  // nothing to do: every launch empty
  if (!a.q || !a.out || (a.n_kv > 0 && (!a.k || !a.v))) bad(op, "q, k, v and out must be set");

  PrefillParams& p = plan.params;
  p.q = a.q, p.k = a.k, p.v = a.v, p.out = a.out;
  p.q_stride = q_stride, p.kv_stride = kv_stride, p.out_stride = out_stride;
  p.q_pos = a.q_pos, p.kv_pos = a.kv_pos;
  p.n_q = a.n_q, p.n_kv = a.n_kv, p.n_heads = a.n_heads, p.group = a.n_heads / a.n_kv_heads, p.head_dim = a.head_dim;
  p.scale_log2 = a.scale * kLog2e;
  p.importance = a.importance;
  p.importance_from = std::max(0, a.importance_from);
  p.importance_per_kv_head = a.importance_per_kv_head;
  p.importance_weight = a.importance_weight;
  p.importance_max = a.importance_max;
  if (a.importance_per_kv_head && (a.importance_weight || a.importance_max))
    bad(op, "weighted or max importance is measured over all query heads, not per KV head");

  // Auto is resolved against the device by attention_prefill; a plan made without a device (the
  // emulator's) takes it as the tensor-core kernels.
  plan.tensor_cores = a.kernel != PrefillKernel::CudaCores;
  auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  p.vec = aligned16(a.q) && aligned16(a.k) && aligned16(a.v) && q_stride % 8 == 0 && kv_stride % 8 == 0 &&
          a.head_dim % 8 == 0;
  auto by_d = [&](size_t b32, size_t b64, size_t b128) { return plan.D == 32 ? b32 : plan.D == 64 ? b64 : b128; };
  const size_t fwd_smem = plan.tensor_cores
                              ? by_d(MmaPrefillLayout<32>::bytes, MmaPrefillLayout<64>::bytes, MmaPrefillLayout<128>::bytes)
                              : by_d(PrefillForwardLayout<32>::bytes, PrefillForwardLayout<64>::bytes,
                                     PrefillForwardLayout<128>::bytes);
  plan.forward = {{unsigned(ceil_div(a.n_q, kPrefillBQ)), unsigned(a.n_heads), 1}, kPrefillThreads, fwd_smem};

  if (plan.importance && a.n_kv > 0 && p.importance_from < a.n_q) {
    const PrefillWorkspaceLayout w = prefill_workspace_layout(a.n_q, a.n_kv, a.n_heads);
    if (!a.workspace || a.workspace_bytes < w.total)
      bad(op, "importance needs a device workspace of " + std::to_string(w.total) + " bytes (attention_prefill_workspace_bytes), got " +
                  std::to_string(a.workspace_bytes));
    char* ws = static_cast<char*>(a.workspace);
    p.lse = reinterpret_cast<float*>(ws + w.lse);
    p.partial = reinterpret_cast<float*>(ws + w.partial);
    const size_t imp_smem =
        plan.tensor_cores
            ? by_d(MmaImportanceLayout<32>::bytes, MmaImportanceLayout<64>::bytes, MmaImportanceLayout<128>::bytes)
            : by_d(PrefillImportanceLayout<32>::bytes, PrefillImportanceLayout<64>::bytes,
                   PrefillImportanceLayout<128>::bytes);
    plan.importance_pass = {{unsigned(ceil_div(a.n_kv, kPrefillBK)), unsigned(a.n_heads), 1}, kPrefillThreads, imp_smem};
    // block (x, y): keys [256 x, 256 x + 256) of KV head y's row (per KV head) or of the one row
    plan.reduce = {{unsigned(ceil_div(a.n_kv, 256)), unsigned(a.importance_per_kv_head ? a.n_kv_heads : 1), 1}, 256, 0};
    if (a.importance_max) {
      // Block (x, y): key tile x against the query tiles y, y + max_groups, ... (all heads each);
      // at most n_heads groups, so that their maxima fit the per-head partial sums' workspace.
      const int tiles = ceil_div(a.n_q, kPrefillBQ) - p.importance_from / kPrefillBQ;
      p.max_groups = std::max(1, std::min(a.n_heads, tiles));
      plan.importance_pass = {{unsigned(ceil_div(a.n_kv, kPrefillBK)), unsigned(p.max_groups), 1}, kPrefillThreads,
                              by_d(PrefillImportanceLayout<32>::bytes, PrefillImportanceLayout<64>::bytes,
                                   PrefillImportanceLayout<128>::bytes)};
      plan.reduce = {{unsigned(ceil_div(a.n_kv, 256)), 1, 1}, 256, 0};
    }
  } else {
    plan.importance = false;  // nothing would be added
  }
  return plan;
}

ValueWeightWorkspaceLayout value_weight_workspace_layout(int n_kv, int n_heads, int n_kv_heads, int head_dim, bool gram) {
  ValueWeightWorkspaceLayout w;
  if (!gram || n_kv <= 0) return w;
  const size_t m = size_t(std::min(n_kv, kValueWeightChunk)), P = size_t(kMaxGramParts), hd = size_t(head_dim);
  w.gp = 0;
  w.scale = align256(size_t(n_heads) * hd * P * hd * 2);
  w.vf = w.scale + align256(size_t(n_heads) * sizeof(float));
  w.vb = w.vf + align256(m * size_t(n_kv_heads) * hd * sizeof(float));
  w.y = w.vb + align256(m * size_t(n_kv_heads) * P * hd * 2);
  w.total = w.y + align256(m * size_t(n_heads) * hd * sizeof(float));
  return w;
}

ValueWeightPlan plan_value_weights(const ValueWeightArgs& a) {
  const char* op = "value_weights";
  ValueWeightPlan plan;
  require_16bit(op, "dtype", a.dtype);
  require_heads(op, a.n_heads, a.n_kv_heads, a.head_dim);
  if (a.n_kv < 0) bad(op, "n_kv must be >= 0");
  const int64_t kvd = int64_t(a.n_kv_heads) * a.head_dim, stride = a.kv_stride ? a.kv_stride : kvd;
  if (stride < kvd) bad(op, "the row stride is smaller than the row");
  plan.dtype = a.dtype;
  plan.D = padded_head_dim(a.head_dim);
  if (a.n_kv == 0) return plan;
  if (!a.v || !a.out) bad(op, "v and out must be set");
  const int hd = a.head_dim, group = a.n_heads / a.n_kv_heads;
  if (!a.gram) {
    ValueWeightParams& p = plan.params;
    p.v = a.v, p.kv_stride = stride, p.n_kv = a.n_kv, p.group = group, p.head_dim = hd;
    p.out = a.out;
    const size_t smem = plan.D == 32 ? ValueWeightLayout<32>::bytes : plan.D == 64 ? ValueWeightLayout<64>::bytes
                                                                                   : ValueWeightLayout<128>::bytes;
    plan.launch = {{unsigned(ceil_div(a.n_kv, kValueWeightKeys)), unsigned(a.n_heads), 1}, kValueWeightKeys, smem};
    return plan;
  }
  const ValueWeightWorkspaceLayout ws = value_weight_workspace_layout(a.n_kv, a.n_heads, a.n_kv_heads, hd, true);
  if (!a.workspace || a.workspace_bytes < ws.total)
    bad(op, "wov2 needs a workspace of value_weights_workspace_bytes() = " + std::to_string(ws.total) + " bytes, got " +
                std::to_string(a.workspace ? a.workspace_bytes : 0));
  if (reinterpret_cast<uintptr_t>(a.workspace) % 16 != 0) bad(op, "the workspace must be 16-byte aligned");
  char* base = static_cast<char*>(a.workspace);
  void* gp = base + ws.gp;
  float* inv_scale = reinterpret_cast<float*>(base + ws.scale);
  float* vf = reinterpret_cast<float*>(base + ws.vf);
  void* vb = base + ws.vb;
  float* y = reinterpret_cast<float*>(base + ws.y);
  const int P = gram_parts(a.dtype);
  plan.split.gram = a.gram, plan.split.head_dim = hd, plan.split.parts = P, plan.split.out = gp;
  plan.split.inv_scale = inv_scale;
  plan.split_launch = {{unsigned(a.n_heads), 1, 1}, kGramSplitThreads, (kGramSplitThreads + 1) * sizeof(float)};
  const size_t es = dtype_size(a.dtype);
  for (int j0 = 0; j0 < a.n_kv; j0 += kValueWeightChunk) {
    const int m = std::min(kValueWeightChunk, a.n_kv - j0);
    ValueWeightChunk c;
    c.rows.v = static_cast<const char*>(a.v) + size_t(j0) * size_t(stride) * es;
    c.rows.kv_stride = stride, c.rows.rows = m, c.rows.cols = int(kvd), c.rows.out = vf;
    c.rows.parts_out = vb, c.rows.head_dim = hd, c.rows.parts = P;
    c.rows_launch = {{unsigned(m), 1, 1}, kValueRowsThreads, 0};
    // Column-major: y^T [q_dim, m] (ldc q_dim); batch g's C is its group's rows [g group hd, + group hd).
    // op(A_g) = (gp + g group hd P hd as column-major [P hd, group hd])^T: row (h' hd + d) holds the
    // parts of G_{g group + h'}[d][:], part after part; B_g = vb + g P hd, column-major [P hd, m] with
    // ld n_kv_heads P hd: the KV head's values P times, one column per key.
    StridedGemm& g = c.gemm;
    g.ab_dtype = a.dtype, g.trans_a = true, g.trans_b = false;
    g.m = group * hd, g.n = m, g.k = P * hd, g.batch = a.n_kv_heads;
    g.a = gp, g.lda = int64_t(P) * hd, g.stride_a = int64_t(group) * hd * P * hd;
    g.b = vb, g.ldb = kvd * P, g.stride_b = int64_t(P) * hd;
    g.c = y, g.ldc = int64_t(a.n_heads) * hd, g.stride_c = int64_t(group) * hd;
    c.dots.y = y, c.dots.vf = vf, c.dots.inv_scale = inv_scale, c.dots.rows = m, c.dots.n_heads = a.n_heads;
    c.dots.group = group, c.dots.head_dim = hd, c.dots.out = a.out + j0, c.dots.out_stride = a.n_kv;
    c.dots_launch = {{unsigned(ceil_div(int64_t(m) * a.n_heads, kValueDotThreads)), 1, 1}, kValueDotThreads, 0};
    plan.chunks.push_back(c);
  }
  return plan;
}

StridedGemm plan_output_gram(const OutputGramArgs& a) {
  const char* op = "output_gram";
  require_16bit(op, "w_dtype", a.w_dtype);
  if (a.hidden < 1 || a.n_heads < 1 || a.head_dim < 1)
    bad(op, "needs hidden, n_heads and head_dim >= 1; got " + std::to_string(a.hidden) + ", " + std::to_string(a.n_heads) +
                ", " + std::to_string(a.head_dim));
  if (!a.w || !a.out) bad(op, "w and out must be set");
  const int hd = a.head_dim;
  const int64_t qd = int64_t(a.n_heads) * hd;
  // Column-major A_h = w + h hd with ld qd: [hd, hidden], A_h(d, i) = w[i][h hd + d] = (W_o^h)^T;
  // C_h = A_h A_h^T: C_h(d, e) = sum_i w[i][h hd + d] w[i][h hd + e] (symmetric: row- and column-major alike).
  StridedGemm g;
  g.ab_dtype = a.w_dtype, g.trans_a = false, g.trans_b = true;
  g.m = hd, g.n = hd, g.k = a.hidden, g.batch = a.n_heads;
  g.a = a.w, g.lda = qd, g.stride_a = hd;
  g.b = a.w, g.ldb = qd, g.stride_b = hd;
  g.c = a.out, g.ldc = hd, g.stride_c = int64_t(hd) * hd;
  return g;
}

// ---------------------------------------------------------------------------------------------
DecodeWorkspaceLayout decode_workspace_layout(int batch, int n_heads, int n_kv_heads, int head_dim, int max_len,
                                              bool importance) {
  DecodeWorkspaceLayout w;
  const int group = n_kv_heads > 0 ? std::max(1, n_heads / n_kv_heads) : 1;
  w.G = 1;
  for (int g = std::min(kDecodeMaxG, group); g >= 1; --g)
    if (group % g == 0) {
      w.G = g;
      break;
    }
  const int chunks = std::max(1, n_heads / w.G);
  const int len = std::max(0, max_len);
  const int max_splits = std::max(1, ceil_div(len, kDecodeMinChunk));
  const int want = ceil_div(kDecodeTargetBlocks, int64_t(std::max(1, batch)) * chunks);
  w.n_splits = std::clamp(want, 1, max_splits);
  w.chunk = std::max(kDecodeTK, ceil_div(ceil_div(len, w.n_splits), kDecodeTK) * kDecodeTK);
  const size_t bh = size_t(std::max(0, batch)) * size_t(std::max(0, n_heads));
  w.o = 0;
  w.ml = w.o + align256(bh * w.n_splits * size_t(std::max(0, head_dim)) * sizeof(float));
  w.total = w.ml + align256(bh * w.n_splits * 2 * sizeof(float));
  if (importance) {
    w.lse = w.total;
    w.scores = w.lse + align256(bh * sizeof(float));
    w.total = w.scores + align256(bh * size_t(len) * sizeof(float));
  }
  return w;
}

DecodePlan plan_attention_decode(const DecodeAttentionArgs& a) {
  const char* op = "attention_decode";
  DecodePlan plan;
  require_heads(op, a.n_heads, a.n_kv_heads, a.head_dim);
  if (a.head_dim % 8 != 0) bad(op, "head_dim must be a multiple of 8 (16-byte loads), got " + std::to_string(a.head_dim));
  check_paged(op, a.kv);
  if (a.kv.kv_dim != a.n_kv_heads * a.head_dim)
    bad(op, "kv.kv_dim (" + std::to_string(a.kv.kv_dim) + ") must be n_kv_heads * head_dim (" +
                std::to_string(a.n_kv_heads * a.head_dim) + ")");
  if (a.batch < 0 || a.max_len < 0) bad(op, "batch and max_len must be >= 0");
  if (a.batch > 65535) bad(op, "batch " + std::to_string(a.batch) + " exceeds 65535");
  const int64_t qd = int64_t(a.n_heads) * a.head_dim;
  const int64_t q_stride = a.q_stride ? a.q_stride : qd, out_stride = a.out_stride ? a.out_stride : qd;
  if (q_stride < qd || out_stride < qd) bad(op, "a row stride is smaller than the row");
  plan.dtype = a.kv.dtype;
  plan.D = padded_head_dim(a.head_dim);
  plan.importance = a.importance != nullptr;
  if (a.batch == 0) return plan;
  if (!a.q || !a.out || !a.lengths) bad(op, "q, out and lengths must be set");
  if (a.heads.per_head && (!a.heads.tables || !a.heads.lengths)) bad(op, "heads.per_head without heads.tables or heads.lengths");
  if (plan.importance && a.importance_stride < a.max_len)
    bad(op, "importance_stride (" + std::to_string(a.importance_stride) + ") must be >= max_len (" +
                std::to_string(a.max_len) + ")");

  const DecodeWorkspaceLayout w =
      decode_workspace_layout(a.batch, a.n_heads, a.n_kv_heads, a.head_dim, a.max_len, plan.importance);
  if (!a.workspace || a.workspace_bytes < w.total)
    bad(op, "needs a device workspace of " + std::to_string(w.total) + " bytes (attention_decode_workspace_bytes), got " +
                std::to_string(a.workspace_bytes));
  char* ws = static_cast<char*>(a.workspace);

  DecodeParams& p = plan.params;
  p.q = a.q, p.q_stride = q_stride, p.q_pos = a.q_pos;
  p.pool = a.kv.pool, p.positions = a.kv.positions, p.n_blocks = a.kv.n_blocks, p.block_size = a.kv.block_size,
  p.kv_dim = a.kv.kv_dim;
  p.tables = a.kv.tables, p.table_stride = a.kv.table_stride, p.error_flag = a.kv.error_flag;
  p.lengths = a.lengths, p.max_len = a.max_len;
  p.batch = a.batch, p.n_heads = a.n_heads, p.group = a.n_heads / a.n_kv_heads, p.G = w.G, p.head_dim = a.head_dim;
  p.scale_log2 = a.scale * kLog2e;
  p.n_splits = w.n_splits, p.chunk = w.chunk;
  plan.MG = w.G <= 1 ? 1 : w.G <= 2 ? 2 : w.G <= 4 ? 4 : 8;
  p.ws_o = reinterpret_cast<float*>(ws + w.o);
  p.ws_ml = reinterpret_cast<float*>(ws + w.ml);
  if (plan.importance) {
    p.ws_lse = reinterpret_cast<float*>(ws + w.lse);
    p.ws_scores = reinterpret_cast<float*>(ws + w.scores);
  }
  p.out = a.out, p.out_stride = out_stride;
  p.importance = a.importance, p.importance_stride = a.importance_stride;
  p.head_flags = a.heads.per_head, p.head_tables = a.heads.tables, p.head_lengths = a.heads.lengths;

  const size_t smem = plan.D == 32   ? DecodeLayout<32>::bytes(w.G)
                      : plan.D == 64 ? DecodeLayout<64>::bytes(w.G)
                                     : DecodeLayout<128>::bytes(w.G);
  plan.split = {{unsigned(w.n_splits), unsigned(a.n_heads / w.G), unsigned(a.batch)}, kDecodeThreads, smem};
  plan.combine = {{unsigned(a.n_heads), unsigned(a.batch), 1}, 128, 0};
  if (plan.importance && a.max_len > 0)
    plan.importance_pass = {{unsigned(ceil_div(a.max_len, 128)), unsigned(a.batch), 1}, 128, 0};
  return plan;
}

// ---------------------------------------------------------------------------------------------
namespace {

PagedParams paged_params(const PagedKV& kv) {
  PagedParams p;
  p.pool = kv.pool, p.positions = kv.positions, p.n_blocks = kv.n_blocks, p.block_size = kv.block_size,
  p.kv_dim = kv.kv_dim, p.tables = kv.tables, p.table_stride = kv.table_stride, p.error_flag = kv.error_flag;
  return p;
}

void check_rows(const char* op, const PagedRows& rows) {
  if (rows.n_rows < 0) bad(op, "n_rows must be >= 0");
  if (rows.n_rows > 0 && (!rows.row_table || !rows.row_entry)) bad(op, "row_table and row_entry must be set");
}

void check_jobs(const char* op, const PagedJobs& jobs, bool need_lengths) {
  if (jobs.n_jobs < 0) bad(op, "n_jobs must be >= 0");
  if (jobs.n_jobs > 0 && (!jobs.job_table || !jobs.keep_offsets || !jobs.keep))
    bad(op, "job_table, keep and keep_offsets must be set");
  if (need_lengths && jobs.n_jobs > 0 && !jobs.lengths) bad(op, "lengths must be set");
}

}  // namespace

PagedPlan plan_paged_write(const PagedKV& kv, const PagedRows& rows, DType src_dtype, const void* k, const void* v,
                           int64_t src_stride, const int32_t* pos) {
  const char* op = "paged_kv_write";
  check_paged(op, kv);
  check_rows(op, rows);
  PagedPlan plan;
  plan.dtype = kv.dtype;
  plan.src_dtype = src_dtype;
  if (rows.n_rows == 0) return plan;
  if (!k || !v || !pos) bad(op, "k, v and pos must be set");
  const int64_t stride = src_stride ? src_stride : kv.kv_dim;
  if (stride < kv.kv_dim) bad(op, "src_stride is smaller than kv_dim");
  plan.params = paged_params(kv);
  plan.params.row_table = rows.row_table, plan.params.row_entry = rows.row_entry, plan.params.n_rows = rows.n_rows;
  plan.params.src_k = k, plan.params.src_v = v, plan.params.src_stride = stride, plan.params.src_pos = pos;
  // block (r, y): part y of row r
  plan.launch = {{unsigned(rows.n_rows), unsigned(ceil_div(kv.kv_dim, int64_t(kPagedThreads) * 8)), 1}, kPagedThreads, 0};
  return plan;
}

PagedPlan plan_paged_rope_write(const PagedKV& kv, const PagedRows& rows, const RopeWriteArgs& a) {
  const char* op = "paged_kv_rope_write";
  check_paged(op, kv);
  check_rows(op, rows);
  PagedPlan plan;
  plan.dtype = kv.dtype;
  plan.src_dtype = DType::F32;
  if (rows.n_rows == 0) return plan;
  if (!a.qkv || !a.pos || !a.inv_freq || !a.q_out) bad(op, "qkv, pos, inv_freq and q_out must be set");
  if (a.n_heads < 1 || a.n_kv_heads < 1 || a.head_dim < 2 || a.head_dim % 2 != 0)
    bad(op, "needs n_heads, n_kv_heads >= 1 and an even head_dim");
  if (int64_t(a.n_kv_heads) * a.head_dim != kv.kv_dim) bad(op, "n_kv_heads * head_dim must equal the pool's kv_dim");
  if (a.qkv_stride < int64_t(a.n_heads + 2 * a.n_kv_heads) * a.head_dim) bad(op, "qkv_stride is smaller than q + k + v");
  if (a.q_out_stride < int64_t(a.n_heads) * a.head_dim) bad(op, "q_out_stride is smaller than n_heads * head_dim");
  plan.params = paged_params(kv);
  plan.params.row_table = rows.row_table, plan.params.row_entry = rows.row_entry, plan.params.n_rows = rows.n_rows;
  plan.params.src_k = a.qkv, plan.params.src_stride = a.qkv_stride, plan.params.src_pos = a.pos;
  plan.params.n_heads = a.n_heads, plan.params.n_kv_heads = a.n_kv_heads, plan.params.head_dim = a.head_dim;
  plan.params.inv_freq = a.inv_freq, plan.params.q_out = a.q_out, plan.params.q_out_stride = a.q_out_stride;
  if (a.heads.per_head && (!a.heads.tables || !a.heads.lengths)) bad(op, "heads.per_head without heads.tables or heads.lengths");
  plan.params.head_flags = a.heads.per_head, plan.params.head_tables = a.heads.tables, plan.params.head_lengths = a.heads.lengths;
  // block (r, y): threads y * 128 .. of row r; a thread rotates one (i, i + head_dim/2) pair of a q or
  // k head, or copies two elements of v
  const int64_t work = int64_t(a.n_heads + a.n_kv_heads) * (a.head_dim / 2) + kv.kv_dim / 2;
  plan.launch = {{unsigned(rows.n_rows), unsigned(ceil_div(work, int64_t(kPagedThreads))), 1}, kPagedThreads, 0};
  return plan;
}

PagedPlan plan_paged_read(const PagedKV& kv, const PagedRows& rows, void* k, void* v, int32_t* pos) {
  const char* op = "paged_kv_read";
  check_paged(op, kv);
  check_rows(op, rows);
  PagedPlan plan;
  plan.dtype = kv.dtype;
  if (rows.n_rows == 0) return plan;
  plan.params = paged_params(kv);
  plan.params.row_table = rows.row_table, plan.params.row_entry = rows.row_entry, plan.params.n_rows = rows.n_rows;
  plan.params.dst_k = k, plan.params.dst_v = v, plan.params.dst_pos = pos;
  plan.launch = {{unsigned(rows.n_rows), 1, 1}, kPagedThreads, 0};  // block r: row r
  return plan;
}

static PagedPlan plan_jobs(const char* op, const PagedKV& kv, const PagedJobs& jobs, bool need_lengths) {
  check_paged(op, kv);
  check_jobs(op, jobs, need_lengths);
  PagedPlan plan;
  plan.dtype = kv.dtype;
  if (jobs.n_jobs == 0) return plan;
  plan.params = paged_params(kv);
  plan.params.job_table = jobs.job_table, plan.params.keep = jobs.keep, plan.params.keep_offsets = jobs.keep_offsets;
  plan.params.lengths = jobs.lengths, plan.params.n_jobs = jobs.n_jobs;
  if (need_lengths && jobs.dest) bad(op, "a merge takes kept entries, not moves (dest must be null)");
  if (!need_lengths && jobs.slots) bad(op, "slot maps are for merges (compaction moves name slots)");
  if (jobs.slots && !jobs.slot_offsets) bad(op, "slots without slot_offsets");
  plan.params.dest = jobs.dest;
  plan.params.slots = jobs.slots, plan.params.slot_offsets = jobs.slot_offsets;
  // One thread per 32-bit word (two elements) of K and of V of an entry; each thread walks the
  // entries of its job in order (see paged_body.h for why that order makes in-place moves safe).
  const int words = kv.kv_dim / 2;
  plan.launch = {{unsigned(jobs.n_jobs), unsigned(ceil_div(2 * int64_t(words), kPagedThreads)), 1}, kPagedThreads, 0};
  return plan;
}

PagedPlan plan_paged_compact(const PagedKV& kv, const PagedJobs& jobs) { return plan_jobs("paged_kv_compact", kv, jobs, false); }
PagedPlan plan_paged_merge(const PagedKV& kv, const PagedJobs& jobs) { return plan_jobs("paged_kv_merge", kv, jobs, true); }

PagedPlan plan_paged_head_compact(const PagedKV& kv, const PagedHeadJobs& jobs) {
  const char* op = "paged_kv_head_compact";
  check_paged(op, kv);
  PagedPlan plan;
  plan.dtype = kv.dtype;
  if (jobs.n_jobs < 0) bad(op, "n_jobs must be >= 0");
  if (jobs.n_kv_heads < 1 || kv.kv_dim % jobs.n_kv_heads != 0 || (kv.kv_dim / jobs.n_kv_heads) % 2 != 0)
    bad(op, "n_kv_heads (" + std::to_string(jobs.n_kv_heads) + ") must divide kv_dim (" + std::to_string(kv.kv_dim) +
                ") into heads of an even head_dim");
  if (jobs.n_jobs == 0) return plan;
  if (!jobs.src || !jobs.src_head || !jobs.dst || !jobs.keep || !jobs.keep_offsets)
    bad(op, "src, src_head, dst, keep and keep_offsets must be set");
  plan.params = paged_params(kv);
  plan.params.job_src = jobs.src, plan.params.job_src_head = jobs.src_head, plan.params.job_dst = jobs.dst;
  plan.params.keep = jobs.keep, plan.params.keep_offsets = jobs.keep_offsets, plan.params.n_jobs = jobs.n_jobs;
  plan.params.n_kv_heads = jobs.n_kv_heads, plan.params.head_dim = kv.kv_dim / jobs.n_kv_heads;
  // One thread per 32-bit word of K and of V of one head's entry, walking its job's entries in order.
  const int words = plan.params.head_dim / 2;
  plan.launch = {{unsigned(jobs.n_jobs), unsigned(ceil_div(2 * int64_t(words), kPagedThreads)), 1}, kPagedThreads, 0};
  return plan;
}

}  // namespace pkv::cuda::detail

namespace pkv::cuda {

size_t attention_prefill_workspace_bytes(int n_q, int n_kv, int n_heads) {
  return detail::prefill_workspace_layout(n_q, n_kv, n_heads).total;
}

size_t value_weights_workspace_bytes(int n_kv, int n_heads, int n_kv_heads, int head_dim, bool gram) {
  return detail::value_weight_workspace_layout(n_kv, n_heads, n_kv_heads, head_dim, gram).total;
}

size_t attention_decode_workspace_bytes(int batch, int n_heads, int n_kv_heads, int head_dim, int max_len,
                                        bool importance) {
  return detail::decode_workspace_layout(batch, n_heads, n_kv_heads, head_dim, max_len, importance).total;
}

size_t paged_pool_bytes(const PagedKV& kv) {
  return size_t(kv.n_blocks) * 2 * size_t(kv.block_size) * size_t(kv.kv_dim) * dtype_size(kv.dtype);
}

size_t paged_positions_bytes(const PagedKV& kv) { return size_t(kv.n_blocks) * size_t(kv.block_size) * sizeof(int32_t); }

bool gemv_fits(const GemvArgs& a) { return detail::gemv_misfit(a).empty(); }
bool skinny_fits(const GemvArgs& a) { return detail::skinny_misfit(a).empty(); }
size_t skinny_workspace_bytes(int rows, int in, int out, bool swiglu) {
  if (rows < 1 || in < detail::kSkinnyChunk || in % detail::kSkinnyChunk || out < 1) return 0;
  return detail::skinny_partial_bytes(std::min(rows, kSkinnyMaxRows), in, out, swiglu);
}

std::string quant_misfit(uint32_t type, int cols) {
  int block = 0;
  switch (type) {
    case quant::kQ8_0: block = quant::blocks::Q8_0::kElems; break;
    case quant::kQ4_0: block = quant::blocks::Q4_0::kElems; break;
    case quant::kQ4_K: block = quant::blocks::Q4_K::kElems; break;
    case quant::kQ6_K: block = quant::blocks::Q6_K::kElems; break;
    default:
      return "ggml type " + std::to_string(type) + " is not a block type the GPU reads (Q8_0, Q4_0, Q4_K, Q6_K)";
  }
  if (cols < block || cols % block)
    return "rows of " + std::to_string(cols) + " elements are not whole blocks of " + std::to_string(block);
  return {};
}


namespace detail {

// What gemv and skinny both ask of rows, widths, strides and pointers (in a multiple of in_multiple).
static std::string product_shape_misfit(const GemvArgs& a, int max_rows, int in_multiple) {
  if (a.rows < 1 || a.rows > max_rows)
    return "rows must be 1.." + std::to_string(max_rows) + ", got " + std::to_string(a.rows);
  if (a.in < in_multiple || a.in % in_multiple || a.out < 1)
    return "in must be a positive multiple of " + std::to_string(in_multiple) + " and out >= 1 (in " +
           std::to_string(a.in) + ", out " + std::to_string(a.out) + ")";
  const int64_t xs = a.x_stride ? a.x_stride : a.in, ys = a.y_stride ? a.y_stride : a.out;
  if (xs < a.in || xs % 8) return "x_stride must be a multiple of 8 and >= in";
  if (ys < a.out) return "y_stride is smaller than out";
  if (!a.x || !a.w || !a.y) return "x, w and y must be set";
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned(a.x) || !aligned(a.w) || (a.w_up && !aligned(a.w_up))) return "x and w must be 16-byte aligned";
  return {};
}

std::string gemv_misfit(const GemvArgs& a) {
  if (a.w_dtype != DType::F16 && a.w_dtype != DType::BF16) return "w must be F16 or BF16";
  if (a.y_dtype != DType::F32 && a.y_dtype != a.w_dtype) return "y must be F32 or w's type";
  if (a.accumulate && a.y_dtype != DType::F32) return "accumulate needs a float32 y";
  if (a.w_quant) {
    const std::string bad_quant = quant_misfit(a.w_quant, a.in);
    if (!bad_quant.empty()) return bad_quant;
    if ((a.y_dtype == DType::F32) == (a.w_up != nullptr))
      return "with quantised w, y must be F32 without w_up and x's type with it";
  }
  return product_shape_misfit(a, kGemvMaxRows, 8);
}

GemvPlan plan_gemv(const GemvArgs& a) {
  const std::string why = gemv_misfit(a);
  if (!why.empty()) bad("gemv", why);
  GemvPlan plan;
  plan.w_dtype = a.w_dtype, plan.y_dtype = a.y_dtype, plan.swiglu = a.w_up != nullptr, plan.w_quant = a.w_quant;
  GemvParams& p = plan.params;
  p.x = a.x, p.x_stride = a.x_stride ? a.x_stride : a.in;
  p.w = a.w, p.w_up = a.w_up;
  p.rows = a.rows, p.in = a.in, p.out = a.out;
  p.y = a.y, p.y_stride = a.y_stride ? a.y_stride : a.out;
  p.accumulate = a.accumulate ? 1 : 0;
  const int per_block = (kGemvThreads / 32 / kGemvKSplit) * kGemvOutsPerWarp;
  const size_t smem = size_t(kGemvThreads / 32) * (plan.swiglu ? 2 : 1) * kGemvOutsPerWarp * a.rows * sizeof(float);
  plan.launch = {{unsigned((a.out + per_block - 1) / per_block), 1, 1}, kGemvThreads, smem};
  return plan;
}

int skinny_split(int in, int out, int& k_per_block, int& splits) {
  const int blocks_x = (out + kSkinnyOuts - 1) / kSkinnyOuts;
  const int chunks = in / kSkinnyChunk;
  int s = std::max(1, (kSkinnyTargetBlocks + blocks_x / 2) / blocks_x);
  s = std::max(s, (in + kSkinnyMaxK - 1) / kSkinnyMaxK);
  s = std::min(s, chunks);
  const int per_block = (chunks + s - 1) / s;  // chunks of 64 columns
  k_per_block = per_block * kSkinnyChunk;
  splits = (chunks + per_block - 1) / per_block;
  return blocks_x;
}

size_t skinny_partial_bytes(int rows, int in, int out, bool swiglu) {
  int k_per_block = 0, splits = 1;
  skinny_split(in, out, k_per_block, splits);
  return splits > 1 ? size_t(splits) * (swiglu ? 2 : 1) * size_t(rows) * size_t(out) * sizeof(float) : 0;
}

std::string skinny_misfit(const GemvArgs& a) {
  if (a.w_quant) return "w must be dense (block-quantised weights take gemv or a dequantised copy)";
  if (a.w_dtype != DType::F16 && a.w_dtype != DType::BF16) return "w must be F16 or BF16";
  if (a.y_dtype != DType::F32 && a.y_dtype != a.w_dtype) return "y must be F32 or w's type";
  if (a.accumulate && a.y_dtype != DType::F32) return "accumulate needs a float32 y";
  return product_shape_misfit(a, kSkinnyMaxRows, kSkinnyChunk);
}

SkinnyPlan plan_skinny(const GemvArgs& a) {
  const std::string why = skinny_misfit(a);
  if (!why.empty()) bad("skinny", why);
  SkinnyPlan plan;
  plan.w_dtype = a.w_dtype, plan.y_dtype = a.y_dtype, plan.swiglu = a.w_up != nullptr;
  plan.n_tiles = (a.rows + 7) / 8;
  SkinnyParams& p = plan.params;
  p.x = a.x, p.x_stride = a.x_stride ? a.x_stride : a.in;
  p.w = a.w, p.w_up = a.w_up;
  p.rows = a.rows, p.in = a.in, p.out = a.out;
  p.y = a.y, p.y_stride = a.y_stride ? a.y_stride : a.out;
  p.accumulate = a.accumulate ? 1 : 0;
  const int blocks_x = skinny_split(a.in, a.out, p.k_per_block, p.splits);
  plan.partial_bytes = skinny_partial_bytes(a.rows, a.in, a.out, plan.swiglu);
  const size_t smem = size_t(8 * plan.n_tiles) * size_t(p.k_per_block + 8) * dtype_size(a.w_dtype);
  plan.launch = {{unsigned(blocks_x), unsigned(p.splits), 1}, kSkinnyThreads, smem};
  return plan;
}

DequantPlan plan_dequantize(const DequantArgs& a) {
  const std::string why = quant_misfit(a.quant, a.cols);
  if (!why.empty()) bad("dequantize_rows", why);
  if (a.rows < 1 || a.n < 0 || (!a.ids && a.n > a.rows))
    bad("dequantize_rows", "needs rows >= 1 and 0 <= n (<= rows without ids); got rows " + std::to_string(a.rows) +
                               ", n " + std::to_string(a.n));
  if (a.out_dtype != DType::F32 && a.out_dtype != DType::F16 && a.out_dtype != DType::BF16)
    bad("dequantize_rows", "out_dtype must be F32, F16 or BF16");
  const int64_t stride = a.out_stride ? a.out_stride : a.cols;
  if (stride < a.cols) bad("dequantize_rows", "out_stride is smaller than the row");
  if (a.n > 0 && (!a.w || !a.out)) bad("dequantize_rows", "w and out must be set");
  if (reinterpret_cast<uintptr_t>(a.w) % 16) bad("dequantize_rows", "w must be 16-byte aligned");
  DequantPlan plan;
  plan.quant = a.quant, plan.out_dtype = a.out_dtype;
  DequantParams& p = plan.params;
  p.w = a.w, p.rows = a.rows, p.cols = a.cols, p.ids = a.ids, p.n = a.n, p.out = a.out, p.out_stride = stride;
  const int64_t pieces = int64_t(a.n) * (a.cols / 8);
  plan.launch = {{unsigned((pieces + kDequantThreads - 1) / kDequantThreads), 1, 1}, kDequantThreads, 0};
  return plan;
}

}  // namespace detail
}  // namespace pkv::cuda
