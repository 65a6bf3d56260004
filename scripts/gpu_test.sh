#!/usr/bin/env bash
# Builds prefixkv with the CUDA back end on the GPU machine and runs pkv_cuda_tests: every CUDA kernel
# against its CPU twin, and the model on the GPU (GpuModel, GpuSession) against the CPU model
# (tests/cuda/). Exits non-zero when the build or any test fails. The model tests' measurements
# (logit errors, kept-entry mismatches, ...) are printed after the per-test lines.
#
#   bash scripts/gpu_test.sh [gtest arguments, e.g. --gtest_filter=CudaAttention.*]
#
# Environment:
#   OUT                 where gpu_build.log, gpu_test.log and gpu_test.json go (default: the build folder)
#   BUILD               build folder (default build-gpu)
#   PKV_CUDA_ARCH       CMAKE_CUDA_ARCHITECTURES (default 90: H100 / H200)
#   PKV_GTEST_SRC       GoogleTest sources to build when CMake finds no installed GTest; also tried:
#                       .carry/googletest, /usr/src/googletest. To carry them from a Debian/Ubuntu
#                       machine with libgtest-dev: mkdir -p .carry && cp -r /usr/src/googletest .carry/
#   PKV_SANITIZE=TOOL   run the tests under compute-sanitizer: memcheck (or 1), racecheck, synccheck,
#                       initcheck; exclude the deliberate-error tests: --gtest_filter=-CudaErrors.*:GpuModel.OutOfDevice*
#   PKV_CUDA_SYNC       default 1 here: synchronise after every launch so a fault names its kernel
# Exit status: 0 all passed; 1 a test failed; 2 configure or build failed; 3 no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpu}
ARCH=${PKV_CUDA_ARCH:-90}
LOGDIR=${OUT:-$BUILD}
mkdir -p "$BUILD" "$LOGDIR"
build_log="$LOGDIR/gpu_build.log"
test_log="$LOGDIR/gpu_test.log"
json="$LOGDIR/gpu_test.json"
: >"$build_log"
export PKV_CUDA_SYNC=${PKV_CUDA_SYNC:-1}

echo "gpu_test: $(nproc) cores; $(command -v nvcc >/dev/null && nvcc --version | tail -1 || echo 'no nvcc on PATH')"
nvidia-smi -L 2>/dev/null || echo "gpu_test: nvidia-smi not available"

gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
source scripts/httplib_env.sh  # the GPU serve tests and the server need cpp-httplib: carried where missing

configure() {
  cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    -DPREFIXKV_NATIVE=ON -DPREFIXKV_TESTS=ON "$@" >>"$build_log" 2>&1
}

if ! configure; then
  if ! grep -q "GTest" "$build_log"; then
    tail -30 "$build_log"
    echo "gpu_test: configuring failed (log: $build_log)"
    exit 2
  fi
  src=""
  for d in "${PKV_GTEST_SRC:-}" .carry/googletest /usr/src/googletest; do
    if [ -n "$d" ] && [ -f "$d/CMakeLists.txt" ]; then src=$d; break; fi
  done
  if [ -z "$src" ]; then
    echo "gpu_test: GoogleTest is not installed and no sources were found (PKV_GTEST_SRC, .carry/googletest," \
         "/usr/src/googletest). Carry them: mkdir -p .carry && cp -r /usr/src/googletest .carry/"
    exit 2
  fi
  echo "gpu_test: building GoogleTest from $src"
  prefix="$PWD/$BUILD/_gtest"
  cmake -S "$src" -B "$BUILD/_gtest_build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_GMOCK=OFF -DINSTALL_GTEST=ON \
    -DCMAKE_INSTALL_PREFIX="$prefix" -DCMAKE_POSITION_INDEPENDENT_CODE=ON >>"$build_log" 2>&1
  cmake --build "$BUILD/_gtest_build" -j "$(nproc)" --target install >>"$build_log" 2>&1
  rm -f "$BUILD/CMakeCache.txt"
  if ! configure -DCMAKE_PREFIX_PATH="$prefix"; then
    tail -30 "$build_log"
    echo "gpu_test: configuring failed (log: $build_log)"
    exit 2
  fi
fi
grep -E "prefixkv: CUDA" "$build_log" | tail -1

t0=$(date +%s)
if ! cmake --build "$BUILD" -j "$(nproc)" --target pkv_cuda_tests pkv_cuda_emu_tests >>"$build_log" 2>&1; then
  grep -E "error|Error" "$build_log" | head -40
  echo "gpu_test: build failed (log: $build_log)"
  exit 2
fi
echo "gpu_test: built pkv_cuda_tests in $(( $(date +%s) - t0 )) s"

runner=()
tool=${PKV_SANITIZE:-0}
[ "$tool" = "1" ] && tool=memcheck
if [ "$tool" != "0" ]; then
  # API errors are not reported: the graph cache's cudaGraphExecUpdate fails by design when a step's
  # topology changes (it then instantiates anew), and the CudaErrors tests provoke errors on purpose.
  runner=(compute-sanitizer --tool "$tool" --error-exitcode 99 --report-api-errors no)
  [ "$tool" = memcheck ] && runner+=(--leak-check full)
  echo "gpu_test: under compute-sanitizer ($tool)"
fi
set +e
"${runner[@]}" "./$BUILD/pkv_cuda_tests" --gtest_output="json:$json" "$@" >"$test_log" 2>&1
rc=$?
set -e
if [ "$rc" = 0 ] && grep -q "no CUDA device found" "$test_log"; then
  cat "$test_log"
  echo "gpu_test: no CUDA device: nothing was tested"
  exit 3
fi

# Summary: failures in full, then one line per test.
grep -E "^\[  FAILED  \]|Failure|error:|Expected|Which is|actual|got |CUDA error|cuBLAS error" "$test_log" | head -60 || true
if command -v python3 >/dev/null && [ -f "$json" ]; then
  python3 - "$json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"gpu_test: {r['tests']} tests, {r['failures']} failed, {r.get('disabled', 0)} disabled, {r['time']}")
for s in r['testsuites']:
    for t in s['testsuite']:
        status = 'FAIL' if t.get('failures') else ('SKIP' if t.get('result') == 'SKIPPED' else 'ok')
        print(f"  {status:4} {s['name']}.{t['name']} ({t['time']})")
EOF
else
  tail -25 "$test_log"
fi
if grep -q "^gpu_model:" "$test_log"; then
  echo "gpu_test: measurements of the model tests (tests/cuda/test_gpu_model.cc):"
  grep "^gpu_model:" "$test_log" | sed 's/^/  /'
fi
echo "gpu_test: exit $rc (logs: $build_log, $test_log)"
exit "$rc"
