#!/usr/bin/env bash
# Makes sure that what prefixkv's build needs is on this machine, and installs a Debian package only
# for what is missing. It checks the things themselves (commands on the PATH, pkg-config modules,
# headers and libraries as the compiler finds them, CMake package files, clang's runtime archives),
# never package names, so tools that came from elsewhere (a NodeSource nodejs with its own npm, a
# hand-built cmake, ...) are used as they are. Idempotent; prints nothing and never calls apt-get when
# nothing is missing. apt-get runs through sudo when not root.
#
#   scripts/setup.sh [--dry-run] [PROFILE...]      (no profile: test)
#
# Profiles (several may be given):
#   run       the prefixkv CLI (`make run`): g++, cmake, ninja, pkg-config, make; OpenBLAS and
#             SentencePiece (pkg-config), nlohmann/json (header and CMake package), libpng + zlib,
#             libjpeg; cpp-httplib (pkg-config module cpp-httplib) for `prefixkv serve`
#   test      run + GoogleTest (gtest/gtest.h, libgtest, libgtest_main); node and npm for the test that
#             runs the official OpenAI client (an existing node/npm is used whatever its origin; Debian's
#             nodejs and npm are installed only where the commands are missing), and CA certificates
#             for npm's download of that client; the Python module's build (below) and pytest
#             (`import pytest` in /usr/bin/python3) for its tests
#   python    run + the Python module (`make python`): /usr/bin/python3, its headers (Python.h) and
#             pybind11 (pybind11/pybind11.h as the compiler sees them, and pybind11's CMake package),
#             numpy (`import numpy`); for the install: venv with pip (`import ensurepip, venv`),
#             setuptools and wheel
#   sanitize  run + GoogleTest + clang++ with its ASan, UBSan and libFuzzer runtimes
#   tsan      run + GoogleTest + clang++ with its ThreadSanitizer runtime
#   all       all of the above
# --dry-run: say what is missing and which packages would be installed, install nothing.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2; }

dry_run=0
want_run=0 want_gtest=0 want_node=0 want_asan=0 want_tsan=0 want_py=0 want_pytest=0 want_pyinstall=0
profiles=()
for a in "$@"; do
  case "$a" in
    --dry-run|-n) dry_run=1 ;;
    -h|--help) usage ;;
    run|test|python|sanitize|tsan|all) profiles+=("$a") ;;
    *) echo "setup: unknown profile '$a' (run, test, python, sanitize, tsan, all)" >&2; exit 2 ;;
  esac
done
[ ${#profiles[@]} -gt 0 ] || profiles=(test)
for p in "${profiles[@]}"; do
  case "$p" in
    run) want_run=1 ;;
    test) want_run=1 want_gtest=1 want_node=1 want_py=1 want_pytest=1 ;;
    python) want_run=1 want_py=1 want_pyinstall=1 ;;
    sanitize) want_run=1 want_gtest=1 want_asan=1 ;;
    tsan) want_run=1 want_gtest=1 want_tsan=1 ;;
    all) want_run=1 want_gtest=1 want_node=1 want_asan=1 want_tsan=1 want_py=1 want_pytest=1 want_pyinstall=1 ;;
  esac
done
want_clang=$((want_asan || want_tsan))

die() { echo "setup: $*" >&2; exit 1; }
join() { local out="" s; for s in "$@"; do out+="${out:+, }$s"; done; printf '%s' "$out"; }

# What is missing: Debian packages to install, and what each one is for.
pkgs=()
whats=()
need() {  # need PACKAGE WHAT
  local p
  for p in ${pkgs[@]+"${pkgs[@]}"}; do
    [ "$p" = "$1" ] && return 0
  done
  pkgs+=("$1")
  whats+=("$2")
}

