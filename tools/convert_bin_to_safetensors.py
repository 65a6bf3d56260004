#!/usr/bin/env python3
"""Rewrite a checkpoint directory of PyTorch .bin pickles as safetensors.

prefixkv reads safetensors only. Checkpoints of the original LLaVA repository (for
example liuhaotian/llava-v1.5-7b) and older CLIP checkpoints are often stored as
pytorch_model.bin or as shards pytorch_model-0000i-of-0000n.bin with
pytorch_model.bin.index.json. This tool writes, for each .bin file, a safetensors file
with the same tensors, names and dtypes:

    pytorch_model.bin                     -> model.safetensors
    pytorch_model-00001-of-00002.bin      -> model-00001-of-00002.safetensors
    pytorch_model.bin.index.json          -> model.safetensors.index.json

Tensors that share memory (tied embeddings, views of one buffer) are cloned, since the
safetensors format stores each tensor separately. Other .bin files (for example
mm_projector.bin) are converted one by one to <name>.safetensors when passed with
--also or when the directory holds no pytorch_model*.bin.

The pickles are opened with torch.load(weights_only=True): only tensors and plain
containers are accepted, no code is run. Requires torch and safetensors.

Examples:
    python3 tools/convert_bin_to_safetensors.py models/llava-v1.5-7b
    python3 tools/convert_bin_to_safetensors.py models/clip-vit-large-patch14-336 --out models/clip-st
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

SHARD_RE = re.compile(r"^pytorch_model-(\d+)-of-(\d+)\.bin$")


def target_name(bin_name: str) -> str:
    """pytorch_model*.bin -> model*.safetensors; anything else keeps its stem."""
    if bin_name == "pytorch_model.bin":
        return "model.safetensors"
    m = SHARD_RE.match(bin_name)
    if m:
        return f"model-{m.group(1)}-of-{m.group(2)}.safetensors"
    return bin_name[: -len(".bin")] + ".safetensors"


def load_state_dict(path: str) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, TypeError, ValueError):
        # mmap needs the zip-based format (torch >= 1.6 default); old files load without it.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        # Some training scripts wrap the weights: {"state_dict": {...}} or {"model": {...}}.
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SystemExit(f"{path}: entries that are not tensors: {bad[:10]}")
    return obj


def detach_shared(tensors: dict) -> dict:
    """Makes every tensor own contiguous memory of exactly its size: the second and later
    users of one storage (tied weights), views into a larger buffer and non-contiguous
    tensors are cloned. Names, shapes and dtypes do not change."""
    seen: set[int] = set()
    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        storage = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
        ptr = storage.data_ptr()
        exact = t.is_contiguous() and t.storage_offset() == 0 and \
            storage.nbytes() == t.numel() * t.element_size()
        if ptr in seen or not exact:
            t = t.contiguous().clone()
        if t.numel() > 0:
            seen.add(ptr)
        out[name] = t
    return out


def convert_file(src: str, dst: str, verify: bool) -> tuple[int, list[str]]:
    """Converts one .bin file; returns (bytes of tensor data, tensor names)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_state_dict(src)
    state = detach_shared(state)
    save_file(state, dst, metadata={"format": "pt"})
    size = sum(t.numel() * t.element_size() for t in state.values())
    if verify:
        back = load_file(dst)
        if sorted(back) != sorted(state):
            raise SystemExit(f"{dst}: tensor names differ after writing")
        for k, t in state.items():
            if back[k].dtype != t.dtype or back[k].shape != t.shape or not torch.equal(back[k], t):
                raise SystemExit(f"{dst}: tensor {k} differs after writing")
    return size, sorted(state)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="directory with pytorch_model*.bin (and pytorch_model.bin.index.json)")
    ap.add_argument("--out", help="output directory (default: the source directory); other files "
                                  "(config.json, tokenizer.model, ...) are copied there")
    ap.add_argument("--also", action="append", default=[], metavar="NAME.bin",
                    help="another .bin file of the directory to convert as well (repeatable)")
    ap.add_argument("--force", action="store_true", help="overwrite existing .safetensors files")
    ap.add_argument("--no-verify", action="store_true", help="skip reading the result back")
    args = ap.parse_args()

    src = os.path.abspath(args.src)
    if not os.path.isdir(src):
        ap.error(f"{src} is not a directory")
    out = os.path.abspath(args.out) if args.out else src
    os.makedirs(out, exist_ok=True)
    names = sorted(os.listdir(src))
    index_path = os.path.join(src, "pytorch_model.bin.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        bins = sorted(set(index["weight_map"].values()))
    else:
        index = None
        bins = [n for n in names if n == "pytorch_model.bin" or SHARD_RE.match(n)]
        if not bins:
            bins = [n for n in names if n.endswith(".bin")]
    bins += [b for b in args.also if b not in bins]
    if not bins:
        ap.error(f"no .bin files in {src}")
    missing = [b for b in bins if not os.path.isfile(os.path.join(src, b))]
    if missing:
        ap.error(f"missing in {src}: {missing}")
    for b in bins:
        dst = os.path.join(out, target_name(b))
        if os.path.exists(dst) and not args.force:
            ap.error(f"{dst} exists (use --force to overwrite)")

    weight_map: dict[str, str] = {}
    total = 0
    for b in bins:
        dst_name = target_name(b)
        print(f"{b} -> {dst_name}", flush=True)
        size, keys = convert_file(os.path.join(src, b), os.path.join(out, dst_name), not args.no_verify)
        total += size
        for k in keys:
            if k in weight_map:
                print(f"warning: tensor {k} appears in {weight_map[k]} and {dst_name}; keeping the first",
                      file=sys.stderr)
                continue
            weight_map[k] = dst_name
    if index is not None:
        expected = set(index["weight_map"])
        if expected != set(weight_map):
            print(f"warning: the .bin index lists {len(expected)} tensors, the shards hold {len(weight_map)}",
                  file=sys.stderr)
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = total
        new_index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(new_index, f, indent=2)
            f.write("\n")
        print("pytorch_model.bin.index.json -> model.safetensors.index.json")
    elif len([b for b in bins if b.startswith("pytorch_model")]) > 1:
        print("warning: several pytorch_model*.bin files but no index; no model.safetensors.index.json written",
              file=sys.stderr)
    if out != src:
        skip = set(bins) | {"pytorch_model.bin.index.json"}
        for n in names:
            p = os.path.join(src, n)
            if n not in skip and os.path.isfile(p) and not n.endswith(".bin"):
                shutil.copy2(p, os.path.join(out, n))
    print(f"done: {len(weight_map)} tensors, {total / 1e6:.1f} MB of tensor data in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
