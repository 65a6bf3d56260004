#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (clang, ASan + UBSan, -DPREFIXKV_FUZZ=ON) in their own
# build folder and runs each for a while; fails when any target finds something (a crash, a leak,
# undefined behaviour, an exception type its parser does not document, a broken invariant, an input
# slower than the timeout, memory over the limit). docs/RELIABILITY.md has the results.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (make fuzz; default 30 s, every target)
#
# TARGET: fuzz_safetensors or just safetensors; `bash scripts/fuzz.sh list` lists them.
# Environment:
#   FUZZ_BUILD      build folder (default build-fuzz)
#   FUZZ_JOBS       parallel compile jobs (default 2)
#   FUZZ_RUNS       stop each target after this many executions instead (-runs; the time still bounds it)
#   FUZZ_ARGS       more libFuzzer flags, e.g. "-jobs=2 -workers=2" or "-detect_leaks=0"
#   FUZZ_KEEP=1     keep the grown corpora of earlier runs (default: start from the seeds each time)
# Per target: the work corpus is $FUZZ_BUILD/corpus/<target> (grown from tests/fuzz/corpus/<target>,
# which is never written), findings go to $FUZZ_BUILD/findings/<target>/, the log to
# $FUZZ_BUILD/logs/<target>.log; $FUZZ_BUILD/fuzz_summary.tsv gets one line per target run (date,
# target, executions, seconds, exit status, the commit the targets were built from).
# Reproduce a finding: $FUZZ_BUILD/fuzz/<target> $FUZZ_BUILD/findings/<target>/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${FUZZ_BUILD:-build-fuzz}
JOBS=${FUZZ_JOBS:-2}
ALL=(fuzz_safetensors fuzz_safetensors_index fuzz_config fuzz_profile fuzz_image fuzz_chat_request fuzz_tokenizer fuzz_gguf)

secs=30
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then secs=$1; shift; fi
if [ "${1:-}" = list ]; then printf '%s\n' "${ALL[@]}"; exit 0; fi
targets=()
for t in "$@"; do
  t=fuzz_${t#fuzz_}
  [[ " ${ALL[*]} " == *" $t "* ]] || { echo "fuzz: unknown target '$t' (one of: ${ALL[*]})" >&2; exit 2; }
  targets+=("$t")
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")

CXX_FUZZ=${CXX_FUZZ:-clang++}
CC_FUZZ=${CC_FUZZ:-clang}
if ! command -v "$CXX_FUZZ" >/dev/null; then
  echo "fuzz: $CXX_FUZZ not found; install clang with its sanitizer and fuzzer runtimes (bash scripts/setup.sh sanitize)" >&2
  exit 2
fi
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
mkdir -p "$BUILD/logs"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  # -O2 with line tables for the stack traces; no NDEBUG and libstdc++'s assertions on, so that
  # nlohmann's and the standard library's own checks fire too.
  CC=$CC_FUZZ CXX=$CXX_FUZZ cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -gline-tables-only -D_GLIBCXX_ASSERTIONS" \
    -DPREFIXKV_CUDA=OFF -DPREFIXKV_TESTS=OFF -DPREFIXKV_FUZZ=ON >"$BUILD/logs/configure.log" 2>&1 ||
    { tail -20 "$BUILD/logs/configure.log"; echo "fuzz: configuring failed ($BUILD/logs/configure.log)" >&2; exit 2; }
fi
t0=$(date +%s)
if ! cmake --build "$BUILD" -j "$JOBS" --target "${targets[@]}" >"$BUILD/logs/build.log" 2>&1; then
  grep -E "error|FAILED" "$BUILD/logs/build.log" | head -30
  echo "fuzz: build failed ($BUILD/logs/build.log)" >&2
  exit 2
fi
rev=$(git describe --always --dirty 2>/dev/null || echo -)  # what the targets were built from
echo "fuzz: built ${#targets[@]} target(s) from $rev in $(( $(date +%s) - t0 )) s; $secs s each"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
printf '%-24s %12s %8s %10s  %s\n' target executions seconds exec/s result
for t in "${targets[@]}"; do
  seeds=tests/fuzz/corpus/$t
  work=$BUILD/corpus/$t
  findings=$BUILD/findings/$t
  log=$BUILD/logs/$t.log
  [ "${FUZZ_KEEP:-0}" = 1 ] || rm -rf "$work"
  mkdir -p "$work" "$findings"
  args=(-max_total_time="$secs" -timeout=25 -rss_limit_mb=2560 -print_final_stats=1 -artifact_prefix="$findings/")
  [ -n "${FUZZ_RUNS:-}" ] && args+=(-runs="$FUZZ_RUNS")
  [ -f "tests/fuzz/dict/$t.dict" ] && args+=(-dict="tests/fuzz/dict/$t.dict")
  # shellcheck disable=SC2206
  extra=(${FUZZ_ARGS:-})
  s0=$(date +%s.%N)
  set +e
  "$BUILD/fuzz/$t" "${args[@]}" "${extra[@]}" "$work" "$seeds" >"$log" 2>&1
  rc=$?
  set -e
  s1=$(date +%s.%N)
  execs=$(grep -E '^stat::number_of_executed_units:' "$log" | tail -1 | awk '{print $2}')
  execs=${execs:-0}
  el=$(awk -v a="$s0" -v b="$s1" 'BEGIN{printf "%.0f", b-a}')
  rate=$(awk -v n="$execs" -v s="$el" 'BEGIN{printf "%.0f", (s > 0) ? n / s : 0}')
  if [ "$rc" = 0 ]; then
    result=ok
  else
    result="FINDING (exit $rc; $log)"
    failed+=("$t")
  fi
  printf '%-24s %12s %8s %10s  %s\n' "$t" "$execs" "$el" "$rate" "$result"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$execs" "$el" "$rc" "$rev" >>"$BUILD/fuzz_summary.tsv"
  if [ "$rc" != 0 ]; then
    grep -E "FINDING|ERROR: |runtime error|SUMMARY|Test unit written" "$log" | head -8 | sed 's/^/    /'
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: findings in ${failed[*]} (inputs in $BUILD/findings/)"
  exit 1
fi
echo "fuzz: no findings"
