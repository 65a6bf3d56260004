#include "ops/cuda/device.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>

#include "core/error.h"
#include "ops/cuda/cuda_check.h"

namespace pkv::cuda {

namespace {

std::string where(const char* file, int line) {
  std::string f(file);
  const size_t p = f.rfind("src/");
  if (p != std::string::npos) f = f.substr(p);
  return f + ":" + std::to_string(line);
}

std::string gib(size_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f GiB", double(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

}  // namespace

void cuda_failed(cudaError_t err, const char* call, const char* file, int line) {
  // Reported here, so clear it from the runtime's last-error slot: otherwise the next launch check
  // (cudaGetLastError) reports it again, against an innocent kernel. Seen on the H200: a checked,
  // failed cudaSetDevice(100000) in one test surfaced as "invalid device ordinal launching
  // rms_norm" in the next. (Sticky errors stay: the context is then unusable anyway.)
  (void)cudaGetLastError();
  fail(where(file, line), std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                              ") in " + call);
}

void cublas_failed(cublasStatus_t st, const char* call, const char* file, int line) {
  fail(where(file, line), std::string("cuBLAS error ") + cublasGetStatusName(st) + " (" + cublasGetStatusString(st) +
                              ") in " + call);
}

bool debug_sync() {
  static const bool on = [] {
    const char* v = std::getenv("PKV_CUDA_SYNC");
    return v && *v && std::string(v) != "0";
  }();
  return on;
}

void launch_check(cudaStream_t stream, const char* what, const char* file, int line) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && debug_sync() && !stream_capturing(stream)) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess)
    fail(where(file, line), std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                                ") launching " + what + (debug_sync() ? "" : " (set PKV_CUDA_SYNC=1 to find an asynchronous fault's launch)"));
}

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear: "no device" is an answer here, not an error
    return 0;
  }
  return n;
}

void set_device(int index) { PKV_CUDA_CHECK(cudaSetDevice(index)); }

std::string device_summary() {
  int dev = 0;
  PKV_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  PKV_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s, compute %d.%d, %d SMs, %s", p.name, p.major, p.minor, p.multiProcessorCount,
                gib(p.totalGlobalMem).c_str());
  return buf;
}

size_t device_free_bytes() {
  size_t f = 0, t = 0;
  PKV_CUDA_CHECK(cudaMemGetInfo(&f, &t));
  return f;
}

size_t device_total_bytes() {
  size_t f = 0, t = 0;
  PKV_CUDA_CHECK(cudaMemGetInfo(&f, &t));
  return t;
}

void device_synchronize() { PKV_CUDA_CHECK(cudaDeviceSynchronize()); }
void stream_synchronize(void* stream) { PKV_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream))); }

DeviceBuffer::DeviceBuffer(size_t bytes, const std::string& what) : what_(what) {
  if (bytes == 0) return;
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky: clear it so later calls do not report it
    size_t f = 0, t = 0;
    const bool info = cudaMemGetInfo(&f, &t) == cudaSuccess;
    if (!info) cudaGetLastError();
    fail("device memory", "out of device memory: cannot allocate " + std::to_string(bytes) + " bytes (" + gib(bytes) +
                              ") for " + what + (info ? " (free " + gib(f) + " of " + gib(t) + ")" : ""));
  }
  PKV_CUDA_CHECK(err);
  ptr_ = p;
  bytes_ = bytes;
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);  // never throws from a destructor; an error here would be sticky anyway
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)), what_(std::move(o.what_)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    what_ = std::move(o.what_);
  }
  return *this;
}

void DeviceBuffer::upload(const void* host, size_t n, size_t offset) {
  if (n == 0) return;
  if (offset > bytes_ || n > bytes_ - offset)
    fail("device memory", "upload of " + std::to_string(n) + " bytes at offset " + std::to_string(offset) +
                              " overruns " + what_ + " (" + std::to_string(bytes_) + " bytes)");
  PKV_CUDA_CHECK(cudaMemcpy(static_cast<char*>(ptr_) + offset, host, n, cudaMemcpyHostToDevice));
}

void DeviceBuffer::download(void* host, size_t n, size_t offset) const {
  if (n == 0) return;
  if (offset > bytes_ || n > bytes_ - offset)
    fail("device memory", "download of " + std::to_string(n) + " bytes at offset " + std::to_string(offset) +
                              " overruns " + what_ + " (" + std::to_string(bytes_) + " bytes)");
  PKV_CUDA_CHECK(cudaMemcpy(host, static_cast<const char*>(ptr_) + offset, n, cudaMemcpyDeviceToHost));
}

void DeviceBuffer::fill_bytes(int value) {
  if (bytes_) PKV_CUDA_CHECK(cudaMemset(ptr_, value, bytes_));
}

void DeviceBuffer::reset() {
  if (ptr_) PKV_CUDA_CHECK(cudaFree(ptr_));
  ptr_ = nullptr;
  bytes_ = 0;
}

Stream::Stream() {
  cudaStream_t s = nullptr;
  PKV_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  s_ = s;
}

Stream::~Stream() {
  if (s_) cudaStreamDestroy(static_cast<cudaStream_t>(s_));
}

