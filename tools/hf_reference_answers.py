#!/usr/bin/env python3
"""Greedy answers of transformers for an evaluation set, the reference the C++ engine is compared with
(issue 3: identical greedy answers for >= 95% of the samples).

    python3 tools/hf_reference_answers.py --model models/prefixkv-llava-tiny --data data/eval/eval.json \
        --out hf_answers.json [--dtype float32] [--max-new-tokens 320] [--limit N]

Runs LlavaForConditionalGeneration with the checkpoint's own processor (LlavaProcessor:
CLIPImageProcessor + the LLaMA tokenizer) on the LLaVA v1 prompt "USER: <image>\\n{prompt} ASSISTANT:",
greedy, batch 1, eager attention, in float32 by default (the engine computes in float32). Writes
{"settings": {...}, "answers": [{"id", "text", "tokens"}]}.
"""
import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="LLaVA conversation JSON")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()

    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, a.dtype)
    model = LlavaForConditionalGeneration.from_pretrained(a.model, dtype=dtype, attn_implementation="eager")
    model.to(a.device).eval()
    proc = AutoProcessor.from_pretrained(a.model)
    data = json.load(open(a.data))
    if a.limit:
        data = data[:a.limit]
    base = os.path.dirname(a.data)
    eos = model.generation_config.eos_token_id
    out = []
    t0 = time.time()
    for i, e in enumerate(data):
        human = next(t["value"] for t in e["conversations"] if t["from"] == "human")
        prompt = "USER: " + human + " ASSISTANT:" if "<image>" in human else "USER: " + human + " ASSISTANT:"
        img = Image.open(os.path.join(base, e["image"])).convert("RGB")
        inputs = proc(images=img, text=prompt, return_tensors="pt").to(a.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            g = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=a.max_new_tokens)
        new = g[0, inputs["input_ids"].shape[1]:].tolist()
        if eos in new:
            new = new[:new.index(eos)]
        out.append({"id": e["id"], "tokens": new, "text": proc.tokenizer.decode(new, skip_special_tokens=True).strip()})
        if i % 50 == 0:
            print(f"[{time.time() - t0:.0f}s] {i}/{len(data)}", flush=True)
    json.dump({"settings": {"model": a.model, "data": a.data, "dtype": a.dtype, "max_new_tokens": a.max_new_tokens,
                            "attention": "eager", "tf32": False},
               "answers": out}, open(a.out, "w"), indent=1)
    print(f"wrote {a.out}: {len(out)} answers in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
