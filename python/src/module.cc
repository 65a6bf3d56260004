// prefixkv._core: the engine for Python (docs/PYTHON.md). Built on the libraries alone, never on the
// prefixkv program: models and profiles through engine/model_files.h, devices through
// engine/make_backend.h, generation through the backend seam, calibration and evaluation through
// src/eval. Every engine call runs with the GIL released and holds its model's lock (one call on a
// model at a time: the CPU's thread pool and the GPU model serve one caller). Bad input is a
// pkv::Error, raised in Python as prefixkv.Error (a ValueError) with the engine's message.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <optional>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/threads.h"
#include "engine/backend.h"
#include "engine/decoding.h"
#include "engine/engine.h"
#include "engine/make_backend.h"
#include "engine/model_files.h"
#include "eval/calibrate.h"
#include "eval/checker.h"
#include "eval/dataset.h"
#include "eval/evaluate.h"
#include "kv/profile.h"
#include "model/identity.h"

namespace py = pybind11;
namespace fs = std::filesystem;
using nlohmann::json;

namespace pkv::python {

using OptStr = std::optional<std::string>;

namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// A numpy array over a vector's memory, which the array then owns (no copy).
template <class T>
py::array_t<T> to_numpy(std::vector<T> v, std::vector<py::ssize_t> shape) {
  auto* owner = new std::vector<T>(std::move(v));
  py::capsule free_owner(owner, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, owner->data(), free_owner);
}
template <class T>
py::array_t<T> to_numpy(std::vector<T> v) {
  const auto n = py::ssize_t(v.size());
  return to_numpy(std::move(v), {n});
}

// [rows][cols] (every row the same length) as one [rows, cols] array.
py::array_t<float> to_numpy_2d(const std::vector<std::vector<float>>& rows) {
  const size_t cols = rows.empty() ? 0 : rows[0].size();
  std::vector<float> flat;
  flat.reserve(rows.size() * cols);
  for (const auto& r : rows) {
    PKV_ASSERT(r.size() == cols);
    flat.insert(flat.end(), r.begin(), r.end());
  }
  return to_numpy(std::move(flat), {py::ssize_t(rows.size()), py::ssize_t(cols)});
}

py::object from_json(const json& j) { return py::module_::import("json").attr("loads")(j.dump()); }

std::string path_of(const py::handle& o) { return py::str(py::module_::import("os").attr("fspath")(o)); }
bool is_path(const py::handle& o) { return py::isinstance<py::str>(o) || py::hasattr(o, "__fspath__"); }
// A path argument that may be None ("").
std::string opt_path(const py::object& o) { return o.is_none() ? std::string() : path_of(o); }
// A profile argument that is not a path: a prefixkv.Profile.
const Profile& profile_of(const py::object& o) {
  if (!py::isinstance<Profile>(o))
    fail("profile", "must be a path or a prefixkv.Profile, got " + std::string(py::str(py::type::of(o).attr("__name__"))));
  return o.cast<const Profile&>();
}

// An image given as a path, PNG/JPEG bytes, or an 8-bit RGB array [height, width, 3].
Image image_from(const py::object& o) {
  if (is_path(o)) {
    const std::string path = path_of(o);
    py::gil_scoped_release nogil;
    return load_image(path);
  }
  if (py::isinstance<py::bytes>(o) || py::isinstance<py::bytearray>(o) || py::isinstance<py::memoryview>(o)) {
    const py::buffer_info b = py::buffer(o).request();
    const auto* data = static_cast<const uint8_t*>(b.ptr);
    const size_t size = size_t(b.size) * size_t(b.itemsize);
    py::gil_scoped_release nogil;
    return decode_image(data, size, "image bytes");
  }
  if (py::isinstance<py::array>(o)) {
    const py::array a = py::reinterpret_borrow<py::array>(o);
    std::string shape;
    for (py::ssize_t i = 0; i < a.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(a.shape(i));
    if (!a.dtype().is(py::dtype::of<uint8_t>()) || a.ndim() != 3 || a.shape(2) != 3 || a.shape(0) < 1 ||
        a.shape(1) < 1)
      fail("image", "an array must be uint8 of shape [height, width, 3] (RGB), got " +
                        std::string(py::str(a.dtype())) + " of shape [" + shape + "]");
    const auto c = py::array_t<uint8_t, py::array::c_style>::ensure(a);
    Image img;
    img.height = int(c.shape(0));
    img.width = int(c.shape(1));
    img.rgb.assign(c.data(), c.data() + c.size());
    return img;
  }
  fail("image", "must be a path, PNG/JPEG bytes or a uint8 array [height, width, 3], got " +
                    std::string(py::str(py::type::of(o).attr("__name__"))));
}

}  // namespace

// A model loaded once, with its tokenizer and its device's back end.
struct PyModel {
  LoadedModel lm;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Backend> backend;
  std::mutex mu;  // one engine call at a time, taken with the GIL released

