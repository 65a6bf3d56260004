#!/usr/bin/env bash
# The whole of docs/RESULTS.md (and the transformers reference answers of docs/MODEL.md) on the GPU
# machine: the CPU engine on its 16 cores, transformers on its GPU. In phases, each under the GPU
# machine's 10-minute command limit; everything lands under $OUT.
#   bash bench/gpu_machine_results.sh PHASE...
#   calibrate   profiles (window estimator): prompt-allocated from 32 samples (the grid's), answer-
#               allocated (shipped), prompt-allocated from 1..16 samples, installed into
#               docs/results/profiles/ and models/prefixkv-llava-tiny/ of this copy; the
#               transformers reference answers start in the background (GPU) and are waited for at
#               the end of the call
#   grid_lo     every policy x estimator at 10-50% kept
#   grid_hi     every policy x estimator at 60-90% kept (and the normalised estimator at 10-50%)
#   ablations   pooling, answer allocation, protected tokens, calibration size
#   decode      the decode rule: proportional (default) against a fixed cap
# Phases in a later call expect the profiles copied back from $OUT/profiles first (the shipped
# profile must be the one the grid used).
set -euo pipefail
# At most 8 files come back from the GPU machine: everything is written under $W and packed into
# $OUT/results.tar at the end (logs of a failed phase included).
FINAL_OUT=$OUT
W=$FINAL_OUT/w
mkdir -p "$W"
OUT=$W
pack() { tar -C "$W" -cf "$FINAL_OUT/results.tar" . && rm -rf "$W"; }
trap pack EXIT
MODEL=models/prefixkv-llava-tiny
LIMIT=${LIMIT:-100}
MAXTOK=${MAXTOK:-320}
J=$(nproc)
mkdir -p "$OUT"
echo "cores: $J; $(grep -m1 'model name' /proc/cpuinfo)"
cmake -S . -B build-cpu16 -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_TESTS=OFF -DPREFIXKV_CUDA=OFF > "$OUT/build.log" 2>&1
cmake --build build-cpu16 -j "$J" --target prefixkv >> "$OUT/build.log" 2>&1
PKV=./build-cpu16/prefixkv

ev() {  # ev NAME [eval options...]
  local name=$1; shift
  local t0=$SECONDS
  $PKV eval --data data/eval/eval.json --limit "$LIMIT" --max-tokens "$MAXTOK" --jobs "$J" \
    --out "$OUT/$name.json" --plot "$OUT/$name.svg" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
  echo "$name: $((SECONDS - t0)) s"
}

for phase in "$@"; do
# The grid measures METHOD.md's plain ranking (no pooling) with the prompt-allocated profile; the
# ablations name what they change.
PLAIN="--kv-prefix-pool 0 --kv-profile docs/results/profiles/window_prompt_n32.json"
case $phase in
  calibrate)
    mkdir -p "$OUT/profiles"
    if [ "${HF:-1}" = 1 ]; then
      (python3 tools/hf_reference_answers.py --model $MODEL --data data/eval/eval.json \
         --out "$OUT/hf_eval_answers.json" > "$OUT/hf.log" 2>&1; echo "hf rc=$?" >> "$OUT/hf.log") &
    fi
    cal() { $PKV calibrate --data data/calib/calib.json --threads "$J" "$@" > /dev/null; }
    cal --kv-importance window --out "$OUT/profiles/window_prompt_n32.json" --plot "$OUT/profiles/window_prompt_n32.svg"
    cal --kv-importance window --allocate-from answer --out "$OUT/profiles/answer_allocated.json" \
        --plot "$OUT/profiles/answer_allocated.svg"
    for n in 1 2 4 8 16; do
      cal --kv-importance window --samples $n --out "$OUT/profiles/window_n$n.json"
    done
    mkdir -p docs/results/profiles
    cp "$OUT"/profiles/*.json docs/results/profiles/
    cp "$OUT/profiles/answer_allocated.json" $MODEL/prefixkv_profile.json
    echo "calibrate: done"
    ;;
  grid_lo)
    ev grid_lo --budgets 0.1,0.2,0.3,0.4,0.5 --estimators window,paper $PLAIN
    ;;
  grid_hi)
    ev grid_hi --budgets 0.6,0.7,0.8,0.9 --estimators window,paper,normalized $PLAIN
    ev grid_norm --budgets 0.1,0.2,0.3,0.4,0.5 --policies uniform-prefix,prefixkv-online --estimators normalized $PLAIN
    ;;
  ablations)
    B=0.1,0.2,0.3,0.5
    ev abl_pool --budgets $B --policies uniform-prefix,prefixkv,prefixkv-online --kv-prefix-pool 7 \
      --kv-profile docs/results/profiles/window_prompt_n32.json
    ev abl_answer --budgets 0.1,0.2,0.3,0.4,0.5,0.7 --policies prefixkv --kv-prefix-pool 0 \
      --kv-profile docs/results/profiles/answer_allocated.json
    ev abl_answer_pool --budgets $B --policies prefixkv --kv-prefix-pool 7 \
      --kv-profile docs/results/profiles/answer_allocated.json
    ev abl_protect0 --budgets 0.2,0.5 --policies uniform-prefix,prefixkv --kv-protected 0 $PLAIN
    ev abl_protect16 --budgets 0.2,0.5 --policies uniform-prefix,prefixkv --kv-protected 16 $PLAIN
    for n in 1 2 4 8 16; do
      ev calib_n$n --budgets 0.1,0.2,0.5 --policies prefixkv --kv-prefix-pool 0 \
        --kv-profile docs/results/profiles/window_n$n.json
    done
    ;;
  decode)  # METHOD.md section 4's proportional rule against a fixed cap (--kv-decode cap)
    ev abl_decode_cap --budgets 0.2,0.5 --policies snapkv,h2o,uniform-prefix,prefixkv --kv-decode cap $PLAIN
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
done
wait  # the transformers answers, when started
if [ -f "$OUT/hf.log" ]; then tail -3 "$OUT/hf.log"; fi
