#!/usr/bin/env bash
# Runs the whole test suite of an already built folder N times in a row and reports every failure:
# the determinism check of docs/RELIABILITY.md ("the suite run 20 times in a row").
#   bash scripts/repeat_tests.sh [N=20] [BUILD=build] [JOBS=$(nproc)]
# Writes one line per run to $BUILD/repeat_tests.tsv (run, seconds, tests, failed, names of the
# failed tests) and keeps the ctest output of a run that failed in $BUILD/repeat_tests_RUN.log.
# Exit status 1 when any run had a failure.
set -u
N=${1:-20}
BUILD=${2:-build}
JOBS=${3:-$(nproc)}
[ -f "$BUILD/CTestTestfile.cmake" ] || { echo "repeat_tests.sh: $BUILD has no tests (build it with make test first)" >&2; exit 2; }
summary="$BUILD/repeat_tests.tsv"
printf 'run\tseconds\ttests\tfailed\tfailed_names\n' > "$summary"
bad=0
for i in $(seq 1 "$N"); do
  log=$(mktemp)
  start=$(date +%s%N)
  (cd "$BUILD" && ctest --output-on-failure -j "$JOBS") > "$log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  secs="$((ms / 1000)).$(( (ms % 1000) / 100 ))"
  total=$(grep -oE 'out of [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+')
  failed=$(grep -oE '[0-9]+ tests failed' "$log" | grep -oE '^[0-9]+')
  names=$(sed -n '/The following tests FAILED/,$p' "$log" | grep -oE '^\s+[0-9]+ - [^ ]+' | awk '{print $3}' | paste -sd, -)
  printf '%d\t%s\t%s\t%s\t%s\n' "$i" "$secs" "${total:-?}" "${failed:-0}" "$names" >> "$summary"
  if [ "$rc" -ne 0 ]; then bad=1; cp "$log" "$BUILD/repeat_tests_$i.log"; fi
  echo "run $i: rc $rc, ${secs} s, failed ${failed:-0} ${names}"
  rm -f "$log"
done
cat "$summary"
exit $bad
