// pkv_cuda_tests: CUDA kernels against their CPU twins. Needs a CUDA device; without one it says so
// and exits 0 (it is never registered with ctest: scripts/gpu_test.sh runs it on the GPU machine).
#include <gtest/gtest.h>

#include <cstdio>

#include "ops/cuda/device.h"

int main(int argc, char** argv) {
  const int n = pkv::cuda::device_count();
  if (n == 0) {
    std::printf("pkv_cuda_tests: no CUDA device found: skipping every test\n");
    return 0;
  }
  std::printf("pkv_cuda_tests: %d device(s); using %s\n", n, pkv::cuda::device_summary().c_str());
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