  const Model& model() const { return *lm.model; }
  const ModelConfig& config() const { return lm.model->config(); }
};
using ModelPtr = std::shared_ptr<PyModel>;

ModelPtr load(const py::object& path_arg, const std::string& device, std::optional<std::string> gpu_dtype_arg,
              const py::object& mmproj, const py::object& vision_tower, double kv_memory_mb,
              std::optional<std::string> kv_dtype_arg) {
  const std::string path = path_of(path_arg), gpu_dtype = gpu_dtype_arg.value_or(""),
                    kv_dtype = kv_dtype_arg.value_or("");
  check_device_options(device, gpu_dtype, kv_dtype);
  if (!(kv_memory_mb >= 0)) fail("kv_memory_mb", "must not be negative");
  if (kv_memory_mb > 0 && device != "cuda") fail("kv_memory_mb", "only applies with device='cuda'");
  auto m = std::make_shared<PyModel>();
  LoadOptions lo;
  lo.mmproj = opt_path(mmproj);
  lo.vision_tower_dir = opt_path(vision_tower);
  py::gil_scoped_release nogil;
  m->lm = load_model(path, lo);
  m->engine = std::make_unique<Engine>(*m->lm.model, *m->lm.tok);
  BackendOptions bo;
  bo.device = device;
  bo.gpu_dtype = gpu_dtype;
  bo.kv_dtype = kv_dtype;
  bo.vision = m->config().has_vision;
  bo.kv_pool_bytes = size_t(kv_memory_mb * 1024 * 1024);
  m->backend = make_backend(*m->lm.model, bo);
  return m;
}

// The policy options of generate(), as `prefixkv run`'s --kv-* options take them.
struct PolicyArgs {
  std::string policy = "full";
  std::optional<double> budget;
  std::optional<int> budget_tokens;
  std::string estimator = "window";
  int window = 32, protected_count = 2, prefix_pool = PolicyOptions{}.prefix_pool;
  std::string decode = "proportional";
  py::object profile;  // None, a path, or a prefixkv.Profile

  PolicyOptions options() const {
    PolicyOptions o;
    o.budget = budget.value_or(0.2);
    if (budget_tokens) {
      if (*budget_tokens < 1) fail("budget_tokens", "must be at least 1");
      if (budget) fail("budget_tokens", "give either budget or budget_tokens, not both");
      o.budget_tokens = *budget_tokens;
    }
    o.estimator = estimator_from_name(estimator);
    if (o.estimator == Estimator::Answer) refuse_answer_estimator();  // no reference answer here
    o.window = window;
    o.protected_count = protected_count;
    if (prefix_pool < 0) fail("prefix_pool", "must not be negative");
    o.prefix_pool = prefix_pool;
    if (decode == "proportional") o.decode_rule = DecodeRule::Proportional;
    else if (decode == "cap") o.decode_rule = DecodeRule::FixedCap;
    else fail("decode", "must be proportional or cap, got '" + decode + "'");
    return o;
  }
  std::unique_ptr<KVPolicy> make(const Model& model) const {
    const PolicyOptions o = options();
    if (!profile.is_none() && !is_path(profile)) return make_policy_for_model(policy, o, profile_of(profile), model);
    return make_policy_for_model(policy, o, opt_path(profile), model);
  }
};

SamplingOptions sampling(int max_tokens, double temperature, int top_k, double top_p, uint64_t seed,
                         const py::object& stop, bool ignore_eos) {
  SamplingOptions s;
  if (max_tokens < 1) fail("max_tokens", "must be at least 1");
  if (!(temperature >= 0)) fail("temperature", "must not be negative");
  if (top_k < 0) fail("top_k", "must not be negative");
  if (!(top_p > 0 && top_p <= 1)) fail("top_p", "must be in (0, 1]");
  s.max_tokens = max_tokens;
  s.temperature = float(temperature);
  s.top_k = top_k;
  s.top_p = float(top_p);
  s.seed = seed;
  if (py::isinstance<py::str>(stop)) s.stop = {stop.cast<std::string>()};
  else if (!stop.is_none()) s.stop = stop.cast<std::vector<std::string>>();
  s.ignore_eos = ignore_eos;
  return s;
}

// One prompt (text, optional image) as `prefixkv run` builds it.
struct PromptArgs {
  std::optional<Image> image;
  PromptRequest req;

