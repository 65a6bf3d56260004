// Addressing of head tables (kernels.h, PagedHeads), shared by the paged-KV and decode-attention
// kernel bodies (paged_body.h, attention_body.h); same conventions as those.
#pragma once
#include <cstdint>

#include "ops/cuda/kernel_types.h"
#include "ops/cuda/kernels.h"

namespace pkv::cuda::detail {

// Element offset of the K of entry e of head table t (kernels.h, PagedHeads: sub-block sb =
// table[e / block_size] is part sb % n_kv_heads of block sb / n_kv_heads; V is block_size * kv_dim
// further), or -1 (error flag set) when the table or entry is out of range.
__device__ __forceinline__ int64_t paged_head_offset(const int32_t* tables, int table_stride,
                                                     int n_blocks, int block_size, int kv_dim, int n_kv_heads,
                                                     int* error_flag, int t, int e) {
  if (t < 0 || e < 0 || e >= table_stride * block_size) {
    if (error_flag) atomicOr(error_flag, kPagedBadEntry);
    return -1;
  }
  const int sb = tables[int64_t(t) * table_stride + e / block_size];
  if (sb < 0 || sb >= n_blocks * n_kv_heads) {
    if (error_flag) atomicOr(error_flag, kPagedBadBlock);
    return -1;
  }
  const int hd = kv_dim / n_kv_heads, blk = sb / n_kv_heads, part = sb % n_kv_heads;
  return int64_t(blk) * 2 * block_size * kv_dim + (int64_t(part) * block_size + e % block_size) * hd;
}

}  // namespace pkv::cuda::detail
