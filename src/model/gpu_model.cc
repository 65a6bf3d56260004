// The model forward pass on the device: CLIP tower + projector and the LLaMA decoder, written
// against the operator API of kernels.h (no CUDA headers here). Model::encode_image and
// Model::decode (src/model/model.cc) are the references, step for step.
#include "model/gpu_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <set>

#include "core/error.h"
#include "core/threads.h"
#include "model/clip.h"
#include "ops/cuda/device.h"
#include "ops/cuda/kernels.h"
#include "ops/quant.h"

namespace pkv::cuda {

namespace {

constexpr const char* kWhere = "GPU model";

bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v && std::string(v) == "0";
}

bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::string(v) != "0";
}

std::string mib(size_t bytes) { return std::to_string((bytes + (1 << 19)) >> 20) + " MiB"; }

// A device buffer that grows on demand. Growing frees the old memory: synchronise the stream first,
// since work enqueued earlier may still use it.
class Scratch {
 public:
  explicit Scratch(std::string what) : what_(std::move(what)) {}
  void* need(size_t bytes, void* stream) {
    if (bytes > buf_.bytes()) {
      stream_synchronize(stream);
      buf_.reset();
      buf_ = DeviceBuffer(std::max<size_t>(bytes + bytes / 4, 256), what_);
    }
    return buf_.data();
  }
  template <class T>
  T* need_as(size_t count, void* stream) {
    return static_cast<T*>(need(count * sizeof(T), stream));
  }

 private:
  std::string what_;
  DeviceBuffer buf_;
};

// Host staging of int32 arrays for one upload: add() returns each array's element offset.
struct IntPack {
  std::vector<int32_t> data;
  size_t add(const std::vector<int32_t>& v) {
    const size_t at = data.size();
    data.insert(data.end(), v.begin(), v.end());
    while (data.size() % 4) data.push_back(0);  // 16-byte alignment of every array
    return at;
  }
  size_t reserve(size_t n, int32_t fill) {
    const size_t at = data.size();
    data.resize(at + n, fill);
    while (data.size() % 4) data.push_back(0);
    return at;
  }
};

int32_t* upload_pack(Scratch& s, const IntPack& p, void* stream) {
  int32_t* d = s.need_as<int32_t>(std::max<size_t>(p.data.size(), 4), stream);
  copy_to_device(d, p.data.data(), p.data.size() * sizeof(int32_t), stream);
  return d;
}

struct DevLinear {
  const void* w = nullptr;   // [out, in] in the compute dtype, or ggml blocks of type `quant`
  uint32_t quant = 0;        // nonzero: w's rows are ggml blocks as the GGUF file stores them
  const float* b = nullptr;  // [out] or null
  int in = 0, out = 0;
  // Fused projections whose weights are stored differently (e.g. Q4_K q/k with a Q6_K v): one
  // product per part, into columns [its offset, + its out) of the fused output, then the bias.
  std::vector<DevLinear> parts;
};

struct DecLayer {
  const float* attn_norm = nullptr;
  const float* mlp_norm = nullptr;
  DevLinear qkv, o, gate, up, down;  // qkv: [q | k | v] rows fused into one [q_dim + 2 kv_dim, hidden]
};

struct VisLayer {
  const float *ln1_w = nullptr, *ln1_b = nullptr, *ln2_w = nullptr, *ln2_b = nullptr;
  DevLinear qkv, o, fc1, fc2;
};

}  // namespace

// ------------------------------------------------------------------------------------------------
struct GpuModel::Impl {
  const Model& m;
  const ModelConfig& cfg;
  DType dt;
  Stream stream;
  Blas blas;
  bool sync_debug = env_on("PKV_CUDA_SYNC");
  bool check_finite = env_on("PKV_GPU_CHECK");
  std::vector<DeviceBuffer> store;  // every uploaded weight
  std::map<const TensorView*, const void*> uploaded;
  size_t weight_bytes = 0;
  size_t quant_bytes = 0;             // of weight_bytes: ggml blocks as the file stores them
  std::set<std::string> quant_types;  // their types ("Q4_K", ...)
  size_t widest_quant = 0;            // elements of the largest quantised matrix (the scratch's size)

  // Decoder.
  // q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, qkv_dim = q_dim + 2 kv_dim (the
  // fused q/k/v row); ffn: the MLP's intermediate size.
  int hidden = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, q_dim = 0, kv_dim = 0, qkv_dim = 0, ffn = 0, vocab = 0,
      n_layers = 0;
  float eps = 0, scale = 1;
  std::vector<DecLayer> layers;
  const void* embed = nullptr;  // [vocab, hidden]
  uint32_t embed_quant = 0;      // nonzero: its rows are ggml blocks
  DevLinear head;
  const float* final_norm = nullptr;
  const float* inv_freq = nullptr;

  // Vision tower and projector.
  bool vision = false;
  // vis_tokens = vis_grid^2 patches + the class token; vis_patch: pixels per patch side.
  int vis_hidden = 0, vis_heads = 0, vis_head_dim = 0, vis_ffn = 0, vis_tokens = 0, vis_grid = 0, vis_patch = 0,
      vis_image_size = 0;
  float v_eps = 0;
  const void* patch_w = nullptr;
  const float* class_emb = nullptr;
  const float* pos_emb = nullptr;
  const float *pre_w = nullptr, *pre_b = nullptr;
  std::vector<VisLayer> vlayers;
  std::vector<DevLinear> projector;

  // Scratch, grown on demand and shared by the vision tower, prefill and decode; R = rows of the
  // call (prompt tokens, batch size or vision tokens), d = that model's hidden size.
  Scratch x{"GPU residual stream"},           // float32 [R, d]
      hf{"GPU norm output"},                  // float32 [R, max(d, patch values)]
      h16{"GPU GEMM input"},                  // compute dtype [R, widest GEMM input]
      qkv{"GPU q/k/v (float32)"},             // float32 [R, qkv_dim]
      qkv16{"GPU q/k/v (16-bit)"},            // compute dtype [R, qkv_dim]
      att16{"GPU attention output"},          // compute dtype [R, q_dim]
      gate{"GPU MLP gate"}, up{"GPU MLP up"},  // float32 [R, ffn]
      logits{"GPU logits"},                   // float32 [R, vocab]
      ints{"GPU call metadata"},              // int32 tables, lengths, positions of one call
      imp{"GPU importance"},                  // float32 [layers, R or batch x stride]
      ws{"GPU attention workspace"},          // the attention kernels' workspace (plan.h layouts)
      io{"GPU input staging"},                // host inputs on their way to the device
      shown{"GPU observed tensor"},           // float32: a tensor computed only for an observer
      back{"GPU prefill keys read back"},     // a prefill piece's earlier keys: K, V [entries, kv_dim], positions
      last{"GPU last rows"},                  // float32 [parts, hidden]: each prefill part's last row
      vw{"GPU value weights"},                // float32 [n_heads, keys]: one part's and layer's (extended importance)
      vw_ws{"GPU value-weight products"};     // wov2's float32 values and products (value_weights_workspace_bytes)
  // The output projection's Gram matrices (float32 [layers][n_heads][hd][hd]), made on the device from
  // the uploaded W_o (kernels.h output_gram: one strided batched product per layer; a quantised W_o
  // dequantised first) by the first prefill that weights by ||W_o^h v||_2 (64 MiB at the 7B shape).
  // Model::output_gram is the CPU engine's.
  DeviceBuffer gram;
  const float* output_gram(int layer) {
    const size_t per = size_t(n_heads) * head_dim * head_dim;
    if (gram.empty()) {
      DeviceBuffer g(size_t(n_layers) * per * sizeof(float), "GPU output-projection Gram matrices");
      for (int l = 0; l < n_layers; ++l) {
        const DevLinear& o = layers[size_t(l)].o;
        PKV_ASSERT(o.parts.empty() && o.in == q_dim && o.out == hidden);
        OutputGramArgs a;
        a.w_dtype = dt, a.w = o.w, a.hidden = hidden, a.n_heads = n_heads, a.head_dim = head_dim;
        a.out = g.as<float>() + size_t(l) * per;
        if (o.quant) {  // one layer's dequantised copy at a time, in linear()'s scratch
          DequantArgs d;
          d.quant = o.quant, d.w = o.w, d.rows = o.out, d.cols = o.in, d.n = o.out, d.out_dtype = dt;
          d.out = blas.weight_workspace(size_t(o.out) * size_t(o.in) * esize());
          dequantize_rows(d, s());
          a.w = d.out;
        }
        cuda::output_gram(blas, a);
      }
      gram = std::move(g);
    }
    return gram.as<float>() + size_t(layer) * per;
  }

  // The observer of the call running now (encode_image, prefill, an observed decode step), or
  // null: the named tensors of Model's CPU forward pass, with the same names and shapes.
  Observer* obs = nullptr;
  bool observes(const char* name) const { return obs && obs->wants(name); }
  // Waits for the stream and shows a float32 device tensor to the observer, when it wants it.
  void show(const char* name, int layer, const float* dev, const std::vector<int64_t>& shape);
  // The final norm of R rows in float32 ("hidden_final"), shown when wanted.
  void show_hidden_final(const float* rows_x, int R);
  // Sets the observer for one call and clears it when the call ends (also by an exception).
  struct Observing {
    Impl& g;
    Observing(Impl& impl, Observer* o) : g(impl) { g.obs = o; }
    ~Observing() { g.obs = nullptr; }
  };

  Impl(const Model& model, const GpuModelOptions& opt);
  ~Impl() {
    try {
      stream.synchronize();  // no queued work may still use the buffers freed next
    } catch (...) {
    }
  }
  void* s() const { return stream.get(); }
  size_t esize() const { return dtype_size(dt); }

  // Uploading.
  const void* upload_matrix(const TensorView& t);
  const void* upload_rows(const std::vector<const TensorView*>& parts, int cols, const std::string& what);
  const void* upload_blocks(const std::vector<const TensorView*>& parts, const std::string& what);
  const float* upload_f32(const std::vector<float>& v, const std::string& what);
  DevLinear linear_of(const Linear& l);
  DevLinear fused_of(const std::vector<const Linear*>& parts, const std::string& what);
  void convert_into(const TensorView& t, size_t first, size_t n, uint16_t* dst) const;

  // Running.
  void linear(const DevLinear& Lw, const void* x16, int rows, void* y, bool accumulate, int64_t x_stride = 0);
  // out[n, hidden] (float32) = the embedding table's rows ids[n] (device ids).
  void embed_rows(const int32_t* ids, int n, float* out);
  void to16(const float* src, void* dst, size_t n) { convert(DType::F32, src, dt, dst, n, s()); }
  void checkpoint(const char* what, int layer, const float* resid, size_t n);
  // The decoder's activation buffers for R rows (grown on demand, shared by prefill and decode).
  struct Rows {
    float* x;
    void* h16;
    float* qkv;
    void* qkv16;
    void* att16;
    float* gate;
    float* up;
  };
  Rows decoder_rows(size_t R, void* stream) {
    const size_t es = esize(), wide = std::max({size_t(hidden), size_t(ffn), size_t(q_dim)});
    return {x.need_as<float>(R * hidden, stream),      h16.need(R * wide * es, stream),
            qkv.need_as<float>(R * qkv_dim, stream),
            qkv16.need(R * qkv_dim * es, stream),       att16.need(R * q_dim * es, stream),
            gate.need_as<float>(R * ffn, stream),   up.need_as<float>(R * ffn, stream)};
  }
  void decoder_qkv(const DecLayer& Ly, int R, const int32_t* pos_dev, const float* xr, void* h16r, float* qkvr,
                   bool rope_here = true);
  void decoder_mlp(const DecLayer& Ly, int R, float* xr, void* h16r, void* att, float* g, float* u);
  void head_logits(const float* rows_x, int R, float* out_host);
  float* head_buffers(int R);  // sizes the head's scratch for R rows; returns the logits buffer
  void head_device(const float* rows_x, int R, float* logits_dev);

  // CUDA graphs of decode steps (GpuModelOptions::cuda_graphs).
  bool use_graphs = true;
  bool capturing = false;
  StreamGraph graph;
  std::vector<int64_t> graph_key;
  StreamTimer step_timer;
  PinnedBuffer pinned;  // the decode steps' logits on their way to the caller
  GpuModel::DecodeTimes times;
};

