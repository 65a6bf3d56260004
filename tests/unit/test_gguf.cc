// llama.cpp's GGUF container (src/io/gguf.h) and ggml's block types (src/ops/quant.h): files written
// by GgufWriter read back the same, every lie in a file is one pkv::Error naming it, and the Q8_0 /
// Q4_0 round trips stay within the bounds their arithmetic gives.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <set>

#include "core/dtype.h"
#include "core/error.h"
#include "io/gguf.h"
#include "engine/engine.h"
#include "model/gguf_export.h"
#include "model/gguf_load.h"
#include "model/model.h"
#include "text/tokenizer.h"
#include "ops/ops.h"
#include "ops/quant.h"
#include "test_util.h"

using namespace pkv;

namespace {

std::vector<uint8_t> f32_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

GgufWriter sample_writer(uint32_t alignment = 32) {
  GgufWriter w(alignment);
  w.set("general.architecture", GgufValue::of_string("llama"));
  w.set("llama.block_count", GgufValue::of_u32(2));
  w.set("llama.rope.freq_base", GgufValue::of_f32(10000.f));
  w.set("some.signed", GgufValue::of_i32(-7));
  w.set("some.big", GgufValue::of_u64(uint64_t(1) << 40));
  w.set("tokenizer.ggml.add_bos_token", GgufValue::of_bool(true));
  w.set("tokenizer.ggml.tokens", GgufValue::of_strings({"<unk>", "<s>", "</s>", "\xe2\x96\x81" "a"}));
  w.set("tokenizer.ggml.scores", GgufValue::of_f32s({0.f, 0.f, 0.f, -1.5f}));
  w.set("tokenizer.ggml.token_type", GgufValue::of_i32s({2, 3, 3, 1}));
  w.add_tensor("token_embd.weight", {4, 2}, quant::kF32, f32_bytes({0, 1, 2, 3, 4, 5, 6, 7}));
  std::vector<float> row(64);
  for (int i = 0; i < 64; ++i) row[size_t(i)] = std::sin(float(i));
  std::vector<uint8_t> q8(quant::row_bytes(quant::kQ8_0, 64)), q4(quant::row_bytes(quant::kQ4_0, 64));
  quant::quantize_row(quant::kQ8_0, row.data(), q8.data(), 64);
  quant::quantize_row(quant::kQ4_0, row.data(), q4.data(), 64);
  w.add_tensor("blk.0.attn_q.weight", {32, 2}, quant::kQ8_0, q8);
  w.add_tensor("blk.0.ffn_up.weight", {64}, quant::kQ4_0, q4);
  std::vector<uint8_t> h(6);
  for (int i = 0; i < 3; ++i) {
    const uint16_t v = f32_to_f16(float(i) + 0.5f);
    std::memcpy(&h[size_t(i) * 2], &v, 2);
  }
  w.add_tensor("output_norm.weight", {3}, quant::kF16, h);
  return w;
}

void expect_refused(std::vector<uint8_t> bytes, const std::string& fragment) {
  try {
    GgufFile::parse(bytes.data(), bytes.size(), "lie.gguf");
    ADD_FAILURE() << "accepted; expected an error with '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("lie.gguf"), std::string::npos) << e.what();
  }
}

// Offsets in a sample file, found by searching for known bytes.
size_t find_bytes(const std::vector<uint8_t>& b, const std::string& needle) {
  auto it = std::search(b.begin(), b.end(), needle.begin(), needle.end());
  EXPECT_NE(it, b.end()) << needle;
  return size_t(it - b.begin());
}

template <class T>
void poke(std::vector<uint8_t>& b, size_t at, T v) {
  std::memcpy(b.data() + at, &v, sizeof v);
}

}  // namespace