  PromptArgs(const std::optional<std::string>& prompt, const py::object& image_obj, const std::string& tmpl,
             const OptStr& image_mode_arg) {
    // (req.image is set by prepare(): the object may move before.)
    const std::string image_mode = image_mode_arg.value_or("");
    if (!image_obj.is_none()) image = image_from(image_obj);
    req.text = prompt.value_or(image ? "Describe the image in detail." : "");
    if (req.text.empty() && !image) fail("prompt", "is required when no image is given");
    if (tmpl != "llava" && tmpl != "raw") fail("template", "must be llava or raw, got '" + tmpl + "'");
    req.tmpl = tmpl == "raw" ? Template::Raw : Template::LlavaV1;
    if (!image_mode.empty() && image_mode != "pad" && image_mode != "crop")
      fail("image_mode", "must be pad or crop, got '" + image_mode + "'");
    req.image_mode = image_mode;
  }
  // Tokenised, the image encoded by the model's back end. Call with the model's lock held.
  PreparedPrompt prepare(PyModel& m) {
    req.image = image ? &*image : nullptr;
    if (image) m.backend->use_for_images(req);
    return m.engine->prepare(req);
  }
};

// What generate(return_stats=True) returns: `prefixkv run --json`'s fields.
py::dict stats_dict(PyModel& m, const GenerationResult& r, const PreparedPrompt& p, const KVPolicy& policy,
                    double budget) {
  const int n_gen = int(r.tokens.size());
  py::dict timings;
  timings["vision_ms"] = p.vision_ms;
  timings["prefill_ms"] = r.prefill_ms;
  timings["prefill_tokens_per_s"] = r.prefill_ms > 0 ? r.prompt_tokens / (r.prefill_ms / 1000.0) : 0.0;
  timings["decode_ms"] = r.decode_ms;
  timings["decode_tokens_per_s"] = r.decode_ms > 0 && n_gen > 1 ? (n_gen - 1) / (r.decode_ms / 1000.0) : 0.0;
  timings["threads"] = num_threads();
  std::vector<int64_t> bytes_per_layer(r.kv_bytes_per_layer.begin(), r.kv_bytes_per_layer.end());
  py::dict kv;
  kv["policy"] = policy.name();
  kv["budget"] = policy_info(policy.name()).compresses ? budget : 1.0;
  kv["prefill_kept_per_layer"] = to_numpy(policy.prefill_kept());
  kv["bytes"] = r.kv_bytes;
  kv["bytes_per_layer"] = to_numpy(std::move(bytes_per_layer));
  kv["entries_per_layer"] = to_numpy(r.kv_entries_per_layer);
  py::dict d;
  d["text"] = r.text;
  d["tokens"] = to_numpy(r.tokens);
  d["prompt_tokens"] = r.prompt_tokens;
  d["image_tokens"] = p.image_tokens;
  d["stop_reason"] = r.stop_reason;
  d["timings"] = timings;
  d["device"] = m.backend->description();
  d["kv"] = kv;
  return d;
}

// generate(stream=True): the answer piece by piece as a Python iterator. No thread: each next()
// runs decode steps (GIL released, the model's lock held) until a piece of final text is ready, as
// pkv::generate's loop does, so the tokens are the same. Dropping it early frees its sequence.
class Stream {
 public:
  Stream(ModelPtr m, std::unique_ptr<KVPolicy> policy, PromptArgs prompt, SamplingOptions s)
      : m_(std::move(m)), policy_(std::move(policy)), budget_(0), prompt_(std::move(prompt)) {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(m_->mu);
    p_ = prompt_.prepare(*m_);
    const int T = int(p_.ids.size());
    if (T == 0) fail("prompt", "is empty");
    logits_.assign(size_t(m_->config().text.vocab_size), 0.f);
    const auto t0 = std::chrono::steady_clock::now();
    seq_ = m_->backend->prefill(p_, *policy_, logits_.data());
    r_.prefill_ms = ms_since(t0);
    r_.prompt_tokens = T;
    d_.emplace(m_->config(), *m_->lm.tok, s, T);
  }
  ~Stream() { close(); }
  void set_budget(double b) { budget_ = b; }

