#!/usr/bin/env python3
"""Markdown tables for docs/PERF.md from the JSON that bench/gpu_machine_perf.sh brings back
(`prefixkv bench --json` and bench/hf_bench.py --out files in one folder).

    python3 bench/perf_tables.py docs/results/perf
"""
import json
import os
import sys

SETTINGS = [  # (label, our file, transformers' file)
    ("7B, batch 1, 672 + 256", "gpu_7b_b1.json", "hf_7b_b1.json"),
    ("7B, batch 16, 1024 + 512", "gpu_7b_b16.json", "hf_7b_b16.json"),
    ("7B, batch 48, 624 + 256", "gpu_7b_b48.json", "hf_7b_b48.json"),
    ("13B, batch 8, 1024 + 512", "gpu_13b_b8.json", "hf_13b_b8.json"),
]


def load(folder, name):
    path = os.path.join(folder, name)
    return json.load(open(path)) if os.path.exists(path) else None


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "docs/results/perf"
    print("| setting | engine | kept | prefill ms | decode tok/s | of the floor | throughput tok/s | x transformers-eager "
          "| peak GPU GiB | largest batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    speedups = []
    for label, ours_f, hf_f in SETTINGS:
        ours, hf = load(folder, ours_f), load(folder, hf_f)
        eager = None
        if hf:
            for r in hf["records"]:
                if r.get("error"):
                    print(f"| {label} | {r['impl']} | 100% | {r['error']} | | | | | | |")
                    continue
                if r["impl"] == "transformers-eager":
                    eager = r["throughput_tokens_per_s"]
                print(f"| {label} | {r['impl']} | 100% | {r['prefill_ms']:.0f} | {r['decode_tokens_per_s']:.1f} | | "
                      f"{r['throughput_tokens_per_s']:.1f} | | {r['peak_gpu_bytes'] / 2**30:.1f} | "
                      f"{r.get('largest_batch_estimate') or ''} (est.) |")
        if not ours:
            continue
        full = None
        for r in ours["records"]:
            if r["policy"] == "full":
                full = r
            ratio = f"{r['throughput_tokens_per_s'] / eager:.2f}" if eager else ""
            floor = f"{100 * r['decode_tokens_per_s'] / r['floor_tokens_per_s']:.0f}%" if r.get("floor_tokens_per_s") else ""
            print(f"| {label} | prefixkv {r['policy']} | {100 * r['budget']:.0f}% | {r['prefill_ms']:.0f} | "
                  f"{r['decode_tokens_per_s']:.1f} | {floor} | {r['throughput_tokens_per_s']:.1f} | {ratio} | "
                  f"{r['peak_gpu_gib']:.1f} | {r['largest_batch']} |")
        if full:
            for r in ours["records"]:
                if r["policy"] != "full" and abs(r["budget"] - 0.2) < 1e-9:
                    got = r["decode_tokens_per_s"] / full["decode_tokens_per_s"]
                    want = r["floor_tokens_per_s"] / full["floor_tokens_per_s"]
                    speedups.append((label, got, want, r["largest_batch"], full["largest_batch"]))
    print()
    print("| setting | decode speed-up, 20% kept vs full | bytes predict | achieved / predicted | largest batch 20% / full |")
    print("|---|---|---|---|---|")
    for label, got, want, lb20, lbfull in speedups:
        print(f"| {label} | {got:.2f}x | {want:.2f}x | {100 * got / want:.0f}% | {lb20} / {lbfull} = {lb20 / lbfull:.1f}x |")


if __name__ == "__main__":
    main()