TEST(Gguf, WrittenFilesReadBackTheSame) {
  for (uint32_t alignment : {32u, 64u}) {
    SCOPED_TRACE(alignment);
    const GgufWriter w = sample_writer(alignment);
    const std::string path = test::temp_path("sample.gguf");
    w.write(path);
    const auto f = GgufFile::open(path);
    EXPECT_EQ(f->version(), 3u);
    EXPECT_EQ(f->alignment(), alignment);
    EXPECT_EQ(f->str("general.architecture"), "llama");
    EXPECT_EQ(f->integer("llama.block_count"), 2);
    EXPECT_EQ(f->number("llama.rope.freq_base"), 10000.0);
    EXPECT_EQ(f->integer("some.signed"), -7);
    EXPECT_EQ(f->integer("some.big"), int64_t(1) << 40);
    EXPECT_TRUE(f->value("tokenizer.ggml.add_bos_token").b);
    EXPECT_EQ(f->strings("tokenizer.ggml.tokens"), (std::vector<std::string>{"<unk>", "<s>", "</s>", "\xe2\x96\x81" "a"}));
    EXPECT_EQ(f->numbers("tokenizer.ggml.scores"), (std::vector<double>{0, 0, 0, -1.5}));
    EXPECT_EQ(f->numbers("tokenizer.ggml.token_type"), (std::vector<double>{2, 3, 3, 1}));
    ASSERT_EQ(f->tensors().size(), 4u);
    const auto* emb = f->find("token_embd.weight");
    ASSERT_TRUE(emb);
    EXPECT_EQ(emb->ne, (std::vector<int64_t>{4, 2}));
    std::vector<float> got(8);
    std::memcpy(got.data(), emb->data, 32);
    EXPECT_EQ(got, (std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7}));
    for (const GgufTensor& t : f->tensors()) {
      EXPECT_EQ(t.offset % alignment, 0u) << t.name;
      EXPECT_EQ(uintptr_t(t.data - f->tensors()[0].data) % alignment, 0u) << t.name;
    }
    const auto* q4 = f->find("blk.0.ffn_up.weight");
    ASSERT_TRUE(q4);
    EXPECT_EQ(q4->bytes, 2u * 18u);
    EXPECT_EQ(f->find("nope"), nullptr);
    // Typed access names the key and the type.
    try {
      (void)f->str("llama.block_count");
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("'llama.block_count' is a uint32"), std::string::npos) << e.what();
    }
    EXPECT_THROW((void)f->integer("missing.key"), Error);
  }
}

// write() streams one tensor at a time (fills made only then): the file on disk is bytes() to the
// byte, tensors given as fills are written where their infos say, and a fill that throws leaves
// neither the file nor its temporary behind.
TEST(Gguf, StreamedWriteEqualsTheBytesAndFailsCleanly) {
  for (uint32_t alignment : {32u, 64u}) {
    SCOPED_TRACE(alignment);
    GgufWriter w = sample_writer(alignment);
    int made = 0;
    w.add_tensor("blk.1.attn_norm.weight", {5}, quant::kF32, [&made](uint8_t* dst) {
      ++made;
      for (int i = 0; i < 5; ++i) {
        const float v = float(i) * 0.25f - 1.f;
        std::memcpy(dst + i * 4, &v, 4);
      }
    });
    EXPECT_EQ(made, 0) << "a fill runs only when the file is written";
    const std::string path = test::temp_path("streamed.gguf");
    w.write(path);
    EXPECT_EQ(made, 1);
    std::ifstream in(path, std::ios::binary);
    const std::vector<uint8_t> disk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(disk, w.bytes());
    const auto f = GgufFile::open(path);
    const auto* t = f->find("blk.1.attn_norm.weight");
    ASSERT_TRUE(t);
    EXPECT_EQ(t->offset % alignment, 0u);
    std::vector<float> got(5);
    std::memcpy(got.data(), t->data, 20);
    EXPECT_EQ(got, (std::vector<float>{-1.f, -0.75f, -0.5f, -0.25f, 0.f}));

    GgufWriter bad = sample_writer(alignment);
    bad.add_tensor("blk.1.ffn_norm.weight", {2}, quant::kF32, [](uint8_t*) { fail("test weights", "cannot be read"); });
    const std::string bad_path = test::temp_path("failed.gguf");
    EXPECT_THROW(bad.write(bad_path), Error);
    EXPECT_FALSE(std::filesystem::exists(bad_path));
    EXPECT_FALSE(std::filesystem::exists(bad_path + ".tmp"));
  }
  GgufWriter w;
  EXPECT_THROW(w.add_tensor("x", {4}, quant::kF32, GgufWriter::Fill{}), Error) << "an empty fill";
  EXPECT_THROW(w.add_tensor("x", {4}, quant::kF32, std::vector<uint8_t>(12)), Error) << "12 bytes for 4 floats";
}

// Every prefix of a valid file is refused with an Error (never a crash), and only the whole file
// is accepted.
TEST(Gguf, EveryTruncationIsAnError) {
  const std::vector<uint8_t> b = sample_writer().bytes();
  for (size_t n = 0; n < b.size(); ++n) {
    bool accepted = false;
    try {
      GgufFile::parse(b.data(), n, "cut.gguf");
      accepted = true;
    } catch (const Error&) {
    }
    // A cut inside the last tensor's padding-free data is the only place a shorter file could
    // still hold everything; the sample's last tensor ends the file, so nothing shorter passes.
    EXPECT_FALSE(accepted) << "accepted a file cut at byte " << n << " of " << b.size();
  }
  EXPECT_NO_THROW(GgufFile::parse(b.data(), b.size(), "whole.gguf"));
}