  std::string next() {
    if (!seq_) throw py::stop_iteration();
    std::string piece;
    bool ended = false;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(m_->mu);
      const auto t0 = std::chrono::steady_clock::now();
      for (;;) {
        if (pending_step_) m_->backend->step(*seq_, d_->last_token(), logits_.data());
        pending_step_ = false;
        piece = d_->next(logits_.data());
        if (d_->done()) {
          piece += d_->finish();
          ended = true;
          break;
        }
        pending_step_ = true;
        if (!piece.empty()) break;
      }
      r_.decode_ms += ms_since(t0);
      if (ended) {
        r_.tokens = d_->tokens();
        r_.text = d_->text();
        r_.stop_reason = d_->stop_reason();
        r_.kv_bytes = seq_->kv_bytes();
        r_.kv_bytes_per_layer = seq_->kv_bytes_per_layer();
        r_.kv_entries_per_layer = seq_->entries_per_layer();
      }
    }
    if (ended) {
      result_ = stats_dict(*m_, r_, p_, *policy_, budget_);
      close();
      if (piece.empty()) throw py::stop_iteration();
    }
    return piece;
  }
  // Frees the sequence (its KV memory); iteration ends.
  void close() {
    if (!seq_) return;
    std::lock_guard<std::mutex> lock(m_->mu);  // never waited on while holding the GIL: no engine call takes it so
    seq_.reset();
  }
  py::object result() const { return result_; }

 private:
  ModelPtr m_;
  std::unique_ptr<KVPolicy> policy_;
  double budget_;
  PromptArgs prompt_;
  PreparedPrompt p_;
  std::vector<float> logits_;
  std::unique_ptr<Backend::Sequence> seq_;
  std::optional<Decoding> d_;
  GenerationResult r_;
  bool pending_step_ = false;
  py::object result_ = py::none();
};

py::object generate(const ModelPtr& m, std::optional<std::string> prompt, py::object image, PolicyArgs pa,
                    SamplingOptions s, const std::string& tmpl, const OptStr& image_mode, bool stream,
                    bool return_stats) {
  PromptArgs prompt_args(prompt, image, tmpl, image_mode);
  std::unique_ptr<KVPolicy> policy = pa.make(m->model());
  const double budget = pa.options().budget;
  if (stream) {
    auto st = std::make_unique<Stream>(m, std::move(policy), std::move(prompt_args), s);
    st->set_budget(budget);
    return py::cast(std::move(st));
  }
  GenerationResult r;
  PreparedPrompt p;
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(m->mu);
    p = prompt_args.prepare(*m);
    r = pkv::generate(*m->backend, *m->lm.tok, p, s, *policy);
  }
  if (!return_stats) return py::str(r.text);
  return stats_dict(*m, r, p, *policy, budget);
}

