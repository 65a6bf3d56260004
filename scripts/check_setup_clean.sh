#!/usr/bin/env bash
# Proves that `make run` works on a bare Debian 12 machine: builds a minimal bookworm root with
# debootstrap (deb.debian.org only), puts the repository into it and runs `make run` there as root in
# a chroot, then checks that it answered. The bare root gets `make` first (a bare Debian has none; it is
# the one prerequisite of `make run`). Variants (each in a fresh copy of the same bare root):
#   plain       nothing but the bare system; `make run` must install only what the CLI needs (no
#               GoogleTest, node or npm) and build only the prefixkv target
#   nodesource  a non-Debian nodejs that ships its own npm (NodeSource's; it Provides and Conflicts
#               npm) is installed first, as on our CI machines; `make run` and `scripts/setup.sh test`
#               must then work without asking apt for Debian's npm
# Every apt-get call inside the chroot goes through a logging wrapper; the checks read that log.
#
#   sudo scripts/check_setup_clean.sh [options]
#     --variant plain|nodesource|both   (default both)
#     --work DIR          where the roots go (default /work/chroot-prefixkv; never inside the repository)
#     --fresh             debootstrap again even if DIR/base from an earlier run exists
#     --worktree          copy the working tree (tracked and untracked, not ignored) instead of HEAD
#     --nodesource-deb F  a real NodeSource nodejs .deb; default: repack the host's installed nodejs
#                         when it is a NodeSource one (dpkg's files, control fields and scripts)
#     --repro REV         nodesource variant: first run REV's scripts/setup.sh and report whether the
#                         old defect (apt: "held broken packages") shows
#     --make-test         afterwards, in each variant: `make test` (GoogleTest, Debian's nodejs and npm,
#                         the whole suite) and `make run` again on the same build folder
#     --npm-cafile F      make test: extra CA certificates for npm (NODE_EXTRA_CA_CERTS), for a machine
#                         that reaches registry.npmjs.org through a TLS-intercepting proxy
#     --keep              keep the variant roots (they are removed at the end otherwise; base stays)
# Needs root (debootstrap, mount, chroot). Mounts are undone at exit, on failure too.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
variant=both work=/work/chroot-prefixkv fresh=0 worktree=0 nodesource_deb="" repro="" make_test=0 keep=0 npm_cafile=""
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=$2; shift ;;
    --work) work=$2; shift ;;
    --fresh) fresh=1 ;;
    --worktree) worktree=1 ;;
    --nodesource-deb) nodesource_deb=$(realpath "$2"); shift ;;
    --repro) repro=$2; shift ;;
    --make-test) make_test=1 ;;
    --npm-cafile) npm_cafile=$(realpath "$2"); shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "check_setup_clean: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
case "$variant" in plain) variants=(plain) ;; nodesource) variants=(nodesource) ;; both) variants=(plain nodesource) ;;
  *) echo "check_setup_clean: --variant plain|nodesource|both" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "check_setup_clean: run as root (debootstrap, mount, chroot)" >&2; exit 1; }