TEST(Gguf, LiesAreRefusedWithOneClearError) {
  const std::vector<uint8_t> good = sample_writer().bytes();
  {
    auto b = good;
    b[0] = 'X';
    expect_refused(b, "not a GGUF file");
  }
  {
    auto b = good;
    poke<uint32_t>(b, 4, 1);
    expect_refused(b, "GGUF version 1 is not supported");
  }
  {
    auto b = good;
    poke<uint64_t>(b, 16, uint64_t(1) << 40);  // metadata count
    expect_refused(b, "metadata pairs, more than the file can hold");
  }
  {
    auto b = good;
    poke<uint64_t>(b, 8, uint64_t(1) << 40);  // tensor count
    expect_refused(b, "tensors, more than the file can hold");
  }
  {
    auto b = good;  // the first key's length
    poke<uint64_t>(b, 24, uint64_t(1) << 50);
    expect_refused(b, "needs 1125899906842624 bytes");
  }
  {
    auto b = good;  // the first value's type (after the key "general.architecture")
    poke<uint32_t>(b, find_bytes(b, "general.architecture") + 20, 77);
    expect_refused(b, "unknown value type 77");
  }
  {
    auto b = good;  // the bool
    const size_t at = find_bytes(b, "tokenizer.ggml.add_bos_token") + 28 + 4;
    b[at] = 2;
    expect_refused(b, "bool holding 2");
  }
  {
    auto b = good;  // the string array's count
    poke<uint64_t>(b, find_bytes(b, "tokenizer.ggml.tokens") + 21 + 4 + 4, uint64_t(1) << 60);
    expect_refused(b, "elements of string, more than");
  }
  {
    auto b = good;  // an array of arrays
    poke<uint32_t>(b, find_bytes(b, "tokenizer.ggml.scores") + 21 + 4, 9);
    expect_refused(b, "array of arrays");
  }
  // Tensor infos: name, n_dims, ne..., type, offset. "token_embd.weight" is the first.
  const size_t t0 = find_bytes(good, "token_embd.weight") + 17;
  {
    auto b = good;
    poke<uint32_t>(b, t0, 5);
    expect_refused(b, "has 5 dimensions");
  }
  {
    auto b = good;
    poke<uint64_t>(b, t0 + 4, 0);
    expect_refused(b, "has a dimension of 0");
  }
  {
    auto b = good;
    poke<uint32_t>(b, t0 + 4 + 16, 99);
    expect_refused(b, "unknown ggml type 99");
  }
  {
    auto b = good;  // F32 [4, 2] declared Q8_0: rows of 4 are not whole blocks of 32
    poke<uint32_t>(b, t0 + 4 + 16, quant::kQ8_0);
    expect_refused(b, "not a whole number of blocks");
  }
  {
    auto b = good;
    poke<uint64_t>(b, t0 + 4 + 16 + 4, 4);
    expect_refused(b, "is not a multiple of the alignment 32");
  }
  {
    auto b = good;
    poke<uint64_t>(b, t0 + 4 + 16 + 4, 1 << 20);
    expect_refused(b, "lies beyond the end");
  }
  {
    auto b = good;  // the second tensor placed on the first
    const size_t t1 = find_bytes(good, "blk.0.attn_q.weight") + 19;
    poke<uint64_t>(b, t1 + 4 + 16 + 4, 0);
    expect_refused(b, "overlap");
  }
  {
    GgufWriter w;  // two keys of one length, the second renamed to the first
    w.set("dup.a", GgufValue::of_u32(1));
    w.set("dup.b", GgufValue::of_u32(2));
    w.add_tensor("t.a", {1}, quant::kF32, f32_bytes({1}));
    w.add_tensor("t.b", {1}, quant::kF32, f32_bytes({2}));
    auto b = w.bytes();
    b[find_bytes(b, "dup.b") + 4] = 'a';
    expect_refused(b, "the metadata key 'dup.a' appears twice");
    b = w.bytes();
    b[find_bytes(b, "t.b") + 2] = 'a';
    expect_refused(b, "tensor 't.a' appears twice");
  }
  {
    GgufWriter w;  // a duplicate tensor is refused by the writer already
    w.add_tensor("a", {1}, quant::kF32, f32_bytes({1}));
    EXPECT_THROW(w.add_tensor("a", {1}, quant::kF32, f32_bytes({1})), Error);
    EXPECT_THROW(w.add_tensor("b", {2}, quant::kF32, f32_bytes({1})), Error) << "wrong byte count";
    EXPECT_THROW(GgufWriter(48), Error) << "alignment not a power of two";
  }
  {
    GgufWriter w(64);
    auto b = w.bytes();  // general.alignment = 64; make it 48
    poke<uint32_t>(b, find_bytes(b, "general.alignment") + 17 + 4, 48);
    expect_refused(b, "is not a power of two");
  }
}

