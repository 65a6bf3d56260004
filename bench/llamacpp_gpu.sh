#!/usr/bin/env bash
# llama.cpp's CUDA back end beside prefixkv on the GPU machine, on the same random LLaVA-1.5-7B language
# model: one checkpoint (tools/make_random_checkpoint.py, fp16 safetensors), written as GGUF F16 by
# `prefixkv export --gguf`; llama.cpp runs that file with its own benchmark tools, prefixkv runs the
# checkpoint it came from (the same values) with `prefixkv bench --model`.
#
# llama.cpp is the release that the npm package node-llama-cpp 3.21.1 bundles (its source ships in the
# package as a git bundle), built from source on the GPU machine for sm_90; it is read and built there,
# never committed.
#
#   Development machine (network to the npm registry):
#     bash bench/llamacpp_gpu.sh prepare     # .carry/llamacpp: llama.cpp's sources (~2 MB, xz) + the tokenizer
#   GPU machine (carry .carry/llamacpp; each phase under the 10-minute command limit, chained on one machine):
#     bash bench/llamacpp_gpu.sh build       # llama-bench and llama-batched-bench, CUDA, sm_90
#     bash bench/llamacpp_gpu.sh model       # the random 7B checkpoint and its GGUF F16 (build-llamacpp/)
#     bash bench/llamacpp_gpu.sh bench       # both engines: batch 1 (672 + 256) and batch 16 (1024 + 512)
#     bash bench/llamacpp_gpu.sh cpu         # both engines on the machine's CPU cores (no GPU): the 7B checkpoint
#                                            # and the bundled model, batch 1, 64-token prompt + 32 tokens
# Results (logs, JSON) go to $OUT/llamacpp_<phase>.tar.
#
# What is compared. Batch 1: llama-bench's `-pg 672,256` (a 672-token prompt then 256 generated tokens,
# one sequence; llama-bench reports tokens/s of the whole test) and its pp672 / tg256 tests apart;
# prefixkv bench --batch 1 --prompt 672 --gen 256 (prefill ms, decode tok/s, throughput). Batch 16:
# llama-batched-bench -npp 1024 -ntg 512 -npl 16 (16 sequences each prefilled with 1024 tokens, then 512
# steps of 16 tokens: S_PP, S_TG and S = all tokens / all time) against prefixkv bench --batch 16
# --prompt 1024 --gen 512. Flash attention on in llama.cpp (-fa 1), all layers on the GPU (-ngl 99),
# F16 KV cache (llama.cpp's default), as prefixkv's f16 cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PIN=3.21.1
C=.carry/llamacpp
B=build-llamacpp
phase=${1:-}
case "$phase" in
  prepare)
    work=${TMPDIR:-/tmp}/pkv-llamacpp-prepare
    mkdir -p "$work/nlc" "$C"
    if [ ! -f "$work/nlc/node_modules/node-llama-cpp/llama/gitRelease.bundle" ]; then
      (cd "$work/nlc" && npm init -y >/dev/null && npm i -E --ignore-scripts "node-llama-cpp@$PIN" >"$work/npm.log" 2>&1) ||
        { echo "llamacpp_gpu: npm install failed (see $work/npm.log)"; exit 1; }
    fi
    info=$work/nlc/node_modules/node-llama-cpp/llama/llama.cpp.info.json
    tag=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tag"])' "$info")
    rm -rf "$work/src" && git clone -q "$work/nlc/node_modules/node-llama-cpp/llama/gitRelease.bundle" "$work/src" 2>/dev/null
    # Only what llama-bench and llama-batched-bench need with the CUDA and CPU back ends.
    (cd "$work/src" && tar -cJf - --exclude='ggml/src/ggml-vulkan' --exclude='ggml/src/ggml-sycl' \
        --exclude='ggml/src/ggml-opencl' --exclude='ggml/src/ggml-metal' --exclude='ggml/src/ggml-hexagon' \
        --exclude='ggml/src/ggml-et' --exclude='ggml/src/ggml-webgpu' --exclude='ggml/src/ggml-openvino' \
        --exclude='ggml/src/ggml-cann' --exclude='ggml/src/ggml-virtgpu' \
        CMakeLists.txt cmake include src common ggml tools/CMakeLists.txt tools/llama-bench tools/batched-bench \
        vendor LICENSE licenses) > "$C/src.tar.xz"
    echo "node-llama-cpp $PIN bundles llama.cpp $tag ($(cd "$work/src" && git log -1 --format=%H))" > "$C/VERSION"
    cp ../shared/reference/llama2-tokenizer/tokenizer.model "$C/tokenizer.model"
    echo "llamacpp_gpu: $(cat "$C/VERSION"); $(du -sh "$C" | cut -f1) in $C"
    ;;
  build|model|bench|cpu)
    [ -f "$C/src.tar.xz" ] || { echo "llamacpp_gpu: no $C/src.tar.xz (run 'bench/llamacpp_gpu.sh prepare' and carry $C)"; exit 2; }
    W=${OUT:-out}/w_llamacpp_$phase
    mkdir -p "$W" "$B"
    trap 'tar -C "$W" -cf "${OUT:-out}/llamacpp_$phase.tar" . || true' EXIT
    J=$(nproc)
    case "$phase" in
      build)
        rm -rf "$B/src" && mkdir -p "$B/src" && tar -xJf "$C/src.tar.xz" -C "$B/src"
        # Only the two benchmark tools (the full tools folder is not carried).
        printf 'add_subdirectory(llama-bench)\nadd_subdirectory(batched-bench)\n' > "$B/src/tools/CMakeLists.txt"
        cmake -S "$B/src" -B "$B/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
          -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
          -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON > "$W/configure.log" 2>&1 || { tail -30 "$W/configure.log"; exit 2; }
        /usr/bin/time -v cmake --build "$B/build" -j "$J" --target llama-bench llama-batched-bench > "$W/build.log" 2>&1 ||
          { grep -m5 -B2 -A5 "error" "$W/build.log"; tail -20 "$W/build.log"; exit 2; }
        grep -E "Elapsed \(wall" "$W/build.log" || true
        cp "$C/VERSION" "$W/"
        ls -la "$B/build/bin/" | tee "$W/bins.txt"
        ;;
      model)
        [ -x build-gpu/prefixkv ] || { cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_CUDA=ON \
          -DCMAKE_CUDA_ARCHITECTURES=90 -DPREFIXKV_TESTS=OFF > "$W/pkv_build.log" 2>&1 &&
          cmake --build build-gpu -j "$J" --target prefixkv >> "$W/pkv_build.log" 2>&1; }
        t0=$(date +%s)
        python3 tools/make_random_checkpoint.py --shape llava-1.5-7b --out "$B/ckpt7b" --tokenizer "$C/tokenizer.model" \
          > "$W/checkpoint.log" 2>&1
        t1=$(date +%s)
        ./build-gpu/prefixkv export --model "$B/ckpt7b" --gguf "$B/7b-f16.gguf" --type f16 > "$W/export.log" 2>&1
        t2=$(date +%s)
        echo "checkpoint $((t1 - t0)) s, GGUF F16 export $((t2 - t1)) s: $(du -sh "$B/ckpt7b" | cut -f1) -> $(du -sh "$B/7b-f16.gguf" | cut -f1)" | tee "$W/model.txt"
        ;;
      bench)
        [ -f "$B/7b-f16.gguf" ] || { echo "llamacpp_gpu: run the model phase first"; exit 2; }
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$W/gpu.txt"
        cat "$C/VERSION" | tee -a "$W/gpu.txt"
        LB="$B/build/bin/llama-bench"
        timeout 200 "$LB" -m "$B/7b-f16.gguf" -ngl 99 -fa 1 -p 672 -n 256 -pg 672,256 -r 3 -o json > "$W/llama_bench_b1.json" 2> "$W/llama_bench_b1.err" ||
          { echo "llama-bench failed: rc $?"; tail -5 "$W/llama_bench_b1.err"; }
        python3 - "$W/llama_bench_b1.json" <<'PY' || true
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f'llama-bench: n_prompt {r["n_prompt"]:5} n_gen {r["n_gen"]:4}  {r["avg_ts"]:9.1f} tok/s (+- {r["stddev_ts"]:.1f})  {r.get("build_commit","")} {r.get("gpu_info","")}')
PY
        timeout 200 "$B/build/bin/llama-batched-bench" -m "$B/7b-f16.gguf" -ngl 99 -fa 1 -c 32768 -b 2048 -ub 512 \
          -npp 1024 -ntg 512 -npl 16 > "$W/llama_batched_b16.txt" 2>&1 || echo "llama-batched-bench failed: rc $?"
        grep -E "^\|" "$W/llama_batched_b16.txt" | tail -3
        for cfg in "1 672 256" "16 1024 512"; do
          set -- $cfg
          timeout 200 ./build-gpu/prefixkv bench --model "$B/ckpt7b" --device cuda --dtype f16 --batch $1 --prompt $2 --gen $3 \
            --json "$W/prefixkv_b$1.json" > "$W/prefixkv_b$1.txt" 2>&1 || echo "prefixkv bench b$1 failed: rc $?"
          grep -E "^\|" "$W/prefixkv_b$1.txt" | tail -2
        done
        ;;
      cpu)
        # llama.cpp's CPU back end: the same build with the GPU hidden (CUDA_VISIBLE_DEVICES empty), so no
        # product is offloaded; both engines use every core. The bundled model is written as GGUF F32 and
        # F16 by prefixkv export, its checkpoint (bf16 values) read by prefixkv as they are.
        [ -f "$B/7b-f16.gguf" ] || { echo "llamacpp_gpu: run the model phase first"; exit 2; }
        LB="$B/build/bin/llama-bench"
        { grep -m1 'model name' /proc/cpuinfo; echo "cores: $J"; cat "$C/VERSION"; } | tee "$W/cpu.txt"
        ./build-gpu/prefixkv export --model models/prefixkv-llava-tiny --gguf "$B/tiny-f16.gguf" --type f16 > "$W/export_tiny.log" 2>&1
        ./build-gpu/prefixkv export --model models/prefixkv-llava-tiny --gguf "$B/tiny-f32.gguf" --type f32 >> "$W/export_tiny.log" 2>&1
        for m in 7b-f16 tiny-f32 tiny-f16; do
          r=3; [ "$m" = 7b-f16 ] && r=2
          CUDA_VISIBLE_DEVICES="" timeout 240 "$LB" -m "$B/$m.gguf" -ngl 0 -t "$J" -p 64 -n 32 -r $r -o json \
            > "$W/llama_cpu_$m.json" 2> "$W/llama_cpu_$m.err" || { echo "llama-bench $m failed: rc $?"; tail -5 "$W/llama_cpu_$m.err"; }
          python3 - "$W/llama_cpu_$m.json" "$m" <<'PY' | tee -a "$W/cpu.txt" || true
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f'llama.cpp CPU {sys.argv[2]}: n_prompt {r["n_prompt"]:3} n_gen {r["n_gen"]:3}  {r["avg_ts"]:9.1f} tok/s (+- {r["stddev_ts"]:.1f}), {r["n_threads"]} threads')
PY
        done
        for m in "$B/ckpt7b" models/prefixkv-llava-tiny; do
          n=$(basename "$m")
          timeout 240 ./build-gpu/prefixkv bench --model "$m" --device cpu --threads "$J" --batch 1 --prompt 64 --gen 32 \
            --json "$W/prefixkv_cpu_$n.json" > "$W/prefixkv_cpu_$n.txt" 2>&1 || echo "prefixkv bench cpu $n failed: rc $?"
          echo "prefixkv CPU $n:" | tee -a "$W/cpu.txt"; grep -E "^\|" "$W/prefixkv_cpu_$n.txt" | tail -2 | tee -a "$W/cpu.txt"
        done
        ;;
    esac
    ;;
  *)
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
    exit 2
    ;;
esac
