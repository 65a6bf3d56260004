// A CPU emulation of CUDA thread blocks, to run the kernel bodies of src/ops/cuda/*_body.h without a GPU.
//
// Each thread of a block is a cooperative fiber (ucontext). __syncthreads, __syncthreads_or,
// __syncwarp and __shfl_xor_sync become barriers over the block or the warp. Fibers run in a random
// order between barriers (seeded), so a missing barrier tends to show up as a wrong result, and a
// barrier that not every thread reaches shows up as a deadlock, reported as a test failure. Blocks
// run one after another. This checks logic (indexing, masking, tiling, reductions, barriers), not
// speed, and not what only hardware does (memory ordering between blocks, real warp scheduling).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "ops/cuda/plan.h"

// CUDA's device atomics that the bodies use: fibers never run concurrently.
inline int atomicOr(int* address, int value) {
  const int old = *address;
  *address = old | value;
  return old;
}

namespace pkv::cuda::emu {

class BlockRunner;

struct Ctx {
  int tid = 0, bx = 0, by = 0, bz = 0;
  unsigned char* smem = nullptr;
  BlockRunner* runner = nullptr;
  void sync();
  bool sync_or(bool pred);
  void warp_sync();
  float shfl_xor(float v, int mask);
};

// Runs body(ctx) for every thread of every block of the launch. Throws std::runtime_error on a
// deadlock (barrier divergence).
void run(const detail::Launch& launch, const std::function<void(Ctx&)>& body, uint32_t seed = 1);

}  // namespace pkv::cuda::emu