work=$(realpath -m "$work")
case "$work/" in "$repo"/*) echo "check_setup_clean: --work must be outside the repository" >&2; exit 2 ;; esac
mkdir -p "$work"
summary="$work/summary.txt"
: >"$summary"

log() { echo "[check $(date +%H:%M:%S)] $*"; }
note() { echo "$*" | tee -a "$summary"; }
fail() { echo "FAIL: $*" >>"$summary"; echo "FAIL: $*" >&2; exit 1; }

# ---- mounts: every one is recorded and undone at exit, in reverse order
mounts=()
mount_in() {  # mount_in ROOT: proc, sys, dev, dev/pts for a chroot
  local r=$1
  mount -t proc proc "$r/proc" && mounts+=("$r/proc")
  mount -t sysfs sysfs "$r/sys" && mounts+=("$r/sys")
  mount --bind /dev "$r/dev" && mounts+=("$r/dev")
  mount --bind /dev/pts "$r/dev/pts" && mounts+=("$r/dev/pts")
}
unmount_all() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount "${mounts[$i]}" 2>/dev/null || umount -l "${mounts[$i]}" 2>/dev/null || echo "could not unmount ${mounts[$i]}" >&2
  done
  mounts=()
}
cleanup() {
  local rc=$?
  unmount_all
  if [ "$keep" = 0 ]; then
    local v
    for v in "${variants[@]}"; do
      # only when nothing is mounted below it any more (rm -rf must never reach the host's /dev)
      if [ -d "$work/$v" ] && ! grep -q " $work/$v/" /proc/mounts; then rm -rf "${work:?}/$v"; fi
    done
  fi
  [ $rc -eq 0 ] || echo "check_setup_clean: failed (rc $rc); summary in $summary" >&2
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the bare root (debootstrap --variant=minbase), made once and copied for each variant
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
base="$work/base"
if [ "$fresh" = 1 ] || [ ! -f "$base/.prefixkv-base-complete" ]; then
  rm -rf "$base"
  log "debootstrap --variant=minbase bookworm $base"
  t0=$(date +%s)
  debootstrap --variant=minbase bookworm "$base" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; fail "debootstrap (log: $work/debootstrap.log)"; }
  cat >"$base/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  rm -rf "$base"/var/lib/apt/lists/*  # as a fresh machine: no package lists yet
  touch "$base/.prefixkv-base-complete"
  note "debootstrap (minbase bookworm): $(($(date +%s) - t0)) s"
else
  log "reusing the bare root $base (made $(date -r "$base/.prefixkv-base-complete" '+%F %T'); --fresh to redo)"
fi

# ---- the NodeSource-style nodejs .deb for the nodesource variant
make_nodesource_deb() {
  local out="$work/nodejs-nodesource.deb"
  if [ -n "$nodesource_deb" ]; then cp "$nodesource_deb" "$out"; echo "$out"; return; fi
  local ver maint
  ver=$(dpkg-query -W -f='${Version}' nodejs 2>/dev/null) || fail "no nodejs on this host to repack: pass --nodesource-deb"
  maint=$(dpkg-query -W -f='${Maintainer}' nodejs)
  case "$ver $maint" in *nodesource*|*NodeSource*) ;; *) fail "the host's nodejs ($ver) is not NodeSource's: pass --nodesource-deb" ;; esac
  local d
  d=$(mktemp -d "$work/repack.XXXXXX")
  # the package's files as installed; its bundled modules (npm, corepack) whole, as they are now (npm
  # may have replaced itself since: npm install -g npm)
  dpkg-query -L nodejs >"$d.all"
  {
    while IFS= read -r f; do
      case "$f" in /usr/lib/node_modules/*) continue ;; esac
      if [ -L "$f" ] || { [ -e "$f" ] && [ ! -d "$f" ]; }; then printf '%s\n' "${f#/}"; fi
    done <"$d.all"
    grep -E '^/usr/lib/node_modules/[^/]+$' "$d.all" | while IFS= read -r m; do
      if [ -d "$m" ]; then printf '%s\n' "${m#/}"; fi
    done
  } >"$d.list"
  tar -C / -cf - -T "$d.list" | tar -C "$d" -xf -
  mkdir "$d/DEBIAN"
  dpkg-query -s nodejs | grep -v -E '^(Status|Conffiles):' >"$d/DEBIAN/control"
  local s
  for s in preinst postinst prerm postrm; do
    [ -f "/var/lib/dpkg/info/nodejs.$s" ] && install -m 755 "/var/lib/dpkg/info/nodejs.$s" "$d/DEBIAN/$s"
  done
  dpkg-deb --root-owner-group -Zgzip -z1 -b "$d" "$out" >/dev/null
  rm -rf "$d" "$d.list" "$d.all"
  echo "$out"
}

# ---- one variant
in_root() {  # in_root ROOT COMMAND: runs COMMAND with bash -c as root in the chroot, clean environment
  local r=$1
  shift
  chroot "$r" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /bin/bash -c "$*"
}
timed() {  # timed ROOT LOG COMMAND: in_root, output to LOG; sets $secs and $rc
  local r=$1 logf=$2 t0
  shift 2
  t0=$(date +%s)
  set +e
  in_root "$r" "$@" >"$logf" 2>&1
  rc=$?
  set -e
  secs=$(($(date +%s) - t0))
}
apt_calls() { cat "$1/var/log/apt-get-calls.log" 2>/dev/null || true; }
asked_for() {  # asked_for ROOT PKG: true when an apt-get install in the log named PKG
  apt_calls "$1" | grep -E '(^| )install( |$)' | tr ' ' '\n' | grep -qx "$2"
}
answer_of() {  # answer_of LOG: what prefixkv run printed on stdout (the lines after make's echo of it)
  sed -n '/^\.\/build\/prefixkv run /,$p' "$1" | sed '1d' | grep -v -e '^\[prefixkv\]' -e '^make' || true
}
check_answer() {  # check_answer LOG: make run printed its statistics line and a non-empty answer
  grep -q '^\[prefixkv\] model .* generated' "$1" && [ -n "$(answer_of "$1" | tr -d '[:space:]')" ]
}

run_variant() {
  local v=$1 r="$work/$1"
  note ""
  note "== variant $v ($(date -u '+%F %T UTC'))"
  ! grep -q " $r/" /proc/mounts || fail "something is still mounted under $r"
  rm -rf "$r"
  cp -a "$base" "$r"
  cp /etc/resolv.conf "$r/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d" && chmod 755 "$r/usr/sbin/policy-rc.d"
  mount_in "$r"

  # the repository: HEAD (git archive) or the working tree without ignored files (build folders)
  mkdir -p "$r/root/prefixkv"
  if [ "$worktree" = 1 ]; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
       while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
       tar --null -T - -cf -) | tar -C "$r/root/prefixkv" -xf -
    note "repository: working tree of $(git -C "$repo" rev-parse --short HEAD) (uncommitted changes included)"
  else
    git -C "$repo" archive --format=tar HEAD | tar -C "$r/root/prefixkv" -xf -
    note "repository: git archive HEAD ($(git -C "$repo" rev-parse --short HEAD))"
  fi

  if [ "$v" = nodesource ]; then
    local deb
    deb=$(make_nodesource_deb)
    cp "$deb" "$r/root/nodejs-nodesource.deb"
    log "$v: installing the NodeSource-style nodejs ($(dpkg-deb -f "$deb" Version))"
    timed "$r" "$work/$v-nodesource-install.log" \
      "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends /root/nodejs-nodesource.deb"
    [ $rc -eq 0 ] || { tail -20 "$work/$v-nodesource-install.log"; fail "$v: installing the NodeSource-style nodejs"; }
    in_root "$r" "node --version && npm --version" >/dev/null || fail "$v: the pre-installed node or npm does not run"
    note "pre-installed: nodejs $(in_root "$r" "dpkg-query -W -f='\${Version}' nodejs") (Provides: $(in_root "$r" "dpkg-query -W -f='\${Provides}' nodejs")); node $(in_root "$r" "node --version"), npm $(in_root "$r" "npm --version")"
    rm -rf "$r"/var/lib/apt/lists/*  # back to a machine whose lists are not fresh
    if [ -n "$repro" ]; then
      git -C "$repo" show "$repro:scripts/setup.sh" >"$r/root/setup-old.sh"
      log "$v: the old scripts/setup.sh ($repro)"
      timed "$r" "$work/$v-old-setup.log" "cd /root/prefixkv && bash /root/setup-old.sh"
      if [ $rc -ne 0 ] && grep -q "held broken packages" "$work/$v-old-setup.log"; then
        note "old setup.sh ($repro): fails as reported (rc $rc): $(grep -m1 'held broken packages' "$work/$v-old-setup.log")"
      else
        note "old setup.sh ($repro): rc $rc, the reported error did not show (log: $work/$v-old-setup.log)"
      fi
      rm -rf "$r"/var/lib/apt/lists/*
    fi
  fi

  # make itself is not in a bare Debian: the one thing a machine needs before `make run`
  timed "$r" "$work/$v-make-install.log" \
    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends make"
  [ $rc -eq 0 ] || { tail -20 "$work/$v-make-install.log"; fail "$v: apt-get install make"; }
  rm -rf "$r"/var/lib/apt/lists/*
  note "prerequisite: apt-get install make ($secs s)"

  # every apt-get call from now on is logged
  cat >"$r/usr/local/sbin/apt-get" <<'EOF'
#!/bin/sh
echo "$*" >>/var/log/apt-get-calls.log
exec /usr/bin/apt-get "$@"
EOF
  chmod 755 "$r/usr/local/sbin/apt-get"
  : >"$r/var/log/apt-get-calls.log"

  log "$v: make run (log: $work/$v-make-run.log)"
  timed "$r" "$work/$v-make-run.log" "cd /root/prefixkv && make run"
  local run_secs=$secs
  [ $rc -eq 0 ] || { tail -30 "$work/$v-make-run.log"; fail "$v: make run rc $rc"; }
  check_answer "$work/$v-make-run.log" || { tail -30 "$work/$v-make-run.log"; fail "$v: make run printed no answer"; }
  note "make run: rc 0 in ${run_secs} s (apt-get, configure, build, answer)"
  note "  answer: $(answer_of "$work/$v-make-run.log" | tr -s '\n' ' ' | cut -c1-160)..."
  note "  $(grep '^\[prefixkv\] model' "$work/$v-make-run.log")"
  note "  apt-get calls: $(apt_calls "$r" | tr '\n' ';')"
  local p
  for p in npm libgtest-dev; do ! asked_for "$r" $p || fail "$v: make run asked apt-get for $p"; done
  [ "$v" = nodesource ] || ! asked_for "$r" nodejs || fail "$v: make run asked apt-get for nodejs"
  grep -q '^PREFIXKV_TESTS:BOOL=OFF' "$r/root/prefixkv/build/CMakeCache.txt" || fail "$v: the tests were configured"
  [ ! -e "$r/root/prefixkv/build/tests/pkv_tests" ] || fail "$v: the tests were built"
  note "  build: PREFIXKV_TESTS=OFF, $(find "$r/root/prefixkv/build" -name '*.o' | wc -l) objects, no pkv_tests"

  log "$v: make run again (nothing to install or build)"
  timed "$r" "$work/$v-make-run2.log" "cd /root/prefixkv && : >/var/log/apt-get-calls.log && make run"
  [ $rc -eq 0 ] && check_answer "$work/$v-make-run2.log" || fail "$v: second make run"
  [ -z "$(apt_calls "$r")" ] || fail "$v: the second make run called apt-get"
  grep -q '^setup:' "$work/$v-make-run2.log" && fail "$v: setup.sh was not quiet the second time"
  note "make run again: rc 0 in ${secs} s, setup.sh silent, no apt-get"

  if [ "$v" = nodesource ]; then
    log "$v: scripts/setup.sh test"
    : >"$r/var/log/apt-get-calls.log"
    timed "$r" "$work/$v-setup-test.log" "cd /root/prefixkv && bash scripts/setup.sh test"
    [ $rc -eq 0 ] || { cat "$work/$v-setup-test.log"; fail "$v: setup.sh test rc $rc"; }
    ! asked_for "$r" npm || fail "$v: setup.sh test asked apt-get for npm"
    ! asked_for "$r" nodejs || fail "$v: setup.sh test asked apt-get for nodejs"
    in_root "$r" "dpkg-query -W -f='\${Status}' npm 2>/dev/null | grep -q 'install ok installed'" && fail "$v: Debian's npm got installed"
    note "scripts/setup.sh test: rc 0 in ${secs} s; $(grep '^setup: installing' "$work/$v-setup-test.log" || echo 'installed nothing')"
    note "  apt-get calls: $(apt_calls "$r" | tr '\n' ';')"
    note "  afterwards: nodejs $(in_root "$r" "dpkg-query -W -f='\${Version}' nodejs"), npm package: $(in_root "$r" "dpkg-query -W -f='\${Status}' npm 2>/dev/null || echo 'not installed'"), npm command $(in_root "$r" "command -v npm") $(in_root "$r" "npm --version")"
    timed "$r" "$work/$v-setup-test2.log" "cd /root/prefixkv && bash scripts/setup.sh test"
    [ $rc -eq 0 ] && [ ! -s "$work/$v-setup-test2.log" ] || fail "$v: setup.sh test was not quiet the second time"
    note "scripts/setup.sh test again: silent, rc 0"
  fi

  if [ "$make_test" = 1 ]; then
    log "$v: make test (log: $work/$v-make-test.log)"
    : >"$r/var/log/apt-get-calls.log"
    local extra=""
    if [ -n "$npm_cafile" ]; then
      cp "$npm_cafile" "$r/root/npm-extra-ca.crt"
      extra="NODE_EXTRA_CA_CERTS=/root/npm-extra-ca.crt"
      note "  (npm gets NODE_EXTRA_CA_CERTS=$npm_cafile: this machine's TLS-intercepting proxy)"
    fi
    timed "$r" "$work/$v-make-test.log" "cd /root/prefixkv && $extra make test"
    local test_rc=$rc
    note "make test: rc $rc in ${secs} s; $(grep -E 'tests passed|tests failed' "$work/$v-make-test.log" | tail -1)"
    note "  apt-get calls: $(apt_calls "$r" | tr '\n' ';')"
    note "  failed: $(sed -n '/^The following tests FAILED:/,$p' "$work/$v-make-test.log" | grep -E '^\s+[0-9]+ - ' | sed 's/^\s*//' | tr '\n' ';')"
    note "  OpenAI client test: $(grep -E 'Test +#[0-9]+: ServerOpenAIClient' "$work/$v-make-test.log" | sed 's/\.\.\.*/ /; s/  */ /g' | head -1)"
    [ -x "$r/root/prefixkv/build/tests/pkv_tests" ] || fail "$v: make test did not build the tests"
    grep -q '^PREFIXKV_TESTS:BOOL=ON' "$r/root/prefixkv/build/CMakeCache.txt" || fail "$v: make test did not turn the tests on"
    timed "$r" "$work/$v-make-run3.log" "cd /root/prefixkv && make run"
    [ $rc -eq 0 ] && check_answer "$work/$v-make-run3.log" || fail "$v: make run after make test"
    note "make run after make test (same build folder, tests still configured): rc 0 in ${secs} s"
    # the suite's own failures are reported above, not a failure of this check (which is about setup)
    [ $test_rc -eq 0 ] || note "  (make test rc $test_rc: see $work/$v-make-test.log)"
  fi
  unmount_all
}

for v in "${variants[@]}"; do run_variant "$v"; done
note ""
note "all checks passed"
