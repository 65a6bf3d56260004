#include "text/tokenizer.h"

#include <filesystem>

#include <sentencepiece_processor.h>

#include "core/error.h"

namespace pkv {

Tokenizer::Tokenizer(const std::string& model_path) : sp_(new sentencepiece::SentencePieceProcessor()), path_(model_path) {
  if (!std::filesystem::exists(model_path)) fail(model_path, "tokenizer model not found");
  auto st = sp_->Load(model_path);
  if (!st.ok()) fail(model_path, "not a valid SentencePiece model: " + st.ToString());
  std::vector<int> ids;
  sp_->Encode("<unk>", &ids).IgnoreError();
  unk_prefix_len_ = int(ids.size());
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
