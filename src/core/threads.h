// A small persistent thread pool: parallel_for splits [0, n) into contiguous chunks, one per worker.
#pragma once
#include <cstddef>
#include <functional>

namespace pkv {

// Number of worker threads used by parallel_for (default: hardware concurrency, or PREFIXKV_THREADS).
int num_threads();
void set_num_threads(int n);

// Calls fn(begin, end, thread_index) on disjoint chunks covering [0, n). Blocks until all are done.
// Chunks are at least `grain` long. Safe to call from one thread at a time (nested calls run serially).
void parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t, int)>& fn);

}  // namespace pkv
