#!/usr/bin/env bash
# Evaluation and calibration on the GPU (`--device cuda`) against the CPU engine, on the GPU machine;
# each phase fits the machine's 10-minute command limit. Everything lands in $OUT/results.tar.
#   bash bench/gpu_eval.sh PHASE...
#   build      prefixkv with the CUDA back end in $BUILD (default build-gpu; scripts/gpu_test.sh
#              leaves it there) and the CPU-only one in build-cpu16
#   calibrate  the grid's profile (32 calibration samples, window estimator, prompt-allocated) and
#              the answer-allocated one, on the CPU (16 cores) and on the GPU; the keep fractions
#              compared (bench/compare_profiles in Python below)
#   check      20 evaluation samples, every policy x the grid's estimators at 10-50% kept, on both
#              devices with every greedy answer written (--answers), compared by bench/compare_eval.py
#   grid_lo    the grid of docs/RESULTS.md at 10-50% kept on the GPU (100 scenes), with its time
#   grid_hi    the same at 60-90% and the normalised estimator at 10-50%
#   questions  testbed (b): the short questions of data/eval/questions.json (QLIMIT, all 778 by
#              default), the grid's policies and estimators at 10-90% kept and the no-image control
#              (every image entry evicted), answer accuracy and PPL, on the GPU
#   text       testbed (c): the held-out language-corpus windows of data/text/heldout.json (384-token
#              context, 128-token continuation teacher-forced), the same configurations, on the GPU
#              and on the CPU's cores at once, compared by bench/compare_eval.py
#   oracle     the answer oracle (--estimators answer: the reference answer's own attention ranks
#              the entries) with uniform budgets and with the online search, plain and pooled, on
#              the descriptions at 10-90% kept, on the GPU
# Environment: LIMIT (100), MAXTOK (320), CHECK_LIMIT (20), QLIMIT (0: all questions), DTYPE (f16:
# the bundled model's checkpoint type; bf16 to override).
set -euo pipefail
FINAL_OUT=${OUT:?set OUT}
W=$FINAL_OUT/w
mkdir -p "$W"
pack() { tar -C "$W" -cf "$FINAL_OUT/results.tar" . && rm -rf "$W"; }
trap pack EXIT
OUT=$W
BUILD=${BUILD:-build-gpu}
MODEL=models/prefixkv-llava-tiny
LIMIT=${LIMIT:-100}
MAXTOK=${MAXTOK:-320}
CHECK_LIMIT=${CHECK_LIMIT:-20}
QLIMIT=${QLIMIT:-0}
DTYPE=${DTYPE:-f16}
J=$(nproc)
GPU=./$BUILD/prefixkv
CPU=./build-cpu16/prefixkv
PLAIN="--kv-prefix-pool 0 --kv-profile docs/results/profiles/window_prompt_n32.json"
echo "cores: $J; $(grep -m1 'model name' /proc/cpuinfo); $(nvidia-smi -L 2>/dev/null | head -1)"

evd() {  # evd NAME BINARY DATA [eval options...]
  local name=$1 bin=$2 data=$3
  shift 3
  local t0=$SECONDS
  $bin eval --model $MODEL --data "$data" --out "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
  echo "$name: $((SECONDS - t0)) s wall (the command's own: $(python3 -c "import json;print(round(json.load(open('$OUT/$name.json'))['seconds'],1))") s)"
}
ev() {  # ev NAME BINARY [eval options...]: the descriptions
  local name=$1 bin=$2
  shift 2
  evd "$name" "$bin" data/eval/eval.json --max-tokens "$MAXTOK" "$@"
}
ALL_BUDGETS=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9
CUDA=(--device cuda --gpu-dtype "$DTYPE" --batch 96)

for phase in "$@"; do
case $phase in
  build)
    t0=$SECONDS
    if [ ! -x "$GPU" ]; then
      cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DPREFIXKV_TESTS=OFF > "$OUT/build_gpu.log" 2>&1
      cmake --build "$BUILD" -j "$J" --target prefixkv >> "$OUT/build_gpu.log" 2>&1
    fi
    cmake -S . -B build-cpu16 -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_TESTS=OFF -DPREFIXKV_CUDA=OFF \
      > "$OUT/build_cpu.log" 2>&1
    cmake --build build-cpu16 -j "$J" --target prefixkv >> "$OUT/build_cpu.log" 2>&1
    echo "build: $((SECONDS - t0)) s"
    ;;
  calibrate)
    for dev in cpu cuda; do
      bin=$CPU
      extra=(--threads "$J")
      [ $dev = cuda ] && bin=$GPU && extra=(--device cuda --gpu-dtype "$DTYPE")
      for alloc in prompt answer; do
        t0=$SECONDS
        $bin calibrate --model $MODEL --data data/calib/calib.json --kv-importance window --allocate-from $alloc \
          "${extra[@]}" --out "$OUT/profile_${alloc}_$dev.json" > "$OUT/calibrate_${alloc}_$dev.txt" 2>&1
        echo "calibrate $alloc on $dev: $((SECONDS - t0)) s"
      done
    done
    python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
