#!/usr/bin/env bash
# Issue 13's grid on the GPU: every policy, estimator form and allocation at 10%, 20%, ..., 90% kept,
# on every testbed ((a) the 200 description scenes of data/eval/eval.json, 320-token answers; (b) the
# 778 short questions of data/eval/questions.json with the no-image control; (c) the 109 held-out text
# windows of data/text/heldout.json), each cell with its 95% bootstrap interval (`--bootstrap`) and
# each adaptive config's verdict against the best uniform-budget baseline at its budget; then one
# merged results JSON, markdown tables, a quality-against-budget plot per testbed and heat maps of the
# budgets per layer and KV head.
#
# The one command, on the GPU machine (one H100, 16 cores; OUT set), one device call per phase, each
# well under its 10-minute limit (a phase stops its evaluations at PHASE_SECONDS, default 560 s, and
# still packs what finished):
#
#   for p in "build smoke" desc_lo desc_mid desc_hi desc_profiles questions_lo questions_mid questions_hi \
#            questions_profiles text_lo text_mid text_hi text_profiles tables; do bash bench/gpu_grid.sh $p; done
#
# (`bash bench/gpu_grid.sh all` runs every phase but smoke in one command where no limit applies.) Each call
# leaves its files in $OUT/results.tar, and a copy of its results JSON in $KEEP on the machine, from
# which `tables` merges them. If the machine went back between calls, merge here instead from the
# unpacked tars: `KEEP=folder-with-all-json bash bench/gpu_grid.sh tables` (OUT set; any machine).
#
# Phases (times expected on one H100 from the earlier grid, about 0.047 s per config and scene):
#   build              prefixkv with the CUDA back end in $BUILD (default build-gpu) and the CPU-only
#                      build-cpu16 (skipped where both exist; every phase below builds what it lacks)
#   smoke              every evaluation below at 10-30% kept on 2 scenes / 4 questions / 2 windows
#                      (24-token answers, 100 resamples; results in $KEEP/../smoke and smoke/ in the
#                      tar), then its tables: the device takes every policy before the long phases
#                      (~1-2 min)
#   desc_lo/mid/hi     (a) at 10-30% / 40-60% / 70-90% kept: the baselines (streaming, h2o, snapkv,
#                      pyramidkv, adakv, uniform-prefix), prefixkv (the shipped profile, the offline cutoff
#                      profile below; pooled ranking), the same ranked by the maximum over the window's
#                      queries, plainly (prefixkv:reduce=max) and weighted by the value (prefixkv:vnorm:reduce=max,
#                      prefixkv:wov2:reduce=max), cutoff:wov2:floor=0.5:cap=1.5 and
#                      cutoff:vnorm:floor=0.5:cap=1.5 on the GPU (37 members x 200 scenes; desc_lo with 28
#                      took 395 s on an H100 as one process), one process per budget at once (SPLIT=1, the
#                      default: the evaluation is bound by its host thread; SPLIT=0: one process), and at
#                      the same time the lookahead forms ($LOOK, CPU-only) on the CPU's cores
#   desc_profiles      (a) at 10-90%: `prefixkv:pool=0` with the prompt-allocated profile of the grid
#                      (METHOD.md's method as written), then `prefixkv:wov2` and `prefixkv:vnorm` with
#                      the offline cutoff profile (docs/results/profiles/cutoff_wov2_floor05_cap15_n32.json,
#                      the model's shipped profile: plain `prefixkv` runs in the main part),
#                      one evaluation per profile (~4.5 min)
#   questions_lo/mid/hi, questions_profiles   (b) the same, answers up to 16 tokens; the no-image
#                      control in questions_lo (~4-6 min each, estimated from the CPU engine's time
#                      per config and question: the GPU has not run this testbed before)
#   text_lo/mid/hi, text_profiles   (c) the same (~2 min each, estimated likewise)
#   In all some 45-55 minutes of device time besides the build: more than one session's 30 minutes,
#   so the calls may span machines; then merge the tars' JSON with `tables` as above.
#   desc_prompt_profile, desc_cutoff_profile (and questions_..., text_...)   one of a _profiles
#                      phase's two evaluations alone
#   desc@B,B... (questions@..., text@...)   the main part at the budgets B (results TESTBED_atB-B.json,
#                      merged like the others; questions with the no-image control where B has 0.1):
#                      where a phase came near its limit, rerun it split, e.g. questions@0.1,0.2 and
#                      questions@0.3 instead of questions_lo (drop the stopped run's JSON from $KEEP)
#   tables             per testbed: bench/grid_tables.py merges the phases' results into one JSON
#                      (grid_<testbed>.json.gz; the verdicts recomputed against the best baseline of
#                      all of them, as eval computes them), writes the markdown tables
#                      (grid_tables.md: PPL, accuracy or top-1, KLD), the quality-against-budget plot
#                      (grid_<testbed>.svg) and heat maps of the kept entries per layer and KV head
#                      (heatmap_<testbed>.svg, bench/kv_heatmap.py) at 20% and 50% kept
# Environment: DEVICE (cuda; cpu runs every GPU evaluation on the CPU engine instead, for a test),
# GPU_BIN / CPU_BIN (the binaries: $BUILD/prefixkv, build-cpu16/prefixkv), LIMIT / QLIMIT / TLIMIT
# (0: all scenes / questions / windows), MAXTOK (320), BOOTSTRAP (1000), DTYPE (f16), CPU_JOBS (cores
# - 4: the rest for the GPU evaluation's host work), LOOK (the CPU-only policies; empty: none),
# BASELINES / ADAPTIVE (the device's policies, to rerun a phase without one that fails there), SPLIT,
# CUTOFF_PROFILE (the offline cutoff profile), KEEP (build-grid/results), PHASE_SECONDS (560).
# The offline cutoff profile was made on the CPU engine (the bundled model, 32 calibration scenes):
#   prefixkv calibrate --data data/calib/calib.json --samples 32 \
#     --allocate-by cutoff:wov2:floor=0.5:cap=1.5 --out docs/results/profiles/cutoff_wov2_floor05_cap15_n32.json
# A test on a CPU-only machine, every phase end to end on 2 scenes:
#   OUT=/tmp/grid DEVICE=cpu LIMIT=2 QLIMIT=4 TLIMIT=2 MAXTOK=24 BOOTSTRAP=200 \
#     GPU_BIN=build/prefixkv CPU_BIN=build/prefixkv KEEP=/tmp/grid-keep bash bench/gpu_grid.sh all
set -euo pipefail
FINAL_OUT=${OUT:?set OUT}
W=$FINAL_OUT/w
mkdir -p "$W"
pack() { tar -C "$W" -cf "$FINAL_OUT/results.tar" . && rm -rf "$W"; }
trap pack EXIT
OUT=$W
DEVICE=${DEVICE:-cuda}
BUILD=${BUILD:-build-gpu}
GPU_BIN=${GPU_BIN:-./$BUILD/prefixkv}
CPU_BIN=${CPU_BIN:-./build-cpu16/prefixkv}
MODEL=models/prefixkv-llava-tiny
LIMIT=${LIMIT:-0}
QLIMIT=${QLIMIT:-0}
TLIMIT=${TLIMIT:-0}
MAXTOK=${MAXTOK:-320}
BOOTSTRAP=${BOOTSTRAP:-1000}
DTYPE=${DTYPE:-f16}
J=$(nproc)
CPU_JOBS=${CPU_JOBS:-$((J > 6 ? J - 4 : J))}
KEEP=${KEEP:-build-grid/results}
PHASE_SECONDS=${PHASE_SECONDS:-560}
mkdir -p "$KEEP"