// Q8_0: q = round(x / d) with d = max|x| / 127, stored d16 = half(d): |x - q d16| <= d / 2 + 127 |d - d16|
// <= d (1/2 + 127 * 2^-11). Q4_0: n = min(15, trunc(x / d + 8.5)) with d = m / -8: |x - (n - 8) d16|
// <= |d| + 8 |d - d16| (the rounding's half step, or a whole step where the top value is clamped).
TEST(Quant, RoundTripsWithinTheirArithmetic) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 1.f);
  const int n = 32 * 64;
  std::vector<float> x(n), y(n);
  for (float& v : x) v = dist(rng) * (rng() % 3 == 0 ? 10.f : 0.1f);
  for (uint32_t type : {quant::kQ8_0, quant::kQ4_0}) {
    std::vector<uint8_t> q(quant::row_bytes(type, n));
    quant::quantize_row(type, x.data(), q.data(), n);
    quant::dequantize_row(type, q.data(), y.data(), n);
    for (int b = 0; b < n / 32; ++b) {
      float amax = 0, m = 0;
      for (int j = 0; j < 32; ++j)
        if (std::fabs(x[size_t(b * 32 + j)]) > amax) amax = std::fabs(x[size_t(b * 32 + j)]), m = x[size_t(b * 32 + j)];
      const double d = type == quant::kQ8_0 ? amax / 127.0 : std::fabs(m / 8.0);
      const double bound = type == quant::kQ8_0 ? d * (0.5 + 127.0 / 2048) : d * (1.0 + 8.0 / 2048);
      for (int j = 0; j < 32; ++j)
        ASSERT_LE(std::fabs(double(x[size_t(b * 32 + j)]) - y[size_t(b * 32 + j)]), bound * (1 + 1e-6))
            << (type == quant::kQ8_0 ? "Q8_0" : "Q4_0") << " block " << b << " element " << j;
    }
  }
  // F16 / BF16 round trips are exact for values they hold.
  const std::vector<float> exact = {0.f, 1.f, -2.5f, 0.125f, 65504.f};
  for (uint32_t type : {quant::kF16, quant::kBF16, quant::kF32}) {
    std::vector<uint8_t> q(quant::row_bytes(type, 5));
    std::vector<float> back(5);
    quant::quantize_row(type, exact.data(), q.data(), 5);
    quant::dequantize_row(type, q.data(), back.data(), 5);
    if (type == quant::kBF16) back[4] = 65504.f;  // not a bfloat16 value
    EXPECT_EQ(back, exact);
  }
}

// The block layouts spelled out: a Q8_0 block is d then 32 int8; a Q4_0 block is d then 16 bytes
// whose low nibbles are elements 0..15 and high nibbles 16..31, each minus 8.
TEST(Quant, BlockLayouts) {
  std::vector<uint8_t> q8(34), q4(18);
  const uint16_t two = f32_to_f16(2.f);
  std::memcpy(q8.data(), &two, 2);
  std::memcpy(q4.data(), &two, 2);
  for (int j = 0; j < 32; ++j) q8[size_t(2 + j)] = uint8_t(int8_t(j - 16));
  for (int j = 0; j < 16; ++j) q4[size_t(2 + j)] = uint8_t(j | ((15 - j) << 4));
  std::vector<float> a(32), b(32);
  quant::dequantize_row(quant::kQ8_0, q8.data(), a.data(), 32);
  quant::dequantize_row(quant::kQ4_0, q4.data(), b.data(), 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(a[size_t(j)], 2.f * float(j - 16));
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(b[size_t(j)], 2.f * float(j - 8));
    EXPECT_EQ(b[size_t(j + 16)], 2.f * float(15 - j - 8));
  }
  EXPECT_THROW(quant::dequantize_row(quant::kQ8_0, q8.data(), a.data(), 31), Error);
  EXPECT_THROW(quant::quantize_row(quant::kQ4_K, a.data(), q8.data(), 256), Error) << "K types are read only";
  const float bad[32] = {NAN};
  EXPECT_THROW(quant::quantize_row(quant::kQ4_0, bad, q4.data(), 32), Error);
}

