#!/usr/bin/env bash
# The CPU engine's KV cache in float32 against 16 bits (--kv-dtype): `prefixkv run` on the bundled
# model (or MODEL_DIR), one run of each type per round, REPS rounds interleaved; prints the median
# prefill and decode speed and the KV bytes of each type, and whether the 16-bit caches gave the
# float32 cache's tokens. Usage:
#   bench/cpu_kv_dtype.sh [REPS] [MAX_TOKENS] [TYPES] [MODEL_DIR]     (defaults: 3 300 f32,f16,bf16)
# The 7B shape has no checkpoint here; measure it with prefixkv bench, e.g.
#   build/prefixkv bench --shape llava-1.5-7b --prompt 672 --gen 8 --kv-dtype f16
# PREFIXKV (default build/prefixkv) picks the binary.
set -euo pipefail
reps=${1:-3}; max=${2:-300}; types=${3:-f32,f16,bf16}; model=${4:-}
here="$(cd "$(dirname "$0")/.." && pwd)"
bin=${PREFIXKV:-$here/build/prefixkv}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
margs=()
[ -n "$model" ] && margs=(--model "$model")
for i in $(seq "$reps"); do
  for t in ${types//,/ }; do
    "$bin" run "${margs[@]}" --image "$here/data/example.png" --prompt "Describe the image in detail." \
        --max-tokens "$max" --kv-dtype "$t" --json > "$tmp/$t.$i.json"
  done
done
python3 - "$tmp" "$reps" "$types" <<'PY'
import json, os, statistics, sys
tmp, reps, types = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
runs = {t: [json.load(open(f"{tmp}/{t}.{i}.json")) for i in range(1, reps + 1)] for t in types}
first = runs[types[0]][0]
print(f"model {first['model']['dir']}; {os.cpu_count()} cores, {cpu}; threads {first['timings']['threads']}; "
      f"{reps} interleaved rounds, medians (range)")
print("| KV dtype | prompt tokens | generated | prefill ms | decode tok/s | KV MiB | tokens as f32 |")
print("|---|---|---|---|---|---|---|")
for t in types:
    rs = runs[t]
    def col(k):
        v = [r["timings"][k] for r in rs]
        return f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" if k == "prefill_ms" else \
               f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"
    same = all(r["tokens"] == first["tokens"] for r in rs)
    print(f"| {rs[0]['kv']['dtype']} | {rs[0]['prompt_tokens']} | {len(rs[0]['tokens'])} | {col('prefill_ms')} | "
          f"{col('decode_tokens_per_s')} | {rs[0]['kv']['bytes'] / 2**20:.2f} | {'yes' if same else 'no'} |")
PY
