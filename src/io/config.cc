#include "io/config.h"

#include <climits>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/file.h"
#include "core/error.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace pkv {

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::LlavaHF: return "llava-hf";
    case Layout::LlavaV5: return "llava-transformers5";
    case Layout::LlavaOriginal: return "llava-original";
    case Layout::Llama: return "llama";
  }
  return "?";
}

namespace {

json read_json(const std::string& path) {
  const std::string text = read_file(path, "config");
  try {
    return json::parse(text);
  } catch (const std::exception& e) {
    fail(path, std::string("not valid JSON: ") + e.what());
  }
}

// A JSON integer that fits in an int. The caller has checked is_number_integer().
bool fits_int(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>() <= uint64_t(INT_MAX);
  const int64_t i = v.get<int64_t>();
  return i >= INT_MIN && i <= INT_MAX;
}

// Typed field access with errors that name the file and the field.
struct Fields {
  const json& j;
  std::string where;  // "DIR/config.json: text_config"

  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  int get_int(const char* k, int def) const {
    if (!has(k)) return def;
    if (!j[k].is_number_integer()) fail(where, std::string("field '") + k + "' must be an integer");
    if (!fits_int(j[k])) fail(where, std::string("field '") + k + "' is out of range: " + j[k].dump());
    return j[k].get<int>();
  }
  float get_float(const char* k, float def) const {
    if (!has(k)) return def;
    if (!j[k].is_number()) fail(where, std::string("field '") + k + "' must be a number");
    return j[k].get<float>();
  }
  bool get_bool(const char* k, bool def) const {
    if (!has(k)) return def;
    if (!j[k].is_boolean()) fail(where, std::string("field '") + k + "' must be true or false");
    return j[k].get<bool>();
  }
  std::string get_str(const char* k, const std::string& def) const {
    if (!has(k)) return def;
    if (!j[k].is_string()) fail(where, std::string("field '") + k + "' must be a string");
    return j[k].get<std::string>();
  }
  int require_int(const char* k) const {
    if (!has(k)) fail(where, std::string("missing required field '") + k + "'");
    return get_int(k, 0);
  }
};

// The architecture-defining fields of a sub-config are either all present or all absent (then the
// transformers defaults of that model class apply, as llava-hf configs rely on). Partly present is
// an error: defaults mixed with real sizes would silently build the wrong model.
void check_all_or_none(const Fields& f, std::initializer_list<const char*> keys) {
  int present = 0;
  for (auto k : keys) present += f.has(k);
  if (present == 0 || present == int(keys.size())) return;
  for (auto k : keys)
    if (!f.has(k)) fail(f.where, std::string("missing required field '") + k + "' (other size fields are given)");
}

std::vector<int> int_list(const json& v, const std::string& where, const char* key) {
  std::vector<int> out;
  if (v.is_number_integer()) {
    if (!fits_int(v)) fail(where, std::string("field '") + key + "' is out of range: " + v.dump());
    out.push_back(v.get<int>());
  } else if (v.is_array()) {
    for (auto& x : v) {
      if (!x.is_number_integer()) fail(where, std::string("field '") + key + "' must hold integers");
      if (!fits_int(x)) fail(where, std::string("field '") + key + "' holds an out-of-range integer: " + x.dump());
      out.push_back(x.get<int>());
    }
  } else if (!v.is_null()) {
    fail(where, std::string("field '") + key + "' must be an integer or a list of integers");
  }
  return out;
}

void parse_rope(const Fields& f, TextConfig& t) {
  t.rope_theta = f.get_float("rope_theta", 10000.f);
  const json* rp = nullptr;
  if (f.has("rope_parameters")) rp = &f.j["rope_parameters"];      // transformers 5
  else if (f.has("rope_scaling")) rp = &f.j["rope_scaling"];        // transformers 4
  if (!rp) return;
  if (!rp->is_object()) fail(f.where, "field 'rope_parameters'/'rope_scaling' must be an object");
  Fields r{*rp, f.where + ": rope parameters"};
  if (r.has("rope_theta")) t.rope_theta = r.get_float("rope_theta", t.rope_theta);
  t.rope_type = r.get_str("rope_type", r.get_str("type", "default"));
  if (t.rope_type == "default") return;
  if (t.rope_type == "linear") {
    t.rope_factor = r.get_float("factor", 1.f);
  } else if (t.rope_type == "llama3") {
    t.rope_factor = r.get_float("factor", 8.f);
    t.rope_low_freq_factor = r.get_float("low_freq_factor", 1.f);
    t.rope_high_freq_factor = r.get_float("high_freq_factor", 4.f);
    t.rope_original_max_positions = r.get_int("original_max_position_embeddings", 8192);
  } else {
    fail(f.where, "unsupported rope type '" + t.rope_type + "' (supported: default, linear, llama3)");
  }
  if (!(t.rope_factor > 0)) fail(f.where, "rope factor must be positive");
}

TextConfig parse_text(const Fields& f) {
  TextConfig t;
  check_all_or_none(f, {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"});
  t.vocab_size = f.get_int("vocab_size", 32000);
  t.hidden = f.get_int("hidden_size", 4096);
  t.intermediate = f.get_int("intermediate_size", 11008);
  t.n_layers = f.get_int("num_hidden_layers", 32);
  t.n_heads = f.get_int("num_attention_heads", 32);
  t.n_kv_heads = f.get_int("num_key_value_heads", t.n_heads);
  if (t.hidden <= 0 || t.n_heads <= 0 || t.n_layers <= 0 || t.intermediate <= 0 || t.vocab_size <= 0 || t.n_kv_heads <= 0)
    fail(f.where, "sizes must be positive");
  t.head_dim = f.get_int("head_dim", t.hidden / t.n_heads);
  if (!f.has("head_dim") && t.hidden % t.n_heads != 0)
    fail(f.where, "hidden_size is not a multiple of num_attention_heads and head_dim is not given");
  if (t.n_heads % t.n_kv_heads != 0) fail(f.where, "num_attention_heads is not a multiple of num_key_value_heads");
  if (t.head_dim <= 0) fail(f.where, "head_dim must be positive");
  if (t.head_dim % 2 != 0) fail(f.where, "head_dim must be even for rotary embeddings");
  t.max_positions = f.get_int("max_position_embeddings", 2048);
  t.rms_eps = f.get_float("rms_norm_eps", 1e-6f);
  t.tie_embeddings = f.get_bool("tie_word_embeddings", false);
  t.attention_bias = f.get_bool("attention_bias", false);
  t.mlp_bias = f.get_bool("mlp_bias", false);
  t.hidden_act = f.get_str("hidden_act", "silu");
  if (t.hidden_act != "silu") fail(f.where, "unsupported hidden_act '" + t.hidden_act + "' (LLaMA uses silu)");
  t.bos_id = f.get_int("bos_token_id", 1);
  if (f.has("eos_token_id")) t.eos_ids = int_list(f.j["eos_token_id"], f.where, "eos_token_id");
  parse_rope(f, t);
  return t;
}

VisionConfig parse_vision(const Fields& f) {
  VisionConfig v;
  check_all_or_none(f, {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"});
  // Defaults: LlavaConfig's default vision tower, CLIP ViT-L/14 at 336 px.
  v.hidden = f.get_int("hidden_size", 1024);
  v.intermediate = f.get_int("intermediate_size", 4096);
  v.n_layers = f.get_int("num_hidden_layers", 24);
  v.n_heads = f.get_int("num_attention_heads", 16);
  v.image_size = f.get_int("image_size", 336);
  v.patch = f.get_int("patch_size", 14);
  v.channels = f.get_int("num_channels", 3);
  v.eps = f.get_float("layer_norm_eps", 1e-5f);
  v.act = f.get_str("hidden_act", "quick_gelu");
  if (v.hidden <= 0 || v.n_heads <= 0 || v.n_layers <= 0 || v.patch <= 0 || v.image_size <= 0 || v.intermediate <= 0)
    fail(f.where, "sizes must be positive");
  if (v.hidden % v.n_heads) fail(f.where, "hidden_size is not a multiple of num_attention_heads");
  if (v.image_size % v.patch) fail(f.where, "image_size is not a multiple of patch_size");
  // grid() * grid() patches (and the image tokens) are ints.
  if (v.grid() > 4096) fail(f.where, "image_size / patch_size is more than 4096 patches a side");
  if (v.channels != 3) fail(f.where, "only 3-channel vision towers are supported");
  if (v.act != "quick_gelu" && v.act != "gelu" && v.act != "gelu_pytorch_tanh")
    fail(f.where, "unsupported vision hidden_act '" + v.act + "'");
  return v;
}

void parse_preprocessor(const std::string& path, ImageConfig& img) {
  json j = read_json(path);
  if (!j.is_object()) fail(path, "not a JSON object");
  Fields f{j, path};
  if (f.has("image_mean")) {
    auto& m = j["image_mean"];
    if (!m.is_array() || m.size() != 3) fail(path, "image_mean must be a list of 3 numbers");
    for (int c = 0; c < 3; ++c) {
      if (!m[c].is_number()) fail(path, "image_mean must be a list of 3 numbers");
      img.mean[c] = m[c].get<float>();
    }
  }
  if (f.has("image_std")) {
    auto& s = j["image_std"];
    if (!s.is_array() || s.size() != 3) fail(path, "image_std must be a list of 3 numbers");
    for (int c = 0; c < 3; ++c) {
      if (!s[c].is_number()) fail(path, "image_std must be a list of 3 numbers");
      img.std[c] = s[c].get<float>();
      if (!(img.std[c] > 0)) fail(path, "image_std must be positive");
    }
  }
  img.rescale = f.get_float("rescale_factor", img.rescale);
  // A side length: a positive integer (given directly or as a field of an object).
  auto side = [&](const json& v, const char* what) {
    if (!v.is_number_integer() || !fits_int(v) || v.get<int>() <= 0)
      fail(path, std::string(what) + " must be a positive integer, got " + v.dump());
    return v.get<int>();
  };
  if (f.has("crop_size")) {
    auto& c = j["crop_size"];
    if (c.is_number_integer()) img.crop = side(c, "crop_size");
    else if (c.is_object() && c.contains("height")) img.crop = side(c["height"], "crop_size.height");
    else fail(path, "crop_size must be an integer or {height, width}");
  }
  if (f.has("size")) {
    auto& s = j["size"];
    if (s.is_number_integer()) img.shortest_edge = side(s, "size");
    else if (s.is_object() && s.contains("shortest_edge")) img.shortest_edge = side(s["shortest_edge"], "size.shortest_edge");
    else if (s.is_object() && s.contains("height")) img.shortest_edge = side(s["height"], "size.height");
    else fail(path, "size must be an integer, {shortest_edge} or {height, width}");
  }
  const int resample = f.get_int("resample", 3);
  if (resample != 3) fail(path, "only bicubic resampling (resample = 3) is supported");
  img.mode = f.get_bool("do_pad", false) ? "pad" : "crop";
  img.source = path;
}

}  // namespace

ModelConfig load_config(const std::string& dir, const std::string& vision_tower_dir) {
  ModelConfig cfg;
  cfg.dir = dir;
  const std::string path = (fs::path(dir) / "config.json").string();
  if (!fs::is_directory(dir)) fail(dir, "model directory does not exist");
  if (!fs::exists(path)) fail(dir, "no config.json in the model directory");
  json j = read_json(path);
  if (!j.is_object()) fail(path, "not a JSON object");
  Fields top{j, path};
  std::string arch;
  if (top.has("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    arch = j["architectures"][0].get<std::string>();
  const std::string model_type = top.get_str("model_type", "");
  if (arch.empty()) {
    if (model_type == "llava") arch = "LlavaForConditionalGeneration";
    else if (model_type == "llava_llama") arch = "LlavaLlamaForCausalLM";
    else if (model_type == "llama") arch = "LlamaForCausalLM";
    else fail(path, "missing 'architectures' (and model_type '" + model_type + "' is not llava, llava_llama or llama)");
  }
  cfg.architecture = arch;

  if (arch == "LlavaForConditionalGeneration") {
    cfg.layout = Layout::LlavaHF;
    cfg.has_vision = true;
    static const json empty = json::object();
    const json& tj = top.has("text_config") ? j["text_config"] : empty;
    const json& vj = top.has("vision_config") ? j["vision_config"] : empty;
    if (!tj.is_object() || !vj.is_object()) fail(path, "text_config and vision_config must be objects");
    cfg.text = parse_text(Fields{tj, path + ": text_config"});
    cfg.vision = parse_vision(Fields{vj, path + ": vision_config"});
    if (top.has("eos_token_id") && !tj.contains("eos_token_id"))
      cfg.text.eos_ids = int_list(j["eos_token_id"], path, "eos_token_id");
    cfg.image_token_index = top.get_int("image_token_index", top.get_int("image_token_id", 32000));
    cfg.projector_act = top.get_str("projector_hidden_act", "gelu");
    if (top.has("vision_feature_layer"))
      cfg.feature_layers = int_list(j["vision_feature_layer"], path, "vision_feature_layer");
    cfg.feature_strategy = top.get_str("vision_feature_select_strategy", "default");
    if (top.get_bool("multimodal_projector_bias", true) == false)
      fail(path, "multimodal_projector_bias = false is not supported");
    cfg.image.mode = "crop";  // the llava-hf processor's behaviour when no preprocessor config says otherwise
  } else if (arch == "LlavaLlamaForCausalLM") {
    cfg.layout = Layout::LlavaOriginal;
    cfg.has_vision = true;
    cfg.text = parse_text(top);
    cfg.image_token_index = -200;
    const int sel = top.get_int("mm_vision_select_layer", -2);
    cfg.feature_layers = {sel};
    const std::string feat = top.get_str("mm_vision_select_feature", "patch");
    if (feat == "patch") cfg.feature_strategy = "default";
    else if (feat == "cls_patch") cfg.feature_strategy = "full";
    else fail(path, "unsupported mm_vision_select_feature '" + feat + "'");
    const std::string ptype = top.get_str("mm_projector_type", "linear");
    if (ptype == "linear") {
      cfg.projector_layers = 1;
    } else if (ptype.size() > 9 && ptype.size() <= 12 &&  // mlpNx_gelu, N of 1 to 3 digits
               ptype.rfind("mlp", 0) == 0 && ptype.substr(ptype.size() - 6) == "x_gelu" &&
               ptype.find_first_not_of("0123456789", 3) == ptype.size() - 6) {
      cfg.projector_layers = std::stoi(ptype.substr(3, ptype.size() - 9));
      if (cfg.projector_layers < 1) fail(path, "bad mm_projector_type '" + ptype + "'");
    } else {
      fail(path, "unsupported mm_projector_type '" + ptype + "' (supported: linear, mlpNx_gelu)");
    }
    cfg.projector_act = "gelu";
    if (top.get_bool("mm_use_im_start_end", false))
      fail(path, "mm_use_im_start_end = true is not supported (LLaVA-1.5 does not use it)");
    const std::string aspect = top.get_str("image_aspect_ratio", "square");
    cfg.image.mode = aspect == "pad" ? "pad" : "crop";
    cfg.vision_tower_dir = vision_tower_dir;
    if (!vision_tower_dir.empty()) {
      const std::string vpath = (fs::path(vision_tower_dir) / "config.json").string();
      if (!fs::exists(vpath)) fail(vision_tower_dir, "no config.json in the vision tower directory");
      json vj = read_json(vpath);
      if (vj.contains("vision_config")) vj = json(vj["vision_config"]);  // a full CLIPModel config
      if (!vj.is_object()) fail(vpath, "the vision config is not a JSON object");
      cfg.vision = parse_vision(Fields{vj, vpath});
      const std::string vpre = (fs::path(vision_tower_dir) / "preprocessor_config.json").string();
      if (fs::exists(vpre)) {
        std::string mode = cfg.image.mode;
        parse_preprocessor(vpre, cfg.image);
        cfg.image.mode = mode;  // the LLaVA config decides pad vs crop
      }
    } else if (top.has("mm_vision_tower_config")) {
      // Not written by the LLaVA repository: a prefixkv extension for checkpoints whose tower is not a
      // standard CLIP ViT and so cannot be inferred from its tensors (the test fixtures use it).
      if (!j["mm_vision_tower_config"].is_object()) fail(path, "mm_vision_tower_config must be an object");
      cfg.vision = parse_vision(Fields{j["mm_vision_tower_config"], path + ": mm_vision_tower_config"});
    } else {
      cfg.vision_from_tensors = true;  // filled in from the tensors by the weight loader
    }
    if (top.has("mm_hidden_size") && cfg.vision_from_tensors)
      cfg.vision.hidden = top.get_int("mm_hidden_size", cfg.vision.hidden);
  } else if (arch == "LlamaForCausalLM") {
    cfg.layout = Layout::Llama;
    cfg.text = parse_text(top);
  } else {
    fail(path, "unsupported architecture '" + arch +
                   "' (supported: LlavaForConditionalGeneration, LlavaLlamaForCausalLM, LlamaForCausalLM)");
  }

  if (cfg.has_vision) {
    for (int l : cfg.feature_layers)
      if (l == 0 || std::abs(l) > cfg.vision.n_layers + 1)
        if (!cfg.vision_from_tensors || l == 0) fail(path, "vision_feature_layer " + std::to_string(l) + " is out of range");
    if (cfg.feature_layers.empty()) fail(path, "vision_feature_layer is empty");
    if (cfg.feature_strategy != "default" && cfg.feature_strategy != "full")
      fail(path, "vision_feature_select_strategy must be 'default' or 'full'");
    if (cfg.projector_act != "gelu" && cfg.projector_act != "gelu_pytorch_tanh" && cfg.projector_act != "quick_gelu" &&
        cfg.projector_act != "relu" && cfg.projector_act != "silu")
      fail(path, "unsupported projector_hidden_act '" + cfg.projector_act + "'");
    const std::string pre = (fs::path(dir) / "preprocessor_config.json").string();
    if (fs::exists(pre)) parse_preprocessor(pre, cfg.image);
    if (cfg.image.source == "defaults") cfg.image.crop = cfg.image.shortest_edge = cfg.vision.image_size;
    if (cfg.image.crop != cfg.vision.image_size && !cfg.vision_from_tensors)
      fail(pre, "crop size " + std::to_string(cfg.image.crop) + " differs from the vision tower's image_size " +
                    std::to_string(cfg.vision.image_size));
  }
  // generation_config.json may carry the real EOS ids.
  const std::string gen = (fs::path(dir) / "generation_config.json").string();
  if (fs::exists(gen)) {
    json g = read_json(gen);
    if (g.contains("eos_token_id") && !g["eos_token_id"].is_null())
      cfg.text.eos_ids = int_list(g["eos_token_id"], gen, "eos_token_id");
  }
  return cfg;
}

}  // namespace pkv