GpuModel::Impl::Impl(const Model& model, const GpuModelOptions& opt)
    : m(model), cfg(model.config()), dt(opt.dtype), stream(), blas(stream.get()) {
  // PKV_GPU_CHECK's per-layer finiteness checks synchronise: they need the plain launches.
  use_graphs = opt.cuda_graphs && !check_finite && !env_off("PKV_CUDA_GRAPHS");
  const TextConfig& t = cfg.text;
  hidden = t.hidden, n_heads = t.n_heads, n_kv_heads = t.n_kv_heads, head_dim = t.head_dim, ffn = t.intermediate, vocab = t.vocab_size,
  n_layers = t.n_layers;
  q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, qkv_dim = q_dim + 2 * kv_dim;
  eps = t.rms_eps;
  scale = 1.f / std::sqrt(float(head_dim));
  if (head_dim % 8 != 0 || head_dim > 128)
    fail(kWhere, "head_dim " + std::to_string(head_dim) + " is not supported by the decode attention kernel (a multiple of 8, <= 128)");
  if (n_heads % n_kv_heads != 0) fail(kWhere, "n_heads " + std::to_string(n_heads) + " is not a multiple of n_kv_heads " + std::to_string(n_kv_heads));

  const Weights& w = m.weights();
  for (int l = 0; l < n_layers; ++l) {
    const LlamaLayer& src = w.lm.layers[size_t(l)];
    const std::string p = "decoder layer " + std::to_string(l);
    DecLayer d;
    d.attn_norm = upload_f32(src.attn_norm.w, p + " input norm");
    d.mlp_norm = upload_f32(src.mlp_norm.w, p + " post-attention norm");
    d.qkv = fused_of({&src.q, &src.k, &src.v}, p + " q/k/v projections");
    d.o = linear_of(src.o);
    d.gate = linear_of(src.gate);
    d.up = linear_of(src.up);
    d.down = linear_of(src.down);
    layers.push_back(d);
  }
  embed = upload_matrix(*w.lm.embed);
  embed_quant = w.lm.embed->quant;
  head = linear_of(w.lm.head);  // the embedding's buffer when tied (uploaded once)
  final_norm = upload_f32(w.lm.norm.w, "final norm");
  const ops::Rope rope = ops::Rope::make(head_dim, t.rope_theta, t.rope_type, t.rope_factor, t.rope_low_freq_factor,
                                         t.rope_high_freq_factor, t.rope_original_max_positions);
  inv_freq = upload_f32(rope.inv_freq, "RoPE inverse frequencies");

  vision = opt.vision && cfg.has_vision;
  if (vision) {
    const VisionConfig& v = cfg.vision;
    vis_hidden = v.hidden, vis_heads = v.n_heads, vis_ffn = v.intermediate, vis_grid = v.grid(), vis_patch = v.patch, vis_image_size = v.image_size;
    vis_tokens = v.n_patches() + 1;
    v_eps = v.eps;
    if (vis_heads < 1 || vis_hidden % vis_heads != 0) fail(kWhere, "vision hidden " + std::to_string(vis_hidden) + " is not a multiple of its heads");
    vis_head_dim = vis_hidden / vis_heads;
    if (vis_head_dim > 128) fail(kWhere, "vision head_dim " + std::to_string(vis_head_dim) + " exceeds 128 (prefill attention kernel)");
    const ClipWeights& cw = w.vision;
    patch_w = upload_matrix(*cw.patch.w);
    class_emb = upload_f32(cw.class_emb, "vision class embedding");
    pos_emb = upload_f32(cw.pos_emb, "vision position embeddings");
    pre_w = upload_f32(cw.pre_norm.w, "vision pre-layernorm weight");
    pre_b = upload_f32(cw.pre_norm.b, "vision pre-layernorm bias");
    for (size_t l = 0; l < cw.layers.size(); ++l) {
      const ClipLayer& src = cw.layers[l];
      const std::string p = "vision layer " + std::to_string(l);
      VisLayer d;
      d.ln1_w = upload_f32(src.ln1.w, p + " layer_norm1 weight");
      d.ln1_b = upload_f32(src.ln1.b, p + " layer_norm1 bias");
      d.ln2_w = upload_f32(src.ln2.w, p + " layer_norm2 weight");
      d.ln2_b = upload_f32(src.ln2.b, p + " layer_norm2 bias");
      d.qkv = fused_of({&src.q, &src.k, &src.v}, p + " q/k/v projections");
      d.o = linear_of(src.o);
      d.fc1 = linear_of(src.fc1);
      d.fc2 = linear_of(src.fc2);
      vlayers.push_back(d);
    }
    for (const Linear& pl : w.projector.layers) projector.push_back(linear_of(pl));
  }
  // Products of many rows with quantised weights dequantise one matrix at a time into this scratch:
  // sized now for the largest, so that nothing grows later (nor inside a captured CUDA graph).
  if (widest_quant) blas.weight_workspace(widest_quant * esize());
  // The skinny products' partial sums (decode steps of 5-64 rows), sized for the widest split now
  // for the same reason.
  if (skinny_enabled()) {
    const int R = kSkinnyMaxRows;
    const size_t skinny_bytes = std::max({skinny_workspace_bytes(R, hidden, qkv_dim, false),
                                          skinny_workspace_bytes(R, q_dim, hidden, false),
                                          skinny_workspace_bytes(R, hidden, ffn, true),
                                          skinny_workspace_bytes(R, ffn, hidden, false),
                                          skinny_workspace_bytes(R, hidden, vocab, false)});
    blas.skinny_workspace(skinny_bytes);
  }
  // The weights went up through cudaMemcpy on the legacy default stream, which our non-blocking
  // stream does not wait for: finish them before any call enqueues work.
  device_synchronize();
}

