#!/bin/bash
# A throw-away single-node etcd 3.4 for tests and benchmarks, from Debian's packages.
#
# `apt-get install etcd-server` would start /etc/init.d/etcd as a system service; downloading the
# .debs and unpacking them into $OSIMG_CACHE/etcd/ (default /var/cache/osimg/etcd, shared by every
# checkout on the machine) gives the same binaries with no effect on the host.
# etcd listens on 127.0.0.1 only, and `stop` only kills a PID that really is this etcd.
# With a PKI folder (made by `pki`), clients and peers speak TLS and must present a certificate of
# osimg's CA (--client-cert-auth): a local process without the client key is refused.
#
# usage: scripts/etcd.sh install                     unpack etcd into $OSIMG_CACHE/etcd (idempotent), print its bin dir
#        scripts/etcd.sh pki DIR                     make (once) a CA, a server and a client certificate in DIR:
#                                                     ca.crt, server.{crt,key}, client.{crt,key}; keys 0600, DIR 0700
#        scripts/etcd.sh start PORT DIR [PEER_PORT] [PKI_DIR]
#                                                     start etcd on 127.0.0.1:PORT (data DIR/data, log DIR/etcd.log),
#                                                     with TLS and client certificates when PKI_DIR is given;
#                                                     print its PID once it reports healthy
#        scripts/etcd.sh stop PID                    stop an etcd started by `start`
set -euo pipefail

CACHE="${OSIMG_CACHE:-/var/cache/osimg}/etcd"
BIN="$CACHE/root/usr/bin"
HEALTH_TRIES=200 # x 0.05 s: etcd 3.4 is healthy in 0.4-1.1 s here, allow for a loaded machine

die() {
  echo "etcd.sh: $*" >&2
  exit 1
}

installed() { [ -x "$BIN/etcd" ] && [ -x "$BIN/etcdctl" ]; }

install() {
  installed && return 0
  mkdir -p "$CACHE"
  # The lock lives in a subshell so that no etcd started later inherits its descriptor.
  (
    flock 9
    installed && exit 0
    tmp=$(mktemp -d "$CACHE/unpack.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download etcd-server etcd-client >download.log 2>&1) ||
      die "apt-get download etcd-server etcd-client failed (apt lists missing? apt-get update): $(tail -n 3 "$tmp/download.log")"
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
    rm -rf "$CACHE/root"
    mv "$tmp/root" "$CACHE/root"
  ) 9>"$CACHE/.lock"
  installed || die "etcd binaries missing in $BIN after unpacking"
}

# One CA per folder; the server certificate names 127.0.0.1 (and serves peers too, hence clientAuth).
pki() {
  local dir=$1
  [ -f "$dir/client.key" ] && [ -f "$dir/ca.crt" ] && return 0
  (
    umask 077
    mkdir -p "$dir"
    chmod 0700 "$dir"
    cd "$dir"
    ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    ec ca.key
    openssl req -x509 -new -key ca.key -subj "/CN=osimg etcd CA" -days 3650 -out ca.crt \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    for who in server client; do
      ec "$who.key"
      openssl req -new -key "$who.key" -subj "/CN=osimg-$who" -out "$who.csr"
      if [ "$who" = server ]; then
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >"$who.ext"
      else
        printf 'extendedKeyUsage=clientAuth\n' >"$who.ext"
      fi
      openssl x509 -req -in "$who.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
        -extfile "$who.ext" -out "$who.crt" 2>/dev/null
      rm -f "$who.csr" "$who.ext"
    done
  ) || die "could not make certificates in $dir"
}

start() {
  local port=$1 dir=$2 peer=${3:-} tls=${4:-}
  [[ $port =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
  [ -n "$peer" ] || peer=$((port + 1))
  [[ $peer =~ ^[0-9]+$ ]] || die "PEER_PORT must be a number, got '$peer'"
  install
  mkdir -p "$dir"
  local scheme=http
  local -a sec=() ctl=()
  if [ -n "$tls" ]; then
    [ -f "$tls/server.key" ] || die "no certificates in $tls: run '$0 pki $tls' first"
    scheme=https
    sec=(--cert-file "$tls/server.crt" --key-file "$tls/server.key" --client-cert-auth --trusted-ca-file "$tls/ca.crt"
      --peer-cert-file "$tls/server.crt" --peer-key-file "$tls/server.key" --peer-client-cert-auth
      --peer-trusted-ca-file "$tls/ca.crt")
    ctl=(--cacert "$tls/ca.crt" --cert "$tls/client.crt" --key "$tls/client.key")
  fi
  "$BIN/etcd" --name osimg --data-dir "$dir/data" \
    --listen-client-urls "$scheme://127.0.0.1:$port" --advertise-client-urls "$scheme://127.0.0.1:$port" \
    --listen-peer-urls "$scheme://127.0.0.1:$peer" --initial-advertise-peer-urls "$scheme://127.0.0.1:$peer" \
    --initial-cluster "osimg=$scheme://127.0.0.1:$peer" "${sec[@]}" </dev/null >"$dir/etcd.log" 2>&1 &
  local pid=$!
  for _ in $(seq "$HEALTH_TRIES"); do
    kill -0 "$pid" 2>/dev/null || die "etcd exited while starting: $(tail -n 5 "$dir/etcd.log")"
    if ETCDCTL_API=3 "$BIN/etcdctl" --endpoints="$scheme://127.0.0.1:$port" "${ctl[@]}" --dial-timeout=0.5s \
      --command-timeout=1s endpoint health >/dev/null 2>&1; then
      echo "$pid"
      return 0
    fi
    sleep 0.05
  done
  kill "$pid"
  die "etcd on 127.0.0.1:$port not healthy in time, log: $dir/etcd.log"
}

# Gone or a zombie waiting for its reaper: either way it no longer serves.
stopped() { [ ! -r "/proc/$1/stat" ] || [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" = Z ]; }

stop() {
  local pid=$1
  [[ $pid =~ ^[0-9]+$ ]] || die "PID must be a number, got '$pid'"
  stopped "$pid" && return 0
  # -f on both sides: the cache folder may be reached through a symlink
  [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$BIN/etcd")" ] || die "PID $pid is not $BIN/etcd, not stopping it"
  kill "$pid"
  for _ in $(seq 100); do
    stopped "$pid" && return 0
    sleep 0.05
  done
  kill -KILL "$pid"
}

case "${1:-}" in
install) install && echo "$BIN" ;;
pki) [ $# -eq 2 ] || die "usage: $0 pki DIR"; pki "$2" ;;
start) [ $# -ge 3 ] || die "usage: $0 start PORT DIR [PEER_PORT] [PKI_DIR]"; start "$2" "$3" "${4:-}" "${5:-}" ;;
stop) [ $# -eq 2 ] || die "usage: $0 stop PID"; stop "$2" ;;
*) die "usage: $0 install | pki DIR | start PORT DIR [PEER_PORT] [PKI_DIR] | stop PID" ;;
esac