// Against ggml itself (tests/data/ref/ggml_quants.bin, written by tools/ggml_quant_reference.c with
// ggml v0.21.0-2): the same 1024 values quantised by ggml as Q8_0, Q4_0, Q4_K and Q6_K, and its
// dequantisation of them. Dequantising ggml's bytes must give ggml's floats bit for bit, and our
// Q8_0 / Q4_0 quantiser must write ggml's bytes.
TEST(Quant, MatchesGgmlBitForBit) {
  std::ifstream f(test::data_path("ref/ggml_quants.bin"), std::ios::binary);
  ASSERT_TRUE(f) << "tests/data/ref/ggml_quants.bin";
  auto get_u32 = [&] {
    uint32_t v = 0;
    f.read(reinterpret_cast<char*>(&v), 4);
    return v;
  };
  std::set<uint32_t> seen;
  for (int k = 0; k < 4; ++k) {
    const uint32_t type = get_u32(), n = get_u32();
    ASSERT_TRUE(f && n == 1024) << "entry " << k;
    std::vector<float> x(n), ref(n), got(n);
    f.read(reinterpret_cast<char*>(x.data()), std::streamsize(n) * 4);
    const uint32_t nb = get_u32();
    std::vector<uint8_t> q(nb);
    f.read(reinterpret_cast<char*>(q.data()), nb);
    f.read(reinterpret_cast<char*>(ref.data()), std::streamsize(n) * 4);
    ASSERT_TRUE(f);
    SCOPED_TRACE(type);
    seen.insert(type);
    ASSERT_EQ(nb, quant::row_bytes(type, n));
    quant::dequantize_row(type, q.data(), got.data(), n);
    for (uint32_t i = 0; i < n; ++i)
      ASSERT_EQ(std::memcmp(&got[i], &ref[i], 4), 0) << "element " << i << ": " << got[i] << " vs ggml's " << ref[i];
    if (type == quant::kQ8_0 || type == quant::kQ4_0) {
      std::vector<uint8_t> mine(nb);
      quant::quantize_row(type, x.data(), mine.data(), n);
      for (uint32_t i = 0; i < nb; ++i) ASSERT_EQ(mine[i], q[i]) << "byte " << i << " of the quantised row";
    }
  }
  EXPECT_EQ(seen, (std::set<uint32_t>{quant::kQ8_0, quant::kQ4_0, quant::kQ4_K, quant::kQ6_K}));
}

// The GGUF export of a checkpoint (src/model/gguf_export.h): llama.cpp's LLaMA names and metadata,
// every matrix the checkpoint's (rounded to the chosen type), q and k rows in ggml's RoPE order.
// (bench/gguf_llamacpp.sh checks the files in llama.cpp itself: the same greedy tokens at F16.)
TEST(GgufExport, TheLanguageModelInLlamaCppsLayout) {
  const auto model = Model::load(test::data_path("fixtures/llama_text"));
  const Tokenizer tok(test::data_path("fixtures/llama_text/tokenizer.model"));
  const TextConfig& t = model->config().text;
  const std::string path = test::temp_path("export.gguf");
  GgufExportOptions opt;
  opt.type = quant::kF16;
  export_text_gguf(*model, tok, path, opt);
  const auto f = GgufFile::open(path);
  EXPECT_EQ(f->str("general.architecture"), "llama");
  EXPECT_EQ(f->integer("general.file_type"), 1);
  EXPECT_EQ(f->integer("llama.block_count"), t.n_layers);
  EXPECT_EQ(f->integer("llama.embedding_length"), t.hidden);
  EXPECT_EQ(f->integer("llama.feed_forward_length"), t.intermediate);
  EXPECT_EQ(f->integer("llama.attention.head_count"), t.n_heads);
  EXPECT_EQ(f->integer("llama.attention.head_count_kv"), t.n_kv_heads);
  EXPECT_EQ(f->integer("llama.rope.dimension_count"), t.head_dim);
  EXPECT_FLOAT_EQ(float(f->number("llama.attention.layer_norm_rms_epsilon")), t.rms_eps);
  EXPECT_EQ(f->str("tokenizer.ggml.model"), "llama");
  const std::vector<std::string> pieces = f->strings("tokenizer.ggml.tokens");
  ASSERT_EQ(int(pieces.size()), tok.vocab_size());
  for (int i : {0, 1, 2, 100, tok.vocab_size() - 1}) {
    EXPECT_EQ(pieces[size_t(i)], tok.id_to_piece(i));
    EXPECT_EQ(f->numbers("tokenizer.ggml.scores")[size_t(i)], double(tok.score(i)));
  }
  EXPECT_EQ(f->numbers("tokenizer.ggml.token_type")[size_t(tok.bos_id())], 3.0) << "BOS is a control token";
  EXPECT_EQ(f->integer("tokenizer.ggml.bos_token_id"), tok.bos_id());
  EXPECT_EQ(f->tensors().size(), size_t(1 + 9 * t.n_layers + 2));  // token_embd, the blocks, output_norm, output

  // A matrix as the file holds it, row r as floats.
  auto file_row = [&](const std::string& name, int64_t r) {
    const GgufTensor* g = f->find(name);
    EXPECT_TRUE(g) << name;
    std::vector<float> out(size_t(g->ne[0]));
    quant::dequantize_row(g->type, g->data + size_t(r) * quant::row_bytes(g->type, g->ne[0]), out.data(), g->ne[0]);
    return out;
  };
  // The checkpoint's row r, rounded to F16 as the export stores it.
  auto ckpt_row = [&](const TensorView& w, int64_t r) {
    const int64_t n = w.shape[1];
    std::vector<float> x(static_cast<size_t>(n));
    const uint32_t st = w.dtype == DType::F32 ? quant::kF32 : w.dtype == DType::F16 ? quant::kF16 : quant::kBF16;
    quant::dequantize_row(st, static_cast<const uint8_t*>(w.data) + size_t(r * n) * dtype_size(w.dtype), x.data(), n);
    std::vector<uint8_t> h(size_t(n) * 2);
    quant::quantize_row(quant::kF16, x.data(), h.data(), n);
    quant::dequantize_row(quant::kF16, h.data(), x.data(), n);
    return x;
  };
  const LlamaLayer& L0 = model->weights().lm.layers[0];
  const GgufTensor* q = f->find("blk.0.attn_q.weight");
  ASSERT_TRUE(q);
  EXPECT_EQ(q->ne, (std::vector<int64_t>{L0.q.w->shape[1], L0.q.w->shape[0]}));
  const int half = t.head_dim / 2;
  for (int h = 0; h < t.n_heads; ++h)
    for (int i = 0; i < half; ++i)
      for (int j = 0; j < 2; ++j)
        ASSERT_EQ(file_row("blk.0.attn_q.weight", h * t.head_dim + 2 * i + j), ckpt_row(*L0.q.w, h * t.head_dim + j * half + i))
            << "head " << h << " pair " << i << " element " << j;
  for (int r : {0, 1, t.head_dim - 1})
    EXPECT_EQ(file_row("blk.0.attn_v.weight", r), ckpt_row(*L0.v.w, r)) << "v rows keep their order";
  EXPECT_EQ(file_row("token_embd.weight", 5), ckpt_row(*model->weights().lm.embed, 5));
  std::vector<float> norm(size_t(t.hidden));
  std::memcpy(norm.data(), f->find("output_norm.weight")->data, norm.size() * 4);
  EXPECT_EQ(norm, model->weights().lm.norm.w);

  EXPECT_THROW(gguf_export_type("q5_k", "--type"), Error);
  opt.type = quant::kQ4_K;
  EXPECT_THROW(export_text_gguf(*model, tok, path, opt), Error);
}