void GpuModel::Impl::convert_into(const TensorView& t, size_t first, size_t n, uint16_t* dst) const {
  PKV_ASSERT_MSG(!t.quant, "quantised tensors are uploaded as blocks (upload_blocks)");
  const uint8_t* src = static_cast<const uint8_t*>(t.data) + first * dtype_size(t.dtype);
  if (t.dtype == dt) {
    std::memcpy(dst, src, n * 2);
    return;
  }
  float worst = 0.f;
  for (size_t i = 0; i < n; ++i) {
    float f;
    if (t.dtype == DType::F32) std::memcpy(&f, src + 4 * i, 4);
    else {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      f = t.dtype == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
    if (dt == DType::F16) {
      if (std::isfinite(f) && std::fabs(f) > 65504.f) worst = std::max(worst, std::fabs(f));
      dst[i] = f32_to_f16(f);
    } else {
      dst[i] = f32_to_bf16(f);
    }
  }
  if (worst > 0.f)
    fail(kWhere, "tensor '" + t.name + "' holds values beyond the F16 range (|x| up to " + std::to_string(worst) +
                     " > 65504): use the BF16 compute dtype");
}

const void* GpuModel::Impl::upload_matrix(const TensorView& t) {
  auto it = uploaded.find(&t);
  if (it != uploaded.end()) return it->second;
  const void* p = t.quant ? upload_blocks({&t}, "tensor '" + t.name + "'") : upload_rows({&t}, 0, "tensor '" + t.name + "'");
  uploaded[&t] = p;
  return p;
}

// Uploads the tensors one after another (each converted to the compute dtype) into one buffer.
const void* GpuModel::Impl::upload_rows(const std::vector<const TensorView*>& parts, int, const std::string& what) {
  size_t total = 0;
  for (const TensorView* t : parts) {
    if (!t || !t->data || !t->supported) fail(kWhere, "cannot upload " + what + ": missing or unsupported tensor");
    total += size_t(t->numel());
  }
  DeviceBuffer buf(total * esize(), what + " (" + dtype_name(dt) + ", " + mib(total * esize()) + ")");
  constexpr size_t kChunk = size_t(1) << 22;
  std::vector<uint16_t> staging(std::min(total, kChunk));
  size_t at = 0;
  for (const TensorView* t : parts) {
    const size_t n = size_t(t->numel());
    for (size_t i = 0; i < n; i += kChunk) {
      const size_t c = std::min(kChunk, n - i);
      convert_into(*t, i, c, staging.data());
      buf.upload(staging.data(), c * 2, (at + i) * 2);
    }
    at += n;
  }
  weight_bytes += buf.bytes();
  store.push_back(std::move(buf));
  return store.back().data();
}

// Uploads quantised tensors of one ggml type as they are stored (their rows one after another: a
// fused matrix of their rows), checked first by the kernels' rules.
const void* GpuModel::Impl::upload_blocks(const std::vector<const TensorView*>& parts, const std::string& what) {
  size_t total = 0, elems = 0;
  for (const TensorView* t : parts) {
    PKV_ASSERT(t && t->quant == parts[0]->quant && t->shape.size() == 2 && t->shape[1] == parts[0]->shape[1]);
    const std::string why = quant_misfit(t->quant, int(t->shape[1]));
    if (!why.empty())
      fail(t->file, "tensor " + t->name + " (" + t->dtype_str + ", " + t->shape_str() + ") cannot go to the GPU: " + why);
    total += quant::row_bytes(t->quant, t->shape[1]) * size_t(t->shape[0]);
    elems += size_t(t->numel());
  }
  DeviceBuffer buf(total, what + " (" + parts[0]->dtype_str + " blocks, " + mib(total) + ")");
  size_t at = 0;
  for (const TensorView* t : parts) {
    const size_t n = quant::row_bytes(t->quant, t->shape[1]) * size_t(t->shape[0]);
    buf.upload(t->data, n, at);
    at += n;
  }
  weight_bytes += buf.bytes();
  quant_bytes += buf.bytes();
  quant_types.insert(parts[0]->dtype_str);
  widest_quant = std::max(widest_quant, elems);
  store.push_back(std::move(buf));
  return store.back().data();
}

const float* GpuModel::Impl::upload_f32(const std::vector<float>& v, const std::string& what) {
  if (v.empty()) return nullptr;
  DeviceBuffer buf(v.size() * sizeof(float), what + " (float32)");
  buf.upload(v.data(), v.size() * sizeof(float));
  weight_bytes += buf.bytes();
  store.push_back(std::move(buf));
  return store.back().as<float>();
}

DevLinear GpuModel::Impl::linear_of(const Linear& l) {
  DevLinear d;
  if (!l.w) fail(kWhere, "a linear layer has no weight");
  if (l.w->shape != std::vector<int64_t>{l.out, l.in})
    fail(kWhere, "tensor '" + l.w->name + "' has shape " + l.w->shape_str() + ", expected [" + std::to_string(l.out) + ", " +
                     std::to_string(l.in) + "]");
  d.w = upload_matrix(*l.w);
  d.quant = l.w->quant;
  d.b = l.b.empty() ? nullptr : upload_f32(l.b, "bias of '" + l.w->name + "'");
  d.in = l.in, d.out = l.out;
  return d;
}

DevLinear GpuModel::Impl::fused_of(const std::vector<const Linear*>& parts, const std::string& what) {
  DevLinear d;
  std::vector<const TensorView*> ts;
  std::vector<float> bias;
  bool any_bias = false;
  for (const Linear* l : parts) any_bias = any_bias || !l->b.empty();
  for (const Linear* l : parts) {
    if (!l->w) fail(kWhere, what + ": a projection has no weight");
    if (l->in != parts[0]->in) fail(kWhere, what + ": projections of different input sizes");
    if (l->w->shape != std::vector<int64_t>{l->out, l->in})
      fail(kWhere, "tensor '" + l->w->name + "' has shape " + l->w->shape_str() + ", expected [" +
                       std::to_string(l->out) + ", " + std::to_string(l->in) + "]");
    ts.push_back(l->w);
    if (any_bias) {
      if (l->b.empty()) bias.insert(bias.end(), size_t(l->out), 0.f);
      else bias.insert(bias.end(), l->b.begin(), l->b.end());
    }
    d.out += l->out;
  }
  d.in = parts[0]->in;
  d.b = any_bias ? upload_f32(bias, what + " biases") : nullptr;
  bool same = true;  // one storage for all parts: one fused matrix
  for (const TensorView* t : ts) same = same && t->quant == ts[0]->quant;
  if (!same) {
    for (const Linear* l : parts) {
      DevLinear part;
      part.w = upload_matrix(*l->w);
      part.quant = l->w->quant;
      part.in = l->in, part.out = l->out;
      d.parts.push_back(part);
    }
    return d;
  }
  std::string names;
  for (const TensorView* t : ts) names += (names.empty() ? "" : ", ") + ("'" + t->name + "'");
  d.quant = ts[0]->quant;
  d.w = d.quant ? upload_blocks(ts, what + " (tensors " + names + ")") : upload_rows(ts, d.in, what + " (tensors " + names + ")");
  return d;
}

void GpuModel::Impl::linear(const DevLinear& Lw, const void* x16, int rows, void* y, bool accumulate, int64_t x_stride) {
  if (!Lw.parts.empty()) {  // float32 y: each part's columns, then the fused bias
    int at = 0;
    for (const DevLinear& part : Lw.parts) {
      LinearArgs a;
      a.x = x16, a.x_stride = x_stride, a.w = part.w, a.w_quant = part.quant, a.w_dtype = dt;
      a.rows = rows, a.in = part.in, a.out = part.out;
      a.y = static_cast<float*>(y) + at, a.y_stride = Lw.out, a.y_dtype = DType::F32, a.accumulate = accumulate;
      cuda::linear(blas, a);
      at += part.out;
    }
    if (Lw.b) add_bias(DType::F32, y, Lw.b, rows, Lw.out, s());
    return;
  }
  LinearArgs a;
  a.x = x16;
  a.x_stride = x_stride;
  a.w = Lw.w;
  a.w_quant = Lw.quant;
  a.w_dtype = dt;
  a.rows = rows;
  a.in = Lw.in;
  a.out = Lw.out;
  a.bias = Lw.b;
  a.y = y;
  a.y_dtype = DType::F32;
  a.accumulate = accumulate;
  cuda::linear(blas, a);
}

void GpuModel::Impl::embed_rows(const int32_t* ids, int n, float* out) {
  if (!embed_quant) return embedding(dt, embed, vocab, hidden, ids, n, DType::F32, out, s());
  DequantArgs a;
  a.quant = embed_quant, a.w = embed, a.rows = vocab, a.cols = hidden, a.ids = ids, a.n = n;
  a.out_dtype = DType::F32, a.out = out;
  dequantize_rows(a, s());
}

// PKV_CUDA_SYNC=1: synchronise after every stage so a fault names the stage and layer;
// PKV_GPU_CHECK=1: also check that the residual stream is finite (F16 overflow shows up here).
void GpuModel::Impl::checkpoint(const char* what, int layer, const float* resid, size_t n) {
  if ((!sync_debug && !check_finite) || capturing) return;  // a stream being captured cannot synchronise
  const std::string at = std::string(what) + (layer >= 0 ? " of layer " + std::to_string(layer) : "");
  try {
    stream.synchronize();
  } catch (const Error& e) {
    fail(kWhere, "after " + at + ": " + e.what());
  }
  if (check_finite && resid && n) {
    std::vector<float> h(n);
    copy_to_host(h.data(), resid, n * sizeof(float), s());
    stream.synchronize();
    for (size_t i = 0; i < n; ++i)
      if (!std::isfinite(h[i]))
        fail(kWhere, "after " + at + ": the residual stream holds a non-finite value at element " + std::to_string(i) +
                         " (" + std::to_string(h[i]) + ")" + (dt == DType::F16 ? "; F16 overflow? try BF16" : ""));
  }
}

// Attention input: rms_norm, fused q/k/v product (float32), RoPE on q and k (float32).
void GpuModel::Impl::decoder_qkv(const DecLayer& Ly, int R, const int32_t* pos_dev, const float* xr, void* h16r,
                                 float* qkvr, bool rope_here) {
  rms_norm_to(DType::F32, xr, dt, h16r, Ly.attn_norm, R, hidden, eps, s());
  linear(Ly.qkv, h16r, R, qkvr, false);
  // q and k heads are adjacent in a row: one launch (decode steps rotate in paged_kv_rope_write)
  if (rope_here) rope(DType::F32, qkvr, R, n_heads + n_kv_heads, head_dim, qkv_dim, pos_dev, inv_freq, s());
}

// Attention output projection into the residual, then the SwiGLU MLP into the residual.
void GpuModel::Impl::decoder_mlp(const DecLayer& Ly, int R, float* xr, void* h16r, void* att, float* g,
                                 float* u) {
  linear(Ly.o, att, R, xr, true);
  rms_norm_to(DType::F32, xr, dt, h16r, Ly.mlp_norm, R, hidden, eps, s());
  // A few rows (decoding): gate, up and SwiGLU in one pass over both weights, straight to 16 bits.
  GemvArgs gu;
  gu.x = h16r, gu.w = Ly.gate.w, gu.w_up = Ly.up.w, gu.w_quant = Ly.gate.quant, gu.w_dtype = dt;
  gu.rows = R, gu.in = hidden, gu.out = ffn;
  gu.y = g, gu.y_dtype = dt;  // 16-bit rows in the float32 gate buffer (room for twice as many)
  if (R <= gemv_auto_rows(Ly.gate.quant) && gemv_enabled() && !Ly.gate.b && !Ly.up.b && Ly.gate.quant == Ly.up.quant &&
      gemv_fits(gu)) {
    gemv(gu, s());
    linear(Ly.down, g, R, xr, true);
    return;
  }
  // Up to 64 rows of dense weights (a batch's decode step): the same pass on tensor cores.
  if (R > gemv_auto_rows(Ly.gate.quant) && R <= kSkinnyMaxRows && !Ly.gate.quant && !Ly.up.quant && !Ly.gate.b &&
      !Ly.up.b && skinny_enabled() && skinny_fits(gu)) {
    skinny(gu, blas);
    linear(Ly.down, g, R, xr, true);
    return;
  }
  linear(Ly.gate, h16r, R, g, false);
  linear(Ly.up, h16r, R, u, false);
  swiglu(DType::F32, g, u, size_t(R) * ffn, s());
  to16(g, h16r, size_t(R) * ffn);
  linear(Ly.down, h16r, R, xr, true);
}

// Final norm and LM head for R rows of the residual; logits to the host (synchronises).
void GpuModel::Impl::show(const char* name, int layer, const float* dev, const std::vector<int64_t>& shape) {
  if (!observes(name)) return;
  PKV_ASSERT_MSG(!capturing, "an observer cannot watch a step being captured as a CUDA graph");
  size_t n = 1;
  for (int64_t d : shape) n *= size_t(d);
  std::vector<float> h(n);
  copy_to_host(h.data(), dev, n * sizeof(float), s());
  stream.synchronize();
  obs->on_tensor(name, layer, h.data(), shape);
}

void GpuModel::Impl::show_hidden_final(const float* rows_x, int R) {
  if (!observes("hidden_final")) return;
  float* y = shown.need_as<float>(size_t(R) * hidden, s());
  rms_norm_to(DType::F32, rows_x, DType::F32, y, final_norm, R, hidden, eps, s());
  show("hidden_final", -1, y, {R, hidden});
}

void GpuModel::Impl::head_logits(const float* rows_x, int R, float* out_host) {
  float* lg = head_buffers(R);
  head_device(rows_x, R, lg);
  copy_to_host(out_host, lg, size_t(R) * vocab * sizeof(float), s());
}

float* GpuModel::Impl::head_buffers(int R) {
  h16.need(size_t(R) * hidden * esize(), s());
  return logits.need_as<float>(size_t(R) * vocab, s());
}

void GpuModel::Impl::head_device(const float* rows_x, int R, float* lg) {
  void* h16r = h16.need(size_t(R) * hidden * esize(), s());
  rms_norm_to(DType::F32, rows_x, dt, h16r, final_norm, R, hidden, eps, s());
  linear(head, h16r, R, lg, false);
}

// ------------------------------------------------------------------------------------------------
GpuModel::GpuModel(const Model& model, const GpuModelOptions& opt) {
  if (opt.dtype != DType::BF16 && opt.dtype != DType::F16)
    fail(kWhere, std::string("the compute dtype must be BF16 or F16, got ") + dtype_name(opt.dtype));
  const int n = device_count();
  if (n == 0) fail(kWhere, "no CUDA device is available");
  if (opt.device < 0 || opt.device >= n)
    fail(kWhere, "device " + std::to_string(opt.device) + " does not exist (" + std::to_string(n) + " devices)");
  set_device(opt.device);
  impl_ = std::make_unique<Impl>(model, opt);
}

GpuModel::~GpuModel() = default;

const Model& GpuModel::cpu() const { return impl_->m; }
const ModelConfig& GpuModel::config() const { return impl_->cfg; }
DType GpuModel::dtype() const { return impl_->dt; }
bool GpuModel::has_vision() const { return impl_->vision; }
size_t GpuModel::weight_bytes() const { return impl_->weight_bytes; }
size_t GpuModel::quantised_bytes() const { return impl_->quant_bytes; }
std::string GpuModel::weights_summary() const {
  const Impl& g = *impl_;
  if (!g.quant_bytes) return "";
  const std::string s = "weights " + mib(g.weight_bytes);
  std::string types;
  for (const std::string& t : g.quant_types) types += (types.empty() ? "" : "/") + t;
  return s + " (" + mib(g.quant_bytes) + " as " + types + " blocks; dequantisation scratch " +
         mib(g.widest_quant * g.esize()) + ")";
}
void* GpuModel::stream() const { return impl_->s(); }
bool GpuModel::uses_graphs() const { return impl_->use_graphs; }
GpuModel::DecodeTimes GpuModel::decode_times() const { return impl_->times; }
void GpuModel::reset_decode_times() { impl_->times = {}; }
int GpuModel::graph_captures() const { return impl_->graph.captures(); }

// ------------------------------------------------------------------------------------------------
GpuImageRows GpuModel::encode_image_on_device(const float* pixels, Observer* obs) {
  Impl& g = *impl_;
  Impl::Observing watching(g, obs);
  if (!g.vision)
    fail(kWhere, g.cfg.has_vision ? "the vision tower was not uploaded (GpuModelOptions::vision = false)"
                                  : "the model " + g.cfg.dir + " has no vision tower");
  if (!pixels) fail(kWhere, "encode_image: no pixels");
  void* s = g.s();
  const int patch_size = g.vis_patch, grid = g.vis_grid, hidden = g.vis_hidden, tokens = g.vis_tokens,
            n_heads = g.vis_heads, head_dim = g.vis_head_dim, ffn = g.vis_ffn;
  const int patch_len = 3 * patch_size * patch_size, qkv_width = 3 * hidden;
  const size_t es = g.esize();

  if (g.observes("pixel_values")) {
    const int S = g.cfg.vision.image_size;
    obs->on_tensor("pixel_values", -1, pixels, {3, S, S});
  }
  // The patches as rows on the host (clip::unfold_patches, as the CPU does).
  const std::vector<float> cols = clip::unfold_patches(g.cfg.vision, pixels);

  // Scratch, all sized before anything is enqueued.
  const size_t wide = std::max({size_t(patch_len), size_t(qkv_width), size_t(ffn), size_t(hidden)});
  float* x = g.x.need_as<float>(size_t(tokens) * hidden, s);
  float* hf = g.hf.need_as<float>(size_t(tokens) * std::max(hidden, patch_len), s);
  void* h16 = g.h16.need(size_t(tokens) * wide * es, s);
  float* qkv = g.qkv.need_as<float>(size_t(tokens) * qkv_width, s);
  void* qkv16 = g.qkv16.need(size_t(tokens) * qkv_width * es, s);
  void* att16 = g.att16.need(size_t(tokens) * hidden * es, s);
  float* mlp = g.gate.need_as<float>(size_t(tokens) * ffn, s);

  // Patch embedding, class token, position embeddings, pre-layernorm.
  copy_to_device(hf, cols.data(), cols.size() * sizeof(float), s);
  g.to16(hf, h16, cols.size());
  DevLinear patch{g.patch_w, 0, nullptr, patch_len, hidden, {}};
  g.linear(patch, h16, grid * grid, x + hidden, false);
  copy_on_device(x, g.class_emb, size_t(hidden) * sizeof(float), s);
  add(DType::F32, x, g.pos_emb, x, size_t(tokens) * hidden, s);
  layer_norm(DType::F32, x, x, g.pre_w, g.pre_b, tokens, hidden, g.v_eps, s);
  g.checkpoint("vision embeddings", -1, x, size_t(tokens) * hidden);

  const VisionConfig& v = g.cfg.vision;
  const ops::Act act = ops::act_from_name(v.act.c_str());
  // The features: the selected hidden states side by side ([rows, k x hidden], the CLS row dropped
  // for "default", as clip::join_features does on the host), written on the device straight into
  // the projector's input as each selected layer is computed.
  const std::vector<int> wanted = clip::feature_hidden_states(g.cfg);
  const int skip = g.cfg.feature_strategy == "default" ? 1 : 0;
  const int T = tokens - skip, F = hidden * int(wanted.size());
  if (g.projector.empty()) fail(kWhere, "the model has no projector");
  size_t widest = size_t(F);
  for (const DevLinear& pl : g.projector) widest = std::max(widest, size_t(pl.out));
  float* cur = g.io.need_as<float>(size_t(T) * widest * 2, s);
  float* nxt = cur + size_t(T) * widest;
  std::vector<bool> got(wanted.size(), false);
  auto keep_if_selected = [&](int idx) {
    for (size_t k = 0; k < wanted.size(); ++k)
      if (wanted[k] == idx) {
        copy_2d_on_device(cur + k * size_t(hidden), size_t(F) * sizeof(float), x + size_t(skip) * hidden,
                          size_t(hidden) * sizeof(float), size_t(hidden) * sizeof(float), size_t(T), s);
        got[k] = true;
      }
  };
  keep_if_selected(0);
  for (size_t li = 0; li < g.vlayers.size(); ++li) {
    const VisLayer& Ly = g.vlayers[li];
    layer_norm(DType::F32, x, hf, Ly.ln1_w, Ly.ln1_b, tokens, hidden, g.v_eps, s);
    g.to16(hf, h16, size_t(tokens) * hidden);
    g.linear(Ly.qkv, h16, tokens, qkv, false);
    g.to16(qkv, qkv16, size_t(tokens) * qkv_width);
    PrefillAttentionArgs a;
    a.dtype = g.dt;
    a.q = qkv16;
    a.n_q = tokens;
    a.q_stride = qkv_width;
    a.k = static_cast<const char*>(qkv16) + size_t(hidden) * es;
    a.v = static_cast<const char*>(qkv16) + size_t(2 * hidden) * es;
    a.n_kv = tokens;
    a.kv_stride = qkv_width;
    a.n_heads = a.n_kv_heads = n_heads;
    a.head_dim = head_dim;
    a.scale = 1.f / std::sqrt(float(head_dim));
    a.out = att16;
    attention_prefill(a, s);
    g.linear(Ly.o, att16, tokens, x, true);
    layer_norm(DType::F32, x, hf, Ly.ln2_w, Ly.ln2_b, tokens, hidden, g.v_eps, s);
    g.to16(hf, h16, size_t(tokens) * hidden);
    g.linear(Ly.fc1, h16, tokens, mlp, false);
    activate(DType::F32, mlp, size_t(tokens) * ffn, act, s);
    g.to16(mlp, h16, size_t(tokens) * ffn);
    g.linear(Ly.fc2, h16, tokens, x, true);
    g.checkpoint("vision layer", int(li), x, size_t(tokens) * hidden);
    g.show("vision_layer_out", int(li), x, {tokens, hidden});
    keep_if_selected(int(li) + 1);
  }
  for (size_t k = 0; k < got.size(); ++k)
    if (!got[k]) fail(kWhere, "vision feature layer " + std::to_string(g.cfg.feature_layers[k]) + " was not computed");
  g.show("vision_features", -1, cur, {T, F});

  // The projector, on the joined features where they are.
  const ops::Act pact = ops::act_from_name(g.cfg.projector_act.c_str());
  void* in16 = g.h16.need(size_t(T) * widest * es, s);
  int width = F;
  for (size_t i = 0; i < g.projector.size(); ++i) {
    const DevLinear& pl = g.projector[i];
    if (pl.in != width) fail(kWhere, "projector layer " + std::to_string(i) + " expects " + std::to_string(pl.in) + " inputs, got " + std::to_string(width));
    g.to16(cur, in16, size_t(T) * width);
    g.linear(pl, in16, T, nxt, false);
    if (i + 1 < g.projector.size()) activate(DType::F32, nxt, size_t(T) * pl.out, pact, s);
    std::swap(cur, nxt);
    width = pl.out;
  }
  if (width != g.hidden) fail(kWhere, "the projector outputs " + std::to_string(width) + " features, the decoder takes " + std::to_string(g.hidden));
  g.show("projector_output", -1, cur, {T, width});
  // Into memory of its own: the scratch it is in serves the next call.
  GpuImageRows out;
  out.rows = T;
  out.width = width;
  out.owner = this;
  out.data = DeviceBuffer(size_t(T) * width * sizeof(float), "the image's embeddings");
  copy_on_device(out.data.data(), cur, size_t(T) * width * sizeof(float), s);
  return out;
}

std::vector<float> GpuModel::encode_image(const float* pixels, Observer* obs) {
  const GpuImageRows rows = encode_image_on_device(pixels, obs);
  std::vector<float> out(size_t(rows.rows) * rows.width);
  copy_to_host(out.data(), rows.data.data(), out.size() * sizeof(float), impl_->s());
  stream_synchronize(impl_->s());
  return out;
}

// ------------------------------------------------------------------------------------------------
void GpuModel::prefill(GpuKVPool& kv, BlockPool::SeqId seq, const float* x_host, int T, const int32_t* pos,
                       float* logits_host, std::vector<std::vector<float>>* importance, int importance_from,
                       Observer* obs, bool importance_per_kv_head, ValueWeight importance_weight, bool importance_max) {
  if (!x_host) fail(kWhere, "prefill: no input embeddings");
  GpuPrefillPart part;
  part.seq = seq, part.n = T, part.pos = pos, part.x = x_host, part.logits = logits_host;
  want_importance(part, T, importance, importance_from, importance_per_kv_head, importance_weight, importance_max);
  prefill_parts(kv, {part}, obs);
}

void GpuModel::want_importance(GpuPrefillPart& part, int T, std::vector<std::vector<float>>* importance, int from,
                               bool per_kv_head, ValueWeight weight, bool max) const {
  if (!importance) return;
  const size_t heads = per_kv_head ? size_t(impl_->n_kv_heads) : 1;
  importance->assign(size_t(impl_->n_layers), std::vector<float>(heads * size_t(std::max(T, 0)), 0.f));
  part.importance = importance, part.importance_from = from;
  part.importance_head_stride = per_kv_head ? T : 0;
  part.importance_weight = weight, part.importance_max = max;
}

void GpuModel::prefill(GpuKVPool& kv, BlockPool::SeqId seq, const int32_t* ids, const GpuImageRows* image,
                       int image_offset, int T, const int32_t* pos, float* logits_host,
                       std::vector<std::vector<float>>* importance, int importance_from, Observer* obs,
                       bool importance_per_kv_head, ValueWeight importance_weight, bool importance_max) {
  if (!ids) fail(kWhere, "prefill: no token ids");
  if (image && (image_offset < 0 || image_offset + image->rows > T))
    fail(kWhere, "prefill: the image's " + std::to_string(image->rows) + " rows at " + std::to_string(image_offset) +
                     " do not fit a " + std::to_string(T) + "-token prompt");
  GpuPrefillPart part;
  part.seq = seq, part.n = T, part.pos = pos, part.ids = ids, part.image = image, part.image_row0 = image_offset;
  part.logits = logits_host;
  want_importance(part, T, importance, importance_from, importance_per_kv_head, importance_weight, importance_max);
  prefill_parts(kv, {part}, obs);
}

void GpuModel::prefill_parts(GpuKVPool& kv, const std::vector<GpuPrefillPart>& parts, Observer* obs) {
  Impl& g = *impl_;
  Impl::Observing watching(g, obs);
  void* s = g.s();
  const int P = int(parts.size());
  if (kv.stream() != s) fail(kWhere, "prefill: the KV pool belongs to another GpuModel");
  if (P == 0) return;
  if (obs && P > 1) fail(kWhere, "prefill: an observer watches a prefill of one sequence only");
  BlockPool& bp = kv.blocks();
  const std::string seq0 = std::to_string(parts[0].seq);

  // Checks, all before anything changes. R: the rows of the whole call; row0[p]: part p's first.
  int R = 0, max_kv = 0;
  std::vector<int> row0(static_cast<size_t>(P));
  std::set<BlockPool::SeqId> seen;
  bool any_ids = false;
  for (int p = 0; p < P; ++p) {
    const GpuPrefillPart& a = parts[size_t(p)];
    const std::string who = "prefill of sequence " + std::to_string(a.seq);
    if (!seen.insert(a.seq).second) fail(kWhere, who + ": the sequence appears twice in one call");
    if (a.n < 1) fail(kWhere, who + ": the prompt is empty");
    if (a.past < 0) fail(kWhere, who + ": negative past");
    if (!a.pos) fail(kWhere, who + ": no positions");
    if ((a.x == nullptr) == (a.ids == nullptr)) fail(kWhere, who + ": give either embeddings or token ids");
    for (int i = 0; i < a.n; ++i)
      if (a.pos[i] < 0 || (i > 0 && a.pos[i] <= a.pos[i - 1]))
        fail(kWhere, who + ": positions must be non-negative and strictly increasing (position " + std::to_string(i) +
                         " is " + std::to_string(a.pos[i]) + ")");
    for (int l = 0; l < g.n_layers; ++l) {
      if (bp.per_head(a.seq, l))
        fail(kWhere, who + ": layer " + std::to_string(l) +
                         " keeps its entries per KV head (a compressed cache): a prefill continues only a prompt "
                         "whose earlier pieces are uncompressed");
      if (bp.entries(a.seq, l) != a.past)
        fail(kWhere, who + ": the sequence holds " + std::to_string(bp.entries(a.seq, l)) + " entries in layer " +
                         std::to_string(l) + ", the call says " + std::to_string(a.past) +
                         (a.past ? " (earlier pieces of its prompt)" : " (prefill starts an empty sequence)"));
      // Earlier pieces are read back by entry index: they must never have been compacted.
      if (a.past && !bp.slot_map(a.seq, l).empty()) fail(kWhere, who + ": its entries were compacted since its last piece");
    }
    if (a.ids) {
      any_ids = true;
      const int n_img = a.image ? a.image->rows : 0;
      if (a.image) {
        if (a.image->owner != this) fail(kWhere, who + ": the image was encoded by another GpuModel");
        if (a.image->width != g.hidden)
          fail(kWhere, who + ": the image's rows are " + std::to_string(a.image->width) + " wide, the decoder's " +
                           std::to_string(g.hidden));
      }
      for (int i = 0; i < a.n; ++i) {
        const bool img = i >= a.image_row0 && i < a.image_row0 + n_img;
        if (!img && (a.ids[i] < 0 || a.ids[i] >= g.vocab))
          fail("prompt", "token id " + std::to_string(a.ids[i]) + " at position " + std::to_string(a.past + i) +
                             " is outside the vocabulary of " + std::to_string(g.vocab));
      }
    }
    if (a.importance) {
      if (int(a.importance->size()) != g.n_layers) fail(kWhere, who + ": importance needs one row per layer");
      const int64_t heads_before = a.importance_head_stride > 0 ? int64_t(g.n_kv_heads - 1) * a.importance_head_stride : 0;
      if (a.importance_head_stride < 0 || (a.importance_head_stride > 0 && a.importance_head_stride < a.past + a.n))
        fail(kWhere, who + ": importance_head_stride is smaller than past + n");
      for (const auto& row : *a.importance)
        if (int64_t(row.size()) < heads_before + a.past + a.n)
          fail(kWhere, who + ": an importance row is shorter than past + n (per KV head)");
      if (a.importance_from < 0 || a.importance_from >= a.n) fail(kWhere, who + ": importance_from outside the part");
      if (a.importance_weight == ValueWeight::OutputNorm) refuse_gpu_wov();
      if ((a.importance_weight != ValueWeight::None || a.importance_max) && a.importance_head_stride > 0)
        fail(kWhere, who + ": value weights and the maximum over queries are measured over all heads, not per KV head");
    }
    row0[size_t(p)] = R;
    R += a.n;
    max_kv = std::max(max_kv, a.past + a.n);
  }
  int need = 0, needing = 0;
  std::string needs;
  for (const GpuPrefillPart& a : parts) {
    const int n = bp.blocks_needed(a.seq, std::vector<int>(size_t(g.n_layers), a.past + a.n));
    need += n;
    if (n && ++needing <= 4)
      needs += (needs.empty() ? "" : ", ") + ("sequence " + std::to_string(a.seq) + ": " + std::to_string(n));
  }
  if (needing > 4) needs += ", and " + std::to_string(needing - 4) + " more sequences";
  if (need > bp.free_blocks())
    fail("GPU KV pool", "out of KV blocks: the prefill of " +
                            (P == 1 ? "sequence " + seq0 + " (" + std::to_string(parts[0].n) + " tokens x " +
                                          std::to_string(g.n_layers) + " layers)"
                                    : std::to_string(P) + " sequences (" + std::to_string(R) + " tokens)") +
                            " needs " + std::to_string(need) + " blocks of " + std::to_string(bp.block_size()) +
                            " entries (" + needs + "), only " + std::to_string(bp.free_blocks()) + " of " +
                            std::to_string(bp.n_blocks()) + " are free");
  for (const GpuPrefillPart& a : parts) bp.resize_all(a.seq, std::vector<int>(size_t(g.n_layers), a.past + a.n));

  // Metadata: the rows' positions; per layer each part's table ([L][P][stride]); the rows to write
  // (row r: table of its part, entry past + i); for the pieces with earlier entries, the entries
  // [0, past + n) to read back (table 0 of a one-table view, entries 0.. in order).
  const int stride = std::max(1, bp.blocks_for(max_kv));
  IntPack pk;
  std::vector<int32_t> pos_all, row_table, row_entry;
  for (int p = 0; p < P; ++p) {
    const GpuPrefillPart& a = parts[size_t(p)];
    pos_all.insert(pos_all.end(), a.pos, a.pos + a.n);
    for (int i = 0; i < a.n; ++i) row_table.push_back(p), row_entry.push_back(a.past + i);
  }
  const size_t o_pos = pk.add(pos_all);
  const size_t o_tab = pk.reserve(size_t(g.n_layers) * P * stride, -1);
  for (int l = 0; l < g.n_layers; ++l)
    for (int p = 0; p < P; ++p) {
      const std::vector<int32_t>& t = bp.table(parts[size_t(p)].seq, l);
      PKV_ASSERT(int(t.size()) <= stride);
      std::copy(t.begin(), t.end(), pk.data.begin() + long(o_tab + (size_t(l) * P + p) * stride));
    }
  const size_t o_rt = pk.add(row_table);
  const size_t o_re = pk.add(row_entry);
  bool any_past = false;
  for (const GpuPrefillPart& a : parts) any_past = any_past || a.past > 0;
  std::vector<int32_t> gather_entry(static_cast<size_t>(max_kv));
  std::iota(gather_entry.begin(), gather_entry.end(), 0);
  const size_t o_gt = any_past ? pk.add(std::vector<int32_t>(size_t(max_kv), 0)) : 0;
  const size_t o_ge = any_past ? pk.add(gather_entry) : 0;
  std::vector<int32_t> ids_all;
  if (any_ids) {
    ids_all.assign(size_t(R), 0);  // rows that are not the table's get row 0 and are overwritten
    for (int p = 0; p < P; ++p) {
      const GpuPrefillPart& a = parts[size_t(p)];
      if (!a.ids) continue;
      const int n_img = a.image ? a.image->rows : 0;
      for (int i = 0; i < a.n; ++i)
        if (!(i >= a.image_row0 && i < a.image_row0 + n_img)) ids_all[size_t(row0[size_t(p)] + i)] = a.ids[i];
    }
  }
  const size_t o_ids = any_ids ? pk.add(ids_all) : 0;

  // Scratch. The importance of part p: [L, past + n] at imp_at[p]; the attention workspace and the
  // read-back K/V are used by one part after another (stream order).
  std::vector<size_t> imp_at(static_cast<size_t>(P), 0);
  size_t imp_floats = 0, ws_bytes = 0;
  for (int p = 0; p < P; ++p) {
    const GpuPrefillPart& a = parts[size_t(p)];
    if (!a.importance) continue;
    imp_at[size_t(p)] = imp_floats;
    imp_floats += size_t(g.n_layers) * size_t(a.past + a.n) * (a.importance_head_stride > 0 ? size_t(g.n_kv_heads) : 1);
    ws_bytes = std::max(ws_bytes, attention_prefill_workspace_bytes(a.n, a.past + a.n, g.n_heads));
  }
  const size_t es = g.esize();
  const Impl::Rows r = g.decoder_rows(size_t(R), s);
  float *x = r.x, *qkv = r.qkv, *gate = r.gate, *up = r.up;
  void *h16 = r.h16, *qkv16 = r.qkv16, *att16 = r.att16;
  float* imp = imp_floats ? g.imp.need_as<float>(imp_floats, s) : nullptr;
  void* ws = ws_bytes ? g.ws.need(ws_bytes, s) : nullptr;
  // K, V [max_kv, kv_dim] (compute dtype) and the positions [max_kv] of a piece's keys.
  const size_t kv_bytes = size_t(max_kv) * g.kv_dim * es;
  char* back = any_past ? static_cast<char*>(g.back.need(2 * kv_bytes + size_t(max_kv) * sizeof(int32_t), s)) : nullptr;
  int32_t* meta = upload_pack(g.ints, pk, s);
  const int32_t* pos_dev = meta + o_pos;

  // The input rows.
  if (any_ids) g.embed_rows(meta + o_ids, R, x);
  for (int p = 0; p < P; ++p) {
    const GpuPrefillPart& a = parts[size_t(p)];
    float* xp = x + size_t(row0[size_t(p)]) * g.hidden;
    if (a.x) {
      copy_to_device(xp, a.x, size_t(a.n) * g.hidden * sizeof(float), s);
    } else if (a.image) {
      const int first = std::max(0, a.image_row0), last = std::min(a.n, a.image_row0 + a.image->rows);
      if (first < last)
        copy_on_device(xp + size_t(first) * g.hidden, static_cast<const float*>(a.image->data.data()) + size_t(first - a.image_row0) * g.hidden,
                       size_t(last - first) * g.hidden * sizeof(float), s);
    }
  }
  if (imp) memset_device(imp, 0, imp_floats * sizeof(float), s);
  for (int l = 0; l < g.n_layers; ++l) {
    const DecLayer& Ly = g.layers[size_t(l)];
    g.decoder_qkv(Ly, R, pos_dev, x, h16, qkv);
    // Every part's new K/V rows into its own table: one write for the whole call.
    const PagedKV all_tables = kv.paged(meta + o_tab + size_t(l) * P * stride, stride);
    paged_kv_write(all_tables, PagedRows{meta + o_rt, meta + o_re, R}, DType::F32, qkv + g.q_dim,
                   qkv + g.q_dim + g.kv_dim, g.qkv_dim, pos_dev, s);
    g.to16(qkv, qkv16, size_t(R) * g.qkv_dim);
    for (int p = 0; p < P; ++p) {
      const GpuPrefillPart& a = parts[size_t(p)];
      const size_t r0 = size_t(row0[size_t(p)]);
      const char* q16 = static_cast<const char*>(qkv16) + r0 * g.qkv_dim * es;
      PrefillAttentionArgs at;
      at.dtype = g.dt;
      at.q = q16;
      at.n_q = a.n;
      at.q_stride = g.qkv_dim;
      at.q_pos = pos_dev + r0;
      at.n_heads = g.n_heads;
      at.n_kv_heads = g.n_kv_heads;
      at.head_dim = g.head_dim;
      at.scale = g.scale;
      at.out = static_cast<char*>(att16) + r0 * g.q_dim * es;
      if (a.past == 0) {  // the keys are this call's rows: read them where the product left them
        at.k = q16 + size_t(g.q_dim) * es;
        at.v = q16 + size_t(g.q_dim + g.kv_dim) * es;
        at.n_kv = a.n;
        at.kv_stride = g.qkv_dim;
        at.kv_pos = pos_dev + r0;
      } else {  // earlier pieces' keys too: entries [0, past + n) read back from the pool, in order
        const int n_kv = a.past + a.n;
        char* kb = back;
        char* vb = back + kv_bytes;
        int32_t* pb = reinterpret_cast<int32_t*>(back + 2 * kv_bytes);
        paged_kv_read(kv.paged(meta + o_tab + (size_t(l) * P + p) * stride, stride),
                      PagedRows{meta + o_gt, meta + o_ge, n_kv}, kb, vb, pb, s);
        at.k = kb;
        at.v = vb;
        at.n_kv = n_kv;
        at.kv_stride = g.kv_dim;
        at.kv_pos = pb;
      }
      if (a.importance) {
        const bool per_kv = a.importance_head_stride > 0;
        at.importance = imp + imp_at[size_t(p)] + size_t(l) * (a.past + a.n) * (per_kv ? size_t(g.n_kv_heads) : 1);
        at.importance_from = a.importance_from;
        at.importance_per_kv_head = per_kv;
        at.importance_max = a.importance_max;
        at.workspace = ws;
        at.workspace_bytes = ws_bytes;
        if (a.importance_weight != ValueWeight::None) {
          // The weights from the values the attention reads here (this call's rows, or the earlier
          // pieces' read back with them): no pass over the pool of its own. A later piece weighs the
          // earlier entries again (n_kv x n_heads x head_dim^2 per layer for wov2), which equals
          // what they weighed before: the weight of an entry is a function of its value alone.
          ValueWeightArgs va;
          va.dtype = g.dt, va.v = at.v, va.n_kv = at.n_kv, va.kv_stride = at.kv_stride;
          va.n_heads = g.n_heads, va.n_kv_heads = g.n_kv_heads, va.head_dim = g.head_dim;
          va.gram = a.importance_weight == ValueWeight::OutputNorm2 ? g.output_gram(l) : nullptr;
          va.out = g.vw.need_as<float>(size_t(g.n_heads) * at.n_kv, s);
          va.workspace_bytes = value_weights_workspace_bytes(at.n_kv, g.n_heads, g.n_kv_heads, g.head_dim, va.gram != nullptr);
          va.workspace = va.workspace_bytes ? g.vw_ws.need(va.workspace_bytes, s) : nullptr;
          value_weights(g.blas, va);
          at.importance_weight = va.out;
        }
      }
      attention_prefill(at, s);
    }
    g.decoder_mlp(Ly, R, x, h16, att16, gate, up);
    g.checkpoint("decoder prefill", l, x, size_t(R) * g.hidden);
    g.show("layer_out", l, x, {R, g.hidden});
  }
  g.show_hidden_final(x, R);
  // Logits of each part's last row: one head product over those rows.
  std::vector<int> with_logits;
  for (int p = 0; p < P; ++p)
    if (parts[size_t(p)].logits) with_logits.push_back(p);
  if (with_logits.size() == 1) {
    const GpuPrefillPart& a = parts[size_t(with_logits[0])];
    g.head_logits(x + size_t(row0[size_t(with_logits[0])] + a.n - 1) * g.hidden, 1, a.logits);
  } else if (!with_logits.empty()) {
    const int n = int(with_logits.size());
    float* last = g.last.need_as<float>(size_t(n) * g.hidden, s);
    for (int i = 0; i < n; ++i) {
      const int p = with_logits[size_t(i)];
      copy_on_device(last + size_t(i) * g.hidden, x + size_t(row0[size_t(p)] + parts[size_t(p)].n - 1) * g.hidden,
                     size_t(g.hidden) * sizeof(float), s);
    }
    std::vector<float> all(size_t(n) * g.vocab);
    g.head_logits(last, n, all.data());
    stream_synchronize(s);
    for (int i = 0; i < n; ++i)
      std::copy_n(all.begin() + long(size_t(i) * g.vocab), g.vocab, parts[size_t(with_logits[size_t(i)])].logits);
  }
  if (parts[0].logits && g.observes("logits")) {
    stream_synchronize(s);
    obs->on_tensor("logits", -1, parts[0].logits, {1, g.vocab});
  }
  if (imp) {
    std::vector<float> all(imp_floats);
    copy_to_host(all.data(), imp, all.size() * sizeof(float), s);
    stream_synchronize(s);
    // Each piece's sums are added to what earlier pieces left (0 for a whole prompt: exact); with
    // importance_max the larger is kept.
    for (int p = 0; p < P; ++p) {
      const GpuPrefillPart& a = parts[size_t(p)];
      if (!a.importance) continue;
      const size_t n_kv = size_t(a.past + a.n);
      const int heads = a.importance_head_stride > 0 ? g.n_kv_heads : 1;
      for (int l = 0; l < g.n_layers; ++l)
        for (int h = 0; h < heads; ++h) {
          const float* src = all.data() + imp_at[size_t(p)] + (size_t(l) * heads + h) * n_kv;
          float* dst = (*a.importance)[size_t(l)].data() + size_t(h) * size_t(a.importance_head_stride);
          if (a.importance_max)
            for (size_t j = 0; j < n_kv; ++j) dst[j] = std::max(dst[j], src[j]);
          else
            for (size_t j = 0; j < n_kv; ++j) dst[j] += src[j];
        }
    }
  }
  stream_synchronize(s);  // the host rows (ids, embeddings) of the call may go once it returns
  kv.check_error_flag(P == 1 ? "prefill of sequence " + seq0 : "prefill of " + std::to_string(P) + " sequences");
}
// ------------------------------------------------------------------------------------------------
void GpuModel::decode(GpuKVPool& kv, const GpuDecodeBatch& b) {
  Impl& g = *impl_;
  Impl::Observing watching(g, b.observer);
  void* s = g.s();
  if (kv.stream() != s) fail(kWhere, "decode: the KV pool belongs to another GpuModel");
  const int B = int(b.seqs.size());
  if (B == 0) return;
  if ((b.embeddings == nullptr) == (b.tokens == nullptr)) fail(kWhere, "decode: give either embeddings or tokens");
  if (!b.positions) fail(kWhere, "decode: no positions");
  if (!b.want_importance.empty() && int(b.want_importance.size()) != B)
    fail(kWhere, "decode: want_importance has " + std::to_string(b.want_importance.size()) + " flags for " +
                     std::to_string(B) + " sequences");
  const auto host_t0 = std::chrono::steady_clock::now();
  if (std::set<BlockPool::SeqId>(b.seqs.begin(), b.seqs.end()).size() != b.seqs.size())
    fail(kWhere, "decode: a sequence appears twice in one batch");
  if (b.tokens)
    for (int i = 0; i < B; ++i)
      if (b.tokens[i] < 0 || b.tokens[i] >= g.vocab)
        fail("prompt", "token id " + std::to_string(b.tokens[i]) + " is outside the vocabulary of " + std::to_string(g.vocab));
  for (int i = 0; i < B; ++i)
    if (b.positions[i] < 0) fail(kWhere, "decode: negative position " + std::to_string(b.positions[i]));
  if (b.while_running && b.importance)
    fail(kWhere, "decode: work while the step runs cannot depend on the step's importance");

  // Blocks: one more entry in every layer of every sequence; all or nothing over the batch.
  BlockPool& bp = kv.blocks();
  std::vector<std::vector<int>> before(static_cast<size_t>(B));
  BlockPool::Need need;
  int needing = 0;
  std::string needs;  // the first few sequences that need blocks (the message stays one line)
  for (int i = 0; i < B; ++i) {
    const BlockPool::SeqId q = b.seqs[size_t(i)];
    std::vector<int> e(static_cast<size_t>(g.n_layers));
    for (int l = 0; l < g.n_layers; ++l) e[size_t(l)] = bp.entries(q, l);
    before[size_t(i)] = e;
    const BlockPool::Need n = bp.blocks_to_append(q, 1);  // every head of a per-head layer gets the entry too
    need += n;
    if ((n.blocks || n.sub_blocks) && ++needing <= 4)
      needs += (needs.empty() ? "" : ", ") + ("sequence " + std::to_string(q) + ": " + std::to_string(n.blocks) +
                                              (n.sub_blocks ? " + " + std::to_string(n.sub_blocks) + " head sub-blocks" : ""));
  }
  if (needing > 4) needs += ", and " + std::to_string(needing - 4) + " more sequences";
  if (!bp.fits(need))
    fail("GPU KV pool", "out of KV blocks: a decode step of " + std::to_string(B) + " sequences needs " +
                            std::to_string(need.blocks) + " new blocks" +
                            (need.sub_blocks ? " and " + std::to_string(need.sub_blocks) + " head sub-blocks" : "") + " (" +
                            needs + "), only " + std::to_string(bp.free_blocks()) + " of " + std::to_string(bp.n_blocks()) +
                            " are free" +
                            (need.sub_blocks ? " (" + std::to_string(bp.sub_blocks_available()) + " sub-blocks)" : ""));
  // Layers some sequence holds in head tables (kernels.h, PagedHeads): their attention and write
  // read each head's own table; the others take the shared tables alone, as before.
  const int H = g.n_kv_heads;
  std::vector<char> heads_in(static_cast<size_t>(g.n_layers), 0);
  for (int i = 0; i < B; ++i)
    for (int l = 0; l < g.n_layers; ++l)
      if (bp.per_head(b.seqs[size_t(i)], l)) heads_in[size_t(l)] = 1;
  if (b.importance)  // a sequence that asks for it must keep every layer shared (its row is per entry)
    for (int i = 0; i < B; ++i)
      for (int l = 0; l < g.n_layers; ++l)
        if ((b.want_importance.empty() || b.want_importance[size_t(i)]) && bp.per_head(b.seqs[size_t(i)], l))
          fail(kWhere, "decode: decode-time importance (H2O) for sequence " + std::to_string(b.seqs[size_t(i)]) +
                           ", whose KV heads hold their own entries in layer " + std::to_string(l) + ", is not supported");
  for (int i = 0; i < B; ++i) bp.append_all(b.seqs[size_t(i)], 1);
  for (int i = 0; i < B; ++i)
    for (int l = 0; l < g.n_layers; ++l)
      if (bp.per_head(b.seqs[size_t(i)], l)) {  // the longest head sizes the layer's attention plan
        int most = 0;
        for (int h = 0; h < H; ++h) most = std::max(most, bp.head_entries(b.seqs[size_t(i)], l, h) - 1);
        before[size_t(i)][size_t(l)] = most;
      }

  // Attention plans are made for a length bucket (the next power of two >= 256) rather than the
  // exact longest entry count, and tables are padded to the bucket: then the whole step's launch
  // arguments stay the same from one step to the next (the kernels read the true lengths from
  // `lengths`), so one captured CUDA graph serves every step until a layer outgrows its bucket.
  auto bucket = [](int n) {
    int v = 256;
    while (v < n) v *= 2;
    return v;
  };
  int stride = 1, max_len_all = 0;
  std::vector<int> max_len(static_cast<size_t>(g.n_layers), 0);
  for (int i = 0; i < B; ++i)
    for (int l = 0; l < g.n_layers; ++l) max_len[size_t(l)] = std::max(max_len[size_t(l)], before[size_t(i)][size_t(l)] + 1);
  for (int l = 0; l < g.n_layers; ++l) {
    max_len[size_t(l)] = bucket(max_len[size_t(l)]);
    max_len_all = std::max(max_len_all, max_len[size_t(l)]);
  }
  stride = std::max(stride, bp.blocks_for(max_len_all));
  IntPack pk;
  const size_t o_pos = pk.add(std::vector<int32_t>(b.positions, b.positions + B));
  const size_t o_tok = b.tokens ? pk.add(std::vector<int32_t>(b.tokens, b.tokens + B)) : 0;
  const size_t o_tab = pk.reserve(size_t(g.n_layers) * B * stride, -1);
  const size_t o_re = pk.reserve(size_t(g.n_layers) * B, 0);
  const size_t o_len = pk.reserve(size_t(g.n_layers) * B, 0);
  std::vector<int32_t> row_table(static_cast<size_t>(B));
  std::iota(row_table.begin(), row_table.end(), 0);
  const size_t o_rt = pk.add(row_table);
  for (int l = 0; l < g.n_layers; ++l)
    for (int i = 0; i < B; ++i) {
      const std::vector<int32_t>& t = bp.table(b.seqs[size_t(i)], l);
      PKV_ASSERT(int(t.size()) <= stride);
      std::copy(t.begin(), t.end(), pk.data.begin() + long(o_tab + (size_t(l) * B + i) * stride));
      pk.data[o_re + size_t(l) * B + i] = before[size_t(i)][size_t(l)];
      pk.data[o_len + size_t(l) * B + i] = before[size_t(i)][size_t(l)] + 1;
    }
  // Per layer with head tables: flags [B], tables [B * H][stride], lengths [B * H] (after the append).
  std::vector<int64_t> o_heads(size_t(g.n_layers) * 3, -1);  // [layer]: flags, tables, lengths
  for (int l = 0; l < g.n_layers; ++l) {
    if (!heads_in[size_t(l)]) continue;
    const size_t o_flag = pk.reserve(size_t(B), 0), o_htab = pk.reserve(size_t(B) * H * stride, -1),
                 o_hlen = pk.reserve(size_t(B) * H, 0);
    o_heads[size_t(l) * 3] = int64_t(o_flag), o_heads[size_t(l) * 3 + 1] = int64_t(o_htab);
    o_heads[size_t(l) * 3 + 2] = int64_t(o_hlen);
    for (int i = 0; i < B; ++i) {
      const BlockPool::SeqId q = b.seqs[size_t(i)];
      if (!bp.per_head(q, l)) continue;
      pk.data[o_flag + size_t(i)] = 1;
      for (int h = 0; h < H; ++h) {
        const std::vector<int32_t>& t = bp.head_table(q, l, h);
        PKV_ASSERT(int(t.size()) <= stride);
        std::copy(t.begin(), t.end(), pk.data.begin() + long(o_htab + (size_t(i) * H + h) * stride));
        pk.data[o_hlen + size_t(i) * H + h] = bp.head_entries(q, l, h);
      }
    }
  }

  const bool want_imp = b.importance != nullptr;
  const int64_t istride = max_len_all;
  size_t ws_bytes = 0;
  for (int l = 0; l < g.n_layers; ++l)
    ws_bytes = std::max(ws_bytes, attention_decode_workspace_bytes(B, g.n_heads, g.n_kv_heads, g.head_dim, max_len[size_t(l)], want_imp));
  const Impl::Rows r = g.decoder_rows(size_t(B), s);
  float* imp = want_imp ? g.imp.need_as<float>(size_t(g.n_layers) * B * istride, s) : nullptr;
  void* ws = g.ws.need(ws_bytes, s);
  float* lg = b.logits ? g.head_buffers(B) : nullptr;
  int32_t* meta = upload_pack(g.ints, pk, s);
  if (b.embeddings) copy_to_device(r.x, b.embeddings, size_t(B) * g.hidden * sizeof(float), s);

  // The step's work. Everything it uses is copied into the closure (a captured graph keeps the
  // values of its capture); only device memory (metadata, activations, the pool) changes between
  // replays.
  const bool tokens = b.tokens != nullptr;
  const std::vector<int> plan_len = max_len;
  Impl* gp = &g;
  GpuKVPool* kvp = &kv;
  auto enqueue = [gp, kvp, r, imp, ws, ws_bytes, lg, meta, B, stride, istride, tokens, plan_len, o_pos, o_tok, o_tab,
                  o_re, o_len, o_rt, o_heads]() {
    Impl& g = *gp;
    void* s = g.s();
    const int32_t* pos_dev = meta + o_pos;
    if (tokens) g.embed_rows(meta + o_tok, B, r.x);
    if (imp) memset_device(imp, 0, size_t(g.n_layers) * B * istride * sizeof(float), s);
    for (int l = 0; l < g.n_layers; ++l) {
      const DecLayer& Ly = g.layers[size_t(l)];
      g.decoder_qkv(Ly, B, pos_dev, r.x, r.h16, r.qkv, false);
      const PagedKV pkv = kvp->paged(meta + o_tab + size_t(l) * B * stride, stride);
      const PagedRows rows{meta + o_rt, meta + o_re + size_t(l) * B, B};
      PagedHeads heads;
      if (o_heads[size_t(l) * 3] >= 0) {
        heads.per_head = meta + o_heads[size_t(l) * 3];
        heads.tables = meta + o_heads[size_t(l) * 3 + 1];
        heads.lengths = meta + o_heads[size_t(l) * 3 + 2];
      }
      // RoPE, the new K/V rows into the pool and q in 16 bits for the attention, in one kernel.
      RopeWriteArgs rw;
      rw.qkv = r.qkv, rw.qkv_stride = g.qkv_dim, rw.n_heads = g.n_heads, rw.n_kv_heads = g.n_kv_heads, rw.head_dim = g.head_dim;
      rw.pos = pos_dev, rw.inv_freq = g.inv_freq, rw.q_out = r.qkv16, rw.q_out_stride = g.qkv_dim;
      rw.heads = heads;
      paged_kv_rope_write(pkv, rows, rw, s);
      DecodeAttentionArgs a;
      a.q = r.qkv16;
      a.batch = B;
      a.q_stride = g.qkv_dim;
      a.q_pos = pos_dev;
      a.kv = pkv;
      a.lengths = meta + o_len + size_t(l) * B;
      a.max_len = plan_len[size_t(l)];
      a.n_heads = g.n_heads;
      a.n_kv_heads = g.n_kv_heads;
      a.head_dim = g.head_dim;
      a.scale = g.scale;
      a.out = r.att16;
      if (imp) {
        a.importance = imp + size_t(l) * B * istride;
        a.importance_stride = istride;
      }
      a.workspace = ws;
      a.workspace_bytes = ws_bytes;
      a.heads = heads;
      attention_decode(a, s);
      g.decoder_mlp(Ly, B, r.x, r.h16, r.att16, r.gate, r.up);
      g.checkpoint("decoder step", l, r.x, size_t(B) * g.hidden);
      g.show("layer_out", l, r.x, {B, g.hidden});  // observed steps only: they are never captured
    }
    g.show_hidden_final(r.x, B);
    if (lg) g.head_device(r.x, B, lg);
  };
  g.times.host_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - host_t0).count();
  g.step_timer.start(s);
  if (g.use_graphs && !b.observer) {  // an observed step waits for its tensors: plain launches
    // The key: every value baked into the graph that can differ between steps.
    std::vector<int64_t> key = {B, stride, istride, tokens, int64_t(ws_bytes)};
    key.insert(key.end(), plan_len.begin(), plan_len.end());
    key.insert(key.end(), o_heads.begin(), o_heads.end());  // which layers read head tables, and where
    const std::initializer_list<const void*> ptrs = {r.x, r.h16, r.qkv, r.qkv16, r.att16, r.gate, r.up, imp, ws, lg, meta};
    for (const void* p : ptrs)
      key.push_back(int64_t(reinterpret_cast<uintptr_t>(p)));
    // The pool the graph writes into: another pool (a new one at another address, or another
    // shape) needs its own capture, even when every activation buffer is the same.
    const PagedKV pv = kv.paged(nullptr, stride);
    for (const void* p : {static_cast<const void*>(pv.pool), static_cast<const void*>(pv.positions),
                          static_cast<const void*>(pv.error_flag)})
      key.push_back(int64_t(reinterpret_cast<uintptr_t>(p)));
    key.insert(key.end(), {pv.n_blocks, pv.block_size, pv.kv_dim, int64_t(pv.dtype)});
    if (key != g.graph_key || !g.graph.ready()) {
      g.graph_key.clear();  // stays clear if the capture fails
      g.capturing = true;
      try {
        g.graph.capture(s, enqueue);
      } catch (...) {
        g.capturing = false;
        throw;
      }
      g.capturing = false;
      g.graph_key = key;
    }
    g.graph.launch(s);
  } else {
    enqueue();
  }
  g.step_timer.stop(s);
  // Through page-locked memory: a pageable copy of B x vocab floats runs at a fraction of the speed.
  const size_t n_logits = lg ? size_t(B) * g.vocab * sizeof(float) : 0;
  void* staged = lg ? g.pinned.need(n_logits) : nullptr;
  if (lg) copy_to_host(staged, lg, n_logits, s);
  if (b.while_running) {
    try {
      b.while_running();
    } catch (...) {
      stream_synchronize(s);
      throw;
    }
  }
  if (lg) {
    const size_t n = n_logits;
    stream_synchronize(s);
    // Megabytes at large batches (48 x 32k floats = 6 MB): one thread copies them at a few GB/s.
    constexpr size_t kChunk = size_t(1) << 18;
    parallel_for((n + kChunk - 1) / kChunk, 1, [&](size_t c0, size_t c1, int) {
      const size_t from = c0 * kChunk, to = std::min(n, c1 * kChunk);
      std::memcpy(reinterpret_cast<char*>(b.logits) + from, static_cast<const char*>(staged) + from, to - from);
    });
    if (g.observes("logits")) b.observer->on_tensor("logits", -1, b.logits, {B, g.vocab});
  }
  g.times.steps += 1;
  g.times.gpu_ms += g.step_timer.elapsed_ms();
  if (imp) {
    std::vector<float> all(size_t(g.n_layers) * B * istride);
    copy_to_host(all.data(), imp, all.size() * sizeof(float), s);
    stream_synchronize(s);
    b.importance->assign(size_t(B), {});
    for (int i = 0; i < B; ++i) {
      if (!b.want_importance.empty() && !b.want_importance[size_t(i)]) continue;
      auto& per = (*b.importance)[size_t(i)];
      per.resize(size_t(g.n_layers));
      for (int l = 0; l < g.n_layers; ++l) {
        // The kernel writes each entry's importance at its slot; the caller counts logical entries.
        const float* row = &all[(size_t(l) * B + i) * istride];
        const int n = before[size_t(i)][size_t(l)] + 1;
        const std::vector<int32_t>& map = bp.slot_map(b.seqs[size_t(i)], l);
        std::vector<float>& out = per[size_t(l)];
        out.assign(row, row + n);
        for (size_t e = 0; e < map.size(); ++e) out[e] = row[map[e]];
      }
    }
  }
  kv.check_error_flag("decode step");
}

