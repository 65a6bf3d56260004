#include <gtest/gtest.h>

#include "test_util.h"

#include <cmath>
#include <filesystem>
#include <random>

#include "core/dtype.h"
#include "core/npy.h"
#include "core/threads.h"
#include "kv/kv_cache.h"

namespace fs = std::filesystem;
using namespace pkv;

TEST(DType, HalfRoundTripIsExactForAllFiniteHalves) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_f16(f), uint16_t(h)) << "half bits " << h;
  }
}

TEST(DType, HalfKnownValues) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7c00)));
  EXPECT_EQ(f32_to_f16(1.0f + 1.0f / 4096), 0x3c00);  // rounds to even
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(3.140625f)), 3.140625f);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
}

TEST(Threads, ParallelForCoversEveryIndexOnce) {
  std::vector<int> hits(10007, 0);
  parallel_for(hits.size(), 3, [&](size_t b, size_t e, int) {
    for (size_t i = b; i < e; ++i) hits[i]++;
  });
  for (int h : hits) ASSERT_EQ(h, 1);
}

TEST(Npy, WriteReadRoundTrip) {
  const std::string path = test::temp_path("npy_test.npy");
  std::vector<float> v = {1.5f, -2.f, 3.25f, 0.f, 7.f, 8.f};
  write_npy(path, v.data(), {2, 3});
  NpyArray a = read_npy(path);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a.data, v);
  fs::remove(path);
}

TEST(KVCache, AppendRetainKeepsOrderPositionsAndFreesBytes) {
  KVCache cache(3, 4);
  std::vector<float> k(10 * 4), v(10 * 4);
  std::vector<int32_t> pos(10);
  for (int i = 0; i < 10; ++i) {
    pos[size_t(i)] = i * 2;  // arbitrary increasing absolute positions
    for (int d = 0; d < 4; ++d) k[size_t(i * 4 + d)] = float(i * 10 + d), v[size_t(i * 4 + d)] = -float(i * 10 + d);
  }
  for (int l = 0; l < 3; ++l) cache.layer(l).append(k.data(), v.data(), pos.data(), 10);
  EXPECT_EQ(cache.bytes(), size_t(3 * 10 * 2 * 4 * 4));
  std::vector<int32_t> keep = {0, 3, 4, 9};
  cache.layer(1).retain(keep);
  const KVLayer& L = cache.layer(1);
  ASSERT_EQ(L.size(), 4);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(L.positions()[i], keep[size_t(i)] * 2);
    for (int d = 0; d < 4; ++d) {
      EXPECT_EQ(L.keys()[i * 4 + d], float(keep[size_t(i)] * 10 + d));
      EXPECT_EQ(L.values()[i * 4 + d], -float(keep[size_t(i)] * 10 + d));
    }
  }
  // Layers are independent: the others still hold everything.
  EXPECT_EQ(cache.layer(0).size(), 10);
  EXPECT_EQ(cache.layer(2).size(), 10);
  EXPECT_EQ(cache.bytes_per_layer()[1], size_t(4 * 2 * 4 * 4));
  EXPECT_LE(cache.layer(1).capacity_bytes(), size_t(10 * 2 * 4 * 4));
  // New entries get their true absolute position after eviction.
  int32_t p = 100;
  cache.layer(1).append(k.data(), v.data(), &p, 1);
  EXPECT_EQ(cache.layer(1).positions()[4], 100);
}