// The per-layer importance of a prompt's tokens: what calibration's prefix search ranks
// (calibration_scores with the estimator's window), [layers, prompt tokens].
py::array_t<float> importance(const ModelPtr& m, std::optional<std::string> prompt, py::object image,
                              const std::string& estimator, int window, const std::string& tmpl,
                              const OptStr& image_mode) {
  PromptArgs prompt_args(prompt, image, tmpl, image_mode);
  CalibrateOptions opt;
  opt.estimator = estimator_from_name(estimator);
  if (window < 1) fail("window", "must be at least 1");
  opt.window = window;
  std::vector<std::vector<float>> scores;
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(m->mu);
    const PreparedPrompt p = prompt_args.prepare(*m);
    scores = calibration_scores(*m->backend, *m->engine, p, "", opt);
  }
  return to_numpy_2d(scores);
}

std::vector<double> check_budgets(std::vector<double> b) {
  for (double x : b)
    if (!(x > 0 && x <= 1)) fail("budgets", std::to_string(x) + " is not a budget in (0, 1]");
  if (b.empty()) fail("budgets", "is empty");
  std::sort(b.begin(), b.end());
  b.erase(std::unique(b.begin(), b.end()), b.end());
  return b;
}

// `prefixkv calibrate` without --out: the profile, with the attention concentration per layer as its
// `concentration` and the first token's share of the importance per layer as `first_token_share`.
py::object calibrate(const ModelPtr& m, const py::object& data_arg, std::optional<int> samples,
                     std::vector<double> budgets, const std::string& estimator, int window, int protected_count,
                     const std::string& allocate_from, const std::string& allocate_by, bool heads,
                     const py::object& image_dir, const OptStr& image_mode) {
  const std::string data = path_of(data_arg);
  CalibrateOptions opt;
  opt.budgets = check_budgets(std::move(budgets));
  opt.estimator = estimator_from_name(estimator);
  if (window < 1) fail("window", "must be at least 1");
  opt.window = window;
  if (protected_count < 0) fail("protected", "must not be negative");
  opt.protected_count = protected_count;
  if (allocate_from != "prompt" && allocate_from != "answer")
    fail("allocate_from", "must be prompt or answer, got '" + allocate_from + "'");
  opt.allocation = allocate_from;
  opt.layer_rule = allocate_by;  // checked by pkv::calibrate, as for the CLI's --allocate-by
  opt.heads = heads;
  if (samples && *samples < 1) fail("samples", "must be at least 1");
  opt.limit = size_t(samples.value_or(0));
  opt.image_mode = image_mode.value_or("");
  opt.data = data;
  const std::string dir = opt_path(image_dir);
  CalibrateResult r;
  {
    py::gil_scoped_release nogil;
    const std::vector<Sample> s = load_conversations(data, dir);
    std::lock_guard<std::mutex> lock(m->mu);
    r = pkv::calibrate(*m->backend, *m->engine, s, opt);
  }
  py::object profile = py::cast(std::move(r.profile));
  profile.attr("concentration") = to_numpy(std::move(r.concentration));
  profile.attr("first_token_share") = to_numpy(std::move(r.first_token_share));
  return profile;
}

