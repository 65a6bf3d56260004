#!/usr/bin/env bash
# CPU timing of `prefixkv run` on one model: runs it REPS times and prints a table (median of each
# column) plus the JSON of the last run. Usage:
#   bench/cpu_run.sh MODEL_DIR IMAGE [MAX_TOKENS] [REPS] [extra prefixkv options...]
# Example (a random-weight LLaVA-1.5-7B, made with tools/make_random_checkpoint.py):
#   bench/cpu_run.sh /tmp/llava7b-random tests/data/images/wide.png 16 1
set -euo pipefail
model=${1:?model dir}; image=${2:?image}; max=${3:-64}; reps=${4:-3}; shift $(( $# < 4 ? $# : 4 ))
bin="$(dirname "$0")/../build/prefixkv"
tmp=$(mktemp -d)
for i in $(seq "$reps"); do
  /usr/bin/time -f "%M" -o "$tmp/rss.$i" "$bin" run --model "$model" --image "$image" --max-tokens "$max" \
      --ignore-eos --json "$@" > "$tmp/run.$i.json"
done
python3 - "$tmp" "$reps" "$model" <<'PY'
import json, statistics, sys, os, platform
tmp, reps, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runs = [json.load(open(f"{tmp}/run.{i}.json")) for i in range(1, reps + 1)]
rss = [int(open(f"{tmp}/rss.{i}").read().split()[-1]) / 1024 / 1024 for i in range(1, reps + 1)]
med = lambda k: statistics.median(r["timings"][k] for r in runs)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"model {model} | {runs[0]['model']['layout']} | {runs[0]['model']['weight_bytes'] / 1e9:.2f} GB weights")
print(f"machine: {os.cpu_count()} cores, {cpu}; threads {runs[0]['timings']['threads']}; {reps} runs, medians")
print("| prompt tokens | image tokens | generated | load ms | vision ms | prefill ms | prefill tok/s | decode tok/s | KV MiB | peak RSS GiB |")
print("|---|---|---|---|---|---|---|---|---|---|")
r = runs[-1]
print(f"| {r['prompt_tokens']} | {r['image_tokens']} | {len(r['tokens'])} | {med('load_ms'):.0f} | {med('vision_ms'):.0f} | "
      f"{med('prefill_ms'):.0f} | {med('prefill_tokens_per_s'):.1f} | {med('decode_tokens_per_s'):.2f} | "
      f"{r['kv']['bytes'] / 2**20:.1f} | {max(rss):.1f} |")
PY
rm -rf "$tmp"
