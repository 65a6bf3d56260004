#include "text/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <queue>
#include <string_view>
#include <tuple>
#include <unordered_map>

#include <sentencepiece_processor.h>

#include "core/file.h"
#include "core/error.h"

namespace pkv {

namespace {
// Lets the piece table be searched with a string_view into the text (no string per lookup).
struct PieceHash {
  using is_transparent = void;
  size_t operator()(std::string_view v) const { return std::hash<std::string_view>{}(v); }
};
}  // namespace

struct Tokenizer::BpeVocab {
  std::unordered_map<std::string, int, PieceHash, std::equal_to<>> ids;  // mergeable pieces (normal and user-defined)
  int byte_ids[256];
  int max_piece_bytes = 1;  // the longest piece, in bytes
};

Tokenizer::Tokenizer(const std::string& model_path) : sp_(new sentencepiece::SentencePieceProcessor()), path_(model_path) {
  if (!std::filesystem::exists(model_path)) fail(model_path, "tokenizer model not found");
  check_regular_file(model_path, "tokenizer model");  // SentencePiece would block on a FIFO
  auto st = sp_->Load(model_path);
  if (!st.ok()) fail(model_path, "not a valid SentencePiece model: " + st.ToString());
  init();
}

namespace {

// Protocol buffers' wire format, as much as a SentencePiece ModelProto needs
// (sentencepiece_model.proto): varints, 32-bit floats and length-delimited fields.
void pb_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) out.push_back(char(uint8_t(v) | 0x80)), v >>= 7;
  out.push_back(char(v));
}
void pb_key(std::string& out, int field, int wire) { pb_varint(out, uint64_t(field) << 3 | uint64_t(wire)); }
void pb_bytes(std::string& out, int field, const std::string& b) {
  pb_key(out, field, 2);
  pb_varint(out, b.size());
  out += b;
}
void pb_uint(std::string& out, int field, uint64_t v) {
  pb_key(out, field, 0);
  pb_varint(out, v);
}
void pb_float(std::string& out, int field, float f) {
  pb_key(out, field, 5);
  char b[4];
  std::memcpy(b, &f, 4);
  out.append(b, 4);
}