// `prefixkv eval`'s results JSON (report_json with the model, the data and the settings), on
// conversations or on a text testbed.
py::object evaluate(const ModelPtr& m, const py::object& data_arg, std::optional<std::vector<std::string>> policies_arg,
                    std::vector<double> budgets, std::vector<std::string> estimators, size_t limit,
                    std::optional<int> max_tokens_arg, const py::object& image_dir_arg, const py::object& truth_arg,
                    const OptStr& image_mode_arg, int jobs, int batch, int window, int protected_count,
                    int prefix_pool, const std::string& decode, py::object profile_arg, bool no_image_control,
                    std::optional<int> text_context, std::optional<int> text_continuation) {
  const std::string data = path_of(data_arg), image_dir = opt_path(image_dir_arg);
  const int max_tokens = max_tokens_arg.value_or(1024);
  const std::string image_mode = image_mode_arg.value_or("");
  std::vector<std::string> policies = policies_arg.value_or(policy_names());
  policies.erase(std::remove_if(policies.begin(), policies.end(),
                                [](const std::string& p) { return !policy_info(p, "policies").compresses; }),
                 policies.end());
  budgets = check_budgets(std::move(budgets));
  for (const auto& e : estimators) estimator_from_name(e);
  PolicyArgs pa;
  pa.window = window, pa.protected_count = protected_count, pa.prefix_pool = prefix_pool, pa.decode = decode;
  EvalOptions opt;
  opt.base = pa.options();
  opt.limit = limit;
  if (max_tokens < 1) fail("max_tokens", "must be at least 1");
  opt.max_tokens = max_tokens;
  opt.image_mode = image_mode;
  if (batch < 1) fail("batch", "must be at least 1");
  opt.batch = batch;
  if (jobs < 1) fail("jobs", "must be at least 1");
  opt.jobs = m->backend->thread_safe() ? jobs : 1;
  opt.no_image_control = no_image_control;

  // A text testbed (a JSON object of documents) or conversations (a JSON list).
  const bool text = is_text_set(data);
  if (text) {
    const std::pair<const char*, bool> given[] = {{"image_dir", !image_dir_arg.is_none()}, {"truth", !truth_arg.is_none()},
                                                  {"image_mode", bool(image_mode_arg)}, {"max_tokens", bool(max_tokens_arg)}};
    for (const auto& [name, is_given] : given)
      if (is_given) fail(name, "does not apply to a text testbed (" + data + ")");
    if (no_image_control) fail("no_image_control", "the text testbed " + data + " has no image to evict");
  } else {
    if (text_context) fail("text_context", "applies to a text testbed only, not to " + data);
    if (text_continuation) fail("text_continuation", "applies to a text testbed only, not to " + data);
  }

  std::optional<Profile> profile;
  for (const auto& p : policies)
    if (policy_info(p).needs_profile && !profile) {
      if (!profile_arg.is_none() && !is_path(profile_arg)) {
        profile = profile_of(profile_arg);
        profile->check_compatible(model_identity(m->model()));
      } else {
        const std::string path = profile_arg.is_none() ? default_profile_path(m->model()) : path_of(profile_arg);
        if (!fs::exists(path)) fail("policies " + p, "needs a profile: none at " + path + " (profile=)");
        profile = load_profile_for_model(path, m->model());
      }
    }
  opt.profile = profile ? &*profile : nullptr;
  opt.configs = eval_configs(policies, budgets, estimators, opt.profile);
  if (opt.configs.empty()) fail("policies", "nothing to evaluate");

  std::string truth_path = opt_path(truth_arg);
  if (!text && truth_arg.is_none()) truth_path = default_truth_path(data);
  json res;
  std::optional<TextSet> text_set;
  {
    py::gil_scoped_release nogil;
    std::vector<Sample> samples;
    std::optional<TruthSet> truth;
    if (text) {
      text_set = load_text_set(data);
      text_set->context_tokens = text_context.value_or(text_set->context_tokens);
      text_set->continuation_tokens = text_continuation.value_or(text_set->continuation_tokens);
    } else {
      samples = load_conversations(data, image_dir);
      if (!truth_path.empty()) truth = TruthSet::load(truth_path);
    }
    std::lock_guard<std::mutex> lock(m->mu);
    // Samples in parallel run single-threaded each, as `prefixkv eval` does; the threads are put back.
    const int threads = num_threads();
    if (opt.jobs > 1) set_num_threads(1);
    try {
      res = report_json(text ? evaluate_text(*m->backend, *m->engine, *text_set, opt)
                             : pkv::evaluate(*m->backend, *m->engine, samples, truth ? &*truth : nullptr, opt));
    } catch (...) {
      set_num_threads(threads);
      throw;
    }
    set_num_threads(threads);
  }
  res["model"] = m->lm.dir;
  res["data"] = data;
  res["settings"] = eval_settings_json(policies, budgets, estimators, opt, decode, truth_path, text ? &*text_set : nullptr);
  return from_json(res);
}

}  // namespace pkv::python

