#!/usr/bin/env python3
"""llama.cpp's image embeddings of an mmproj file against prefixkv's (bench/mmproj_llamacpp.sh).
A float64 numpy model of the LLaVA-1.5 tower and projector reads the F32 mmproj file and runs it two
ways: as prefixkv and transformers do (class token first, exact GELU) and as clip.cpp v0.4.0's
LLaVA graph does (tools/mtmd/models/llava.cpp: the class token concatenated after the patches while
the position and patch indices assume it first, ggml-org/llama.cpp issue 25814; ggml's tanh GELU).
Prints the largest difference of each pair relative to the reference's largest magnitude.
Usage: mmproj_compare.py MMPROJ_F32.gguf PIXELS.npy PREFIXKV.npy LLAMACPP.f32 [LLAMACPP.f32 ...]
Needs numpy. A benchmark helper: it asserts nothing."""
import math
import struct
import sys

import numpy as np


def read_gguf(path):
    d = open(path, "rb").read()
    o = 8
    nt, nkv = struct.unpack_from("<QQ", d, o)
    o += 16

    def rs():
        nonlocal o
        n, = struct.unpack_from("<Q", d, o)
        o += 8
        s = d[o:o + n]
        o += n
        return s.decode()
    fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    meta, align = {}, 32
    for _ in range(nkv):
        k = rs()
        t, = struct.unpack_from("<I", d, o)
        o += 4
        if t == 8:
            meta[k] = rs()
        elif t == 9:
            et, n = struct.unpack_from("<IQ", d, o)
            o += 12
            if et == 8:
                meta[k] = [rs() for _ in range(n)]
            else:
                meta[k] = list(struct.unpack_from("<%d%s" % (n, fmt[et]), d, o))
                o += struct.calcsize(fmt[et]) * n
        else:
            meta[k], = struct.unpack_from("<" + fmt[t], d, o)
            o += struct.calcsize(fmt[t])
    align = meta.get("general.alignment", 32)
    infos = []
    for _ in range(nt):
        name = rs()
        nd, = struct.unpack_from("<I", d, o)
        o += 4
        ne = struct.unpack_from("<%dQ" % nd, d, o)
        o += 8 * nd
        ty, off = struct.unpack_from("<IQ", d, o)
        o += 12
        infos.append((name, ne, ty, off))
    start = (o + align - 1) // align * align
    w = {}
    for name, ne, ty, off in infos:
        if ty != 0:
            sys.exit("%s: tensor %s is not F32 (give the F32 mmproj file)" % (path, name))
        n = int(np.prod(ne))
        w[name] = np.frombuffer(d, np.float32, n, start + off).reshape(tuple(reversed(ne))).astype(np.float64)
    return meta, w


def tower(meta, w, pixels, cls_last, tanh_gelu):
    D = meta["clip.vision.embedding_length"]
    H = meta["clip.vision.attention.head_count"]
    P = meta["clip.vision.patch_size"]
    G = meta["clip.vision.image_size"] // P
    eps = meta["clip.vision.attention.layer_norm_epsilon"]
    layers = max(meta.get("clip.vision.feature_layer", [meta["clip.vision.block_count"]]))
    act = "gelu" if meta.get("clip.use_gelu") else "silu" if meta.get("clip.use_silu") else "quick_gelu"
    hd = D // H

    def ln(x, p):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + eps) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    erf = np.vectorize(math.erf)
    gelu_exact = lambda y: 0.5 * y * (1 + erf(y / math.sqrt(2)))
    gelu_tanh = lambda y: 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    acts = {"quick_gelu": lambda y: y / (1 + np.exp(-1.702 * y)), "silu": lambda y: y / (1 + np.exp(-y)),
            "gelu": gelu_tanh if tanh_gelu else gelu_exact}
    patches = pixels.reshape(3, G, P, G, P).transpose(1, 3, 0, 2, 4).reshape(G * G, -1)
    emb = patches @ w["v.patch_embd.weight"].reshape(D, -1).T
    cls = w["v.class_embd"][None]
    x = np.vstack([emb, cls] if cls_last else [cls, emb]) + w["v.position_embd.weight"]
    x = ln(x, "v.pre_ln")
    for layer in range(layers):
        p = "v.blk.%d." % layer
        h = ln(x, p + "ln1")
        q, k, v = (lin(h, p + n).reshape(-1, H, hd).transpose(1, 0, 2) for n in ("attn_q", "attn_k", "attn_v"))
        a = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + lin((a @ v).transpose(1, 0, 2).reshape(-1, D), p + "attn_out")
        h = ln(x, p + "ln2")
        fc1, fc2 = ("ffn_down", "ffn_up") if w[p + "ffn_down.weight"].shape[1] == D else ("ffn_up", "ffn_down")
        x = x + lin(acts[act](lin(h, p + fc1)), p + fc2)
    y = lin(x[1:], "mm.0")
    return lin(gelu_tanh(y) if tanh_gelu else gelu_exact(y), "mm.2")


def main():
    meta, w = read_gguf(sys.argv[1])
    pixels = np.load(sys.argv[2]).astype(np.float64)
    ours = np.load(sys.argv[3]).astype(np.float64)
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
    hf = tower(meta, w, pixels, False, False)
    as_llamacpp = tower(meta, w, pixels, True, True)
    print("prefixkv vs the model, class token first, exact GELU (transformers' LLaVA): %.2e" % rel(ours, hf))
    for path in sys.argv[4:]:
        lc = np.fromfile(path, np.float32).reshape(ours.shape).astype(np.float64)
        print("llama.cpp (%s) vs the model as clip.cpp's graph runs it (class token last, tanh GELU): %.2e; "
              "vs prefixkv: %.2e; vs the model with the class token first and tanh GELU: %.2e"
              % (path, rel(lc, as_llamacpp), rel(lc, ours), rel(lc, tower(meta, w, pixels, False, True))))


main()