// The tokenizer a GGUF file carries (tokenizer.ggml.*) is the checkpoint's: exported, read back
// with Tokenizer::from_pieces, it encodes and decodes every text as the original SentencePiece
// model does, on the bundled model (with its user-defined <image> piece) and a LLaMA fixture.
TEST(GgufExport, TheTokenizerReadBackEncodesAsTheOriginal) {
  const std::vector<std::string> texts = {
      "Describe the image in detail.", "USER: <image>\nWhat is this? ASSISTANT:", "  two  spaces and a tab\there",
      "numbers 1234567890 and symbols #$%&*()[]{}", "accents: café, naïve, Zürich; CJK: 東京; emoji: \xF0\x9F\x98\x80",
      "", " ", "line\nbreaks\n\n", "a red circle above a blue square, to the left of a green triangle"};
  for (const std::string& dir : {std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny", test::data_path("fixtures/llama_text")}) {
    SCOPED_TRACE(dir);
    const auto model = Model::load(dir);
    const Tokenizer tok(dir + "/tokenizer.model");
    const std::string path = test::temp_path("tok.gguf");
    export_text_gguf(*model, tok, path, GgufExportOptions{});
    const auto f = GgufFile::open(path);
    std::vector<float> scores;
    for (double x : f->numbers("tokenizer.ggml.scores")) scores.push_back(float(x));
    std::vector<int> types;
    for (double x : f->numbers("tokenizer.ggml.token_type")) types.push_back(int(x));
    const auto back = Tokenizer::from_pieces(f->strings("tokenizer.ggml.tokens"), scores, types,
                                             int(f->integer("tokenizer.ggml.bos_token_id")),
                                             int(f->integer("tokenizer.ggml.eos_token_id")),
                                             int(f->integer("tokenizer.ggml.unknown_token_id")), path);
    ASSERT_EQ(back->vocab_size(), tok.vocab_size());
    EXPECT_EQ(back->bos_id(), tok.bos_id());
    EXPECT_EQ(back->eos_id(), tok.eos_id());
    for (int i = 0; i < tok.vocab_size(); ++i) {
      ASSERT_EQ(back->id_to_piece(i), tok.id_to_piece(i)) << i;
      ASSERT_EQ(back->gguf_token_type(i), tok.gguf_token_type(i)) << i;
      ASSERT_EQ(back->score(i), tok.score(i)) << i;
    }
    for (const std::string& t : texts) {
      SCOPED_TRACE(t);
      EXPECT_EQ(back->encode(t), tok.encode(t));
      EXPECT_EQ(back->encode_hf(t, true), tok.encode_hf(t, true));
      EXPECT_EQ(back->encode_continuation(t), tok.encode_continuation(t));
      EXPECT_EQ(back->decode(tok.encode(t)), tok.decode(tok.encode(t)));
    }
  }
  const int image = Tokenizer(std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny/tokenizer.model").piece_to_id("<image>");
  ASSERT_GE(image, 0);
  EXPECT_EQ(Tokenizer(std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny/tokenizer.model").gguf_token_type(image), 4)
      << "<image> is a user-defined piece";
  EXPECT_THROW(Tokenizer::from_pieces({"a"}, {0.f, 1.f}, {1}, 0, 0, 0, "bad"), Error);
  EXPECT_THROW(Tokenizer::from_pieces({"a"}, {0.f}, {9}, 0, 0, 0, "bad"), Error);
  EXPECT_THROW(Tokenizer::from_pieces({"a"}, {0.f}, {1}, 3, 0, 0, "bad"), Error);
}

// A checkpoint whose embedding table is longer than its tokenizer (llava-hf pads it: LLaVA-1.5-7B has
// 32064 rows for 32000 pieces; the fixture 386 for 384) exports with a placeholder piece per extra
// row, as llama.cpp's converter writes them, and loads back with the checkpoint's logits and tokens.
TEST(GgufExport, APaddedEmbeddingTableGetsPlaceholderPieces) {
  const std::string dir = test::data_path("fixtures/llava_hf_mha");
  const auto model = Model::load(dir);
  const Tokenizer tok(dir + "/tokenizer.model");
  const int V = model->config().text.vocab_size, n = tok.vocab_size();
  ASSERT_GT(V, n) << "the fixture's table is padded";
  const std::string path = test::temp_path("padded.gguf");
  GgufExportOptions opt;
  opt.type = quant::kF32;
  export_text_gguf(*model, tok, path, opt);
  const auto f = GgufFile::open(path);
  const std::vector<std::string> pieces = f->strings("tokenizer.ggml.tokens");
  const std::vector<double> types = f->numbers("tokenizer.ggml.token_type");
  ASSERT_EQ(int(pieces.size()), V);
  ASSERT_EQ(int(types.size()), V);
  for (int i = 0; i < n; ++i) ASSERT_EQ(pieces[size_t(i)], tok.id_to_piece(i)) << i;
  for (int i = n; i < V; ++i) {
    EXPECT_EQ(pieces[size_t(i)], "[PAD" + std::to_string(i) + "]");
    EXPECT_EQ(types[size_t(i)], 5) << "unused";
  }
  const auto back = Model::load(path);
  const auto back_tok = gguf_tokenizer(path);
  EXPECT_EQ(back_tok->vocab_size(), V);
  const Engine e1(*model, tok), e2(*back, *back_tok);
  PromptRequest req;
  req.text = "a red circle above a blue square";
  req.tmpl = Template::Raw;
  const PreparedPrompt p1 = e1.prepare(req), p2 = e2.prepare(req);
  ASSERT_EQ(p1.ids, p2.ids) << "the placeholders are never produced by encoding";
  SamplingOptions s;
  s.max_tokens = 8;
  s.ignore_eos = true;
  FullPolicy f1, f2;
  const GenerationResult a = e1.generate(p1, s, f1), b = e2.generate(p2, s, f2);
  EXPECT_EQ(a.first_logits, b.first_logits);
  EXPECT_EQ(a.tokens, b.tokens);
}

// A GGUF language model loads as the checkpoint it was exported from: an F32 export of a float32
// checkpoint holds the same values, so the prefill's logits and greedy tokens are bit-identical;
// the q / k rows come back from ggml's RoPE order. Files prefixkv cannot run are clear errors.
TEST(GgufLoad, AnExportLoadsBackAsTheCheckpoint) {
  const std::string dir = test::data_path("fixtures/llama_text");
  const auto model = Model::load(dir);
  const Tokenizer tok(dir + "/tokenizer.model");
  const std::string path = test::temp_path("load.gguf");
  GgufExportOptions opt;
  opt.type = quant::kF32;
  export_text_gguf(*model, tok, path, opt);
  const auto back = Model::load(path);
  const auto back_tok = gguf_tokenizer(path);
  EXPECT_EQ(back->config().text.n_layers, model->config().text.n_layers);
  EXPECT_EQ(back->config().text.n_kv_heads, model->config().text.n_kv_heads);
  EXPECT_FALSE(back->has_vision());
  const Engine e1(*model, tok), e2(*back, *back_tok);
  PromptRequest req;
  req.text = "The quick brown fox jumps over the lazy dog";
  req.tmpl = Template::Raw;
  const PreparedPrompt p1 = e1.prepare(req), p2 = e2.prepare(req);
  ASSERT_EQ(p1.ids, p2.ids);
  SamplingOptions s;
  s.max_tokens = 12;
  s.ignore_eos = true;
  FullPolicy f1, f2;
  const GenerationResult a = e1.generate(p1, s, f1), b = e2.generate(p2, s, f2);
  EXPECT_EQ(a.first_logits, b.first_logits) << "the same weights, the same products";
  EXPECT_EQ(a.tokens, b.tokens);

  // A quantised file loads and runs on the CPU: its batched steps equal single ones bit for bit
  // (the engine's invariant; tests above bound its products).
  opt.type = quant::kQ8_0;
  const std::string q8 = test::temp_path("load_q8.gguf");
  export_text_gguf(*model, tok, q8, opt);  // the fixture's rows (64, 128) are whole Q8_0 blocks
  const auto mq = Model::load(q8);
  const Engine eq(*mq, *back_tok);
  const PreparedPrompt pq = eq.prepare(req);
  FullPolicy fa, fb;
  Session sa(*mq, fa), sb(*mq, fb);
  std::vector<float> la(size_t(mq->config().text.vocab_size)), lb(la.size()), lab(2 * la.size());
  sa.prefill(pq, la.data());
  sb.prefill(pq, lb.data());
  ASSERT_EQ(la, lb);
  const int32_t tokens[2] = {17, 17};
  Session::step_many({&sa, &sb}, tokens, lab.data());
  Session sc(*mq, fa);
  sc.prefill(pq, la.data());
  sc.step(17, la.data());
  EXPECT_TRUE(std::equal(la.begin(), la.end(), lab.begin())) << "batched = single";
  GgufWriter w;
  w.set("general.architecture", GgufValue::of_string("gpt2"));
  w.write(test::temp_path("gpt2.gguf"));
  try {
    Model::load(test::temp_path("gpt2.gguf"));
    ADD_FAILURE() << "a gpt2 file loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'gpt2'"), std::string::npos) << e.what();
  }
}

// Products with block-quantised weights (ops::linear on a TensorView with `quant`): the weights'
// rows are dequantised block by block, so the result is the float product with the dequantised
// matrix, within float summation's bound |error| <= n u / (1 - n u) * sum |x_i w_i| (u = 2^-24);
// batched rows (linear_rows) equal one row at a time bit for bit; the embedding reads a row too.
TEST(QuantLinear, ProductsWithDequantisedBlocks) {
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.f, 1.f);
  const int in = 64, out = 48;
  std::vector<float> w(size_t(in) * out);
  for (float& v : w) v = dist(rng);
  for (uint32_t type : {quant::kQ8_0, quant::kQ4_0}) {
    SCOPED_TRACE(type);
    std::vector<uint8_t> q(quant::row_bytes(type, in) * out);
    for (int o = 0; o < out; ++o) quant::quantize_row(type, &w[size_t(o) * in], &q[size_t(o) * quant::row_bytes(type, in)], in);
    std::vector<float> deq(w.size());
    for (int o = 0; o < out; ++o) quant::dequantize_row(type, &q[size_t(o) * quant::row_bytes(type, in)], &deq[size_t(o) * in], in);
    TensorView tv;
    tv.name = "w";
    tv.shape = {out, in};
    tv.data = q.data();
    tv.quant = type;
    tv.supported = true;
    Linear L;
    L.w = &tv;
    L.in = in, L.out = out;
    std::vector<float> row(in);
    ops::weight_row(tv, 7, in, row.data());
    EXPECT_TRUE(std::equal(row.begin(), row.end(), deq.begin() + 7 * in));
    for (int rows : {1, 2, 5, 40}) {
      std::vector<float> x(size_t(rows) * in), y(size_t(rows) * out);
      for (float& v : x) v = dist(rng);
      ops::linear(x.data(), rows, L, y.data());
      const double u = std::ldexp(1.0, -24), gamma = in * u / (1 - in * u);
      for (int r = 0; r < rows; ++r)
        for (int o = 0; o < out; ++o) {
          double exact = 0, mag = 0;
          for (int i = 0; i < in; ++i) {
            exact += double(x[size_t(r) * in + i]) * deq[size_t(o) * in + i];
            mag += std::fabs(double(x[size_t(r) * in + i]) * deq[size_t(o) * in + i]);
          }
          ASSERT_LE(std::fabs(y[size_t(r) * out + o] - exact), gamma * mag + 1e-30) << rows << " rows, r " << r << " o " << o;
        }
      std::vector<float> batched(y.size()), one(static_cast<size_t>(out));
      ops::linear_rows(x.data(), rows, L, batched.data());
      for (int r = 0; r < rows; ++r) {
        ops::linear(x.data() + size_t(r) * in, 1, L, one.data());
        ASSERT_TRUE(std::equal(one.begin(), one.end(), batched.begin() + size_t(r) * out)) << "row " << r;
      }
    }
  }
}