// The SentencePiece types of a serialized ModelProto's pieces (field 1, each with its type in field
// 3; NORMAL when absent), in order.
std::vector<int> pb_piece_types(const std::string& proto) {
  std::vector<int> types;
  size_t i = 0;
  auto varint = [&](const std::string& b, size_t& k) {
    uint64_t r = 0;
    for (int shift = 0; k < b.size() && shift < 64; shift += 7) {
      const uint8_t c = uint8_t(b[k++]);
      r |= uint64_t(c & 0x7f) << shift;
      if (c < 0x80) break;
    }
    return r;
  };
  auto skip = [&](const std::string& b, size_t& k, int wire) {
    if (wire == 0) varint(b, k);
    else if (wire == 1) k += 8;
    else if (wire == 5) k += 4;
    else if (wire == 2) k += size_t(varint(b, k));
  };
  while (i < proto.size()) {
    const uint64_t key = varint(proto, i);
    const int field = int(key >> 3), wire = int(key & 7);
    if (field == 1 && wire == 2) {
      const size_t len = size_t(varint(proto, i));
      const std::string piece = proto.substr(i, len);
      i += len;
      int type = 1;
      for (size_t k = 0; k < piece.size();) {
        const uint64_t pk = varint(piece, k);
        if ((pk >> 3) == 3 && (pk & 7) == 0) type = int(varint(piece, k));
        else skip(piece, k, int(pk & 7));
      }
      types.push_back(type);
    } else {
      skip(proto, i, wire);
    }
  }
  return types;
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::from_pieces(const std::vector<std::string>& pieces, const std::vector<float>& scores,
                                                  const std::vector<int>& types, int bos_id, int eos_id, int unk_id,
                                                  const std::string& where) {
  const size_t n = pieces.size();
  if (n == 0 || scores.size() != n || types.size() != n)
    fail(where, "the vocabulary's pieces, scores and types differ in number (" + std::to_string(n) + ", " +
                    std::to_string(scores.size()) + ", " + std::to_string(types.size()) + ")");
  auto in_range = [&](int id, const char* what) {
    if (id < 0 || size_t(id) >= n) fail(where, std::string("the ") + what + " id " + std::to_string(id) + " is outside the vocabulary");
  };
  in_range(bos_id, "BOS"), in_range(eos_id, "EOS"), in_range(unk_id, "unknown-token");
  std::string proto;
  bool bytes = false;
  for (size_t i = 0; i < n; ++i) {
    if (types[i] < 1 || types[i] > 6)
      fail(where, "piece " + std::to_string(i) + " has the token type " + std::to_string(types[i]) + " (1 to 6)");
    bytes = bytes || types[i] == 6;
    std::string piece;
    pb_bytes(piece, 1, pieces[i]);
    pb_float(piece, 2, scores[i]);
    pb_uint(piece, 3, uint64_t(types[i]));
    pb_bytes(proto, 1, piece);
  }
  // LLaMA's settings: BPE with byte fallback, a dummy prefix, whitespace escaped, nothing normalised.
  std::string trainer;
  pb_uint(trainer, 3, 2);  // model_type BPE
  pb_uint(trainer, 4, n);  // vocab_size
  pb_uint(trainer, 35, bytes ? 1 : 0);  // byte_fallback
  pb_uint(trainer, 40, uint64_t(unk_id));
  pb_uint(trainer, 41, uint64_t(bos_id));
  pb_uint(trainer, 42, uint64_t(eos_id));
  pb_uint(trainer, 43, uint64_t(int64_t(-1)));  // pad_id: none
  pb_bytes(proto, 2, trainer);
  std::string norm;
  pb_bytes(norm, 1, "identity");
  pb_uint(norm, 3, 1);  // add_dummy_prefix
  pb_uint(norm, 4, 0);  // remove_extra_whitespaces
  pb_uint(norm, 5, 1);  // escape_whitespaces
  pb_bytes(proto, 3, norm);
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  t->path_ = where;
  const auto st = t->sp_->LoadFromSerializedProto(proto);
  if (!st.ok()) fail(where, "its vocabulary is not a valid SentencePiece model: " + st.ToString());
  t->init();
  return t;
}

void Tokenizer::init() {
  std::vector<int> ids;
  sp_->Encode("<unk>", &ids).IgnoreError();
  unk_prefix_len_ = int(ids.size());
  bpe_ = std::make_unique<BpeVocab>();
  const int n = sp_->GetPieceSize();
  std::fill(std::begin(bpe_->byte_ids), std::end(bpe_->byte_ids), -1);
  for (int i = 0; i < n; ++i) {
    if (sp_->IsByte(i)) {
      unsigned v = 0;
      if (std::sscanf(sp_->IdToPiece(i).c_str(), "<0x%02X>", &v) == 1 && v < 256) bpe_->byte_ids[v] = i;
    } else if (!sp_->IsControl(i) && !sp_->IsUnknown(i)) {
      const std::string piece = sp_->IdToPiece(i);
      bpe_->ids.emplace(piece, i);
      bpe_->max_piece_bytes = std::max(bpe_->max_piece_bytes, int(piece.size()));
    }
  }
  const std::string proto = sp_->serialized_model_proto();
  piece_types_ = pb_piece_types(proto);
  if (int(piece_types_.size()) != n) piece_types_.assign(size_t(n), 0);  // unreadable: fall back to the API's kinds
}

namespace {

// The ranks of BPE merges and their order, as one key: smaller merges first. Rank of a pair, as
// transformers derives the merges from a SentencePiece model: the merged piece's id (not its score:
// LLaMA's whitespace pieces have score -1e9 but low ids, and merge first), then the left and right
// ids; equal pairs merge leftmost first (the left symbol's index).
struct MergeCandidate {
  int merged, left_id, right_id;
  int left;                   // index of the left symbol (its first character)
  int left_len, right_len;    // bytes of both symbols when the candidate was made
  bool operator>(const MergeCandidate& o) const {
    return std::tie(merged, left_id, right_id, left) > std::tie(o.merged, o.left_id, o.right_id, o.left);
  }
};

}  // namespace

std::vector<int> Tokenizer::encode_hf(const std::string& text, bool first_section) const {
  static const std::string kSpace = "\xe2\x96\x81";  // U+2581
  std::string s;
  s.reserve(text.size() + 8);
  for (char c : text) {
    if (c == ' ') s += kSpace;
    else s += c;
  }
  if (s.empty()) return {};
  // The prefix goes in unless the section already starts with "▁" (a space, or the character itself).
  if (first_section && s.compare(0, kSpace.size(), kSpace) != 0) s.insert(0, kSpace);
  // Symbols: one per UTF-8 character at first, a doubly linked list over their indices; a merge
  // grows the left symbol and unlinks the right one. Symbol i covers s[start[i], start[i] + len[i]).
  std::vector<int> start, len;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    n = std::min(n, s.size() - i);
    start.push_back(int(i));
    len.push_back(int(n));
    i += n;
  }
  const int n = int(start.size());
  std::vector<int> next(static_cast<size_t>(n)), id(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) next[size_t(i)] = i + 1 < n ? i + 1 : -1;
  const auto& ids = bpe_->ids;
  auto lookup = [&](int from, int bytes) {
    auto it = ids.find(std::string_view(s).substr(size_t(from), size_t(bytes)));
    return it == ids.end() ? -1 : it->second;
  };
  for (int i = 0; i < n; ++i) id[size_t(i)] = lookup(start[size_t(i)], len[size_t(i)]);
  // Every adjacent pair that forms a piece is a candidate; a candidate popped after one of its
  // symbols changed is stale and skipped (symbols only grow, so equal lengths mean unchanged). Each
  // merge adds at most two candidates: O(n log n) over the section's n characters.
  std::priority_queue<MergeCandidate, std::vector<MergeCandidate>, std::greater<>> queue;
  auto offer = [&](int left) {
    const int right = next[size_t(left)];
    if (right < 0 || id[size_t(left)] < 0 || id[size_t(right)] < 0) return;
    const int merged = lookup(start[size_t(left)], len[size_t(left)] + len[size_t(right)]);
    if (merged >= 0)
      queue.push({merged, id[size_t(left)], id[size_t(right)], left, len[size_t(left)], len[size_t(right)]});
  };
  std::vector<int> prev(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    prev[size_t(i)] = i - 1;
    offer(i);
  }
  while (!queue.empty()) {
    const MergeCandidate c = queue.top();
    queue.pop();
    const int right = next[size_t(c.left)];
    if (len[size_t(c.left)] != c.left_len || right < 0 || len[size_t(right)] != c.right_len) continue;
    len[size_t(c.left)] += len[size_t(right)];
    id[size_t(c.left)] = c.merged;
    len[size_t(right)] = 0;  // unlinked: never a valid left or right again
    next[size_t(c.left)] = next[size_t(right)];
    if (next[size_t(right)] >= 0) prev[size_t(next[size_t(right)])] = c.left;
    if (prev[size_t(c.left)] >= 0) offer(prev[size_t(c.left)]);
    offer(c.left);
  }
  std::vector<int> out;
  for (int i = 0; i >= 0 && i < n; i = next[size_t(i)]) {
    if (id[size_t(i)] >= 0) {
      out.push_back(id[size_t(i)]);
      continue;
    }
    for (int b = start[size_t(i)]; b < start[size_t(i)] + len[size_t(i)]; ++b) {
      const int byte_id = bpe_->byte_ids[static_cast<unsigned char>(s[size_t(b)])];
      out.push_back(byte_id >= 0 ? byte_id : sp_->unk_id());
    }
  }
  return out;
}

