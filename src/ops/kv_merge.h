// The merge rule of Elastic Cache (Liu et al. 2024), one home for the CPU cache and the GPU kernel:
// with the kept entries keep[0..n_keep) of a layer of n entries (strictly increasing), every entry
// belongs to its nearest kept entry by index, ties to the earlier kept entry. Kept entry m's group is
// the index range [merge_group_lo, merge_group_hi]; the groups are disjoint and cover [0, n).
// Plain C++, callable from CUDA kernel bodies (host and device).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PKV_HOST_DEVICE __host__ __device__
#else
#define PKV_HOST_DEVICE
#endif

namespace pkv::ops {

PKV_HOST_DEVICE inline int merge_group_lo(const int32_t* keep, int m) {
  return m == 0 ? 0 : (keep[m - 1] + keep[m]) / 2 + 1;
}
PKV_HOST_DEVICE inline int merge_group_hi(const int32_t* keep, int m, int n_keep, int n) {
  return m == n_keep - 1 ? n - 1 : (keep[m] + keep[m + 1]) / 2;
}

}  // namespace pkv::ops
