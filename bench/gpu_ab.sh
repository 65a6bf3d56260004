#!/usr/bin/env bash
# GPU speed of two versions of prefixkv in one sitting on one machine: the working tree ("new") and
# an older commit ("old") built side by side, then `prefixkv bench --device cuda` run alternately
# (old, new, old, new) at the shapes of docs/PERF.md. For checking that a change keeps the speed.
#
#   On the development machine:  bash bench/gpu_ab.sh prepare COMMIT   (archives COMMIT into .carry/old)
#   On the GPU machine:          bash bench/gpu_ab.sh run [ROUNDS]      (carry .carry/old; results in $OUT)
#
# Prints one line per run (decode tok/s and prefill ms per policy) and a summary table: the median
# over rounds of each version and new/old.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    commit=${2:?usage: bench/gpu_ab.sh prepare COMMIT}
    rm -rf .carry/old && mkdir -p .carry/old
    git archive "$commit" CMakeLists.txt src apps bench scripts | tar -x -C .carry/old
    echo "$commit" > .carry/old/COMMIT
    echo "gpu_ab: $(git log -1 --format='%h %s' "$commit" | cut -c1-80) in .carry/old ($(du -sh .carry/old | cut -f1))"
    ;;
  run)
    rounds=${2:-2}
    W=${OUT:-out}
    mkdir -p "$W"
    [ -f .carry/old/COMMIT ] || { echo "gpu_ab: no .carry/old (run 'bench/gpu_ab.sh prepare COMMIT' and carry it)"; exit 2; }
    source scripts/httplib_env.sh
    for v in old new; do
      src=.; [ $v = old ] && src=.carry/old
      cmake -S "$src" -B "build-ab-$v" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DPREFIXKV_TESTS=OFF > "$W/build_$v.log" 2>&1
      cmake --build "build-ab-$v" -j "$(nproc)" --target prefixkv >> "$W/build_$v.log" 2>&1 || { tail -20 "$W/build_$v.log"; exit 2; }
    done
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$W/gpu_name.txt"
    echo "gpu_ab: old = $(cat .carry/old/COMMIT), new = the working tree"
    shapes=("b1:--batch 1 --prompt 672 --gen 128" "b16:--batch 16 --prompt 1024 --gen 128")
    for r in $(seq 1 "$rounds"); do
      for s in "${shapes[@]}"; do
        name=${s%%:*}; args=${s#*:}
        for v in old new; do
          timeout 150 "./build-ab-$v/prefixkv" bench --shape llava-1.5-7b --device cuda --dtype f16 $args \
            --policies full,prefixkv-online --budgets 0.2 --json "$W/${v}_${name}_r$r.json" > "$W/${v}_${name}_r$r.txt" 2>&1 \
            || echo "gpu_ab: $v $name round $r failed (rc $?)"
        done
      done
    done
    python3 - "$W" <<'PY'
import glob, json, os, statistics, sys
w = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(w, "*_r*.json"))):
    v, name, _ = os.path.basename(f)[:-5].split("_")
    for rec in json.load(open(f))["records"]:
        key = (name, rec["policy"], rec.get("budget", 1.0))
        runs.setdefault(key, {}).setdefault(v, []).append((rec["decode_tokens_per_s"], rec["prefill_ms"]))
print("| shape | policy | budget | old decode tok/s | new decode tok/s | new/old | old prefill ms | new prefill ms | new/old |")
print("|---|---|---|---|---|---|---|---|---|")
for (name, pol, b), d in sorted(runs.items()):
    if "old" not in d or "new" not in d: continue
    od = statistics.median(x[0] for x in d["old"]); nd = statistics.median(x[0] for x in d["new"])
    op = statistics.median(x[1] for x in d["old"]); np_ = statistics.median(x[1] for x in d["new"])
    print(f"| {name} | {pol} | {b} | {od:.1f} | {nd:.1f} | {nd/od:.3f} | {op:.1f} | {np_:.1f} | {np_/op:.3f} |")
PY
    ;;
  *)
    sed -n 2,11p "$0"; exit 2 ;;
esac
