#!/usr/bin/env python3
"""Writes the seed corpora of the JSON / safetensors / text fuzz targets (tests/fuzz/corpus/) from the
repository's own data: the fixtures' config files, the bundled model's profile and index, the
tokenizer fixture texts, and the image seeds (made by tools/make_image_seeds.cc; run that first).
Small on purpose: long seeds only slow every mutation down. Run from the repository root:
    python3 tests/fuzz/tools/make_seeds.py
"""
import base64
import json
import os
import struct

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(rel, mode="r"):
    with open(os.path.join(ROOT, rel), mode) as f:
        return f.read()


def compact(obj):
    return json.dumps(obj, separators=(",", ":"))


# ---- safetensors: small files in the format's corner cases
def st(header, data, pad_to=None):
    h = compact(header).encode()
    if pad_to:
        h += b" " * (-(8 + len(h)) % pad_to)
    return struct.pack("<Q", len(h)) + h + data


f32 = struct.pack("<4f", 1, 2, 3, 4)
put("fuzz_safetensors", "two_tensors", st({"__metadata__": {"format": "pt"},
                                           "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                                           "b": {"dtype": "BF16", "shape": [2], "data_offsets": [16, 20]}},
                                          f32 + b"\x80\x3f\x00\x40", pad_to=8))
put("fuzz_safetensors", "unaligned", st({"w": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]}}, b"\x00\x3c" * 3))
put("fuzz_safetensors", "scalar_and_empty", st({"s": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
                                                "e": {"dtype": "U8", "shape": [0, 5], "data_offsets": [8, 8]},
                                                "f8": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [8, 10]}},
                                               struct.pack("<q", 7) + b"\x01\x02"))
# The real header of one of the fixtures' shards, with its data section cut to the first tensor.
shard = read("tests/data/fixtures/llava_orig_sharded/model-00003-of-00003.safetensors", "rb")
hlen = struct.unpack("<Q", shard[:8])[0]
hdr = json.loads(shard[8:8 + hlen])
name, info = sorted(((k, v) for k, v in hdr.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])[0]
b, e = info["data_offsets"]
put("fuzz_safetensors", "fixture_first_tensor", st({name: info}, shard[8 + hlen + b:8 + hlen + e]))

# ---- the sharded index: the harness's folder holds model-00001-of-00002 (a, b) and -00002 (c)
s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
put("fuzz_safetensors_index", "both_shards", json.dumps({"metadata": {"total_size": 22},
                                                         "weight_map": {"a": s1, "b": s1, "c": s2}}, indent=1))
put("fuzz_safetensors_index", "one_shard", compact({"weight_map": {"c": s2}}))
put("fuzz_safetensors_index", "missing_tensor", compact({"weight_map": {"a": s1, "zz": s2}}))
idx = json.loads(read("tests/data/fixtures/llava_orig_sharded/model.safetensors.index.json"))
wm = dict(list(idx["weight_map"].items())[:6])
put("fuzz_safetensors_index", "fixture_prefix", json.dumps({"metadata": idx["metadata"], "weight_map": wm}, indent=1))

# ---- config.json [\0 preprocessor_config.json [\0 generation_config.json [\0 tower/config.json]]]
fx = "tests/data/fixtures/"
for d in sorted(os.listdir(os.path.join(ROOT, fx))):
    parts = [compact(json.loads(read(fx + d + "/config.json")))]
    pre = os.path.join(ROOT, fx, d, "preprocessor_config.json")
    gen = os.path.join(ROOT, fx, d, "generation_config.json")
    if os.path.exists(pre) or os.path.exists(gen):
        parts.append(compact(json.loads(read(fx + d + "/preprocessor_config.json"))) if os.path.exists(pre) else "{}")
    if os.path.exists(gen):
        parts.append(compact(json.loads(read(fx + d + "/generation_config.json"))))
    put("fuzz_config", d, "\0".join(parts))
# The original layout with a separate CLIP tower (the fourth part).
orig = json.loads(read(fx + "llava_orig_nocip/config.json"))
orig.pop("mm_vision_tower_config", None)
orig["mm_projector_type"] = "mlp2x_gelu"
put("fuzz_config", "orig_with_tower", "\0".join([compact(orig), "{}", "{}", compact(json.loads(read(fx + "clip_separate/config.json")))]))
tiny = "models/prefixkv-llava-tiny/"
put("fuzz_config", "bundled", "\0".join(compact(json.loads(read(tiny + n))) for n in
                                        ("config.json", "preprocessor_config.json", "generation_config.json")))

# ---- profiles
prof = json.loads(read(tiny + "prefixkv_profile.json"))
prof["source"]["sample_ids"] = prof["source"]["sample_ids"][:2]
prof["source"]["samples"] = 2
put("fuzz_profile", "bundled_two_budgets", json.dumps(dict(prof, budgets=prof["budgets"][:2]), indent=1))
small = {"format": "prefixkv-profile", "version": 1, "model": {"name": "m", "fingerprint": "", "n_layers": 4},
         "importance": {"estimator": "paper", "window": 0}, "protected_tokens": 2,
         "source": {"kind": "imported", "files": [{"file": "prefixkv_m_0.5.json", "evicted": 0.5, "mean_evicted": 0.49}]},
         "budgets": [{"budget": 0.5, "keep": [0.9, 0.5, 0.3, 0.31]}]}
