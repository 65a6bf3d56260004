#!/usr/bin/env bash
# Prepares .carry/httplib (ignored by git) from Debian's cpp-httplib packages, for a machine that has
# no libcpp-httplib-dev (the GPU machine): the device tool carries the folder there, and
# scripts/httplib_env.sh points the build at it. Run on the dev machine (Debian 12):
#   bash scripts/carry_httplib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download libcpp-httplib0.11 libcpp-httplib-dev >/dev/null 2>&1)
rm -rf .carry/httplib
mkdir -p .carry/httplib
for deb in "$tmp"/*.deb; do dpkg -x "$deb" .carry/httplib; done
rm -rf .carry/httplib/usr/share .carry/httplib/usr/lib/x86_64-linux-gnu/pkgconfig
# real files instead of symbolic links (the device tool may not carry links)
lib=.carry/httplib/usr/lib/x86_64-linux-gnu
for l in "$lib"/libcpp-httplib.so "$lib"/libcpp-httplib.so.0.11; do cp --remove-destination "$(readlink -f "$l")" "$l"; done
echo "carry_httplib: $(du -sh .carry/httplib | cut -f1) in .carry/httplib"
