#!/usr/bin/env bash
# docs/PERF.md's measurements on the GPU machine, in phases (each under its 10-minute command limit);
# everything is packed into $OUT/perf_<phase>.tar (at most 8 files come back).
#   bash bench/gpu_machine_perf.sh cpu      # prefixkv bench on the machine's CPU cores (LLaVA-1.5-7B shape)
#   bash bench/gpu_machine_perf.sh hf       # transformers, eager and sdpa, the paper's settings (bench/hf_bench.py)
#   bash bench/gpu_machine_perf.sh smoke    # prefixkv bench --device cuda: short runs of each kind + an nsys profile of batch 1
#   bash bench/gpu_machine_perf.sh gpu1     # prefixkv bench --device cuda: batch 1 (bandwidth floor), 7B batch 16
#   bash bench/gpu_machine_perf.sh run      # prefixkv run --device cuda vs cpu on the bundled model
#   bash bench/gpu_machine_perf.sh ab       # batch 1: CUDA graphs / the gemv kernel on and off; the importance pass's cost
#   bash bench/gpu_machine_perf.sh capacity # 7B at 20% kept with the batch the pool holds (700); full cache past its 151
#   bash bench/gpu_machine_perf.sh gpu2     # prefixkv bench --device cuda: 7B batch 48, 13B batch 8
#   bash bench/gpu_machine_perf.sh peers    # transformers static cache + compiled decoding vs prefixkv, 7B b1 and b16
#                                           # (PEER_BATCH=1 or 16: only that setting)
#   bash bench/gpu_machine_perf.sh prefill  # one 1024-token 7B prefill: tensor-core vs CUDA-core attention
#   bash bench/gpu_machine_perf.sh prefill_batch # prompts/s: a batch's prompts in one pass (--prefill-batched) vs one
#                                           # at a time, 7B f16, prompts of 128 and 672 tokens, batch 1, 4, 16
#   bash bench/gpu_machine_perf.sh decode_ab # decode steps with the dependent launches (PKV_PDL) and the tensor-core
#                                           # skinny products (PKV_SKINNY) on and off: 7B b1, b16, b48, full cache
#   bash bench/gpu_machine_perf.sh serve_load # prefixkv serve, random LLaVA-1.5-7B: 64 streaming clients, images,
#                                           # mixed lengths; full cache and 20% kept (bench/serve_load.py)
# (the same card must run both sides of a comparison: run hf and gpu* in one call or on one warm machine)
set -euo pipefail
FINAL_OUT=$OUT
W=$FINAL_OUT/w_perf
mkdir -p "$W"
pack() { tar -C "$W" -cf "$FINAL_OUT/perf_${PHASES// /_}.tar" . && rm -rf "$W"; }
# What is done so far, packed after every run: a call killed at its time limit still returns it.
keep() { tar -C "$W" -cf "$FINAL_OUT/perf_${PHASES// /_}.tar" . || true; }
PHASES="$*"
trap pack EXIT
J=$(nproc)
# prefixkv with the CUDA back end in build-gpu (scripts/gpu_test.sh may have configured it already)
source scripts/httplib_env.sh  # the server needs cpp-httplib: carried in .carry/httplib where the machine lacks it
build_gpu() {
  if [ ! -f build-gpu/CMakeCache.txt ]; then
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DPREFIXKV_NATIVE=ON -DPREFIXKV_TESTS=OFF > "$W/build_gpu.log" 2>&1
  fi
  cmake --build build-gpu -j "$J" --target prefixkv >> "$W/build_gpu.log" 2>&1
}
for phase in "$@"; do
case $phase in
  cpu)
    cmake -S . -B build-cpu16 -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_TESTS=OFF -DPREFIXKV_CUDA=OFF > "$W/build_cpu.log" 2>&1
    cmake --build build-cpu16 -j "$J" --target prefixkv >> "$W/build_cpu.log" 2>&1
    echo "cores: $J; $(grep -m1 'model name' /proc/cpuinfo)" | tee "$W/cpu.txt"
    ./build-cpu16/prefixkv bench --shape llava-1.5-7b --dtype f16 --batch 1,8 --prompt 672 --gen 32 \
      --policies full,snapkv --budgets 0.2 --json "$W/bench_cpu_7b.json" >> "$W/cpu.txt" 2>&1
    tail -8 "$W/cpu.txt"
    ;;
  hf)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$W/hf.txt"
    PYTHONUNBUFFERED=1 timeout 280 python3 bench/hf_bench.py --shape llava-1.5-7b --batch 1 --prompt 672 --gen 256 --out "$W/hf_7b_b1.json" >> "$W/hf.txt" 2>&1 || echo "hf_bench failed: rc $?" >> "$W/hf.txt"; keep
    PYTHONUNBUFFERED=1 timeout 280 python3 bench/hf_bench.py --shape llava-1.5-7b --batch 16 --prompt 1024 --gen 512 --out "$W/hf_7b_b16.json" >> "$W/hf.txt" 2>&1 || echo "hf_bench failed: rc $?" >> "$W/hf.txt"; keep
    PYTHONUNBUFFERED=1 timeout 280 python3 bench/hf_bench.py --shape llava-1.5-7b --batch 48 --prompt 624 --gen 256 --out "$W/hf_7b_b48.json" >> "$W/hf.txt" 2>&1 || echo "hf_bench failed: rc $?" >> "$W/hf.txt"; keep
    PYTHONUNBUFFERED=1 timeout 280 python3 bench/hf_bench.py --shape llava-1.5-13b --batch 8 --prompt 1024 --gen 512 --out "$W/hf_13b_b8.json" >> "$W/hf.txt" 2>&1 || echo "hf_bench failed: rc $?" >> "$W/hf.txt"; keep
    grep "^|" "$W/hf.txt" || tail -20 "$W/hf.txt"
    grep -iE "error|Traceback" "$W/hf.txt" | head -5 || true
    ;;
  run)  # prefixkv run on the GPU vs the CPU: the bundled model describing data/example.png
    build_gpu
    for dev in cpu "cuda --gpu-dtype f16" "cuda --gpu-dtype bf16" "cuda --gpu-dtype f16 --kv-policy prefixkv --kv-budget 0.2"; do
      tag=$(echo "$dev" | tr ' .-' '___')
      ./build-gpu/prefixkv run --image data/example.png --device $dev --json > "$W/run_$tag.json" 2> "$W/run_$tag.err" \
        || echo "run --device $dev failed: $(tail -1 "$W/run_$tag.err")"
      python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(sys.argv[2], '|', j.get('device'), '|', j['timings']['vision_ms'], 'ms vision |', round(j['timings']['prefill_ms'],1), 'ms prefill |', round(j['timings']['decode_tokens_per_s'],1), 'tok/s |', j['text'])" "$W/run_$tag.json" "$dev" || true
      keep
    done
    ;;
  serve)  # prefixkv serve --device cuda: 4 concurrent requests (batched on the GPU) = prefixkv run's answers
    build_gpu
    SERVE_DEV=${SERVE_DEV:-cuda --gpu-dtype f16}
    cases=()
    for pb in full snapkv:0.5 prefixkv-online:0.3 h2o:0.5; do
      pol=${pb%%:*}; bud=${pb#*:}; [ "$bud" = "$pb" ] && bud=1
      ./build-gpu/prefixkv run --image data/example.png --device $SERVE_DEV --kv-policy "$pol" --kv-budget "$bud" \
        --max-tokens 48 --json > "$W/serve_ref_$pol.json" 2>> "$W/serve.txt" || echo "run $pol failed" | tee -a "$W/serve.txt"
      cases+=("$pb=$W/serve_ref_$pol.json")
    done
    ./build-gpu/prefixkv serve --device $SERVE_DEV --port 0 > "$W/serve_server.log" 2>&1 &
    spid=$!
    port=""
    for _ in $(seq 1 120); do
      port=$(sed -n 's/^listening on http:\/\/[^:]*:\([0-9]*\).*/\1/p' "$W/serve_server.log" | head -1)
      [ -n "$port" ] && break
      kill -0 $spid 2>/dev/null || break
      sleep 0.5
    done
    if [ -n "$port" ]; then
      python3 bench/serve_check.py --port "$port" --image data/example.png --max-tokens 48 "${cases[@]}" 2>&1 | tee -a "$W/serve.txt" || true
      curl -s "http://127.0.0.1:$port/metrics" 2>/dev/null | grep -E "^prefixkv_(kv|batch|requests)" | head -12 >> "$W/serve.txt" || true
    else
      echo "serve did not start:" | tee -a "$W/serve.txt"; tail -5 "$W/serve_server.log" | tee -a "$W/serve.txt"
    fi
    kill $spid 2>/dev/null || true; wait $spid 2>/dev/null || true
    keep
    ;;
  ncu)  # per-kernel GPU time of decode steps (plain launches: ncu profiles each kernel)
    build_gpu
    # the decode kernels' memory throughput, occupancy and registers (a few launches each)
    PKV_CUDA_GRAPHS=0 timeout 200 ncu --clock-control none --kernel-name regex:"gemv|decode_split|rms_norm" \
      --launch-skip 600 --launch-count 12 \
      --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,launch__occupancy_limit_registers \
      ./build-gpu/prefixkv bench --shape llava-1.5-7b --device cuda --dtype f16 --batch 1 --prompt 672 --gen 8 \
      > "$W/ncu_metrics_b1.txt" 2>&1 || echo "ncu metrics failed: rc $?"
    grep -E "gemv_kernel|decode_split|rms_norm|duration|dram__|warps_active|registers|grid_size|occupancy" "$W/ncu_metrics_b1.txt" | head -120
    for cfg in "1 672" "16 1024"; do
      set -- $cfg
      # skip the prefill(s) and the first steps: profile kernels of later decode steps only
      skip=$(( $1 * 530 + 1700 ))
      PKV_CUDA_GRAPHS=0 timeout 280 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        --launch-skip $skip --launch-count 1000 ./build-gpu/prefixkv bench --shape llava-1.5-7b --device cuda --dtype f16 \
        --batch $1 --prompt $2 --gen 16 > "$W/ncu_b$1.csv" 2> "$W/ncu_b$1.err" || echo "ncu b$1 failed: rc $?"
      python3 - "$W/ncu_b$1.csv" <<'PY' | tee "$W/ncu_b$1_summary.txt"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows: print("no ncu rows"); sys.exit()
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); ui = h.index("Metric Unit")
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    if r[ui] == "usecond": v *= 1000
    elif r[ui] == "msecond": v *= 1e6
    name = r[ki].split("(")[0][:70]; tot[name] += v; cnt[name] += 1