// ------------------------------------------------------------------------------------------------
GpuKVPool::GpuKVPool(GpuModel& model, const GpuKVPoolOptions& opt)
    : blocks_(0, std::max(1, opt.block_size), model.config().text.n_layers, 0),
      dtype_(model.dtype()),
      kv_dim_(model.config().text.n_kv_heads * model.config().text.head_dim),
      stream_(model.stream()) {
  const char* where = "GPU KV pool";
  if (opt.block_size < 1) fail(where, "block_size must be >= 1, got " + std::to_string(opt.block_size));
  if (kv_dim_ < 2 || kv_dim_ % 2 != 0) fail(where, "kv_dim " + std::to_string(kv_dim_) + " must be even");
  const size_t block_bytes = paged_block_bytes(opt.block_size, kv_dim_, dtype_size(dtype_));
  int n = opt.n_blocks;
  if (n <= 0) {
    if (opt.bytes == 0) fail(where, "give its size: n_blocks or bytes");
    const size_t nb = opt.bytes / block_bytes;
    if (nb < 1)
      fail(where, std::to_string(opt.bytes) + " bytes hold no block (one block of " + std::to_string(opt.block_size) +
                      " entries is " + std::to_string(block_bytes) + " bytes)");
    n = int(std::min<size_t>(nb, size_t(1) << 30));
  }
  blocks_ = BlockPool(n, opt.block_size, model.config().text.n_layers, block_bytes, 0, model.config().text.n_kv_heads);
  PagedKV shape;
  shape.dtype = dtype_, shape.n_blocks = n, shape.block_size = opt.block_size, shape.kv_dim = kv_dim_;
  pool_ = DeviceBuffer(paged_pool_bytes(shape), "the KV pool (" + std::to_string(n) + " blocks of " +
                                                    std::to_string(opt.block_size) + " entries, " +
                                                    mib(paged_pool_bytes(shape)) + ")");
  positions_ = DeviceBuffer(paged_positions_bytes(shape), "the KV pool's positions");
  flag_ = DeviceBuffer(sizeof(int), "the KV pool's error flag");
  memset_device(flag_.data(), 0, sizeof(int), stream_);
  memset_device(positions_.data(), 0xff, positions_.bytes(), stream_);
  stream_synchronize(stream_);
}

