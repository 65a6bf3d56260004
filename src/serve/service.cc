#include "serve/service.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "core/error.h"
#include "kv/policy.h"

using nlohmann::json;

namespace pkv::serve {

namespace {

std::string new_completion_id() {
  // Unique enough for a log line or a client's bookkeeping: the start time and a counter, mixed.
  static const uint64_t base = uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
  static std::atomic<uint64_t> counter{0};
  uint64_t z = base + 0x9e3779b97f4a7c15ull * (counter.fetch_add(1) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  char buf[32];
  std::snprintf(buf, sizeof buf, "chatcmpl-%016llx", static_cast<unsigned long long>(z));
  return buf;
}

}  // namespace

std::string dump_json(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::optional<ImageHeader> read_image_header(const std::vector<uint8_t>& b) {
  const size_t n = b.size();
  auto be16 = [&](size_t i) { return int64_t(b[i]) << 8 | int64_t(b[i + 1]); };
  auto be32 = [&](size_t i) { return be16(i) << 16 | be16(i + 2); };
  if (n >= 24 && std::memcmp(b.data(), "\x89PNG\r\n\x1a\n", 8) == 0 && std::memcmp(&b[12], "IHDR", 4) == 0)
    return ImageHeader{false, be32(16), be32(20), false, 0};
  if (n >= 4 && b[0] == 0xFF && b[1] == 0xD8) {
    // Markers found the way libjpeg finds them (jdmarker.c, next_marker): bytes before a 0xFF are
    // skipped, 0xFF fill bytes swallowed, and 0xFF 0x00 (a stuffed zero) is no marker. Stopping at
    // the first stray byte instead let a JPEG that libjpeg decodes pass unmeasured (found by
    // tests/fuzz/fuzz_image.cc: the pixel limit was bypassed). The same walk skips the entropy-coded
    // data of the scans (no 0xFF there but stuffed zeros and restart markers).
    std::optional<ImageHeader> h;
    size_t i = 2;
    for (;;) {
      while (i < n && b[i] != 0xFF) ++i;
      while (i < n && b[i] == 0xFF) ++i;
      if (i >= n) return h;
      const uint8_t m = b[i++];  // i: the marker's length field, when it has one
      if (m == 0x00 || m == 0x01 || (m >= 0xD0 && m <= 0xD8)) continue;  // stuffed zero, markers without a length
      if (m == 0xD9) return h;  // end of image
      if (m == 0xDA) {
        if (!h) return std::nullopt;  // scan data before any frame header
        ++h->scans;
      }
      const bool frame = m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
      if (frame && !h) {
        if (i + 7 > n) return std::nullopt;
        // SOFn: length, precision, height, width
        h = ImageHeader{true, be16(i + 5), be16(i + 3), m == 0xC2 || m == 0xC6 || m == 0xCA || m == 0xCE, 0};
      }
      if (i + 2 > n) return h;
      i += size_t(be16(i));  // the length counts its own two bytes
    }
  }
  return std::nullopt;
}

std::optional<std::pair<int64_t, int64_t>> image_header_size(const std::vector<uint8_t>& bytes) {
  auto h = read_image_header(bytes);
  if (!h) return std::nullopt;
  return std::make_pair(h->width, h->height);
}

ChatService::ChatService(const Model& model, const Tokenizer& tok, Scheduler& scheduler, ServiceOptions opt,
                         PolicyFactory make_policy)
    : model_(model),
      tok_(tok),
      engine_(model, tok),
      scheduler_(scheduler),
      opt_(std::move(opt)),
      make_policy_(std::move(make_policy)),
      decode_slots_(std::clamp(opt_.image_decode_slots, 1, 1024)),
      started_(int64_t(std::time(nullptr))) {}

void ChatService::check_model(const std::string& name) const {
  // No model named: the one this server serves (as llama.cpp's server does).
  if (!name.empty() && name != opt_.model_id)
    throw ApiError(
        404, "The model '" + name + "' does not exist; this server serves '" + opt_.model_id + "' (GET /v1/models)",
        "model_not_found", "model");
}

json ChatService::models() const {
  return json{
      {"object", "list"},
      {"data",
       json::array({{{"id", opt_.model_id}, {"object", "model"}, {"created", started_}, {"owned_by", "prefixkv"}}})}};
}

json ChatService::model(const std::string& id) const {
  if (id != opt_.model_id) check_model(id.empty() ? "''" : id);
  return models()["data"][0];
}

Image ChatService::decode_image_input(const ImageInput& in) {
  auto too_large = [&](int64_t w, int64_t h) {
    return ApiError(400,
                    in.where + ": the image is " + std::to_string(w) + "x" + std::to_string(h) +
                        " pixels, more than the " + std::to_string(opt_.max_image_pixels) +
                        " the server accepts (--max-image-pixels)",
                    "image_too_large", "messages");
  };
  // Refuse huge images before decoding: a few kilobytes of PNG can claim gigabytes of pixels.
  // Unsigned: a header's sides are below 2^32 each, so the product is exact (a PNG claiming
  // 0xFFFFFFFF x 0xFFFFFFFF overflowed int64_t, found by tests/fuzz/fuzz_image.cc).
  const std::vector<uint8_t>& b = in.bytes;
  const std::optional<ImageHeader> h = read_image_header(b);
  if (!h) {
    // Nothing is decoded without its size known: PNG or JPEG data whose header cannot be read
    // is refused here, anything else by the decoder ("not a PNG or JPEG image").
    const bool png = b.size() >= 8 && std::memcmp(b.data(), "\x89PNG", 4) == 0;
    const bool jpeg = b.size() >= 2 && b[0] == 0xFF && b[1] == 0xD8;
    if (png || jpeg)
      throw ApiError(400,
                     in.where + ": the " + (png ? "PNG" : "JPEG") +
                         " data ends before its size is given (a truncated or damaged header)",
                     "invalid_image", "messages");
  } else {
    if (uint64_t(h->width) * uint64_t(h->height) > uint64_t(opt_.max_image_pixels)) throw too_large(h->width, h->height);
    if (h->jpeg && h->scans > opt_.max_jpeg_scans)
      throw ApiError(400,
                     in.where + ": the JPEG has " + std::to_string(h->scans) + " scans, more than the " +
                         std::to_string(opt_.max_jpeg_scans) +
                         " the server decodes (each scan is a pass over the whole image)",
                     "invalid_image", "messages");
  }
  // Bounded concurrency: every handler thread may hold an image, and decoding is the memory peak.
  decode_slots_.acquire();
  struct Slot {
    std::counting_semaphore<1024>& s;
    ~Slot() { s.release(); }
  } slot{decode_slots_};
  Image img;
  try {
    img = decode_image(in.bytes.data(), in.bytes.size(), in.where);
  } catch (const pkv::Error& e) {
    throw ApiError(400, e.what(), "invalid_image", "messages");
  }
  if (int64_t(img.width) * img.height > opt_.max_image_pixels) throw too_large(img.width, img.height);
  return img;
}

Submitted ChatService::submit(const std::string& body) {
  ChatRequest req = parse_chat_request(body, opt_.parse);
  check_model(req.model);
  const ModelConfig& cfg = model_.config();
  const bool has_image = req.image.has_value();
  if (has_image && !cfg.has_vision)
    throw ApiError(400, req.image->where + ": the model " + opt_.model_id + " is text-only and cannot take an image",
                   "invalid_value", "messages");

  auto job = std::make_shared<Job>();
  const std::vector<std::string> pieces = render_llava_v1(req.messages);
  const int image_tokens = has_image ? cfg.image_tokens() : 0;
  const int context = cfg.text.max_positions;
  // Refused before tokenizing when the text alone cannot fit: tokenizing costs time in its length.
  size_t text_bytes = 0;
  for (const std::string& p : pieces) text_bytes += p.size();
  if (const int64_t at_least = engine_.min_tokens(text_bytes) + image_tokens; at_least >= context)
    throw ApiError(400,
                   "messages: the prompt is " + std::to_string(text_bytes) + " bytes of text, at least " +
                       std::to_string(at_least) + " tokens" +
                       (has_image ? " (" + std::to_string(image_tokens) + " of them the image's)" : "") +
                       ", and the model's context is " + std::to_string(context) + " tokens",
                   "context_length_exceeded", "messages");
  try {
    job->prompt.marked_ids = engine_.tokenize_turns(pieces, has_image);
  } catch (const pkv::Error& e) {
    throw ApiError(400, std::string("messages: ") + e.what(), "invalid_value", "messages");
  }
  const int prompt_tokens = int(job->prompt.marked_ids.size()) + (has_image ? image_tokens - 1 : 0);
  if (prompt_tokens >= context)
    throw ApiError(400,
                   "messages: the prompt is " + std::to_string(prompt_tokens) + " tokens" +
                       (has_image ? " (" + std::to_string(image_tokens) + " of them the image's)" : "") +
                       ", and the model's context is " + std::to_string(context) + " tokens",
                   "context_length_exceeded", "messages");
  SamplingOptions s = req.sampling;
  if (s.max_tokens == 0) {
    s.max_tokens = std::min(opt_.default_max_tokens, context - prompt_tokens);
  } else if (int64_t(prompt_tokens) + s.max_tokens > context) {
    throw ApiError(400,
                   "max_tokens: the prompt's " + std::to_string(prompt_tokens) + " tokens + max_tokens " +
                       std::to_string(s.max_tokens) + " are more than the model's context of " +
                       std::to_string(context) + " tokens",
                   "context_length_exceeded", "max_tokens");
  }

  Submitted sub;
  sub.kv_policy = req.kv_policy.value_or(opt_.default_policy);
  try {
    job->policy = make_policy_(sub.kv_policy, req.kv_budget);
  } catch (const pkv::Error& e) {
    throw ApiError(400, std::string("kv_policy: ") + e.what(), "invalid_value", "kv_policy");
  }
  if (!policy_info(sub.kv_policy).compresses)  // keeps every entry, whatever the budget
    sub.kv_budget = 1;
  else if (req.kv_budget)
    sub.kv_budget = *req.kv_budget;
  else if (opt_.default_budget_tokens > 0)
    sub.kv_budget = std::min(1.0, double(opt_.default_budget_tokens) / prompt_tokens);
  else
    sub.kv_budget = opt_.default_budget;
  job->kv = kv_reservation(cfg.text, prompt_tokens, s.max_tokens, sub.kv_budget, opt_.protected_count,
                           scheduler_.backend().kv_entry_bytes(), scheduler_.backend().kv_block());
  job->sampling = s;
  job->prompt_tokens = prompt_tokens;
  if (has_image) {  // last: the most expensive check
    job->image = decode_image_input(*req.image);
    job->prompt.image = &job->image;
  }

  sub.job = job;
  sub.id = new_completion_id();
  sub.created = int64_t(std::time(nullptr));
  sub.stream = req.stream;
  sub.include_usage = req.include_usage;
  scheduler_.submit(job);
  return sub;
}

json ChatService::usage(const Completion& c) const {
  return json{{"prompt_tokens", c.prompt_tokens},
              {"completion_tokens", c.completion_tokens},
              {"total_tokens", c.prompt_tokens + c.completion_tokens},
              {"kv_bytes", c.kv_bytes},
              {"kv_bytes_full", c.kv_bytes_full}};
}

json ChatService::extension(const Submitted& s, const Completion& c) const {
  return json{{"kv_policy", s.kv_policy},
              {"kv_budget", s.kv_budget},
              {"stop_reason", c.stop_reason},
              {"kv_entries_per_layer", c.kv_entries_per_layer},
              {"timings", {{"queue_ms", c.queue_ms}, {"prefill_ms", c.prefill_ms}, {"decode_ms", c.decode_ms}}}};
}

json ChatService::completion_body(const Submitted& s, const Completion& c) const {
  return json{{"id", s.id},
              {"object", "chat.completion"},
              {"created", s.created},
              {"model", opt_.model_id},
              {"choices", json::array({{{"index", 0},
                                        {"message", {{"role", "assistant"}, {"content", c.text}}},
                                        {"logprobs", nullptr},
                                        {"finish_reason", finish_reason(c.stop_reason)}}})},
              {"usage", usage(c)},
              {"prefixkv", extension(s, c)}};
}

json ChatService::chunk_body(const Submitted& s, const json& delta, const std::string& finish) const {
  return json{{"id", s.id},
              {"object", "chat.completion.chunk"},
              {"created", s.created},
              {"model", opt_.model_id},
              {"choices", json::array({{{"index", 0},
                                        {"delta", delta},
                                        {"logprobs", nullptr},
                                        {"finish_reason", finish.empty() ? json(nullptr) : json(finish)}}})}};
}

json ChatService::usage_chunk_body(const Submitted& s, const Completion& c) const {
  return json{{"id", s.id},
              {"object", "chat.completion.chunk"},
              {"created", s.created},
              {"model", opt_.model_id},
              {"choices", json::array()},
              {"usage", usage(c)},
              {"prefixkv", extension(s, c)}};
}

}  // namespace pkv::serve
