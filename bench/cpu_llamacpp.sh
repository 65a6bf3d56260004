#!/usr/bin/env bash
# CPU speed of prefixkv against llama.cpp's CPU back end (the prebuilt binaries of the npm package
# node-llama-cpp, pinned 3.21.1: llama.cpp release v0.4.0) on the same GGUF file, greedy, the same
# thread count, runs interleaved (one engine, then the other, ROUNDS times, after one warm-up run of
# each: the file is in the page cache for both). Beside them, the machine's read bandwidth
# (pkv_bench_cpu_linear's plain read of a 7B product's weights): the floor decoding can reach.
#
#   bash bench/cpu_llamacpp.sh tiny [TOKENS=64] [ROUNDS=3]   # the bundled model as GGUF F32 and F16
#   bash bench/cpu_llamacpp.sh 7b   [TOKENS=16] [ROUNDS=2]   # a random LLaVA-1.5-7B language model, GGUF F16
#   bash bench/cpu_llamacpp.sh FILE.gguf [TOKENS] [ROUNDS]    # any LLaMA GGUF both engines read
#
# Needs node >= 20 (NODE=/path/to/node), the npm registry for node-llama-cpp (about 180 MB, fetched
# once into $OUT), build/prefixkv and build/pkv_bench_cpu_linear (`ninja -C build prefixkv
# pkv_bench_cpu_linear`); the 7b case writes a 13.5 GB checkpoint and a 13.5 GB GGUF under $OUT
# (PYTHON, default /usr/bin/python3, with numpy; 28 GB of disk). THREADS (default: the machine's cores). Prints a table; the
# JSON of every run goes to $OUT (default /tmp/cpu_llamacpp). PKV_ARGS: more options for prefixkv run
# (e.g. PKV_ARGS="--kv-dtype f16": its KV cache in 16 bits, as llama.cpp keeps its own). MMAP=0: both
# engines read the weights into memory instead of mapping the file (prefixkv --no-mmap, llama.cpp's
# useMmap false): on a machine whose kernel evicts cold file pages early (this development VM runs
# DAMON reclaim) a mapped 13.5 GB file is partly re-read from disk at every token. Asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:?tiny, 7b or a GGUF file}
N=${2:-}
ROUNDS=${3:-}
OUT=${OUT:-/tmp/cpu_llamacpp}
NLC=$OUT/node-llama-cpp
NODE=${NODE:-node}
PKV=${PKV:-./build/prefixkv}
LINEAR=${LINEAR:-./build/pkv_bench_cpu_linear}
THREADS=${THREADS:-$(nproc)}
MMAP=${MMAP:-1}
[ "$MMAP" = 0 ] && PKV_ARGS="${PKV_ARGS:-} --no-mmap"
PROMPT="USER: Describe the image in detail. What shapes are there, what colours are they, and where are they? ASSISTANT:"
mkdir -p "$OUT" "$NLC"
if [ ! -d "$NLC/node_modules/node-llama-cpp" ]; then
  (cd "$NLC" && npm init -y >/dev/null && npm i -E node-llama-cpp@3.21.1 >"$OUT/npm.log" 2>&1)
fi
cp tools/llamacpp_speed.mjs "$NLC/speed.mjs"