all_ns = sum(tot.values())
print(f"{len(rows)-1} kernels, {all_ns/1e6:.3f} ms in all")
for n, v in sorted(tot.items(), key=lambda x: -x[1])[:25]:
    print(f"{v/1e6:9.3f} ms {100*v/all_ns:5.1f}% {cnt[n]:6d} x {v/cnt[n]/1e3:8.2f} us  {n}")
PY
    done
    ;;
  peers)  # transformers' strongest path (static cache, compiled decoding) and prefixkv, the same settings, one sitting
    build_gpu
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$W/peers.txt"
    for cfg in "1 672 256" "16 1024 512"; do
      set -- $cfg
      [ -z "${PEER_BATCH:-}" ] || [ "$PEER_BATCH" = "$1" ] || continue  # PEER_BATCH=1 or 16: one setting per call
      PYTHONUNBUFFERED=1 timeout 280 python3 bench/hf_bench.py --shape llava-1.5-7b --attn static --batch $1 --prompt $2 \
        --gen $3 --out "$W/hf_static_7b_b$1.json" >> "$W/peers.txt" 2>&1 || echo "hf_bench static b$1 failed: rc $?" | tee -a "$W/peers.txt"
      keep
      timeout 150 ./build-gpu/prefixkv bench --shape llava-1.5-7b --device cuda --dtype f16 --batch $1 --prompt $2 --gen $3 \
        --json "$W/pkv_7b_b$1.json" >> "$W/peers.txt" 2>&1 || echo "prefixkv bench b$1 failed: rc $?" | tee -a "$W/peers.txt"
      keep
    done
    grep -E "^\| (impl|transformers)|^\|---" "$W/peers.txt" | sort -u
    python3 - "$W"/pkv_7b_b*.json <<'PY'