for alloc in ("prompt", "answer"):
    a = json.load(open(f"{out}/profile_{alloc}_cpu.json"))
    b = json.load(open(f"{out}/profile_{alloc}_cuda.json"))
    worst = 0.0
    for x, y in zip(a["budgets"], b["budgets"]):
        assert x["budget"] == y["budget"]
        worst = max(worst, max(abs(p - q) for p, q in zip(x["keep"], y["keep"])))
    print(f"calibrate {alloc}: largest |keep fraction cpu - cuda| over budgets and layers: {worst:.4f}")
EOF
    ;;
  check)
    common=(--limit "$CHECK_LIMIT" --budgets 0.1,0.2,0.3,0.4,0.5 --estimators window,paper $PLAIN)
    # The CPU on its cores and the GPU at the same time: they share nothing but the host.
    ev check_cpu $CPU "${common[@]}" --jobs "$J" --answers "$OUT/check_cpu_answers.jsonl" &
    cpu_pid=$!
    ev check_cuda $GPU "${common[@]}" --device cuda --gpu-dtype "$DTYPE" --batch 96 \
      --answers "$OUT/check_cuda_answers.jsonl"
    wait $cpu_pid
    python3 bench/compare_eval.py "$OUT/check_cpu.json" "$OUT/check_cuda.json" \
      --answers "$OUT/check_cpu_answers.jsonl" "$OUT/check_cuda_answers.jsonl" --out "$OUT/check_compare.json" \
      | tee "$OUT/check_compare.txt"
    ;;
  grid_lo)
    ev grid_lo_cuda $GPU --limit "$LIMIT" --budgets 0.1,0.2,0.3,0.4,0.5 --estimators window,paper $PLAIN \
      --device cuda --gpu-dtype "$DTYPE" --batch 96 --plot "$OUT/grid_lo_cuda.svg"
    python3 bench/compare_eval.py docs/results/grid_lo.json "$OUT/grid_lo_cuda.json" --out "$OUT/grid_lo_compare.json" \
      | tee "$OUT/grid_lo_compare.txt"
    ;;
  grid_hi)
    ev grid_hi_cuda $GPU --limit "$LIMIT" --budgets 0.6,0.7,0.8,0.9 --estimators window,paper,normalized $PLAIN \
      --device cuda --gpu-dtype "$DTYPE" --batch 96
    ev grid_norm_cuda $GPU --limit "$LIMIT" --budgets 0.1,0.2,0.3,0.4,0.5 --policies uniform-prefix,prefixkv-online \
      --estimators normalized $PLAIN --device cuda --gpu-dtype "$DTYPE" --batch 96
    for g in grid_hi grid_norm; do
      python3 bench/compare_eval.py docs/results/$g.json "$OUT/${g}_cuda.json" --out "$OUT/${g}_compare.json" \
        | tee "$OUT/${g}_compare.txt"
    done
    ;;
  questions)
    evd questions_cuda $GPU data/eval/questions.json --limit "$QLIMIT" --max-tokens 16 --budgets $ALL_BUDGETS \
      --estimators window,paper $PLAIN --no-image-control "${CUDA[@]}" --plot "$OUT/questions_cuda.svg"
    ;;
  text)
    common=(--budgets $ALL_BUDGETS --estimators window,paper $PLAIN)
    evd text_cpu $CPU data/text/heldout.json "${common[@]}" --jobs "$J" &
    cpu_pid=$!
    evd text_cuda $GPU data/text/heldout.json "${common[@]}" "${CUDA[@]}" --plot "$OUT/text_cuda.svg"
    wait $cpu_pid
    python3 bench/compare_eval.py "$OUT/text_cpu.json" "$OUT/text_cuda.json" --out "$OUT/text_compare.json" \
      | tee "$OUT/text_compare.txt"
    ;;
  oracle)
    for pool in 0 7; do
      ev oracle_pool${pool}_cuda $GPU --limit "$LIMIT" --budgets $ALL_BUDGETS --policies uniform-prefix,prefixkv-online \
        --estimators answer --kv-prefix-pool $pool "${CUDA[@]}"
    done
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
done
