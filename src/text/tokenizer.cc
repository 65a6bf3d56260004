#include "text/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string_view>
#include <tuple>
#include <unordered_map>

#include <sentencepiece_processor.h>

#include "core/error.h"

namespace pkv {

struct Tokenizer::BpeVocab {
  std::unordered_map<std::string, int> ids;  // mergeable pieces (normal and user-defined)
  int byte_ids[256];
};

Tokenizer::Tokenizer(const std::string& model_path) : sp_(new sentencepiece::SentencePieceProcessor()), path_(model_path) {
  if (!std::filesystem::exists(model_path)) fail(model_path, "tokenizer model not found");
  auto st = sp_->Load(model_path);
  if (!st.ok()) fail(model_path, "not a valid SentencePiece model: " + st.ToString());
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
      bpe_->ids.emplace(sp_->IdToPiece(i), i);
    }
  }
}

std::vector<int> Tokenizer::encode_hf(const std::string& text, bool first_section) const {
  static const std::string kSpace = "\xe2\x96\x81";  // U+2581
  std::string s;
  s.reserve(text.size() + 8);
  for (char c : text) {
    if (c == ' ') s += kSpace;
    else s += c;
  }
  if (s.empty()) return {};
  if (first_section && s.compare(0, kSpace.size(), kSpace) != 0) s = kSpace + s;
  // Symbols: one per UTF-8 character.
  std::vector<std::string> sym;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    len = std::min(len, s.size() - i);
    sym.push_back(s.substr(i, len));
    i += len;
  }
  // Merge the best pair until none applies. Rank of a pair, as transformers derives the merges from
  // a SentencePiece model: the merged piece's id (not its score: LLaMA's whitespace pieces have score
  // -1e9 but low ids, and merge first), then the left and right ids; equal pairs merge leftmost first.
  const auto& ids = bpe_->ids;
  for (;;) {
    int best = -1;
    std::tuple<int, int, int> best_key;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = ids.find(sym[i] + sym[i + 1]);
      if (it == ids.end()) continue;
      auto li = ids.find(sym[i]), ri = ids.find(sym[i + 1]);
      if (li == ids.end() || ri == ids.end()) continue;
      std::tuple<int, int, int> key{it->second, li->second, ri->second};
      if (best < 0 || key < best_key) {
        best = int(i);
        best_key = key;
      }
    }
    if (best < 0) break;
    sym[size_t(best)] += sym[size_t(best) + 1];
    sym.erase(sym.begin() + best + 1);
  }
  std::vector<int> out;
  for (auto& x : sym) {
    auto it = ids.find(x);
    if (it != ids.end()) {
      out.push_back(it->second);
      continue;
    }
    for (unsigned char b : x) out.push_back(bpe_->byte_ids[b] >= 0 ? bpe_->byte_ids[b] : sp_->unk_id());
  }
  return out;
}

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

}  // namespace pkv
