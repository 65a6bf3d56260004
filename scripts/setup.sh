#!/usr/bin/env bash
# Installs the Debian packages prefixkv needs to build and test (idempotent).
# Run as root or with sudo available. Skips apt-get entirely when everything is present.
set -euo pipefail
# libcpp-httplib-dev: prefixkv serve's HTTP; nodejs, npm: the test that runs the official openai client.
PKGS=(g++ cmake ninja-build make pkg-config libopenblas-dev nlohmann-json3-dev libsentencepiece-dev
      libgtest-dev libpng-dev libjpeg-dev python3 python3-numpy libcpp-httplib-dev nodejs npm)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
echo "setup: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
