// The chat-completions service without the HTTP: turns a request body into a queued Job (parsing,
// the model name, the prompt in the chat template and its length against the context, the image,
// the request's KV policy and its reservation), and builds the OpenAI response bodies. The HTTP
// glue only moves bytes; tests drive this directly.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <semaphore>
#include <string>

#include "serve/api.h"
#include "serve/scheduler.h"

namespace pkv::serve {

// Makes a request's policy: `budget` is the request's kv_budget, nullopt for the server's default
// budget options. Throws pkv::Error for a policy that cannot be made (e.g. prefixkv without a
// profile); the service answers 400.
using PolicyFactory = std::function<std::unique_ptr<KVPolicy>(const std::string& name, std::optional<double> budget)>;

struct ServiceOptions {
  std::string model_id;  // what /v1/models lists and requests may name
  std::string default_policy = "full";
  double default_budget = 0.2;    // the server's --kv-budget
  int default_budget_tokens = 0;  // the server's --kv-budget-tokens (0: unused)
  int protected_count = 2;        // the policies' protected tokens, for reservations
  int default_max_tokens = 256;   // when a request gives none (capped by the context)
  int64_t max_image_pixels = int64_t(1) << 24;
  int image_decode_slots = 2;  // images decoded at once (each can take width x height x 3 bytes)
  // A JPEG's scans at most: each is a pass of the decoder over the whole image, and a scan header is
  // 10 bytes, so a few megabytes of them cost hours (typical progressive files have 6 to 12).
  int max_jpeg_scans = 64;
  ParseOptions parse;
};

// A queued request and what its response needs.
struct Submitted {
  std::shared_ptr<Job> job;
  std::string id;  // chatcmpl-...
  int64_t created = 0;
  bool stream = false, include_usage = false;
  std::string kv_policy;
  double kv_budget = 1;
};

class ChatService {
 public:
  ChatService(const Model& model, const Tokenizer& tok, Scheduler& scheduler, ServiceOptions opt,
              PolicyFactory make_policy);

  // Validates a POST /v1/chat/completions body and queues it. Throws ApiError (4xx for the request,
  // 503 for a full queue).
  Submitted submit(const std::string& body);

  nlohmann::json models() const;                      // GET /v1/models
  nlohmann::json model(const std::string& id) const;  // GET /v1/models/{id}; throws ApiError 404

  nlohmann::json completion_body(const Submitted& s, const Completion& c) const;
  // A stream chunk: `delta` is {"role": ...} / {"content": ...} / {}; finish_reason "" is null.
  nlohmann::json chunk_body(const Submitted& s, const nlohmann::json& delta, const std::string& finish_reason) const;
  nlohmann::json usage_chunk_body(const Submitted& s, const Completion& c) const;


  const ServiceOptions& options() const { return opt_; }
  Scheduler& scheduler() { return scheduler_; }

 private:
  nlohmann::json usage(const Completion& c) const;
  nlohmann::json extension(const Submitted& s, const Completion& c) const;
  void check_model(const std::string& name) const;
  Image decode_image_input(const ImageInput& in);

  const Model& model_;
  const Tokenizer& tok_;
  Engine engine_;
  Scheduler& scheduler_;
  ServiceOptions opt_;
  PolicyFactory make_policy_;
  std::counting_semaphore<1024> decode_slots_;
  int64_t started_;
};

// What a PNG or JPEG says about itself before any pixel is decoded.
struct ImageHeader {
  bool jpeg = false;
  int64_t width = 0, height = 0;
  bool progressive = false;  // JPEG: SOF2, SOF6, SOF10 or SOF14
  int scans = 0;             // JPEG: the scans (SOS markers) up to the end of the image; PNG: 0
};
// Reads the header the way the decoders do (for a JPEG: the markers up to the frame header, which
// may come after any number of other segments, then the scans to the end of the image, skipping
// their entropy-coded data); linear in the size. nullopt when there is no size to read (not a PNG
// or JPEG, or one cut short before its frame header).
std::optional<ImageHeader> read_image_header(const std::vector<uint8_t>& bytes);
// Width and height from read_image_header.
std::optional<std::pair<int64_t, int64_t>> image_header_size(const std::vector<uint8_t>& bytes);

// JSON text for a response: invalid UTF-8 in generated text becomes U+FFFD instead of an exception.
std::string dump_json(const nlohmann::json& j);

}  // namespace pkv::serve
