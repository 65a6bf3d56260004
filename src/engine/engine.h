// Generation for one sequence: prompt preparation (the tokens from engine/prompt.h's templates, the
// image's embeddings spliced in), prefill, the decode loop with sampling and stop conditions, and
// the KV policy hooks.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/prompt.h"
#include "kv/policy.h"
#include "model/model.h"
#include "text/tokenizer.h"
#include "vision/image.h"

namespace pkv {

// Image embeddings that a back end's encoder left in its device's memory (the GPU's:
// Backend::use_for_images), to be spliced into the prompt there; the host never holds them.
class DeviceImage {
 public:
  virtual ~DeviceImage() = default;
};

struct PromptRequest {
  std::string text;                 // the user's prompt (Raw: the whole model input)
  Template tmpl = Template::LlavaV1;
  const Image* image = nullptr;     // optional
  std::string image_mode;           // "" = the model's default, else pad | crop
  // When not empty: the model input already tokenised (BOS first, -1 once where the image goes),
  // used instead of text and tmpl. The server renders multi-turn conversations this way.
  std::vector<int32_t> marked_ids;
  // When set: computes the image embeddings [image_tokens, hidden] from the preprocessed pixels
  // [3, S, S] instead of the model's CPU vision tower (prefixkv run --device cuda: GpuModel).
  std::function<std::vector<float>(const float* pixels)> encode_image;
  // When set instead: the image's embeddings stay on the device that computed them, and the prepared
  // prompt carries them as device_image (no host embeddings at all).
  std::function<std::shared_ptr<const DeviceImage>(const float* pixels)> encode_image_on_device;
};

struct PreparedPrompt {
  std::vector<int32_t> ids;         // model input ids; image positions hold the image token id
                                    // (llava-hf) or -200 (original layout), once per image token
  std::vector<float> embeddings;    // [ids.size(), hidden]; empty when device_image is set
  // Set when the image was encoded on a device (PromptRequest::encode_image_on_device): its rows
  // are there, and only a sequence of that back end can take this prompt, which builds every row on
  // the device (the text rows from the embedding table by their ids).
  std::shared_ptr<const DeviceImage> device_image;
  int image_tokens = 0;
  int image_offset = -1;            // first image position, or -1
  std::vector<float> pixels;        // [3, S, S] when an image was given
  double vision_ms = 0;
};

struct SamplingOptions {
  int max_tokens = 256;
  float temperature = 0.f;  // 0: greedy
  int top_k = 0;            // 0: off
  float top_p = 1.f;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  bool ignore_eos = false;
};

struct GenerationResult {
  std::vector<int32_t> tokens;
  std::string text;
  std::string stop_reason;  // eos | stop | length | context
  int prompt_tokens = 0;
  double prefill_ms = 0, decode_ms = 0;
  size_t kv_bytes = 0;
  std::vector<size_t> kv_bytes_per_layer;
  // Per layer: the entries each KV head holds; a layer whose heads hold their own entries (per-head
  // budgets, kv_cache.h): their mean over the heads, rounded (kv_entries_per_head has each).
  std::vector<int> kv_entries_per_layer;
  // [layers][kv heads]: entries and bytes each KV head holds; empty where the back end keeps the
  // same entries in every head (the GPU).
  std::vector<std::vector<int>> kv_entries_per_head;
  std::vector<std::vector<size_t>> kv_bytes_per_head;
  std::vector<float> first_logits;  // logits of the first generated token (from the prefill)
};

// One sequence's decoding state: its KV cache and its policy. prefill() then step() per token.
class Session {
 public:
  // kv_dtype: the cache's storage type (kv/kv_cache.h; --kv-dtype).
  Session(const Model& model, KVPolicy& policy, DType kv_dtype = DType::F32);
  // Runs the prompt; writes the logits of its last position (from the uncompressed prefill), then
  // lets the policy compress the cache.
  void prefill(const PreparedPrompt& p, float* logits, Observer* obs = nullptr);
  // Runs the prompt without consulting the policy (nothing compressed; logits as prefill's, may be
  // null) and returns the raw importance over the queries from each of importance_from (distinct
  // first queries in [0, prompt length)): Backend::prefill_shared on the CPU.
  // With per_kv_head, each importance row is per KV head (ImportanceRequest::per_kv_head).
  std::vector<std::vector<std::vector<float>>> prefill_uncompressed(const PreparedPrompt& p, float* logits,
                                                                    const std::vector<int>& importance_from,
                                                                    bool per_kv_head = false);
  // Starts from another session's uncompressed prefill (its cache, the importance this session's
  // policy asks for, the prompt length) instead of running the prompt again, then lets the policy
  // compress. Evaluation uses it to share one prefill among many policies.
  void adopt_prefill(const KVCache& full_cache, const std::vector<std::vector<float>>& importance, int prompt_len);
  // Feeds one token at the next position; writes the logits for the position after it, then lets
  // the policy evict.
  void step(int32_t token, float* logits, Observer* obs = nullptr);
  // Feeds one token to each of several sessions of the same model (continuous batching: the
  // sessions may have different lengths, positions and policies); logits is [n, vocab], row i for
  // sessions[i]. One batched decoder pass (Model::decode_batch: the weights are read once for all
  // sessions), bit-identical to calling step() on each in turn.
  static void step_many(const std::vector<Session*>& sessions, const int32_t* tokens, float* logits);
  int position() const { return pos_; }
  const KVCache& cache() const { return cache_; }
  const KVPolicy& policy() const { return policy_; }

