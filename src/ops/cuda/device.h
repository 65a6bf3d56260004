// Device memory and streams for the CUDA back end. No CUDA types here (DESIGN.md principle 1): a
// stream is passed as `void*` (a cudaStream_t; nullptr = the default stream), device pointers as
// plain pointers. Every failure throws pkv::Error with the file and line of the failing call.
#pragma once
#include <cstddef>
#include <functional>
#include <string>

namespace pkv::cuda {

// Number of usable CUDA devices; 0 when there is no device or no driver (never throws).
int device_count();
// Makes device `index` current for this host thread (cudaSetDevice).
void set_device(int index);
// "NVIDIA H100 80GB HBM3, compute 9.0, 132 SMs, 79.1 GiB" for the current device.
std::string device_summary();
size_t device_free_bytes();
size_t device_total_bytes();
void device_synchronize();
// Device memory bandwidth from timed device-to-device copies of `bytes` (bytes read + bytes written
// per second, the traffic of the copy); 0 where it cannot be measured (the fake device).
double measure_copy_bandwidth(size_t bytes = size_t(1) << 30);
void stream_synchronize(void* stream);

// Owns one device allocation (cudaMalloc). Move-only; expensive copies are explicit (copy_from).
// Allocation failure throws pkv::Error naming `what`, the size and the free/total device memory,
// and leaves no sticky CUDA error behind.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes, const std::string& what = "device buffer");
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() { return ptr_; }
  const void* data() const { return ptr_; }
  template <class T>
  T* as() {
    return static_cast<T*>(ptr_);
  }
  template <class T>
  const T* as() const {
    return static_cast<const T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }
  bool empty() const { return bytes_ == 0; }

  // Synchronous copies between host memory and [offset, offset + n) of this buffer (bounds checked).
  void upload(const void* host, size_t n, size_t offset = 0);
  void download(void* host, size_t n, size_t offset = 0) const;
  void fill_bytes(int value);  // memset of the whole buffer (synchronous)
  void reset();                // frees the memory now

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  std::string what_;
};

// Page-locked host memory (cudaMallocHost), for copies that run at full speed. Grown on demand.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* need(size_t bytes);  // at least `bytes`; the old contents are lost when it grows
  void* data() { return ptr_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// An owned, non-blocking CUDA stream.
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(Stream&& o) noexcept;
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  void* get() const { return s_; }  // a cudaStream_t
  void synchronize() const;

 private:
  void* s_ = nullptr;
};

// Work recorded once from a stream and replayed with one launch (a CUDA graph), so that a decode
// step of hundreds of small kernels is not bound by their launch overhead. capture() records what
// `enqueue` puts on `stream` WITHOUT running it; every argument is baked in at that moment (device
// memory is read at each replay), so `enqueue` must copy the values it uses, not refer to state that
// changes. The first capture instantiates the graph; later ones update it in place when only
// arguments changed (cudaGraphExecUpdate) and re-instantiate otherwise.
class StreamGraph {
 public:
  StreamGraph() = default;
  ~StreamGraph();
  StreamGraph(const StreamGraph&) = delete;
  StreamGraph& operator=(const StreamGraph&) = delete;
  void capture(void* stream, const std::function<void()>& enqueue);
  void launch(void* stream);  // replays the last capture on `stream`
  bool ready() const { return exec_ != nullptr; }
  int captures() const { return captures_; }
  int instantiations() const { return instantiations_; }

 private:
  void* exec_ = nullptr;  // cudaGraphExec_t
  std::function<void()> replay_;  // the fake device (tests/cuda/fake_device.cc) replays this
  int captures_ = 0, instantiations_ = 0;
};
// GPU time between two points of a stream (CUDA events).
class StreamTimer {
 public:
  StreamTimer();
  ~StreamTimer();
  StreamTimer(const StreamTimer&) = delete;
  StreamTimer& operator=(const StreamTimer&) = delete;
  void start(void* stream);
  void stop(void* stream);
  double elapsed_ms() const;  // waits for the stop event; 0 on the fake device

 private:
  void* e0_ = nullptr;
  void* e1_ = nullptr;
};

// True while `stream` is being captured (then nothing may synchronise it).
bool stream_capturing(void* stream);

// Asynchronous copies on `stream` (host memory should be pinned for real overlap).
void copy_to_device(void* dst, const void* host_src, size_t bytes, void* stream);
void copy_to_host(void* host_dst, const void* src, size_t bytes, void* stream);
void copy_on_device(void* dst, const void* src, size_t bytes, void* stream);
// `rows` rows of `width` bytes from src (a row every src_pitch bytes) to dst (every dst_pitch
// bytes), both in device memory; enqueued on the stream.
void copy_2d_on_device(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
                       void* stream);
void memset_device(void* dst, int value, size_t bytes, void* stream);

}  // namespace pkv::cuda