BASELINES=${BASELINES:-streaming,h2o,snapkv,pyramidkv,adakv,uniform-prefix}
ADAPTIVE=${ADAPTIVE:-prefixkv,prefixkv:reduce=max,prefixkv:vnorm:reduce=max,prefixkv:wov2:reduce=max,cutoff:wov2:floor=0.5:cap=1.5,cutoff:vnorm:floor=0.5:cap=1.5}
SPLIT=${SPLIT:-1}
LOOK=${LOOK-cutoff:wov2:floor=0.5:look=8:reduce=max,cutoff:wov2:floor=0.5:cap=1.5:look=8:reduce=max}
PROMPT_PROFILE=docs/results/profiles/window_prompt_n32.json  # the grid's: window estimator, prompt-allocated
CUTOFF_PROFILE=${CUTOFF_PROFILE:-docs/results/profiles/cutoff_wov2_floor05_cap15_n32.json}
LO=0.1,0.2,0.3
MID=0.4,0.5,0.6
HI=0.7,0.8,0.9
ALL_BUDGETS=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9
if [ "$DEVICE" = cuda ]; then
  DEV_BIN=$GPU_BIN
  DEV=(--device cuda --gpu-dtype "$DTYPE" --batch 96)
else
  DEV_BIN=$CPU_BIN
  DEV=(--jobs "$CPU_JOBS")
fi
echo "cores: $J; $(grep -m1 'model name' /proc/cpuinfo); $(nvidia-smi -L 2>/dev/null | head -1); device $DEVICE"

