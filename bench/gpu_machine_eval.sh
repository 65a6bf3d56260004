#!/usr/bin/env bash
# Runs `prefixkv eval` on the GPU machine's CPU cores (16 there, 2 here): builds the CPU engine and
# runs the evaluation grid given as arguments, writing results under $OUT.
#   bash bench/gpu_machine_eval.sh NAME [prefixkv eval options...]
set -euo pipefail
name=$1; shift
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_TESTS=OFF > "$OUT/build_$name.log" 2>&1
cmake --build build-gpu -j "$(nproc)" >> "$OUT/build_$name.log" 2>&1
echo "cores: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
time ./build-gpu/prefixkv eval --data data/eval/eval.json --out "$OUT/$name.json" --plot "$OUT/$name.svg" \
  --jobs "$(nproc)" "$@" 2> "$OUT/eval_$name.log"