GpuKVPool::~GpuKVPool() {
  try {
    stream_synchronize(stream_);  // no kernel may still use the pool when it is freed
  } catch (...) {
  }
}

PagedKV GpuKVPool::paged(const int32_t* tables, int table_stride) const {
  PagedKV kv;
  kv.dtype = dtype_;
  kv.pool = const_cast<void*>(pool_.data());
  kv.positions = const_cast<int32_t*>(positions_.as<int32_t>());
  kv.n_blocks = blocks_.n_blocks();
  kv.block_size = blocks_.block_size();
  kv.kv_dim = kv_dim_;
  kv.tables = tables;
  kv.table_stride = table_stride;
  kv.error_flag = const_cast<int*>(flag_.as<int>());
  return kv;
}

void GpuKVPool::compact(std::vector<Job> jobs) {
  const char* where = "GPU KV pool";
  if (jobs.empty()) return;
  // No synchronisation with the stream: compaction may be enqueued behind a decode step that is
  // still running (GpuDecodeBatch::while_running). The previous call's work (its metadata copy out
  // of staging_pinned_, its kernels) ends with its timer's stop event: wait for that only.
  compaction_gpu_ms();  // waits for the previous call's stop event (and adds its time)
  {
    std::vector<int64_t> keys(jobs.size());  // (sequence, layer) at most once
    for (size_t i = 0; i < jobs.size(); ++i) keys[i] = (int64_t(jobs[i].seq) << 32) | uint32_t(jobs[i].layer);
    std::sort(keys.begin(), keys.end());
    const auto dup = std::adjacent_find(keys.begin(), keys.end());
    if (dup != keys.end())
      fail(where, "compact: sequence " + std::to_string(*dup >> 32) + " layer " + std::to_string(int32_t(*dup & 0xffffffff)) +
                      " appears twice");
  }
  // Head plans go their own way (compact_heads), after the shared tables' work below.
  for (const Job& j : jobs)
    if (j.head_keep.empty() && blocks_.per_head(j.seq, j.layer))
      fail(where, "compact: sequence " + std::to_string(j.seq) + " layer " + std::to_string(j.layer) +
                      " has head tables: its plan must keep one list per KV head");
  const auto heads_from =
      std::stable_partition(jobs.begin(), jobs.end(), [](const Job& j) { return j.head_keep.empty(); });
  if (heads_from != jobs.end()) {
    std::vector<Job> head_jobs(std::make_move_iterator(heads_from), std::make_move_iterator(jobs.end()));
    jobs.erase(heads_from, jobs.end());
    compact_heads(std::move(head_jobs));  // validates everything before it changes anything
    compaction_gpu_ms();                  // adds the head compaction's time
    if (jobs.empty()) return;
  }
  // Merge jobs first: paged_kv_merge then runs on the prefix of the same job arrays.
  std::stable_partition(jobs.begin(), jobs.end(), [](const Job& j) { return j.merge; });
  const int J = int(jobs.size());
  // Validation, one task per group of jobs (a decode step of a large batch has thousands of them).
  std::vector<int32_t> lengths(static_cast<size_t>(J));
  std::vector<int> firsts(static_cast<size_t>(J));
  std::vector<std::string> errors(static_cast<size_t>(J));
  constexpr size_t kGrain = 64;
  parallel_for(size_t(J), kGrain, [&](size_t i0, size_t i1, int) {
    for (size_t i = i0; i < i1; ++i) {
      const Job& j = jobs[i];
      int n = 0;
      try {
        n = blocks_.entries(j.seq, j.layer);  // validates the sequence and layer
      } catch (const Error& e) {
        errors[i] = e.what();
        continue;
      }
      const std::string which = "compact: sequence " + std::to_string(j.seq) + " layer " + std::to_string(j.layer);
      // Strictly increasing and < n. The identity prefix (keep[m] = m: a decode step's eviction
      // keeps most of the table) needs no check beyond its length.
      size_t m0 = 0;
      while (m0 < j.keep.size() && j.keep[m0] == int32_t(m0)) ++m0;
      bool ok = int(m0) <= n;
      for (size_t m = m0; ok && m < j.keep.size(); ++m)
        ok = j.keep[m] >= 0 && j.keep[m] < n && (m == 0 || j.keep[m] > j.keep[m - 1]);
      if (!ok) errors[i] = which + ": kept indices must be strictly increasing and < " + std::to_string(n);
      else if (j.merge && j.keep.empty() && n > 0) errors[i] = which + ": a merge needs at least one kept entry";
      lengths[i] = n;
      firsts[i] = int(m0);
    }
  });
  int n_merge = 0, stride = 1;
  size_t entries_sum = 0;
  for (int i = 0; i < J; ++i) {
    if (!errors[size_t(i)].empty()) fail(where, errors[size_t(i)]);
    n_merge += jobs[size_t(i)].merge ? 1 : 0;
    stride = std::max(stride, blocks_.blocks_for(lengths[size_t(i)]));
    entries_sum += size_t(lengths[size_t(i)]);
  }
  // The metadata's device buffer, sized for the most it can hold (tables, per-job arrays, and per
  // entry at most a merge's keep and slot lists and a move's source and target), before any
  // bookkeeping changes: an allocation failure leaves everything as it was.
  const size_t bound = (size_t(J) * stride + 8 * (size_t(J) + 8) + 4 * entries_sum) * sizeof(int32_t);
  if (meta_.bytes() < bound) {
    meta_.reset();
    meta_ = DeviceBuffer(bound + bound / 2, "the KV pool's compaction metadata");
  }
  // Nothing can fail from here on. Merges read the kept entries' groups by logical index through the
  // slot maps (sent only where a map is not the identity); then every job's kept entries move into
  // the slots below its new length (plan_slot_moves updates each map in place), and only jobs with
  // moves go to the compaction kernel.
  std::vector<int32_t>& host = staging_;
  host.assign(size_t(J) * stride, -1);
  std::vector<int32_t> job_table(static_cast<size_t>(J));
  std::vector<int32_t> merge_keep, merge_offsets{0}, slots, slot_offsets;
  for (int i = 0; i < n_merge; ++i) {  // merge jobs come first; their slot lists before the maps change
    const Job& j = jobs[size_t(i)];
    const std::vector<int32_t>& map = blocks_.slot_map(j.seq, j.layer);
    merge_keep.insert(merge_keep.end(), j.keep.begin(), j.keep.end());
    merge_offsets.push_back(int32_t(merge_keep.size()));
    if (map.empty()) {
      slot_offsets.push_back(-1);
    } else {
      slot_offsets.push_back(int32_t(slots.size()));
      for (int e = 0; e < lengths[size_t(i)]; ++e) slots.push_back(slot_of(map, e));
    }
  }
  // Tables and moves, in parallel (each job touches only its own table's map), then concatenated.
  std::vector<std::vector<int32_t>> job_src(static_cast<size_t>(J)), job_dst(static_cast<size_t>(J));
  parallel_for(size_t(J), kGrain, [&](size_t i0, size_t i1, int) {
    for (size_t i = i0; i < i1; ++i) {
      const Job& j = jobs[i];
      const std::vector<int32_t>& t = blocks_.table(j.seq, j.layer);
      std::copy(t.begin(), t.end(), host.begin() + long(i * stride));
      job_table[i] = int32_t(i);
      plan_slot_moves(blocks_.mutable_slot_map(j.seq, j.layer), lengths[i], j.keep, firsts[i], job_src[i], job_dst[i]);
    }
  });
  std::vector<int32_t> move_jobs, src, dst, move_offsets{0};
  for (int i = 0; i < J; ++i) {
    if (job_src[size_t(i)].empty()) continue;
    move_jobs.push_back(i);
    src.insert(src.end(), job_src[size_t(i)].begin(), job_src[size_t(i)].end());
    dst.insert(dst.end(), job_dst[size_t(i)].begin(), job_dst[size_t(i)].end());
    move_offsets.push_back(int32_t(src.size()));
  }
  auto append = [&](const std::vector<int32_t>& v) {
    while (host.size() % 4) host.push_back(0);
    const size_t at = host.size();
    host.insert(host.end(), v.begin(), v.end());
    if (v.empty()) host.push_back(0);
    return at;
  };
  const size_t o_job = append(job_table), o_len = append(lengths), o_mkeep = append(merge_keep),
               o_moff = append(merge_offsets), o_slots = append(slots), o_soff = append(slot_offsets),
               o_mjob = append(move_jobs), o_src = append(src), o_dst = append(dst), o_voff = append(move_offsets);
  const size_t bytes = host.size() * sizeof(int32_t);
  PKV_ASSERT(bytes <= meta_.bytes());
  // From page-locked memory: a pageable copy would wait for the stream (the running step) first.
  void* pinned = staging_pinned_.need(bytes);
  std::memcpy(pinned, host.data(), bytes);
  copy_to_device(meta_.data(), pinned, bytes, stream_);
  const int32_t* d = meta_.as<int32_t>();
  const PagedKV kv = paged(d, stride);
  compact_timer_.start(stream_);
  if (n_merge > 0) {
    PagedJobs mj{d + o_job, d + o_mkeep, d + o_moff, d + o_len, n_merge};
    if (!slots.empty()) mj.slots = d + o_slots, mj.slot_offsets = d + o_soff;
    paged_kv_merge(kv, mj, stream_);
  }
  if (!move_jobs.empty()) {
    PagedJobs pj{d + o_mjob, d + o_src, d + o_voff, nullptr, int(move_jobs.size())};
    pj.dest = d + o_dst;
    paged_kv_compact(kv, pj, stream_);
  }
  compact_timer_.stop(stream_);
  compact_timed_ = true;
  for (const Job& j : jobs) blocks_.resize(j.seq, j.layer, int(j.keep.size()));
}

