#!/usr/bin/env bash
# prefixkv and llama.cpp on the same GGUF files, in one command. llama.cpp is the CPU back end of the
# npm package node-llama-cpp (pinned: 3.21.1, llama.cpp release v0.4.0, its prebuilt binaries).
#  1. Files we write: `prefixkv export --gguf` writes the bundled model's language model as F16, Q8_0
#     and Q4_0 (and the vision tower as mmproj.gguf); llama.cpp loads each and decodes greedily; the
#     tokens are compared with `prefixkv run` on the original checkpoint and on the same file, prompt
#     by prompt. The prebuilt binaries ship no libmtmd (clip.cpp), so the mmproj file is only parsed
#     by ggml's GGUF reader and checked against the keys, types and tensors clip.cpp asks for
#     (tools/llamacpp_mmproj_check.c); bench/mmproj_llamacpp.sh builds libmtmd and encodes an image.
#  2. Files llama.cpp writes: its own quantiser (llama_model_quantize in the prebuilt libllama,
#     tools/llamacpp_quantize.c) turns our F16 file into Q8_0, Q4_K_M (Q4_K and Q6_K tensors) and
#     Q6_K; prefixkv and llama.cpp decode each, and where they part, pkv_bench_gguf_margins
#     (bench/gguf_margins.cc) gives prefixkv's logit gaps at that step: how far llama.cpp's token lies
#     below prefixkv's best, and the gap between prefixkv's two best.
# Not part of CI (it downloads the package from the npm registry, about 180 MB). Needs node >= 20
# (Debian 12's node 18 cannot load node-llama-cpp 3.21.1; NODE=/path/to/node picks another), a C
# compiler, and build/pkv_bench_gguf_margins (`ninja -C build pkv_bench_gguf_margins`).
#   bash bench/gguf_llamacpp.sh [TOKENS=32]
# Prints one line per file and prompt and a summary per part; the files and logs go to $OUT (default
# /tmp/gguf_llamacpp).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-32}
OUT=${OUT:-/tmp/gguf_llamacpp}
NLC=$OUT/node-llama-cpp
MODEL=${MODEL:-models/prefixkv-llava-tiny}
PKV=${PKV:-./build/prefixkv}
MARGINS=${MARGINS:-./build/pkv_bench_gguf_margins}
NODE=${NODE:-node}
mkdir -p "$OUT" "$NLC"
if [ ! -d "$NLC/node_modules/node-llama-cpp" ]; then
  (cd "$NLC" && npm init -y >/dev/null && npm i -E node-llama-cpp@3.21.1 >"$OUT/npm.log" 2>&1)
fi
BINS=$NLC/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64
cp tools/llamacpp_greedy.mjs "$NLC/greedy.mjs"
cc -O2 tools/llamacpp_quantize.c -ldl -o "$OUT/llamacpp_quantize"
cc -O2 tools/llamacpp_mmproj_check.c -ldl -o "$OUT/llamacpp_mmproj_check"
prompts=("USER: What is in a picture of a red circle? ASSISTANT:"
         "USER: Describe the image in detail. ASSISTANT:"
         "The quick brown fox"
         "USER: How many shapes are there, and what colours are they? ASSISTANT:"
         "Once upon a time")

ours() {  # prefixkv's greedy tokens for model $1, prompt $2
  "$PKV" run --model "$1" --template raw --prompt "$2" --max-tokens "$N" --ignore-eos --json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])'
}
theirs() {  # llama.cpp's: {"prompt": ids, "tokens": ids}
  (cd "$NLC" && "$NODE" greedy.mjs "$1" "$N" "$2" 2>>"$OUT/node.log")
}

echo "== files prefixkv writes"
same=0; same_gguf=0; total=0
for type in f16 q8_0 q4_0; do
  mm=(); [ "$type" = f16 ] && mm=(--mmproj "$OUT/mmproj-f16.gguf")
  "$PKV" export --model "$MODEL" --gguf "$OUT/model-$type.gguf" --type "$type" "${mm[@]}" >/dev/null
  for p in "${prompts[@]}"; do
    a=$(ours "$MODEL" "$p"); c=$(ours "$OUT/model-$type.gguf" "$p")
    b=$(theirs "$OUT/model-$type.gguf" "$p" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])')
    python3 - "$type" "$p" "$a" "$b" "$c" <<'PY'
import ast, sys
t, p = sys.argv[1], sys.argv[2]
a, b, c = (ast.literal_eval(x) for x in sys.argv[3:6])
def cmp(x, y):
    k = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
    return "same" if x == y else "differ at " + str(k)
print(f"{t:5} llama.cpp vs prefixkv on the checkpoint: {cmp(b, a):13} on the same GGUF: {cmp(b, c):13} {p[:40]!r}")
PY
    total=$((total + 1)); [ "$a" = "$b" ] && same=$((same + 1)); [ "$c" = "$b" ] && same_gguf=$((same_gguf + 1))
  done
done
echo "gguf_llamacpp: llama.cpp's greedy answers equal prefixkv's on the checkpoint in $same of $total, prefixkv's on the same GGUF file in $same_gguf of $total (node-llama-cpp 3.21.1, $N tokens each)"
# The vision file: ggml's own GGUF reader and the keys, types and tensors clip.cpp asks for.
"$OUT/llamacpp_mmproj_check" "$BINS/libggml-base.so" "$OUT/mmproj-f16.gguf" >"$OUT/mmproj_check.log" &&
  echo "gguf_llamacpp: $(tail -1 "$OUT/mmproj_check.log") (tools/llamacpp_mmproj_check.c; these binaries have no libmtmd to encode the image: bench/mmproj_llamacpp.sh builds it)" ||
  { cat "$OUT/mmproj_check.log"; exit 1; }

echo "== files llama.cpp writes (llama_model_quantize from our F16 file)"
same=0; total=0
for type in q8_0 q4_k_m q6_k; do
  f=$OUT/llamacpp-$type.gguf
  "$OUT/llamacpp_quantize" "$BINS/libllama.v0.4.0.so" "$OUT/model-f16.gguf" "$f" "$type" >"$OUT/quantize-$type.log" 2>&1
  for p in "${prompts[@]}"; do
    c=$(ours "$f" "$p"); j=$(theirs "$f" "$p")
    ids=$(echo "$j" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(",".join(map(str, d["prompt"])), ",".join(map(str, d["tokens"])))')
    m=$("$MARGINS" "$f" ${ids% *} ${ids#* })
    python3 - "$type" "$p" "$c" "$j" "$m" <<'PY'
import ast, json, sys
t, p = sys.argv[1], sys.argv[2]
c, j, m = ast.literal_eval(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
b = j["tokens"]
k = next((i for i in range(min(len(b), len(c))) if b[i] != c[i]), None)
if k is None:
    print(f"{t:6} same ({len(b)} tokens) {p[:40]!r}")
else:
    s = m["steps"][k]
    assert s["top1"] == c[k], "teacher forcing reproduces prefixkv's own choice"
    print(f"{t:6} part at token {k:2}: prefixkv {c[k]}, llama.cpp {b[k]} lies {s['top1_forced']:.4f} below prefixkv's best "
          f"(prefixkv's two best {s['top1_top2']:.4f} apart) {p[:40]!r}")
PY
    total=$((total + 1)); [ "$(echo "$j" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])')" = "$c" ] && same=$((same + 1))
  done
done
echo "gguf_llamacpp: on files llama.cpp quantised, llama.cpp's greedy answers equal prefixkv's in $same of $total ($N tokens each)"