put("fuzz_profile", "imported", compact(small))
cal = dict(small, source={"kind": "calibrated", "samples": 1, "data": "d.json", "date": "2026-01-01", "sample_ids": [7]},
           importance={"estimator": "window", "window": 4, "allocation": "prompt"},
           budgets=[{"budget": 0.25, "keep": [0.1, 0.2, 0.3, 0.4], "keep_std": [0, 0, 0, 0.1],
                     "keep_min": [0, 0.1, 0.2, 0.3], "keep_max": [0.2, 0.3, 0.4, 0.5]},
                    {"budget": 1, "keep": [1, 1, 1, 1]}])
put("fuzz_profile", "calibrated_stats", compact(cal))

# ---- chat-completions bodies
png = read("tests/fuzz/corpus/fuzz_image/rgb.png", "rb")
uri = "data:image/png;base64," + base64.b64encode(png).decode()
put("fuzz_chat_request", "text", compact({"model": "prefixkv-llava-tiny", "messages": [{"role": "user", "content": "Hi"}]}))
put("fuzz_chat_request", "image_parts", compact({
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                              {"type": "image_url", "image_url": {"url": uri, "detail": "low"}}]}],
    "max_tokens": 16, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n", "END"],
    "stream": True, "stream_options": {"include_usage": True}, "kv_policy": "prefixkv-online", "kv_budget": 0.2}))
put("fuzz_chat_request", "multi_turn_local_path", compact({
    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "a.png"}]},
                 {"role": "assistant", "content": "A cat."},
                 {"role": "developer", "content": [{"type": "text", "text": "x"}]},
                 {"role": "user", "content": [{"type": "text", "text": "And?"}]}],
    "max_completion_tokens": 8.0, "n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
    "response_format": {"type": "text"}, "tools": [], "ignore_eos": True, "stop": "x"}))
put("fuzz_chat_request", "file_uri_subdir", compact({
    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://sub/../a.png"}}]}]}))
wrapped = "data:image/png;base64," + "\n".join(base64.b64encode(png[:40]).decode()[i:i + 16] for i in range(0, 56, 16))
put("fuzz_chat_request", "wrapped_base64", compact({
    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": wrapped}}]}],
    "max_tokens": None, "temperature": None}))

# ---- tokenizer: flag byte (bit 0 first section, 1 encode + continuation, 2 ids, 3 piece) + text
cases = json.loads(read("tests/data/tokenizer/fixture_ids.json"))["cases"]
texts = [c["text"] for c in cases if 0 < len(c["text"].encode()) <= 80]
picked = texts[::max(1, len(texts) // 10)][:10]
for i, t in enumerate(picked):
    put("fuzz_tokenizer", "fixture_%02d" % i, bytes([i % 16]) + t.encode())
put("fuzz_tokenizer", "spaces_utf8", b"\x0f  Hello,  w\xc3\xb6rld \xe2\x96\x81 \xf0\x9f\x98\x80 \t\n<s></s><unk>")
put("fuzz_tokenizer", "invalid_utf8", b"\x07\xff\xfe\xc3\x28\xe2\x82 \x80\x80 abc")

# ---- fuzz_gguf: small GGUF files (the container of src/io/gguf.h) written here byte by byte.
def gguf(kv, tensors, alignment=32):
    def s(x):
        x = x.encode()
        return struct.pack("<Q", len(x)) + x
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, (typ, val) in kv:
        out += s(key) + struct.pack("<I", typ)
        if typ == 8:
            out += s(val)
        elif typ == 9:
            et, items = val
            out += struct.pack("<IQ", et, len(items))
            for it in items:
                out += s(it) if et == 8 else struct.pack({0: "<B", 4: "<I", 5: "<i", 6: "<f", 7: "<B"}[et], it)
        else:
            out += struct.pack({0: "<B", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q"}[typ], val)
    offset, blobs = 0, []
    for name, ne, typ, blob in tensors:
        out += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", typ, offset)
        blobs.append((offset, blob))
        offset = (offset + len(blob) + alignment - 1) // alignment * alignment
    out += b"\0" * (-len(out) % alignment)
    start = len(out)
    for off, blob in blobs:
        out += b"\0" * (start + off - len(out)) + blob
    return out


half_one = struct.pack("<e", 1.0)
q8_block = half_one + bytes(range(32))
q4_block = half_one + bytes((i * 17) % 256 for i in range(16))
meta = [("general.architecture", (8, "llama")), ("llama.block_count", (4, 2)), ("llama.rope.freq_base", (6, 10000.0)),
        ("tokenizer.ggml.model", (8, "llama")),
        ("tokenizer.ggml.tokens", (9, (8, ["<unk>", "<s>", "</s>", "\u2581a"]))),
        ("tokenizer.ggml.scores", (9, (6, [0.0, 0.0, 0.0, -1.5]))),
        ("tokenizer.ggml.token_type", (9, (5, [2, 3, 3, 1]))), ("tokenizer.ggml.add_bos_token", (7, 1))]
put("fuzz_gguf", "llama_like", gguf(meta, [("token_embd.weight", [4, 2], 0, struct.pack("<8f", *range(8))),
                                           ("output_norm.weight", [8], 1, half_one * 8),
                                           ("blk.0.attn_q.weight", [32, 2], 8, q8_block * 2),
                                           ("blk.0.ffn_up.weight", [32], 2, q4_block)]))
put("fuzz_gguf", "aligned_64", gguf([("general.alignment", (4, 64))] + meta[:2],
                                    [("a", [32], 8, q8_block), ("b", [2, 2], 30, b"\x80\x3f" * 4)], alignment=64))
put("fuzz_gguf", "metadata_only", gguf(meta, []))