PYBIND11_MODULE(_core, mod) {
  using namespace pkv;
  using namespace pkv::python;
  mod.doc() = "prefixkv's engine (the native part of the prefixkv package; see docs/PYTHON.md)";
  py::register_exception<Error>(mod, "Error", PyExc_ValueError);

  mod.def("have_cuda", &have_cuda_backend, "Whether this build has the CUDA back end (device='cuda').");
  mod.def("policies", [] { return policy_names(); }, "The KV policy names, in the order of METHOD.md.");
  mod.def("threads", &num_threads, "The engine's worker threads.");
  mod.def(
      "set_threads",
      [](int n) {
        if (n < 1 || n > 1024) fail("threads", "must be between 1 and 1024");
        set_num_threads(n);
      },
      py::arg("n"), "Sets the engine's worker threads (default: all cores).");

  py::class_<Profile>(mod, "Profile", py::dynamic_attr(), "A PrefixKV profile: per-layer keep fractions for several budgets.")
      .def_static(
          "load", [](const py::object& path) { return Profile::load(path_of(path)); }, py::arg("path"),
          "Reads and checks a profile file (docs/FORMATS.md).")
      .def_static(
          "from_json", [](const std::string& text) { return Profile::parse(text, "profile JSON"); }, py::arg("text"))
      .def("to_json", &Profile::to_json, "The profile as the JSON text `prefixkv calibrate --out` writes.")
      .def("to_dict", [](const Profile& p) { return from_json(json::parse(p.to_json())); })
      .def(
          "save", [](const Profile& p, const py::object& path) { p.save(path_of(path)); }, py::arg("path"),
          "Writes the profile file (as `prefixkv calibrate --out`).")
      .def_property_readonly("budgets",
                             [](const Profile& p) {
                               std::vector<double> b;
                               for (const auto& e : p.budgets) b.push_back(e.budget);
                               return b;
                             })
      .def_property_readonly("n_layers", &Profile::n_layers)
      .def_property_readonly("estimator", [](const Profile& p) { return p.estimator; })
      .def(
          "keep", [](const Profile& p, double budget) { return to_numpy(p.keep_fractions(budget)); }, py::arg("budget"),
          "Per-layer keep fractions for a budget in (0, 1] (interpolated between stored budgets).")
      .def_property_readonly("has_head_table", &Profile::has_head_table)
      .def(
          "head_keep",
          [](const Profile& p, double budget) {
            if (!p.has_head_table())
              fail("head_keep", "this profile has no per-head table (made without `heads=True` / --heads)");
            const auto t = p.head_keep_fractions(budget);
            std::vector<double> flat;
            for (const auto& l : t) flat.insert(flat.end(), l.begin(), l.end());
            const py::ssize_t cols = t.empty() ? 0 : py::ssize_t(t[0].size());
            return to_numpy(std::move(flat), {py::ssize_t(t.size()), cols});
          },
          py::arg("budget"), "Keep fractions per layer and KV head for a budget (the profile's per-head table).")
      .def("__repr__", [](const Profile& p) {
        return "<prefixkv.Profile " + p.model.name + ", " + std::to_string(p.n_layers()) + " layers, " +
               std::to_string(p.budgets.size()) + " budgets, " + p.estimator + ">";
      });

  py::class_<Stream>(mod, "Stream", "generate(stream=True): iterate for the answer's text pieces.")
      .def("__iter__", [](py::object self) { return self; })
      .def("__next__", &Stream::next)
      .def("close", &Stream::close, "Stops the generation and frees its KV cache.")
      .def_property_readonly("result", &Stream::result,
                             "Once the iteration ended: the answer with its statistics (generate's return_stats).");

  py::class_<PyModel, ModelPtr>(mod, "Model",
                                "A model loaded once (a checkpoint folder, or a GGUF file with mmproj=) on a device "
                                "(cpu, or cuda in a build with the CUDA back end).")
      .def(py::init(&load), py::arg("path"), py::kw_only(), py::arg("device") = "cpu", py::arg("gpu_dtype") = py::none(),
           py::arg("mmproj") = py::none(), py::arg("vision_tower") = py::none(), py::arg("kv_memory_mb") = 0.0,
           py::arg("kv_dtype") = py::none())
      .def_property_readonly("path", [](const PyModel& m) { return m.lm.dir; })
      .def_property_readonly("device", [](const PyModel& m) { return m.backend->description(); })
      .def_property_readonly("n_layers", [](const PyModel& m) { return m.config().text.n_layers; })
      .def_property_readonly("n_kv_heads", [](const PyModel& m) { return m.config().text.n_kv_heads; })
      .def_property_readonly("has_vision", [](const PyModel& m) { return m.config().has_vision; })
      .def_property_readonly("image_tokens", [](const PyModel& m) { return m.config().image_tokens(); })
      .def(
          "generate",
          [](const ModelPtr& m, std::optional<std::string> prompt, py::object image, const std::string& policy,
             std::optional<double> budget, std::optional<int> budget_tokens, const std::string& estimator, int window,
             int protected_count, int prefix_pool, const std::string& decode, py::object profile, int max_tokens,
             double temperature, int top_k, double top_p, uint64_t seed, py::object stop, bool ignore_eos,
             const std::string& tmpl, const OptStr& image_mode, bool stream, bool return_stats) {
            PolicyArgs pa{policy, budget, budget_tokens, estimator, window, protected_count, prefix_pool, decode,
                          profile};
            return generate(m, prompt, image, pa,
                            sampling(max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos), tmpl,
                            image_mode, stream, return_stats);
          },
          py::arg("prompt") = py::none(), py::kw_only(), py::arg("image") = py::none(), py::arg("policy") = "full",
          py::arg("budget") = py::none(), py::arg("budget_tokens") = py::none(), py::arg("estimator") = "window",
          py::arg("window") = 32, py::arg("protected") = 2, py::arg("prefix_pool") = pkv::PolicyOptions{}.prefix_pool,
          py::arg("decode") = "proportional", py::arg("profile") = py::none(), py::arg("max_tokens") = 256,
          py::arg("temperature") = 0.0, py::arg("top_k") = 0, py::arg("top_p") = 1.0, py::arg("seed") = 0,
          py::arg("stop") = py::none(), py::arg("ignore_eos") = false, py::arg("template") = "llava",
          py::arg("image_mode") = py::none(), py::arg("stream") = false, py::arg("return_stats") = false,
          "The answer to a prompt (and image) under a KV policy, as `prefixkv run`: its text; with return_stats "
          "a dict of text, tokens, timings and KV statistics; with stream an iterator of text pieces.")
      .def("importance", &importance, py::arg("prompt") = py::none(), py::kw_only(), py::arg("image") = py::none(),
           py::arg("estimator") = "window", py::arg("window") = 32, py::arg("template") = "llava",
           py::arg("image_mode") = py::none(),
           "The per-layer importance of the prompt's tokens the prefix policies rank: float32 [layers, tokens].");

  mod.def("calibrate", &pkv::python::calibrate, py::arg("model"), py::arg("data"), py::kw_only(), py::arg("samples") = py::none(),
          py::arg("budgets") = std::vector<double>{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9},
          py::arg("estimator") = "window", py::arg("window") = 32, py::arg("protected") = 2,
          py::arg("allocate_from") = "prompt", py::arg("allocate_by") = "prefix", py::arg("heads") = false,
          py::arg("image_dir") = py::none(), py::arg("image_mode") = py::none(),
          "`prefixkv calibrate` on LLaVA conversation JSON: a Profile, with the per-layer concentration.");
  mod.def("evaluate", &pkv::python::evaluate, py::arg("model"), py::arg("data"), py::kw_only(), py::arg("policies") = py::none(),
          py::arg("budgets") = std::vector<double>{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9},
          py::arg("estimators") = std::vector<std::string>{"window"}, py::arg("limit") = 0,
          py::arg("max_tokens") = py::none(), py::arg("image_dir") = py::none(), py::arg("truth") = py::none(),
          py::arg("image_mode") = py::none(), py::arg("jobs") = 1, py::arg("batch") = 32, py::arg("window") = 32,
          py::arg("protected") = 2, py::arg("prefix_pool") = pkv::PolicyOptions{}.prefix_pool,
          py::arg("decode") = "proportional", py::arg("profile") = py::none(), py::arg("no_image_control") = false,
          py::arg("text_context") = py::none(), py::arg("text_continuation") = py::none(),
          "`prefixkv eval`: its results JSON as a dict.");
}
