#!/usr/bin/env bash
# Prepares .carry/pybind11 (ignored by git) from this machine's pybind11 (Debian's pybind11-dev: its
# headers and CMake package), for a machine that has no pybind11 and no network (the GPU machine):
# the folder travels with the working tree, and CMake looks there when it finds no pybind11 of its
# own. pybind11 is headers only: nothing is compiled here. Run on the development machine:
#   bash scripts/carry_pybind11.sh
set -euo pipefail
cd "$(dirname "$0")/.."
inc=/usr/include/pybind11
cfg=/usr/lib/cmake/pybind11
[ -f "$inc/pybind11.h" ] && [ -f "$cfg/pybind11Config.cmake" ] ||
  { echo "carry_pybind11: no pybind11 at $inc and $cfg (apt-get install pybind11-dev)" >&2; exit 1; }
rm -rf .carry/pybind11
mkdir -p .carry/pybind11/include .carry/pybind11/lib/cmake
cp -r "$inc" .carry/pybind11/include/
cp -r "$cfg" .carry/pybind11/lib/cmake/
echo "carry_pybind11: $(du -sh .carry/pybind11 | cut -f1) in .carry/pybind11"