have_cmd() { command -v "$1" >/dev/null 2>&1; }
# The compiler CMake will use: $CXX when set, else g++.
cxx=${CXX:-g++}
have_header() { printf '#include <%s>\n' "$1" | "$cxx" -std=c++20 -x c++ -E -o /dev/null - >/dev/null 2>&1; }
have_lib() {  # have_lib FILE...: true when the compiler's library search path holds one of them
  local f path
  for f in "$@"; do
    path=$("$cxx" -print-file-name="$f" 2>/dev/null) || continue
    [ "$path" != "$f" ] && [ -e "$path" ] && return 0
  done
  return 1
}
have_pc() { pkg-config --exists "$1" 2>/dev/null; }
# The Python the module is built for and tested with: Debian's, whatever python3 the PATH finds first.
python=/usr/bin/python3
have_py_module() { [ -x "$python" ] && "$python" -c "import $1" >/dev/null 2>&1; }
# have_py_header HEADER: the header as the compiler sees it with Python's include folder added.
have_py_header() {
  local inc
  inc=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null) || return 1
  printf '#include <%s>\n' "$1" | "$cxx" -std=c++20 -I"$inc" -x c++ -E -o /dev/null - >/dev/null 2>&1
}
have_cmake_package() {  # have_cmake_package NAME: a NAMEConfig.cmake or name-config.cmake find_package sees
  local name=$1 prefix dir extra=()
  local prefixes=(/usr /usr/local)
  [ -z "${CMAKE_PREFIX_PATH:-}" ] || IFS=: read -r -a extra <<<"$CMAKE_PREFIX_PATH"
  prefixes+=(${extra[@]+"${extra[@]}"})
  for prefix in "${prefixes[@]}"; do
    for dir in "$prefix"/share/cmake/"$name" "$prefix"/lib/cmake/"$name" "$prefix"/lib/*/cmake/"$name" \
               "$prefix"/share/"$name"/cmake "$prefix"/lib/"$name"/cmake; do
      [ -f "$dir/${name}Config.cmake" ] || [ -f "$dir/${name,,}-config.cmake" ] && return 0
    done
  done
  return 1
}

# Commands: checked first, since the checks below run them.
check_tools() {
  have_cmd make || need make "make"
  have_cmd cmake || need cmake "cmake"
  have_cmd ninja || need ninja-build "ninja"
  have_cmd pkg-config || need pkg-config "pkg-config"
  if [ -n "${CXX:-}" ]; then
    have_cmd "$cxx" || die "CXX=$CXX is not a command; unset CXX to use g++"
  else
    have_cmd g++ || need g++ "g++ (C++20)"
  fi
  if [ "$want_clang" = 1 ]; then have_cmd clang++ || need clang "clang++"; fi
  if [ "$want_node" = 1 ]; then check_node; fi
  if [ "$want_py" = 1 ]; then [ -x "$python" ] || need python3 "Debian's python3 ($python)"; fi
}

# node and npm for tests/e2e/test_server_openai.cc. Whatever provides the commands is used as it is;
# apt is never asked for npm when an npm command exists (a NodeSource nodejs ships its own npm and
# conflicts with Debian's).
check_node() {
  local node=0 npm=0
  have_cmd node && node=1
  have_cmd npm && npm=1
  [ $node = 1 ] && [ $npm = 1 ] && return 0
  if [ $node = 1 ] && have_cmd dpkg-query &&
     dpkg-query -W -f='${Provides}, ${Conflicts}\n' nodejs 2>/dev/null | grep -qw npm; then
    die "node is installed by a nodejs package that provides npm itself (not Debian's), yet there is no npm" \
        "command; reinstall that nodejs package rather than Debian's npm"
  fi
  [ $node = 1 ] || need nodejs "node (the OpenAI client test)"
  [ $npm = 1 ] || need npm "npm (the OpenAI client test)"
}

# Libraries, headers and runtimes: need the compiler and pkg-config.
check_libs() {
  if [ "$want_run" = 1 ]; then
    have_pc openblas || need libopenblas-dev "OpenBLAS (pkg-config openblas)"
    have_pc sentencepiece || need libsentencepiece-dev "SentencePiece (pkg-config sentencepiece)"
    { have_header nlohmann/json.hpp && have_cmake_package nlohmann_json; } ||
      need nlohmann-json3-dev "nlohmann/json.hpp and its CMake package"
    { have_header png.h && have_lib libpng.so libpng.a; } || need libpng-dev "png.h, libpng"
    { have_header zlib.h && have_lib libz.so libz.a; } || need zlib1g-dev "zlib.h, libz (FindPNG)"
    { have_header jpeglib.h && have_lib libjpeg.so libjpeg.a; } || need libjpeg-dev "jpeglib.h, libjpeg"
    have_pc cpp-httplib || need libcpp-httplib-dev "cpp-httplib (pkg-config cpp-httplib, prefixkv serve)"
  fi
  if [ "$want_gtest" = 1 ]; then
    { have_header gtest/gtest.h && have_lib libgtest.a libgtest.so && have_lib libgtest_main.a libgtest_main.so; } ||
      need libgtest-dev "gtest/gtest.h, libgtest, libgtest_main"
  fi
  if [ "$want_py" = 1 ] && [ -x "$python" ]; then
    have_py_header Python.h || need python3-dev "Python.h for $python"
    { have_py_header pybind11/pybind11.h && have_cmake_package pybind11; } ||
      need pybind11-dev "pybind11/pybind11.h and its CMake package"
    have_py_module numpy || need python3-numpy "numpy for $python"
  fi
  if [ "$want_pytest" = 1 ] && [ -x "$python" ]; then
    have_py_module pytest || need python3-pytest "pytest for $python"
  fi
  if [ "$want_pyinstall" = 1 ] && [ -x "$python" ]; then
    have_py_module "ensurepip, venv" || need python3-venv "venv with pip for $python"
    have_py_module setuptools || need python3-setuptools "setuptools for $python"
    have_py_module wheel || need python3-wheel "wheel for $python"
  fi
  if [ "$want_node" = 1 ] && [ ! -e /etc/ssl/certs/ca-certificates.crt ]; then
    need ca-certificates "CA certificates (npm ci downloads the openai client over https)"
  fi
  if [ "$want_clang" = 1 ] && have_cmd clang++; then
    local rt=() r
    [ "$want_asan" = 1 ] && rt+=(asan ubsan_standalone fuzzer)
    [ "$want_tsan" = 1 ] && rt+=(tsan)
    for r in "${rt[@]}"; do
      if ! have_clang_rt "$r"; then
        need "libclang-rt-$(clang++ -dumpversion | cut -d. -f1)-dev" "clang's runtimes (libclang_rt.*)"
      fi
    done
  fi
}

# have_clang_rt NAME: libclang_rt.NAME-ARCH.a (lib/linux/) or libclang_rt.NAME.a (lib/TRIPLE/) under
# clang's resource dir.
have_clang_rt() {
  local dir arch f
  dir=$(clang++ -print-resource-dir 2>/dev/null) || return 1
  arch=$(uname -m)
  [ -f "$dir/lib/linux/libclang_rt.$1-$arch.a" ] && return 0
  for f in "$dir"/lib/"$arch"-*/libclang_rt."$1".a; do
    [ -f "$f" ] && return 0
  done
  return 1
}

