#!/usr/bin/env python3
"""The transformers side of the GPU comparison (issue 5, docs/PERF.md): a LLaMA decoder of the
LLaVA-1.5-7B/13B language-model shape with random weights, batched greedy generation with
transformers' own cache, eager or sdpa attention, or (`static`) sdpa with transformers' static cache,
for which `generate` compiles the decoding step with torch.compile itself (the strongest PyTorch path:
CUDA graphs of a fixed-shape step). Prints a table and writes JSON with the same fields as
`prefixkv bench`: prefill ms, decode tokens/s, end-to-end throughput (batch x generated / total time),
peak GPU memory, KV bytes, the largest batch that fits. For `static` a first generation of the very
same shape runs untimed (compilation, CUDA-graph capture) and its time is reported apart as
`warmup_s`; the timed generation comes after it.

Prompts are random token ids (as `prefixkv bench`); generation is forced to the full length
(min_new_tokens = max_new_tokens), so every setting generates batch x gen tokens.

    python3 bench/hf_bench.py --shape llava-1.5-7b --batch 16 --prompt 1024 --gen 512 --attn eager,sdpa --out hf.json
"""
import argparse
import json
import sys
import time

SHAPES = {
    "llava-1.5-7b": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32),
    "llava-1.5-13b": dict(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                          num_attention_heads=40, num_key_value_heads=40),
    "tiny": dict(vocab_size=4000, hidden_size=256, intermediate_size=768, num_hidden_layers=12,
                 num_attention_heads=8, num_key_value_heads=4),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llava-1.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--prompt", type=int, default=672)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--attn", default="eager,sdpa", help="what to run: eager, sdpa, static (sdpa + static cache, compiled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    s = SHAPES[args.shape]
    records = []
    total_mem = torch.cuda.get_device_properties(dev).total_memory
    for attn in [a for a in args.attn.split(",") if a]:
        if attn not in ("eager", "sdpa", "static"):
            ap.error(f"--attn: unknown '{attn}' (eager, sdpa, static)")
        static = attn == "static"
        cfg = LlamaConfig(**s, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                          tie_word_embeddings=False, attn_implementation="sdpa" if static else attn)
        torch.manual_seed(args.seed)
        torch.set_default_dtype(dtype)  # made in 16 bits on the GPU directly (a 13B fp32 copy would not fit)
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        model.eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        layers, kvh = s["num_hidden_layers"], s["num_key_value_heads"]
        hd = s["hidden_size"] // s["num_attention_heads"]
        entry_bytes = 2 * layers * kvh * hd * torch.finfo(dtype).bits // 8
        for b in [int(x) for x in args.batch.split(",") if x]:
            g = torch.Generator(device="cpu").manual_seed(args.seed + b)
            ids = torch.randint(3, s["vocab_size"], (b, args.prompt), generator=g).to(dev)
            mask = torch.ones_like(ids)
            rec = dict(impl=f"transformers-{attn}", shape=args.shape, dtype=args.dtype, batch=b, prompt=args.prompt,
                       gen=args.gen, policy="full", budget=1.0, transformers=transformers.__version__)
            extra = dict(cache_implementation="static") if static else {}
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                with torch.inference_mode():
                    # warm-up (kernels, allocator), then prefill alone, then the whole generation
                    model.generate(input_ids=ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=2,
                                   min_new_tokens=2, do_sample=False, pad_token_id=0)
                    torch.cuda.synchronize()
                    if static:  # compilation and graph capture happen for the exact shape: a whole first run
                        t0 = time.perf_counter()
                        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.gen,
                                       min_new_tokens=args.gen, do_sample=False, pad_token_id=0, **extra)
                        torch.cuda.synchronize()
                        rec["warmup_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
                    torch.cuda.synchronize()
                    prefill_s = time.perf_counter() - t0
                    torch.cuda.reset_peak_memory_stats(dev)
                    t0 = time.perf_counter()
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.gen,
                                         min_new_tokens=args.gen, do_sample=False, pad_token_id=0, **extra)
                    torch.cuda.synchronize()
                    total_s = time.perf_counter() - t0
                assert out.shape[1] == args.prompt + args.gen, out.shape
                decode_s = max(total_s - prefill_s, 1e-9)
                peak = torch.cuda.max_memory_allocated(dev)
                kv = b * (args.prompt + args.gen) * entry_bytes
                per_seq = (peak - weight_bytes) / b
                rec.update(prefill_ms=prefill_s * 1000, decode_tokens_per_s=b * args.gen / decode_s,
                           throughput_tokens_per_s=b * args.gen / total_s, total_s=total_s, peak_gpu_bytes=peak,
                           kv_bytes=kv, weight_bytes=weight_bytes,
                           largest_batch_estimate=int((total_mem - weight_bytes) / per_seq) if per_seq > 0 else None)
            except torch.cuda.OutOfMemoryError as e:
                rec.update(error=f"out of memory: {str(e).splitlines()[0]}")
            records.append(rec)
            print(json.dumps(rec), flush=True)
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    print(f"\n| impl | batch | prompt+gen | prefill ms | decode tok/s | throughput tok/s | peak GiB | KV GiB | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if "error" in r:
            print(f"| {r['impl']} | {r['batch']} | {r['prompt']}+{r['gen']} | {r['error']} |")
            continue
        warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else ""
        print(f"| {r['impl']} | {r['batch']} | {r['prompt']}+{r['gen']} | {r['prefill_ms']:.0f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['throughput_tokens_per_s']:.1f} | "
              f"{r['peak_gpu_bytes'] / 2**30:.1f} | {r['kv_bytes'] / 2**30:.2f} | {warm} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                       "transformers": transformers.__version__, "records": records}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
