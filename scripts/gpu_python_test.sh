#!/usr/bin/env bash
# The Python module on the GPU machine: builds the prefixkv program and the module with the CUDA back
# end, then runs python/tests there (test_cuda.py: device="cuda" against `prefixkv run --device cuda`
# and `prefixkv calibrate --device cuda`; the CPU tests as everywhere). Needs a python3 with numpy,
# pytest and its headers (Python.h); pybind11 from the system or from .carry/pybind11 (made on the
# development machine by scripts/carry_pybind11.sh).
#
#   bash scripts/gpu_python_test.sh [pytest arguments, e.g. python/tests/test_cuda.py]
#
# Environment: BUILD (default build-gpu-py), PYTHON (default python3), PKV_CUDA_ARCH (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpu-py}
PYTHON=$(command -v "${PYTHON:-python3}")
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
source scripts/httplib_env.sh  # the program's server needs cpp-httplib: carried where missing
mkdir -p "$BUILD"
cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPREFIXKV_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${PKV_CUDA_ARCH:-90}" -DPREFIXKV_TESTS=OFF -DPREFIXKV_PYTHON=ON \
  -DPython_EXECUTABLE="$PYTHON" >"$BUILD/configure.log" 2>&1 || { tail -20 "$BUILD/configure.log"; exit 2; }
cmake --build "$BUILD" -j "$(nproc)" --target prefixkv prefixkv_python >"$BUILD/build.log" 2>&1 ||
  { tail -40 "$BUILD/build.log"; exit 2; }
[ $# -gt 0 ] || set -- python/tests
PYTHONPATH="$BUILD/python" PREFIXKV_BINARY="$BUILD/prefixkv" PYTHONDONTWRITEBYTECODE=1 \
  "$PYTHON" -m pytest -q -p no:cacheprovider -rs "$@"