updated=0
install_missing() {
  [ ${#pkgs[@]} -gt 0 ] || return 0
  echo "setup: missing: $(join "${whats[@]}")"
  if [ "$dry_run" = 1 ]; then
    echo "setup: would install (apt-get): ${pkgs[*]}"
    pkgs=() whats=()
    return 0
  fi
  have_cmd apt-get || die "no apt-get here: install ${pkgs[*]} (or their equivalents) by hand"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    have_cmd sudo || die "not root and no sudo: install ${pkgs[*]} as root"
    sudo=(sudo)
  fi
  echo "setup: installing (apt-get): ${pkgs[*]}"
  if [ "$updated" = 0 ]; then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    updated=1
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
  pkgs=() whats=()
}

# A step: check, install what is missing, check again (anything still missing is an error).
step() {
  "$1"
  install_missing
  [ "$dry_run" = 1 ] && return 0
  "$1"
  if [ ${#pkgs[@]} -gt 0 ]; then
    die "still missing after apt-get: $(join "${whats[@]}")"
  fi
}

step check_tools
if [ "$dry_run" = 1 ] && { ! have_cmd "$cxx" || ! have_cmd pkg-config; }; then
  echo "setup: the libraries are checked once the commands above are installed"
  exit 0
fi
step check_libs