Stream::Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}

Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    if (s_) cudaStreamDestroy(static_cast<cudaStream_t>(s_));
    s_ = std::exchange(o.s_, nullptr);
  }
  return *this;
}

void Stream::synchronize() const { PKV_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(s_))); }

void copy_to_device(void* dst, const void* host_src, size_t bytes, void* stream) {
  if (bytes) PKV_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)));
}
void copy_to_host(void* host_dst, const void* src, size_t bytes, void* stream) {
  if (bytes) PKV_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(stream)));
}
void copy_on_device(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes) PKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)));
}
void copy_2d_on_device(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
                       void* stream) {
  if (width && rows)
    PKV_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDeviceToDevice,
                                     static_cast<cudaStream_t>(stream)));
}
void memset_device(void* dst, int value, size_t bytes, void* stream) {
  if (bytes) PKV_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, static_cast<cudaStream_t>(stream)));
}

// ------------------------------------------------------------------------------------------------
PinnedBuffer::~PinnedBuffer() {
  if (ptr_) cudaFreeHost(ptr_);
}

void* PinnedBuffer::need(size_t bytes) {
  if (bytes <= bytes_ && ptr_) return ptr_;
  if (ptr_) PKV_CUDA_CHECK(cudaFreeHost(ptr_));
  ptr_ = nullptr, bytes_ = 0;
  const size_t n = std::max<size_t>(bytes + bytes / 4, 4096);
  PKV_CUDA_CHECK(cudaMallocHost(&ptr_, n));
  bytes_ = n;
  return ptr_;
}

double measure_copy_bandwidth(size_t bytes) {
  DeviceBuffer a(bytes, "bandwidth probe"), b(bytes, "bandwidth probe");
  PKV_CUDA_CHECK(cudaMemset(a.data(), 1, bytes));
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  PKV_CUDA_CHECK(cudaEventCreate(&e0));
  PKV_CUDA_CHECK(cudaEventCreate(&e1));
  float best_ms = 0;
  for (int rep = 0; rep < 6; ++rep) {  // the first is a warm-up; the best of the rest
    PKV_CUDA_CHECK(cudaEventRecord(e0, nullptr));
    PKV_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, nullptr));
    PKV_CUDA_CHECK(cudaEventRecord(e1, nullptr));
    PKV_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    PKV_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (rep > 0 && (best_ms == 0 || ms < best_ms)) best_ms = ms;
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return best_ms > 0 ? 2.0 * double(bytes) / (double(best_ms) / 1000.0) : 0.0;
}

StreamTimer::StreamTimer() {
  cudaEvent_t a = nullptr, b = nullptr;
  PKV_CUDA_CHECK(cudaEventCreate(&a));
  if (cudaEventCreate(&b) != cudaSuccess) {
    cudaEventDestroy(a);
    PKV_CUDA_CHECK(cudaGetLastError());
  }
  e0_ = a, e1_ = b;
}
StreamTimer::~StreamTimer() {
  if (e0_) cudaEventDestroy(static_cast<cudaEvent_t>(e0_));
  if (e1_) cudaEventDestroy(static_cast<cudaEvent_t>(e1_));
}
void StreamTimer::start(void* stream) {
  PKV_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e0_), static_cast<cudaStream_t>(stream)));
}
void StreamTimer::stop(void* stream) {
  PKV_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e1_), static_cast<cudaStream_t>(stream)));
}
double StreamTimer::elapsed_ms() const {
  PKV_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(e1_)));
  float ms = 0;
  PKV_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(e0_), static_cast<cudaEvent_t>(e1_)));
  return ms;
}

bool stream_capturing(void* stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  PKV_CUDA_CHECK(cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &st));
  return st != cudaStreamCaptureStatusNone;
}

StreamGraph::~StreamGraph() {
  if (exec_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
}

void StreamGraph::capture(void* stream, const std::function<void()>& enqueue) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (!s) fail("cuda::StreamGraph", "the default stream cannot be captured; give a stream of your own");
  PKV_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  cudaGraph_t graph = nullptr;
  try {
    enqueue();
  } catch (...) {
    cudaStreamEndCapture(s, &graph);  // ends the capture; what was recorded is dropped
    if (graph) cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    throw;
  }
  PKV_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  ++captures_;
  if (exec_) {
    cudaGraphExecUpdateResultInfo info{};
    if (cudaGraphExecUpdate(static_cast<cudaGraphExec_t>(exec_), graph, &info) == cudaSuccess) {
      cudaGraphDestroy(graph);
      return;
    }
    (void)cudaGetLastError();  // the topology changed: instantiate anew
    cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
    exec_ = nullptr;
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (err != cudaSuccess) cuda_failed(err, "cudaGraphInstantiate(&exec, graph, 0)", __FILE__, __LINE__);
  exec_ = exec;
  ++instantiations_;
}

void StreamGraph::launch(void* stream) {
  if (!exec_) fail("cuda::StreamGraph", "launch before any capture");
  PKV_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), static_cast<cudaStream_t>(stream)));
}

namespace detail {

bool pdl_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("PKV_PDL");
    if (v && std::string(v) == "0") return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    return major >= 9;
  }();
  return on;
}

}  // namespace detail
}  // namespace pkv::cuda