void GpuKVPool::compact_heads(std::vector<Job> jobs) {
  const char* where = "GPU KV pool";
  const int H = blocks_.n_kv_heads(), J = int(jobs.size());
  // Validation, and what each job takes and returns, in sub-blocks (a block is n_kv_heads of them):
  // a split takes its head tables' and returns the shared table's blocks; an in-place compaction
  // only returns sub-blocks.
  std::vector<int> need(static_cast<size_t>(J), 0), freed(static_cast<size_t>(J), 0);
  std::vector<char> splits(static_cast<size_t>(J), 0);
  for (int i = 0; i < J; ++i) {
    const Job& j = jobs[size_t(i)];
    const std::string which = "compact: sequence " + std::to_string(j.seq) + " layer " + std::to_string(j.layer);
    const bool split = !blocks_.per_head(j.seq, j.layer);  // validates the sequence and layer
    splits[size_t(i)] = split;
    if (j.merge) fail(where, which + ": a merge over head tables is not supported on the GPU");
    if (int(j.head_keep.size()) != H)
      fail(where, which + ": " + std::to_string(j.head_keep.size()) + " head lists for " + std::to_string(H) + " KV heads");
    for (int h = 0; h < H; ++h) {
      const std::vector<int32_t>& k = j.head_keep[size_t(h)];
      const int n = split ? blocks_.entries(j.seq, j.layer) : blocks_.head_entries(j.seq, j.layer, h);
      for (size_t m = 0; m < k.size(); ++m)
        if (k[m] < 0 || k[m] >= n || (m > 0 && k[m] <= k[m - 1]))
          fail(where, which + " head " + std::to_string(h) + ": kept indices must be strictly increasing and < " +
                          std::to_string(n));
      if (split) need[size_t(i)] += blocks_.head_blocks_for(int(k.size()));
      else freed[size_t(i)] += int(blocks_.head_table(j.seq, j.layer, h).size()) - blocks_.head_blocks_for(int(k.size()));
    }
    if (split) freed[size_t(i)] = int(blocks_.table(j.seq, j.layer).size()) * H;
  }
  // Groups: as many jobs as the free sub-blocks hold; a group's freed blocks serve the next group.
  std::vector<int> group_end;
  {
    int free = blocks_.sub_blocks_available(), taken = 0, returned = 0;
    for (int i = 0; i < J; ++i) {
      if (need[size_t(i)] > free - taken) {
        group_end.push_back(i);
        free += returned - taken;
        taken = returned = 0;
      }
      if (need[size_t(i)] > free)
        fail(where, "out of KV blocks: the head tables of sequence " + std::to_string(jobs[size_t(i)].seq) + " layer " +
                            std::to_string(jobs[size_t(i)].layer) + " need " + std::to_string(need[size_t(i)]) +
                            " sub-blocks (" + std::to_string(H) + " per block), " + std::to_string(free) + " are free");
      taken += need[size_t(i)];
      returned += freed[size_t(i)];
    }
    group_end.push_back(J);
  }
  int begin = 0;
  for (const int end : group_end) {
    if (end == begin) continue;
    // Tables: per job its source (the shared table of a split) and its H head tables.
    std::vector<std::vector<int32_t>> rows;
    std::vector<int32_t> src, src_head, dst, keep, offsets{0};
    for (int i = begin; i < end; ++i) {
      const Job& j = jobs[size_t(i)];
      const bool split = splits[size_t(i)];
      int src_row = -1;
      std::vector<int32_t> slots;
      if (split) {
        std::vector<int> counts;
        for (const auto& k : j.head_keep) counts.push_back(int(k.size()));
        blocks_.split_heads(j.seq, j.layer, counts);  // fits: the groups were sized for it
        src_row = int(rows.size());
        rows.push_back(blocks_.table(j.seq, j.layer));
        slots = blocks_.slot_map(j.seq, j.layer);
      }
      for (int h = 0; h < H; ++h) {
        const int row = int(rows.size());
        rows.push_back(blocks_.head_table(j.seq, j.layer, h));
        src.push_back(split ? src_row : row);
        src_head.push_back(split ? h : -1);
        dst.push_back(row);
        for (int32_t e : j.head_keep[size_t(h)]) keep.push_back(split ? slot_of(slots, e) : e);
        offsets.push_back(int32_t(keep.size()));
      }
    }
    size_t stride = 1;
    for (const auto& r : rows) stride = std::max(stride, r.size());
    std::vector<int32_t> host(rows.size() * stride, -1);
    for (size_t r = 0; r < rows.size(); ++r) std::copy(rows[r].begin(), rows[r].end(), host.begin() + long(r * stride));
    std::vector<size_t> at;
    for (const std::vector<int32_t>* v : {&src, &src_head, &dst, &keep, &offsets}) {
      at.push_back(host.size());
      host.insert(host.end(), v->begin(), v->end());
    }
    const size_t bytes = host.size() * sizeof(int32_t);
    stream_synchronize(stream_);  // the previous group's (or call's) metadata is no longer read
    if (head_meta_.bytes() < bytes) {
      head_meta_.reset();
      head_meta_ = DeviceBuffer(bytes + bytes / 2, "the KV pool's head compaction metadata");
    }
    void* pinned = head_pinned_.need(bytes);
    std::memcpy(pinned, host.data(), bytes);
    copy_to_device(head_meta_.data(), pinned, bytes, stream_);
    const int32_t* d = head_meta_.as<int32_t>();
    PagedHeadJobs hj;
    hj.src = d + at[0], hj.src_head = d + at[1], hj.dst = d + at[2], hj.keep = d + at[3], hj.keep_offsets = d + at[4];
    hj.n_jobs = int(dst.size());
    hj.n_kv_heads = H;
    compaction_gpu_ms();  // the previous group's time (its stop event is past: synchronised above)
    compact_timer_.start(stream_);
    paged_kv_head_compact(paged(d, int(stride)), hj, stream_);
    compact_timer_.stop(stream_);
    compact_timed_ = true;
    // Work queued later on the stream may take the returned blocks at once.
    for (int i = begin; i < end; ++i) {
      const Job& j = jobs[size_t(i)];
      if (splits[size_t(i)]) blocks_.release_shared(j.seq, j.layer);
      else
        for (int h = 0; h < H; ++h) blocks_.resize_head(j.seq, j.layer, h, int(j.head_keep[size_t(h)].size()));
    }
    begin = end;
  }
}