int Tokenizer::max_piece_bytes() const { return bpe_->max_piece_bytes; }

Tokenizer::~Tokenizer() = default;

std::vector<int> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  auto st = sp_->Encode(text, &ids);
  if (!st.ok()) fail(path_, "encoding failed: " + st.ToString());
  return ids;
}

std::vector<int> Tokenizer::encode_continuation(const std::string& text) const {
  // Encode "<unk>" + text and drop the pieces of "<unk>": the text then starts mid-stream, with no
  // dummy prefix added, exactly as transformers' non-legacy LLaMA tokenizer does.
  std::vector<int> ids = encode("<unk>" + text);
  ids.erase(ids.begin(), ids.begin() + std::min<size_t>(ids.size(), size_t(unk_prefix_len_)));
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::vector<int> valid;
  valid.reserve(ids.size());
  for (int id : ids)
    if (id >= 0 && id < sp_->GetPieceSize()) valid.push_back(id);
  std::string out;
  sp_->Decode(valid, &out).IgnoreError();
  return out;
}

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::bos_id() const { return sp_->bos_id(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }
int Tokenizer::piece_to_id(const std::string& piece) const {
  int id = sp_->PieceToId(piece);
  return (id == sp_->unk_id() && piece != sp_->IdToPiece(sp_->unk_id())) ? -1 : id;
}
std::string Tokenizer::id_to_piece(int id) const {
  return (id >= 0 && id < sp_->GetPieceSize()) ? sp_->IdToPiece(id) : std::string();
}

float Tokenizer::score(int id) const {
  if (id < 0 || id >= vocab_size()) fail(path_, "token id " + std::to_string(id) + " is outside the vocabulary");
  return sp_->GetScore(id);
}

int Tokenizer::gguf_token_type(int id) const {
  if (id < 0 || id >= vocab_size()) fail(path_, "token id " + std::to_string(id) + " is outside the vocabulary");
  // SentencePiece's piece types are numbered as GGUF's token types (1 normal ... 6 byte).
  const int t = piece_types_[size_t(id)];
  if (t >= 1 && t <= 6) return t;
  if (sp_->IsUnknown(id)) return 2;
  if (sp_->IsControl(id)) return 3;
  if (sp_->IsUnused(id)) return 5;
  if (sp_->IsByte(id)) return 6;
  return 1;  // normal (user-defined pieces are not told apart by this API: none in LLaMA's model)
}

}  // namespace pkv