 private:
  // The prompt into the empty cache (positions 0..T-1), the importance over the queries from
  // importance_from when asked; no policy involved.
  void run_prompt(const PreparedPrompt& p, float* logits, Observer* obs, std::vector<std::vector<float>>* importance,
                  int importance_from, bool importance_per_kv_head = false);

  const Model& model_;
  KVPolicy& policy_;
  KVCache cache_;
  int pos_ = 0;
  std::vector<float> x_;
};

class Engine {
 public:
  Engine(const Model& model, const Tokenizer& tok) : model_(model), tok_(tok) {}

  const Model& model() const { return model_; }
  const Tokenizer& tokenizer() const { return tok_; }

  // Tokenises, preprocesses and encodes the image, and builds the input embeddings.
  PreparedPrompt prepare(const PromptRequest& req, Observer* obs = nullptr) const;

  // Prefill + decode on the CPU: pkv::generate (engine/backend.h) over the CPU back end. on_text
  // receives text as it is produced (may be empty function).
  GenerationResult generate(const PreparedPrompt& p, const SamplingOptions& s, KVPolicy& policy,
                            const std::function<void(const std::string&)>& on_text = {},
                            Observer* obs = nullptr) const;

  // Prompt building (defined in prompt.cc, with the templates of prompt.h):
  //
  // The model input of a request, tokenized, -1 once where the image goes: req.text in req.tmpl as
  // a single_turn conversation, rendered and tokenized by tokenize_turns, or req.marked_ids when
  // given (checked to hold one marker with an image, none without). Refuses an image for a
  // text-only model and a raw prompt with <image> but no image. prepare() starts with it; callers
  // count a prompt's tokens with it before preparing.
  std::vector<int32_t> prompt_ids(const PromptRequest& req) const;
  // Token ids of the text parts of a prompt with `<image>` marking where the image goes
  // (the image marker is returned as -1, one entry). Exposed for tests.
  std::vector<int32_t> tokenize_prompt(const std::string& full_text, bool has_image) const;
  // A conversation rendered as pieces split at the end of each assistant turn (render_prompt): the
  // first piece as tokenize_prompt (its <image> the image's place when has_image), each later one
  // after an EOS, its text a continuation (no dummy prefix) and any <image> in it a marker. A
  // single piece gives exactly tokenize_prompt.
  std::vector<int32_t> tokenize_turns(const std::vector<std::string>& pieces, bool has_image) const;
  // The fewest tokens a text of this many bytes can encode to (no token stands for more bytes than
  // the tokenizer's longest piece), and a check that refuses, before any tokenizing, a text that
  // cannot fit the model's context.
  int64_t min_tokens(size_t text_bytes) const;
  void check_text_fits(size_t text_bytes) const;
  // The end-of-sequence id the model was trained to produce (the config's first, else the
  // tokenizer's): the token between conversation turns and after a reference answer.
  int32_t eos_id() const;

  // Token ids of a reference answer as it follows the prompt (teacher forcing), with EOS at the end:
  // the tokens the model was trained to produce after "ASSISTANT:".
  std::vector<int32_t> answer_ids(const std::string& answer) const;

  // The model input text of a single prompt: render_prompt(single_turn(text, has_image, t), t), one
  // piece.
  static std::string apply_template(const std::string& text, Template t, bool has_image);

 private:
  // Appends the ids of text; with split_images each "<image>" becomes one -1 marker (returns their
  // count). starts_prompt: the text opens the prompt (transformers' dummy prefix applies).
  int append_text_ids(std::vector<int32_t>& ids, const std::string& text, bool starts_prompt, bool split_images) const;

  const Model& model_;
  const Tokenizer& tok_;
};

// Picks the next token: greedy (first maximum) when temperature <= 0, else temperature / top-k /
// top-p sampling with the given generator state.
int sample_token(const float* logits, int vocab, const SamplingOptions& s, uint64_t& rng_state);

}  // namespace pkv