void GpuKVPool::read_head(BlockPool::SeqId seq, int layer, int head, std::vector<float>* k, std::vector<float>* v) {
  const int H = blocks_.n_kv_heads(), hd = kv_dim_ / H;
  const int n = blocks_.head_entries(seq, layer, head);  // throws for a shared layer
  const std::vector<int32_t>& t = blocks_.head_table(seq, layer, head);
  const int bs = blocks_.block_size();
  const size_t es = dtype_size(dtype_);
  const size_t part = size_t(bs) * hd;  // elements of a sub-block's K (and of its V)
  std::vector<uint16_t> raw(t.size() * 2 * part);  // per sub-block: K then V
  auto* pool = static_cast<const uint8_t*>(pool_.data());
  stream_synchronize(stream_);
  for (size_t i = 0; i < t.size(); ++i) {
    const size_t k_at = size_t(t[i] / H) * 2 * bs * kv_dim_ + size_t(t[i] % H) * part;  // elements
    copy_to_host(raw.data() + i * 2 * part, pool + k_at * es, part * es, stream_);
    copy_to_host(raw.data() + (i * 2 + 1) * part, pool + (k_at + size_t(bs) * kv_dim_) * es, part * es, stream_);
  }
  stream_synchronize(stream_);
  auto value = [&](size_t i) { return dtype_ == DType::F16 ? f16_to_f32(raw[i]) : bf16_to_f32(raw[i]); };
  if (k) k->resize(size_t(n) * hd);
  if (v) v->resize(size_t(n) * hd);
  for (int e = 0; e < n; ++e)
    for (int c = 0; c < hd; ++c) {
      const size_t off = size_t(e / bs) * 2 * part + size_t(e % bs) * hd + c;
      if (k) (*k)[size_t(e) * hd + c] = value(off);
      if (v) (*v)[size_t(e) * hd + c] = value(off + part);
    }
}

