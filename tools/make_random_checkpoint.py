#!/usr/bin/env python3
"""Writes a LLaVA-1.5-shaped checkpoint with random fp16 weights (llava-hf layout, sharded safetensors)
for speed and memory measurements on machines that cannot download the real weights.

    /usr/bin/python3 tools/make_random_checkpoint.py --shape llava-1.5-7b --out /tmp/llava7b-random \
        --tokenizer ../shared/reference/llama2-tokenizer/tokenizer.model

Only numpy is needed. The values are random but repeat in blocks (generating 7e9 independent normals
would take minutes longer and changes nothing for timing). Outputs are garbage text.
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

SHAPES = {
    "llava-1.5-7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32064,
                         v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16),
    "llava-1.5-13b": dict(hidden=5120, inter=13824, layers=40, heads=40, kv_heads=40, vocab=32064,
                          v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16),
}


def tensors(s):
    h, i, v = s["hidden"], s["inter"], s["v_hidden"]
    yield "language_model.model.embed_tokens.weight", (s["vocab"], h)
    for l in range(s["layers"]):
        p = f"language_model.model.layers.{l}."
        kv = s["kv_heads"] * (h // s["heads"])
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "language_model.model.norm.weight", (h,)
    yield "language_model.lm_head.weight", (s["vocab"], h)
    vp = "vision_tower.vision_model."
    yield vp + "embeddings.patch_embedding.weight", (v, 3, 14, 14)
    yield vp + "embeddings.class_embedding", (v,)
    yield vp + "embeddings.position_embedding.weight", (577, v)
    yield vp + "pre_layrnorm.weight", (v,)
    yield vp + "pre_layrnorm.bias", (v,)
    for l in range(s["v_layers"]):
        p = f"{vp}encoder.layers.{l}."
        for n in ("layer_norm1", "layer_norm2"):
            yield p + n + ".weight", (v,)
            yield p + n + ".bias", (v,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield p + "self_attn." + n + ".weight", (v, v)
            yield p + "self_attn." + n + ".bias", (v,)
        yield p + "mlp.fc1.weight", (s["v_inter"], v)
        yield p + "mlp.fc1.bias", (s["v_inter"],)
        yield p + "mlp.fc2.weight", (v, s["v_inter"])
        yield p + "mlp.fc2.bias", (v,)
    yield vp + "post_layernorm.weight", (v,)
    yield vp + "post_layernorm.bias", (v,)
    yield "multi_modal_projector.linear_1.weight", (h, v)
    yield "multi_modal_projector.linear_1.bias", (h,)
    yield "multi_modal_projector.linear_2.weight", (h, h)
    yield "multi_modal_projector.linear_2.bias", (h,)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5-7b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="tokenizer.model to copy (the LLaMA-2 one)")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    a = ap.parse_args()
    s = SHAPES[a.shape]
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 24) * 0.02).astype(np.float16)
    shards, cur, size = [], [], 0
    for name, shape in tensors(s):
        n = int(np.prod(shape)) * 2
        if cur and size + n > a.shard_gb * 1e9:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for k, items in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in items:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        total += off
        hb = json.dumps(header).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        with open(os.path.join(a.out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for name, shape in items:
                n = int(np.prod(shape))
                if name.endswith("norm.weight") or "layer_norm" in name and name.endswith(".weight") \
                        or "layrnorm.weight" in name:
                    arr = np.ones(n, np.float16)
                else:
                    start = (hash(name) & 0xFFFFFF)
                    reps = -(-(start + n) // block.size)
                    arr = np.tile(block, reps)[start:start + n] if reps < 64 else None
                    if arr is None:  # large tensors: write the block repeatedly
                        done = 0
                        while done < n:
                            m = min(block.size, n - done)
                            f.write(block[:m].tobytes())
                            done += m
                        continue
                f.write(arr.tobytes())
        print("wrote", fname, f"{off / 1e9:.2f} GB")
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "hidden_size": s["hidden"], "intermediate_size": s["inter"],
                        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
                        "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
        "vision_config": {"hidden_size": s["v_hidden"], "intermediate_size": s["v_inter"],
                          "num_hidden_layers": s["v_layers"], "num_attention_heads": s["v_heads"],
                          "image_size": 336, "patch_size": 14},
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    shutil.copy(a.tokenizer, os.path.join(a.out, "tokenizer.model"))
    print("done:", a.out, f"{total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