testbed_args() {  # the data and its options, per testbed
  case $1 in
    desc) echo "--data data/eval/eval.json --limit $LIMIT --max-tokens $MAXTOK" ;;
    questions) echo "--data data/eval/questions.json --limit $QLIMIT --max-tokens 16" ;;
    text) echo "--data data/text/heldout.json --limit $TLIMIT" ;;
  esac
}

DEADLINE=0
left() { echo $((DEADLINE - SECONDS)); }
# evr NAME BINARY TESTBED [eval options...]: one evaluation, stopped at the phase's deadline; its
# results JSON also copied to $KEEP.
evr() {
  local name=$1 bin=$2 tb=$3
  shift 3
  local t0=$SECONDS budget
  budget=$(left)
  if [ "$budget" -le 5 ]; then
    echo "$name: not run, the phase's $PHASE_SECONDS s are spent"
    return 0
  fi
  # shellcheck disable=SC2046
  if timeout "$budget" "$bin" eval --model $MODEL $(testbed_args "$tb") --bootstrap "$BOOTSTRAP" \
      --out "$OUT/$name.json" --plot "$OUT/$name.svg" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"; then
    cp "$OUT/$name.json" "$KEEP/"
    echo "$name: $((SECONDS - t0)) s wall (the command's own: $(python3 -c "import json;print(round(json.load(open('$OUT/$name.json'))['seconds'],1))") s)"
  else
    local rc=$?
    echo "$name: FAILED or stopped at the deadline after $((SECONDS - t0)) s (rc $rc; $OUT/$name.log):"
    tail -3 "$OUT/$name.log"
  fi
}

ensure_built() {
  [ -x "$DEV_BIN" ] && [ -x "$CPU_BIN" ] && return 0
  local t0=$SECONDS
  if [ "$DEVICE" = cuda ] && [ ! -x "$GPU_BIN" ]; then
    cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DPREFIXKV_TESTS=OFF > "$OUT/build_gpu.log" 2>&1
    cmake --build "$BUILD" -j "$J" --target prefixkv >> "$OUT/build_gpu.log" 2>&1
  fi
  if [ ! -x "$CPU_BIN" ]; then
    cmake -S . -B build-cpu16 -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_TESTS=OFF -DPREFIXKV_CUDA=OFF \
      > "$OUT/build_cpu.log" 2>&1
    cmake --build build-cpu16 -j "$J" --target prefixkv >> "$OUT/build_cpu.log" 2>&1
  fi
  echo "build: $((SECONDS - t0)) s"
}

