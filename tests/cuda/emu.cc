#include "emu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <vector>

namespace pkv::cuda::emu {

class BlockRunner {
 public:
  BlockRunner(int threads, size_t smem, uint32_t seed)
      : n_(threads), fibers_(size_t(threads)), smem_(smem + 64), xbuf_(size_t(threads)), warp_arrived_(size_t((threads + 31) / 32)),
        rng_(seed) {
    for (auto& f : fibers_) f.stack.reset(new char[kStack]);
  }

  void run_block(int bx, int by, int bz, const std::function<void(Ctx&)>& body) {
    // Poison shared memory: reading what no thread wrote gives NaN-ish garbage, not zeros.
    std::fill(smem_.begin(), smem_.end(), static_cast<unsigned char>(0xff));
    unsigned char* smem = aligned_smem();
    body_ = &body;
    block_arrived_ = 0;
    std::fill(warp_arrived_.begin(), warp_arrived_.end(), 0);
    or_acc_ = or_result_ = false;
    for (int t = 0; t < n_; ++t) {
      Fiber& f = fibers_[size_t(t)];
      f.ctx_info = Ctx{t, bx, by, bz, smem, this};
      f.state = State::Ready;
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = f.stack.get();
      f.uc.uc_stack.ss_size = kStack;
      f.uc.uc_link = &sched_;
      makecontext(&f.uc, reinterpret_cast<void (*)()>(&BlockRunner::entry), 0);
    }
    std::vector<int> order;
    order.reserve(static_cast<size_t>(n_));
    for (;;) {
      order.clear();
      bool all_done = true;
      for (int t = 0; t < n_; ++t) {
        if (fibers_[size_t(t)].state == State::Ready) order.push_back(t);
        if (fibers_[size_t(t)].state != State::Done) all_done = false;
      }
      if (all_done) break;
      if (order.empty()) throw std::runtime_error(deadlock_report(bx, by, bz));
      std::shuffle(order.begin(), order.end(), rng_);
      for (int t : order) {
        if (fibers_[size_t(t)].state != State::Ready) continue;
        cur_ = t;
        current() = this;
        swapcontext(&sched_, &fibers_[size_t(t)].uc);
      }
    }
  }

  void block_barrier() {
    Fiber& me = fibers_[size_t(cur_)];
    me.state = State::WaitBlock;
    if (++block_arrived_ == n_) {
      block_arrived_ = 0;
      or_result_ = or_acc_;
      or_acc_ = false;
      for (auto& f : fibers_)
        if (f.state == State::WaitBlock) f.state = State::Ready;
    }
    yield();
  }

  bool block_barrier_or(bool pred) {
    or_acc_ = or_acc_ || pred;
    block_barrier();
    return or_result_;
  }

  void warp_barrier() {
    const int w = cur_ / 32;
    const int size = std::min(32, n_ - w * 32);
    Fiber& me = fibers_[size_t(cur_)];
    me.state = State::WaitWarp;
    if (++warp_arrived_[size_t(w)] == size) {
      warp_arrived_[size_t(w)] = 0;
      for (int t = w * 32; t < w * 32 + size; ++t)
        if (fibers_[size_t(t)].state == State::WaitWarp) fibers_[size_t(t)].state = State::Ready;
    }
    yield();
  }

  float shfl_xor(float v, int mask) {
    const int me = cur_;
    xbuf_[size_t(me)] = v;
    warp_barrier();
    const float r = xbuf_[size_t(me ^ mask)];
    warp_barrier();
    return r;
  }

 private:
  static constexpr size_t kStack = 256 * 1024;
  enum class State { Ready, WaitBlock, WaitWarp, Done };
  struct Fiber {
    ucontext_t uc;
    std::unique_ptr<char[]> stack;
    State state = State::Done;
    Ctx ctx_info;
  };

  static BlockRunner*& current() {
    static thread_local BlockRunner* r = nullptr;
    return r;
  }

  static void entry() {
    BlockRunner* r = current();
    Fiber& f = r->fibers_[size_t(r->cur_)];
    (*r->body_)(f.ctx_info);
    // The fiber may have moved between barriers, but its own index is in its context.
    r->fibers_[size_t(f.ctx_info.tid)].state = State::Done;
  }

  void yield() {
    Fiber& me = fibers_[size_t(cur_)];
    swapcontext(&me.uc, &sched_);
  }

  unsigned char* aligned_smem() {
    auto p = reinterpret_cast<uintptr_t>(smem_.data());
    return smem_.data() + ((64 - p % 64) % 64);
  }

  std::string deadlock_report(int bx, int by, int bz) const {
    int wb = 0, ww = 0, done = 0;
    for (const auto& f : fibers_) wb += f.state == State::WaitBlock, ww += f.state == State::WaitWarp, done += f.state == State::Done;
    return "emulated block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " + std::to_string(bz) +
           ") deadlocked: " + std::to_string(wb) + " threads at a block barrier, " + std::to_string(ww) +
           " at a warp barrier, " + std::to_string(done) + " finished (a barrier not every thread reaches)";
  }

  int n_;
  std::vector<Fiber> fibers_;
  std::vector<unsigned char> smem_;
  std::vector<float> xbuf_;
  std::vector<int> warp_arrived_;
  int block_arrived_ = 0;
  bool or_acc_ = false, or_result_ = false;
  int cur_ = 0;
  ucontext_t sched_;
  const std::function<void(Ctx&)>* body_ = nullptr;
  std::mt19937 rng_;
};

void Ctx::sync() { runner->block_barrier(); }
bool Ctx::sync_or(bool pred) { return runner->block_barrier_or(pred); }
void Ctx::warp_sync() { runner->warp_barrier(); }
float Ctx::shfl_xor(float v, int mask) { return runner->shfl_xor(v, mask); }

void run(const detail::Launch& launch, const std::function<void(Ctx&)>& body, uint32_t seed) {
  if (launch.empty()) return;
  BlockRunner runner(launch.threads, launch.smem, seed);
  for (unsigned z = 0; z < launch.grid[2]; ++z)
    for (unsigned y = 0; y < launch.grid[1]; ++y)
      for (unsigned x = 0; x < launch.grid[0]; ++x) runner.run_block(int(x), int(y), int(z), body);
}

}  // namespace pkv::cuda::emu