files=()
case "$WHAT" in
  tiny)
    N=${N:-64}; ROUNDS=${ROUNDS:-3}
    for t in f32 f16; do
      [ -f "$OUT/tiny-$t.gguf" ] || "$PKV" export --model models/prefixkv-llava-tiny --gguf "$OUT/tiny-$t.gguf" --type $t >/dev/null
      files+=("$OUT/tiny-$t.gguf")
    done
    ;;
  7b)
    N=${N:-16}; ROUNDS=${ROUNDS:-2}
    if [ ! -f "$OUT/7b-f16.gguf" ]; then
      [ -f "$OUT/ckpt7b/config.json" ] || "${PYTHON:-/usr/bin/python3}" tools/make_random_checkpoint.py --shape llava-1.5-7b --out "$OUT/ckpt7b" \
        --tokenizer ../shared/reference/llama2-tokenizer/tokenizer.model >"$OUT/ckpt7b.log" 2>&1
      "$PKV" export --model "$OUT/ckpt7b" --gguf "$OUT/7b-f16.gguf" --type f16 >/dev/null
      rm -rf "$OUT/ckpt7b"  # the GGUF holds the same values; keep one copy on disk
    fi
    files+=("$OUT/7b-f16.gguf")
    ;;
  *) N=${N:-32}; ROUNDS=${ROUNDS:-3}; files+=("$WHAT") ;;
esac

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
echo "machine: $(nproc) cores, $cpu; $(free -g | awk '/Mem:/ {print $2}') GiB; threads $THREADS; $N tokens; $ROUNDS rounds${PKV_ARGS:+; prefixkv $PKV_ARGS}"
floor=$("$LINEAR" --threads "$THREADS" --rows 1 --reps 5 --json "$OUT/linear.json" >/dev/null &&
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%.1f" % max(x["read_floor_gbs"] for x in r))' "$OUT/linear.json")
echo "read floor: $floor GB/s (plain read of a 7B product's weights, $THREADS threads, best of 5)"

ours() {  # $1 file, $2 output json
  PREFIXKV_THREADS=$THREADS "$PKV" run --model "$1" --template raw --prompt "$PROMPT" --max-tokens "$N" --ignore-eos \
    --threads "$THREADS" ${PKV_ARGS:-} --json > "$2" 2>/dev/null
}
theirs() {
  (cd "$NLC" && LLAMACPP_THREADS=$THREADS LLAMACPP_MMAP=$MMAP "$NODE" speed.mjs "$1" "$N" "$PROMPT") > "$2" 2>>"$OUT/node.log"
}
for f in "${files[@]}"; do
  b=$(basename "$f" .gguf)
  ours "$f" "$OUT/$b.pkv.warm.json"; theirs "$f" "$OUT/$b.llama.warm.json"
  for r in $(seq "$ROUNDS"); do
    ours "$f" "$OUT/$b.pkv.$r.json"; theirs "$f" "$OUT/$b.llama.$r.json"
  done
done
python3 - "$OUT" "$ROUNDS" "${files[@]}" <<'PY'
import json, os, statistics, sys
out, rounds, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("\n| model | engine | prompt tokens | prompt + first token ms | decode tok/s | GB/s of weights | same tokens |")
print("|---|---|---|---|---|---|---|")
for f in files:
    b = os.path.basename(f)[:-5]
    size = os.path.getsize(f)
    P = [json.load(open(f"{out}/{b}.pkv.{r}.json")) for r in range(1, rounds + 1)]
    L = [json.load(open(f"{out}/{b}.llama.{r}.json")) for r in range(1, rounds + 1)]
    same = P[-1]["tokens"] == L[-1]["tokens"]
    def row(engine, first, tps, n_prompt):
        m = lambda xs: statistics.median(xs)
        print(f"| {b} | {engine} | {n_prompt} | {m(first):.0f} ({min(first):.0f}-{max(first):.0f}) | "
              f"{m(tps):.2f} ({min(tps):.2f}-{max(tps):.2f}) | {m(tps) * size / 1e9:.1f} | {'yes' if same else 'no'} |")
    row("prefixkv", [p["timings"]["prefill_ms"] for p in P], [p["timings"]["decode_tokens_per_s"] for p in P],
        P[-1]["prompt_tokens"])
    rel = L[-1].get("llama_cpp") or {}
    row("llama.cpp " + (rel.get("release", "") if isinstance(rel, dict) else str(rel)), [l["prompt_and_first_token_ms"] for l in L],
        [l["decode_tokens_per_s"] for l in L], L[-1]["prompt_tokens"])
PY