# main TESTBED PART BUDGETS [options...]: the baselines and the adaptive configs on the device, and the
# CPU-only lookahead forms on the CPU's cores at the same time.
main_part() {
  local tb=$1 part=$2 budgets=$3 cpu_pid=
  shift 3
  if [ -n "$LOOK" ]; then
    evr "${tb}_${part}_look" "$CPU_BIN" "$tb" --budgets "$budgets" --policies "$LOOK" --jobs "$CPU_JOBS" &
    cpu_pid=$!
  fi
  if [ "$DEVICE" = cuda ] && [ "$SPLIT" = 1 ] && [[ $budgets == *,* ]]; then
    # One evaluation process per budget at the same time: the GPU evaluation of this small model is
    # bound by its host thread, so three processes share the GPU rather than wait for one another.
    local b pids=()
    for b in ${budgets//,/ }; do
      evr "${tb}_${part}_b$b" "$DEV_BIN" "$tb" --budgets "$b" --policies "$BASELINES,$ADAPTIVE" "${DEV[@]}" "$@" &
      pids+=($!)
    done
    wait "${pids[@]}"
  else
    evr "${tb}_${part}" "$DEV_BIN" "$tb" --budgets "$budgets" --policies "$BASELINES,$ADAPTIVE" "${DEV[@]}" "$@"
  fi
  [ -z "$cpu_pid" ] || wait "$cpu_pid"
}

# The profiles: one evaluation each (a run takes one --kv-profile).
prompt_profile_part() {
  evr "${1}_prompt_profile" "$DEV_BIN" "$1" --budgets "$ALL_BUDGETS" --policies prefixkv:pool=0 \
    --kv-profile "$PROMPT_PROFILE" "${DEV[@]}"
}
cutoff_profile_part() {
  evr "${1}_cutoff_profile" "$DEV_BIN" "$1" --budgets "$ALL_BUDGETS" --policies prefixkv:wov2,prefixkv:vnorm \
    --kv-profile "$CUTOFF_PROFILE" "${DEV[@]}"
}

# merge TESTBED: the phases' results in $KEEP -> one JSON, tables, plot and heat map in $OUT.
merge_testbed() {
  local tb=$1 files=() f
  # The main runs first (lo's full cache is the merged one), then the others (TESTBED@BUDGETS phases).
  for f in "$KEEP/${tb}_lo.json" "$KEEP/${tb}_lo_b"*.json "$KEEP/${tb}_mid.json" "$KEEP/${tb}_hi.json" \
           "$KEEP/${tb}"_*_b[0-9]*.json "$KEEP/${tb}"_at*.json "$KEEP/${tb}"_*_look.json; do
    [[ -f $f && " ${files[*]} " != *" $f "* ]] && files+=("$f")
  done
  [ -f "$KEEP/${tb}_prompt_profile.json" ] && files+=("$KEEP/${tb}_prompt_profile.json=prompt profile")
  [ -f "$KEEP/${tb}_cutoff_profile.json" ] && files+=("$KEEP/${tb}_cutoff_profile.json=cutoff profile")
  if [ ${#files[@]} -eq 0 ]; then
    echo "tables: no results of testbed $tb in $KEEP"
    return 0
  fi
  python3 bench/grid_tables.py merge --out "$OUT/grid_$tb.json" "${files[@]}" || return 0
  python3 bench/grid_tables.py tables --kld "$OUT/grid_$tb.json" >> "$OUT/grid_tables.md" || true
  python3 bench/grid_tables.py plot "$OUT/grid_$tb.json" --out "$OUT/grid_$tb.svg" || true
  python3 bench/kv_heatmap.py "$OUT/grid_$tb.json" --budgets 0.2,0.5 --out "$OUT/heatmap_$tb.svg" \
    --policies "adakv,prefixkv:wov2:reduce=max,prefixkv,prefixkv:pool=0,cutoff:wov2:floor=0.5:cap=1.5,cutoff:vnorm:floor=0.5:cap=1.5,prefixkv:wov2,${LOOK%%,*}" \
    || true
}

run_phase() {
  DEADLINE=$((SECONDS + PHASE_SECONDS))
  local t0=$SECONDS
  case $1 in
    build) ensure_built ;;
    desc_lo) ensure_built; main_part desc lo "$LO" ;;
    desc_mid) ensure_built; main_part desc mid "$MID" ;;
    desc_hi) ensure_built; main_part desc hi "$HI" ;;
    desc_profiles) ensure_built; prompt_profile_part desc; cutoff_profile_part desc ;;
    questions_lo) ensure_built; main_part questions lo "$LO" --no-image-control ;;
    questions_mid) ensure_built; main_part questions mid "$MID" ;;
    questions_hi) ensure_built; main_part questions hi "$HI" ;;
    questions_profiles) ensure_built; prompt_profile_part questions; cutoff_profile_part questions ;;
    text_lo) ensure_built; main_part text lo "$LO" ;;
    text_mid) ensure_built; main_part text mid "$MID" ;;
    text_hi) ensure_built; main_part text hi "$HI" ;;
    text_profiles) ensure_built; prompt_profile_part text; cutoff_profile_part text ;;
    desc_prompt_profile | questions_prompt_profile | text_prompt_profile) ensure_built; prompt_profile_part "${1%%_*}" ;;
    desc_cutoff_profile | questions_cutoff_profile | text_cutoff_profile) ensure_built; cutoff_profile_part "${1%%_*}" ;;
    desc@* | questions@* | text@*)  # TESTBED@BUDGETS: the main part at other budgets
      ensure_built
      local tb=${1%%@*} b=${1#*@} extra=()
      [ "$tb" = questions ] && [[ ,$b, == *,0.1,* ]] && extra=(--no-image-control)
      main_part "$tb" "at${b//,/-}" "$b" "${extra[@]}"
      ;;
    smoke)
      ensure_built
      OUT=$OUT/smoke LIMIT=2 QLIMIT=4 TLIMIT=2 MAXTOK=24 BOOTSTRAP=100 KEEP=$KEEP/../smoke LO=$LO PHASE_SECONDS=120 \
        bash "$0" desc_lo desc_profiles questions_lo text_lo tables
      ;;
    tables)
      rm -f "$OUT/grid_tables.md"
      for tb in desc questions text; do merge_testbed $tb; done
      gzip -9f "$OUT"/grid_*.json 2> /dev/null || true  # the per-sample tables: keep the tar small
      ;;
    *) echo "unknown phase $1" >&2; exit 2 ;;
  esac
  echo "phase $1: $((SECONDS - t0)) s"
}

for phase in "$@"; do
  if [ "$phase" = all ]; then
    for p in build desc_lo desc_mid desc_hi desc_profiles questions_lo questions_mid questions_hi \
             questions_profiles text_lo text_mid text_hi text_profiles tables; do
      run_phase $p
    done
  else
    run_phase "$phase"
  fi
done