import json, sys
for f in sys.argv[1:]:
    j = json.load(open(f))
    for r in j.get("records", []):
        print({k: r.get(k) for k in ("batch", "prompt", "gen", "policy", "prefill_ms", "decode_tokens_per_s", "throughput_tokens_per_s")})
PY
    grep -iE "error|Traceback" "$W/peers.txt" | head -5 || true
    ;;
  decode_ab)  # what the dependent launches and the skinny products bring to decoding, one sitting
    build_gpu
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$W/decode_ab.txt"
    for cfg in "1 672 256" "16 1024 512" "48 624 256"; do
      set -- $cfg
      for ab in "PKV_PDL=0 PKV_SKINNY=0" "PKV_PDL=1 PKV_SKINNY=0" "PKV_PDL=0 PKV_SKINNY=1" "PKV_PDL=1 PKV_SKINNY=1"; do
        [ "$1" = 1 ] && [ "${ab#*SKINNY=}" = 1 ] && continue  # one row: the skinny products are not used
        echo "== 7B batch $1, $2 + $3, $ab" >> "$W/decode_ab.txt"
        env $ab timeout 150 ./build-gpu/prefixkv bench --shape llava-1.5-7b --device cuda --dtype f16 --batch $1 --prompt $2 \
          --gen $3 --json "$W/ab_b$1_$(echo $ab | tr ' =' '__').json" >> "$W/decode_ab.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/decode_ab.txt"
        keep
      done
    done
    grep -E "^==|^\| prefixkv|decode" "$W/decode_ab.txt" | grep -vE "^\|---" | head -60
    ;;
  serve_load)  # the server under load: 64 concurrent streaming clients, a random LLaVA-1.5-7B with its vision tower
    build_gpu
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$W/serve_load.txt"
    CK=${SERVE_LOAD_CKPT:-build-llamacpp/ckpt7b}  # the checkpoint bench/llamacpp_gpu.sh model writes, when there
    if [ ! -f "$CK/config.json" ]; then
      CK=build-serve-load/ckpt7b
      [ -f "$CK/config.json" ] || python3 tools/make_random_checkpoint.py --shape llava-1.5-7b --out "$CK" \
        --tokenizer "${SERVE_LOAD_TOKENIZER:-.carry/llamacpp/tokenizer.model}" >> "$W/serve_load.txt" 2>&1
    fi
    PYTHONUNBUFFERED=1 timeout "${SERVE_LOAD_TIMEOUT:-540}" python3 bench/serve_load.py --binary build-gpu/prefixkv --model "$CK" \
      --images data/example.png tests/data/images/wide.png tests/data/images/tall.jpg --clients 64 \
      --requests "${SERVE_LOAD_REQUESTS:-192}" --gen 32,256 --settings ${SERVE_LOAD_SETTINGS:-full snapkv:0.2} \
      --server-args "--device cuda --dtype f16 --max-running 64 --max-queue 256" --workdir "$W" \
      --out "$W/serve_load.json" >> "$W/serve_load.txt" 2>&1 || echo "serve_load failed: rc $?" | tee -a "$W/serve_load.txt"
    grep -E "^\|" "$W/serve_load.txt" || tail -20 "$W/serve_load.txt"
    keep
    ;;
  prefill)  # the prefill attention: tensor-core vs CUDA-core kernels, one 1024-token 7B prompt (f16, bf16)
    build_gpu
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$W/prefill.txt"
    for dt in f16 bf16; do
      for mma in 1 0; do
        for round in $(seq 1 "${PREFILL_ROUNDS:-2}"); do
          echo "== 7B prefill, $dt, PKV_PREFILL_MMA=$mma, round $round" >> "$W/prefill.txt"
          PKV_PREFILL_MMA=$mma timeout 120 ./build-gpu/prefixkv bench --shape llava-1.5-7b --device cuda --dtype $dt \
            --batch 1 --prompt 1024 --gen 4 --json "$W/prefill_${dt}_mma${mma}_r$round.json" >> "$W/prefill.txt" 2>&1 \
            || echo "bench failed: rc $?" | tee -a "$W/prefill.txt"
        done
      done
    done
    grep -E "^==|one 1024-token prefill" "$W/prefill.txt"
    keep
    ;;
  prefill_batch)  # batched prefill (issue 14 item 2): one pass vs one prompt at a time, alternating, same card
    build_gpu
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$W/prefill_batch.txt"
    for round in $(seq 1 "${PREFILL_ROUNDS:-2}"); do
      for prompt in 128 672; do
        for f in "" --prefill-batched; do
          echo "== 7B f16 prompt $prompt ${f:-one at a time} round $round" >> "$W/prefill_batch.txt"
          timeout 150 ./build-gpu/prefixkv bench --shape llava-1.5-7b --device cuda --dtype f16 --batch 1,4,16 \
            --prompt $prompt --gen 4 $f --json "$W/prefill_batch_p${prompt}${f:+_batched}_r$round.json" \
            >> "$W/prefill_batch.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/prefill_batch.txt"
          keep
        done
      done
    done
    grep -E "^==|prompts/s" "$W/prefill_batch.txt"
    ;;
  smoke|gpu1|gpu2|b1|bf16|capacity|ab)
    build_gpu
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$W/gpu.txt"
    B=./build-gpu/prefixkv
    P="--policies full,prefixkv-online --budgets 0.2,0.4,0.6,0.8 --device cuda --dtype f16"
    if [ "$phase" = ab ]; then  # batch 1, 1024-token prompt: CUDA graphs and the gemv kernel on / off
      for ab in "" "PKV_CUDA_GRAPHS=0" "PKV_CUDA_GRAPHS=0 PKV_GEMV=0"; do
        echo "== 7B batch 1 ${ab:-(default)}" >> "$W/gpu.txt"
        env $ab timeout 170 $B bench --shape llava-1.5-7b --device cuda --dtype f16 --batch 1 --prompt 1024 --gen 128 \
          --json "$W/gpu_7b_b1_ab${ab:+_$(echo $ab | tr ' =' '__')}.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/gpu.txt"
        keep
      done
    elif [ "$phase" = capacity ]; then  # the memory saved is real: run the batch the pool holds at 20%, and past full's
      timeout 280 $B bench --shape llava-1.5-7b --device cuda --dtype f16 --policies prefixkv-online --budgets 0.2 \
        --batch 700 --prompt 1024 --gen 512 --json "$W/gpu_7b_cap20_b700.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/gpu.txt"
      keep
      timeout 200 $B bench --shape llava-1.5-7b --device cuda --dtype f16 --policies full \
        --batch 160 --prompt 1024 --gen 512 --json "$W/gpu_7b_capfull_b160.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed (expected: out of blocks): rc $?" | tee -a "$W/gpu.txt"
      keep
    elif [ "$phase" = bf16 ]; then  # bf16 weights and KV: batch 1 and batch 16 (full and 20%)
      timeout 120 $B bench --shape llava-1.5-7b --device cuda --dtype bf16 --batch 1 --prompt 672 --gen 256 \
        --json "$W/gpu_7b_b1_bf16.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/gpu.txt"
      keep
      timeout 170 $B bench --shape llava-1.5-7b --device cuda --dtype bf16 --policies full,prefixkv-online --budgets 0.2 \
        --batch 16 --prompt 1024 --gen 512 --json "$W/gpu_7b_b16_bf16.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/gpu.txt"
      keep
    elif [ "$phase" = b1 ]; then  # one short batch-1 run (a check after a kernel change)
      timeout 170 $B bench --shape llava-1.5-7b --device cuda --dtype f16 --batch 1 --prompt 672 --gen 128 \
        --json "$W/gpu_7b_b1_quick.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/gpu.txt"
      keep
    elif [ "$phase" = smoke ]; then  # minutes: does everything run; A/B of CUDA graphs and the gemv kernel
      timeout 170 $B bench --shape tiny --device cuda --dtype f16 --batch 1,4 --prompt 64 --gen 16 --policies full,prefixkv-online,h2o,elastic \
        --budgets 0.5 >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/gpu.txt"
      for ab in "" "PKV_CUDA_GRAPHS=0"; do
        echo "== 7B batch 1 ${ab:-(default)}" >> "$W/gpu.txt"
        env $ab timeout 170 $B bench --shape llava-1.5-7b --device cuda --dtype f16 --batch 1 --prompt 672 --gen 128 \
          --json "$W/gpu_7b_b1_smoke${ab:+_$(echo $ab | tr ' =' '__')}.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/gpu.txt"
      done
      timeout 170 $B bench --shape llava-1.5-7b --device cuda --dtype f16 --policies full,prefixkv-online --budgets 0.2 \
        --batch 16 --prompt 1024 --gen 64 --json "$W/gpu_7b_b16_smoke.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" | tee -a "$W/gpu.txt"
      if command -v nsys >/dev/null; then
        timeout 120 nsys profile -o "$W/b1" --force-overwrite true $B bench --shape llava-1.5-7b --device cuda --dtype f16 --batch 1 \
          --prompt 672 --gen 32 > "$W/nsys_run.txt" 2>&1 || true
        nsys stats --report cuda_gpu_kern_sum,cuda_api_sum --format csv "$W/b1.nsys-rep" > "$W/nsys_b1.csv" 2>&1 || true
        rm -f "$W/b1.nsys-rep" "$W/b1.sqlite"
      fi
    elif [ "$phase" = gpu1 ]; then
      $B bench --shape llava-1.5-7b --device cuda --dtype f16 --batch 1 --prompt 672 --gen 256 \
        --json "$W/gpu_7b_b1.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" >> "$W/gpu.txt"; keep
      $B bench --shape llava-1.5-7b $P --batch 16 --prompt 1024 --gen 512 --json "$W/gpu_7b_b16.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" >> "$W/gpu.txt"; keep
    else
      $B bench --shape llava-1.5-7b $P --batch 48 --prompt 624 --gen 256 --json "$W/gpu_7b_b48.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" >> "$W/gpu.txt"; keep
      $B bench --shape llava-1.5-13b $P --batch 8 --prompt 1024 --gen 512 --json "$W/gpu_13b_b8.json" >> "$W/gpu.txt" 2>&1 || echo "bench failed: rc $?" >> "$W/gpu.txt"; keep
    fi
    grep "^|" "$W/gpu.txt" || tail -20 "$W/gpu.txt"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
done
