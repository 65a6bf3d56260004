// SentencePiece tokenizer (LLaMA's tokenizer.model) with the conventions LLaVA needs.
#pragma once
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace pkv {

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& model_path);  // throws Error naming the file
  // A LLaMA tokenizer from its vocabulary as llama.cpp's GGUF stores it (tokenizer.ggml.tokens,
  // .scores, .token_type; types numbered as SentencePiece's: 1 normal, 2 unknown, 3 control, 4
  // user-defined, 5 unused, 6 byte): a SentencePiece BPE model with byte fallback, a dummy prefix
  // and escaped whitespace, as LLaMA's. Error naming `where` for an inconsistent vocabulary.
  static std::unique_ptr<Tokenizer> from_pieces(const std::vector<std::string>& pieces, const std::vector<float>& scores,
                                                const std::vector<int>& types, int bos_id, int eos_id, int unk_id,
                                                const std::string& where);
  ~Tokenizer();

  // Plain SentencePiece encoding (with the model's dummy "▁" prefix), no BOS.
  std::vector<int> encode(const std::string& text) const;
  // Encoding of a piece of text that continues earlier text (no dummy prefix), as transformers'
  // non-legacy LLaMA tokenizer encodes the text after a special token.
  std::vector<int> encode_continuation(const std::string& text) const;
  // transformers' LLaMA tokenizer (tokenizers BPE converted from this model, legacy = false):
  // spaces become "▁", one "▁" is prepended to the first section of a text unless it already starts
  // with one, and BPE merges run over the whole section, ranked by the merged piece's id (no
  // split at whitespace, unlike SentencePiece itself). Differs from encode() on runs of spaces.
  // O(n log n) in the section's length (a queue of candidate merges over a list of symbols).
  std::vector<int> encode_hf(const std::string& text, bool first_section) const;
  // The longest piece in bytes: no token stands for more bytes of text, so a text of b bytes
  // encodes to at least b / max_piece_bytes() tokens (with byte fallback, as LLaMA's model has).
  // Lets a caller refuse a text that cannot fit a context before encoding it.
  int max_piece_bytes() const;
  std::string decode(const std::vector<int>& ids) const;

  int vocab_size() const;
  int bos_id() const;
  int eos_id() const;
  int piece_to_id(const std::string& piece) const;  // -1 when absent
  // The model's score of a piece, and its kind as llama.cpp's GGUF records it
  // (tokenizer.ggml.token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
  float score(int id) const;
  int gguf_token_type(int id) const;
  std::string id_to_piece(int id) const;

 private:
  Tokenizer() = default;
  void init();  // the BPE view and the piece types, once the SentencePiece model is loaded
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::vector<int> piece_types_;  // SentencePiece's type of each piece (from the model proto)
  std::string path_;
  int unk_prefix_len_ = 0;
  struct BpeVocab;
  std::unique_ptr<BpeVocab> bpe_;
};

}  // namespace pkv
