// Random inputs for the per-head KV tests (test_adakv.cc, test_head_alloc.cc): uniform floats and a
// CPU cache whose KV heads can hold their own entries, filled with random keys and values at
// positions 0 .. n-1.
#pragma once
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kv/kv_cache.h"

namespace pkv::test {

inline std::vector<float> random_vec(std::mt19937& rng, size_t n, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> x(n);
  for (float& f : x) f = u(rng);
  return x;
}

inline KVCache random_cache(std::mt19937& rng, int layers, int n, int kv_heads, int head_dim) {
  KVCache c(layers, kv_heads * head_dim, kv_heads);
  std::vector<int32_t> pos(static_cast<size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);
  for (int l = 0; l < layers; ++l) {
    const std::vector<float> k = random_vec(rng, size_t(n) * kv_heads * head_dim),
                             v = random_vec(rng, size_t(n) * kv_heads * head_dim);
    c.layer(l).append(k.data(), v.data(), pos.data(), n);
  }
  return c;
}

}  // namespace pkv::test