double GpuKVPool::compaction_gpu_ms() {
  if (compact_timed_) {
    compact_gpu_ms_ += compact_timer_.elapsed_ms();
    compact_timed_ = false;
  }
  return compact_gpu_ms_;
}

void GpuKVPool::check_error_flag(const std::string& after) {
  int flag = 0;
  copy_to_host(&flag, flag_.data(), sizeof(int), stream_);
  stream_synchronize(stream_);
  if (flag != 0)
    fail("GPU KV pool", "after " + after + ": a paged kernel found an inconsistent block table (flags " + std::to_string(flag) +
                            ": 1 = block id out of range, 2 = entry out of range); this is a bug in the KV bookkeeping");
}

void GpuKVPool::copy_sequence(BlockPool::SeqId from, BlockPool::SeqId to) {
  const int L = n_layers();
  std::vector<int> entries(static_cast<size_t>(L));
  for (int l = 0; l < L; ++l) {
    if (blocks_.entries(to, l) != 0)
      fail("GPU KV pool", "copy into sequence " + std::to_string(to) + ", which is not empty");
    if (blocks_.per_head(from, l))
      fail("GPU KV pool", "copy of sequence " + std::to_string(from) + ": layer " + std::to_string(l) +
                              " keeps its entries per KV head, which a copy does not support");
    entries[size_t(l)] = blocks_.entries(from, l);
  }
  blocks_.resize_all(to, entries);  // throws, changing nothing, when too few blocks are free
  const int bs = blocks_.block_size();
  const size_t kv_block = size_t(2) * size_t(bs) * size_t(kv_dim_) * dtype_size(dtype_);  // K then V of a block
  const size_t pos_block = size_t(bs) * sizeof(int32_t);
  auto* kv = static_cast<uint8_t*>(pool_.data());
  auto* pos = static_cast<uint8_t*>(positions_.data());
  for (int l = 0; l < L; ++l) {
    blocks_.set_slot_map(to, l, blocks_.slot_map(from, l));
    const std::vector<int32_t>& src = blocks_.table(from, l);
    const std::vector<int32_t>& dst = blocks_.table(to, l);
    PKV_ASSERT(src.size() == dst.size());
    for (size_t i = 0; i < src.size();) {
      size_t n = 1;  // a run of blocks consecutive in both tables: one copy
      while (i + n < src.size() && src[i + n] == src[i] + int32_t(n) && dst[i + n] == dst[i] + int32_t(n)) ++n;
      copy_on_device(kv + size_t(dst[i]) * kv_block, kv + size_t(src[i]) * kv_block, n * kv_block, stream_);
      copy_on_device(pos + size_t(dst[i]) * pos_block, pos + size_t(src[i]) * pos_block, n * pos_block, stream_);
      i += n;
    }
  }
}

void GpuKVPool::read_layer(BlockPool::SeqId seq, int layer, std::vector<float>* k, std::vector<float>* v,
                           std::vector<int32_t>* pos) {
  if (blocks_.per_head(seq, layer))
    fail("GPU KV pool", "read_layer: sequence " + std::to_string(seq) + " layer " + std::to_string(layer) +
                            " keeps its entries per KV head (read_head)");
  const int n = blocks_.entries(seq, layer);
  const std::vector<int32_t>& t = blocks_.table(seq, layer);
  const int stride = std::max<int>(1, int(t.size()));
  std::vector<int32_t> host(t.begin(), t.end());
  host.resize(size_t(stride), -1);
  const size_t o_rt = host.size();
  host.insert(host.end(), size_t(n), 0);
  const size_t o_re = host.size();
  const std::vector<int32_t>& map = blocks_.slot_map(seq, layer);
  for (int e = 0; e < n; ++e) host.push_back(slot_of(map, e));  // logical order
  DeviceBuffer meta(std::max<size_t>(host.size(), 1) * sizeof(int32_t), "read_layer metadata");
  const size_t es = dtype_size(dtype_);
  DeviceBuffer dk(std::max<size_t>(size_t(n) * kv_dim_ * es, 16), "read_layer K");
  DeviceBuffer dv(std::max<size_t>(size_t(n) * kv_dim_ * es, 16), "read_layer V");
  DeviceBuffer dp(std::max<size_t>(size_t(n) * sizeof(int32_t), 16), "read_layer positions");
  copy_to_device(meta.data(), host.data(), host.size() * sizeof(int32_t), stream_);
  const int32_t* d = meta.as<int32_t>();
  paged_kv_read(paged(d, stride), PagedRows{d + o_rt, d + o_re, n}, dk.data(), dv.data(), dp.as<int32_t>(), stream_);
  stream_synchronize(stream_);
  std::vector<uint16_t> raw(size_t(n) * kv_dim_);
  auto to_float = [&](const DeviceBuffer& b, std::vector<float>* out) {
    if (!out) return;
    b.download(raw.data(), raw.size() * 2);
    out->resize(raw.size());
    for (size_t i = 0; i < raw.size(); ++i) (*out)[i] = dtype_ == DType::F16 ? f16_to_f32(raw[i]) : bf16_to_f32(raw[i]);
  };
  to_float(dk, k);
  to_float(dv, v);
  if (pos) {
    pos->resize(size_t(n));
    dp.download(pos->data(), size_t(n) * sizeof(int32_t));
  }
  check_error_flag("read_layer");
}

}  // namespace pkv::cuda
