# Sourced by the GPU scripts: when the machine has no cpp-httplib but .carry/httplib exists
# (scripts/carry_httplib.sh), writes a pkg-config file for the carried copy and exports
# PKG_CONFIG_PATH and LD_LIBRARY_PATH, so that CMake builds the server. The carried library was
# built with OpenSSL, zlib and brotli support; their -D flags are kept only where the headers exist
# (the server uses none of them).
pkv_httplib_env() {
  local root
  root="$(pwd)/.carry/httplib/usr"
  if pkg-config --exists cpp-httplib 2>/dev/null || [ ! -f "$root/include/httplib.h" ]; then return 0; fi
  local libdir="$root/lib/x86_64-linux-gnu" pcdir
  pcdir="$(pwd)/.carry/httplib/pkgconfig"
  mkdir -p "$pcdir"
  local flags=""
  [ -f /usr/include/openssl/ssl.h ] && flags="$flags -DCPPHTTPLIB_OPENSSL_SUPPORT"
  [ -f /usr/include/zlib.h ] && flags="$flags -DCPPHTTPLIB_ZLIB_SUPPORT"
  [ -f /usr/include/brotli/decode.h ] && flags="$flags -DCPPHTTPLIB_BROTLI_SUPPORT"
  cat >"$pcdir/cpp-httplib.pc" <<PC
prefix=$root
includedir=\${prefix}/include
libdir=$libdir

Name: cpp-httplib
Description: cpp-httplib carried from Debian (scripts/carry_httplib.sh)
Version: 0.11.4
Libs: -L\${libdir} -lcpp-httplib
Cflags: -I\${includedir}$flags
PC
  export PKG_CONFIG_PATH="$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "httplib_env: using the carried cpp-httplib ($root)"
}
pkv_httplib_env
