#!/usr/bin/env bash
# llama.cpp encodes data/example.png through our mmproj file, and its image embeddings are compared
# with prefixkv's. node-llama-cpp 3.21.1's prebuilt binaries ship no libmtmd (llama.cpp's
# multimodal library), so it is built here from the llama.cpp source that package bundles
# (llama/gitRelease.bundle, release v0.4.0: tools/mtmd and vendor/hash, about 50 files) against the
# package's prebuilt libggml and libllama; nothing of it is committed. Then:
#   tools/llamacpp_mmproj_encode.c: llama.cpp's embeddings of the image through our F32 and F16 files;
#   `prefixkv run --dump-tensors`: prefixkv's (the F32 pair) and the pixels;
#   bench/mmproj_compare.py: both against a float64 numpy model of the file run as transformers'
#   LLaVA does and as clip.cpp's graph does (its class token placed last, issue 25814).
# Not part of CI (npm download, a C++ build of a few minutes). Needs node >= 20 only when the
# package is not installed yet (bench/gguf_llamacpp.sh installs it in the same $OUT), g++, libpng,
# and python3 with numpy ($PYTHON, default /usr/bin/python3).
#   bash bench/mmproj_llamacpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gguf_llamacpp}
NLC=$OUT/node-llama-cpp
PKV=${PKV:-./build/prefixkv}
PYTHON=${PYTHON:-/usr/bin/python3}
DIM=${DIM:-256}  # the projector's output width: the bundled model's text hidden size
mkdir -p "$OUT" "$NLC"
if [ ! -d "$NLC/node_modules/node-llama-cpp" ]; then
  (cd "$NLC" && npm init -y >/dev/null && npm i -E node-llama-cpp@3.21.1 >"$OUT/npm.log" 2>&1)
fi
BINS=$NLC/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64
SRC=$OUT/llama.cpp
MT=$OUT/mtmd-build
if [ ! -f "$MT/libmtmd.so" ]; then
  [ -d "$SRC/tools/mtmd" ] || git clone -q "$NLC/node_modules/node-llama-cpp/llama/gitRelease.bundle" "$SRC" 2>/dev/null
  mkdir -p "$MT"
  # The library's sources as its CMakeLists lists them, and the hashes it uses.
  srcs=$(sed -n '/^add_library(mtmd$/,/)/p' "$SRC/tools/mtmd/CMakeLists.txt" | grep -o '[A-Za-z0-9_./-]*\.cpp')
  for f in $srcs; do echo "tools/mtmd/$f"; done > "$MT/sources"
  echo vendor/hash/hash.cpp >> "$MT/sources"
  (cd "$SRC" && xargs -P2 -I{} sh -c 'o="$0/$(echo {} | tr / _).o"; [ -f "$o" ] ||
     g++ -std=c++17 -O1 -fPIC -w -Itools/mtmd -Iinclude -Iggml/include -Ivendor -Isrc -c {} -o "$o"' "$MT" < "$MT/sources")
  for c in sha256/sha256 xxhash/xxhash; do  # C, as hash.cpp declares them (sha1 is not used)
    gcc -O1 -fPIC -w -I"$SRC/vendor/hash" -c "$SRC/vendor/hash/$c.c" -o "$MT/vendor_hash_$(basename $c).o"
  done
  g++ -shared -o "$MT/libmtmd.so" "$MT"/*.o -L"$BINS" -l:libllama.v0.4.0.so -l:libggml.v0.4.0.so -l:libggml-base.so \
    -Wl,-rpath,"$BINS" -Wl,--no-undefined
fi
cc -O2 tools/llamacpp_mmproj_encode.c -ldl -lpng -o "$OUT/llamacpp_mmproj_encode"
for type in f32 f16; do
  "$PKV" export --gguf "$OUT/text-$type.gguf" --mmproj "$OUT/mmproj-$type.gguf" --type "$type" >/dev/null
  "$OUT/llamacpp_mmproj_encode" "$MT/libmtmd.so" "$BINS" "$OUT/mmproj-$type.gguf" data/example.png \
    "$DIM" "$OUT/llamacpp-emb-$type.f32" 2>"$OUT/mtmd-$type.log"
done
rm -rf "$OUT/dump-f32"
"$PKV" run --model "$OUT/text-f32.gguf" --mmproj "$OUT/mmproj-f32.gguf" --image data/example.png --max-tokens 1 \
  --dump-tensors "$OUT/dump-f32" >/dev/null 2>&1
"$PYTHON" bench/mmproj_compare.py "$OUT/mmproj-f32.gguf" "$OUT/dump-f32/pixel_values.npy" \
  "$OUT/dump-f32/projector_output.npy" "$OUT/llamacpp-emb-f32.f32" "$OUT/llamacpp-emb-f16.f32"
