#!/usr/bin/env bash
# Our GGUF files in llama.cpp itself: `prefixkv export --gguf` writes the bundled model's language
# model (F16, Q8_0, Q4_0), llama.cpp's CPU back end (the prebuilt binaries of the npm package
# node-llama-cpp, pinned) loads each and decodes greedily, and the tokens are compared with
# `prefixkv run` on the original checkpoint and with `prefixkv run` on the same GGUF file, prompt by
# prompt. Not part of CI (it downloads the
# package from the npm registry, about 180 MB). Development machine:
#   bash bench/gguf_llamacpp.sh [TOKENS=32]
# Prints one line per type and prompt and a summary; the files and logs go to $OUT (default
# /tmp/gguf_llamacpp).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-32}
OUT=${OUT:-/tmp/gguf_llamacpp}
NLC=$OUT/node-llama-cpp
MODEL=${MODEL:-models/prefixkv-llava-tiny}
PKV=${PKV:-./build/prefixkv}
mkdir -p "$OUT" "$NLC"
if [ ! -d "$NLC/node_modules/node-llama-cpp" ]; then
  (cd "$NLC" && npm init -y >/dev/null && npm i -E node-llama-cpp@3.21.1 >"$OUT/npm.log" 2>&1)
fi
cp tools/llamacpp_greedy.mjs "$NLC/greedy.mjs"
prompts=("USER: What is in a picture of a red circle? ASSISTANT:"
         "USER: Describe the image in detail. ASSISTANT:"
         "The quick brown fox"
         "USER: How many shapes are there, and what colours are they? ASSISTANT:"
         "Once upon a time")
same=0; same_gguf=0; total=0
for type in f16 q8_0 q4_0; do
  "$PKV" export --model "$MODEL" --gguf "$OUT/model-$type.gguf" --type "$type" >/dev/null
  for p in "${prompts[@]}"; do
    ours=$("$PKV" run --model "$MODEL" --template raw --prompt "$p" --max-tokens "$N" --ignore-eos --json 2>/dev/null |
           python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])')
    ours_gguf=$("$PKV" run --model "$OUT/model-$type.gguf" --template raw --prompt "$p" --max-tokens "$N" --ignore-eos --json 2>/dev/null |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])')
    theirs=$(cd "$NLC" && node greedy.mjs "$OUT/model-$type.gguf" "$N" "$p" 2>>"$OUT/node.log" |
             python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])')
    python3 - "$type" "$p" "$ours" "$theirs" "$ours_gguf" <<'PY'
import ast, sys
t, p = sys.argv[1], sys.argv[2]
a, b, c = (ast.literal_eval(x) for x in sys.argv[3:6])
def cmp(x, y):
    k = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
    return "same" if x == y else "differ at " + str(k)
print(f"{t:5} llama.cpp vs prefixkv on the checkpoint: {cmp(b, a):13} on the same GGUF: {cmp(b, c):13} {p[:40]!r}")
PY
    total=$((total + 1)); [ "$ours" = "$theirs" ] && same=$((same + 1)); [ "$ours_gguf" = "$theirs" ] && same_gguf=$((same_gguf + 1))
  done
done
echo "gguf_llamacpp: llama.cpp's greedy answers equal prefixkv's on the checkpoint in $same of $total, prefixkv's on the same GGUF file in $same_gguf of $total (node-llama-cpp 3.21.1, $N tokens each)"
