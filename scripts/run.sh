#!/bin/bash
# One entry point for a fresh Debian 12 machine (root): installs and starts what osimg needs, then
# runs the demo or the test suite. Re-running is fast: each step checks before it acts.
#   bash scripts/run.sh demo [osimg demo args]   the end-to-end main job
#   bash scripts/run.sh test [pytest args]       the full test suite
#   bash scripts/run.sh setup                    only the set-up
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# Builds (guest images, etcd, pip log, daemon pid files) are cached per machine, not per checkout:
# every clone on this host (CI's fresh ones too) reuses them, and a recipe rebuilds when it changes.
CACHE=${OSIMG_CACHE:-/var/cache/osimg}
mkdir -p "$CACHE"; chmod 755 "$CACHE"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "run as root: libvirt's system instance and apt need it" >&2; exit 1; }

# 1. Debian packages (apt-get update only when something is missing)
PKGS="qemu-system-x86 qemu-utils qemu-block-extra libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
gcc libc6-dev python3-venv busybox-static linux-image-cloud-amd64 e2fsprogs cpio openssh-client openssl mmdebstrap curl tini"
missing=$(for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  log "installing Debian packages: $(echo $missing)"
  apt-get update -qq
  # policy-rc.d: the packages must not start services on their own; we start the daemons below
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  rm -f /usr/sbin/policy-rc.d; trap - EXIT
fi

# 2. Python venv with the package (reinstalled only when pyproject.toml changed)
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then log "creating .venv"; "$PY" -m venv .venv; fi
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat .venv/.osimg-stamp 2>/dev/null)" != "$stamp" ]; then
  log "installing osimg and its dependencies into .venv (libvirt-python builds from source)"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[dev]' >"$CACHE/pip.log" 2>&1 || { tail -20 "$CACHE/pip.log" >&2; exit 1; }
  .venv/bin/python -c 'import libvirt, orchestrator' || { echo "python install failed" >&2; exit 1; }
  echo "$stamp" >.venv/.osimg-stamp
fi

# 3. libvirt daemons: no systemd here, so start them directly. Each is checked on its own, by a
# real connection: a socket file can outlive its daemon (a stale virtlogd-sock makes every domain
# start fail with "Connection refused" while libvirtd itself answers).
# libvirtd runs under 'tini -s' (a child subreaper): QEMU daemonizes, and its orphaned process
# must be reaped promptly or libvirt waits on the zombie. Some container inits reap only once a
# second, which would add a second to every guest teardown (and to every warm swap's downtime).
sock_alive() {
  python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])' "$1" \
    >/dev/null 2>&1
}
mkdir -p "$CACHE/daemons"
if ! sock_alive /run/libvirt/virtlogd-sock; then
  rm -f /run/libvirt/virtlogd-sock /run/libvirt/virtlogd-admin-sock
  virtlogd -d -p "$CACHE/daemons/virtlogd.pid"
  for _ in $(seq 50); do sock_alive /run/libvirt/virtlogd-sock && break; sleep 0.1; done
  log "started virtlogd (pid $(cat "$CACHE/daemons/virtlogd.pid"))"
fi
sock_alive /run/libvirt/virtlogd-sock || { echo "virtlogd does not answer on /run/libvirt/virtlogd-sock" >&2; exit 1; }
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  setsid tini -s -- libvirtd -p "$CACHE/daemons/libvirtd.pid" </dev/null >"$CACHE/daemons/libvirtd.log" 2>&1 &
  for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.1; done
  log "started libvirtd (pid $(cat "$CACHE/daemons/libvirtd.pid"), under tini -s)"
fi
virsh -c qemu:///system version >/dev/null || { echo "libvirtd does not answer on qemu:///system" >&2; exit 1; }

# 4. etcd binaries from Debian packages (unpacked, not installed: the package would start a service),
#    and the certificates etcds:// clients and etcd itself use (CA, server, client; keys 0600)
bash scripts/etcd.sh install >/dev/null
bash scripts/etcd.sh pki "${OSIMG_CACHE:-/var/cache/osimg}/etcd/pki"

# 5. guest images (cached by recipe hash; a cached build is reused at once)
IMAGES=${OSIMG_PREBUILD:-"tiny:v1 tiny:v2 debian:v1 debian:v2"}
log "guest images: $IMAGES"
.venv/bin/osimg recipe build $IMAGES

case "${1:-setup}" in
  setup) ;;
  demo) shift; exec .venv/bin/osimg demo "$@" ;;
  test) shift; exec .venv/bin/pytest "$@" ;;
  *) echo "usage: run.sh setup|demo|test [args]" >&2; exit 2 ;;
esac
