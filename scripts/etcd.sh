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
#        scripts/etcd.sh cluster-start DIR PKI_DIR PORT1..PORTn PEER1..PEERn
#                                                     start an n-member (1-9) TLS cluster on 127.0.0.1: member i
#                                                     serves clients on PORTi and peers on PEERi, lives in DIR/mi
#                                                     (data, etcd.log, etcd.pid, member.conf); print the PIDs
#                                                     once every member reports healthy
#        scripts/etcd.sh member-start DIR I          start member I of that cluster again (its data rejoins)
#        scripts/etcd.sh member-stop DIR I [KILL]    stop member I by its PID file (KILL: kill -9, no goodbye)
#        scripts/etcd.sh cluster-stop DIR            stop every member of the cluster in DIR
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

# TLS flags of a member serving with the certificates in $1 (none: plain HTTP): sets scheme, sec, ctl.
tls_flags() {
  local tls=$1
  scheme=http sec=() ctl=()
  [ -n "$tls" ] || return 0
  [ -f "$tls/server.key" ] || die "no certificates in $tls: run '$0 pki $tls' first"
  scheme=https
  sec=(--cert-file "$tls/server.crt" --key-file "$tls/server.key" --client-cert-auth --trusted-ca-file "$tls/ca.crt"
    --peer-cert-file "$tls/server.crt" --peer-key-file "$tls/server.key" --peer-client-cert-auth
    --peer-trusted-ca-file "$tls/ca.crt")
  ctl=(--cacert "$tls/ca.crt" --cert "$tls/client.crt" --key "$tls/client.key")
}

# Wait until the etcd with PID $1 answers on 127.0.0.1:$2 (a health check is a quorum read); log $3.
# Not healthy in time: kill it, say why and fail.
wait_healthy() {
  local pid=$1 port=$2 log=$3
  for _ in $(seq "$HEALTH_TRIES"); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "etcd.sh: etcd exited while starting: $(tail -n 5 "$log")" >&2
      return 1
    fi
    if ETCDCTL_API=3 "$BIN/etcdctl" --endpoints="$scheme://127.0.0.1:$port" "${ctl[@]}" --dial-timeout=0.5s \
      --command-timeout=1s endpoint health >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.05
  done
  kill "$pid"
  echo "etcd.sh: etcd on 127.0.0.1:$port not healthy in time, log: $log" >&2
  return 1
}

number() { [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a number, got '$2'"; }

start() {
  local port=$1 dir=$2 peer=${3:-} tls=${4:-}
  number PORT "$port"
  [ -n "$peer" ] || peer=$((port + 1))
  number PEER_PORT "$peer"
  install
  mkdir -p "$dir"
  local scheme sec ctl
  tls_flags "$tls"
  "$BIN/etcd" --name osimg --data-dir "$dir/data" \
    --listen-client-urls "$scheme://127.0.0.1:$port" --advertise-client-urls "$scheme://127.0.0.1:$port" \
    --listen-peer-urls "$scheme://127.0.0.1:$peer" --initial-advertise-peer-urls "$scheme://127.0.0.1:$peer" \
    --initial-cluster "osimg=$scheme://127.0.0.1:$peer" "${sec[@]}" </dev/null >"$dir/etcd.log" 2>&1 &
  local pid=$!
  wait_healthy "$pid" "$port" "$dir/etcd.log" || exit 1
  echo "$pid"
}

# -- clusters: member i of DIR lives in DIR/mi; member.conf keeps what a restart needs -------------------

member_dir() {
  [[ $2 =~ ^[1-9]$ ]] || die "member must be 1-9, got '$2'"
  [ -f "$1/m$2/member.conf" ] || die "no member $2 in $1 (no $1/m$2/member.conf): start it with cluster-start"
  echo "$1/m$2"
}

# The value of key $2 in member.conf $1 (read, never sourced).
conf() { sed -n "s/^$2=//p" "$1"; }

# Launch member $2 of cluster $1 in the background and write its PID file; prints the PID.
launch() {
  local mdir
  mdir=$(member_dir "$1" "$2")
  local port peer cluster tls
  port=$(conf "$mdir/member.conf" port) peer=$(conf "$mdir/member.conf" peer)
  cluster=$(conf "$mdir/member.conf" cluster) tls=$(conf "$mdir/member.conf" pki)
  local scheme sec ctl
  tls_flags "$tls"
  # --initial-cluster* only count on the first start; a restarted member rejoins from its data.
  "$BIN/etcd" --name "m$2" --data-dir "$mdir/data" \
    --listen-client-urls "$scheme://127.0.0.1:$port" --advertise-client-urls "$scheme://127.0.0.1:$port" \
    --listen-peer-urls "$scheme://127.0.0.1:$peer" --initial-advertise-peer-urls "$scheme://127.0.0.1:$peer" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "osimg-$(basename "$1")" \
    "${sec[@]}" </dev/null >>"$mdir/etcd.log" 2>&1 &
  echo $! >"$mdir/etcd.pid"
  echo $!
}

cluster_start() {
  local dir=$1 tls=$2
  shift 2
  local n=$(($# / 2))
  { [ $(($# % 2)) -eq 0 ] && [ "$n" -ge 1 ] && [ "$n" -le 9 ]; } || die "cluster-start needs 1-9 client ports and as many peer ports"
  local -a ports=("${@:1:n}") peers=("${@:n+1}")
  local p
  for p in "${ports[@]}" "${peers[@]}"; do number PORT "$p"; done
  [ -f "$tls/server.key" ] || die "no certificates in $tls: run '$0 pki $tls' first"
  install
  local i cluster=""
  for i in $(seq "$n"); do cluster+="${cluster:+,}m$i=https://127.0.0.1:${peers[i - 1]}"; done
  mkdir -p "$dir"
  for i in $(seq "$n"); do
    [ ! -e "$dir/m$i/data" ] || die "$dir/m$i/data exists: a cluster-start needs an empty DIR"
    mkdir -p "$dir/m$i"
    printf 'port=%s\npeer=%s\ncluster=%s\npki=%s\n' "${ports[i - 1]}" "${peers[i - 1]}" "$cluster" "$tls" >"$dir/m$i/member.conf"
  done
  # All at once: a member is healthy only once a quorum of its peers is up.
  local -a pids=()
  for i in $(seq "$n"); do pids+=("$(launch "$dir" "$i")"); done
  local scheme sec ctl
  tls_flags "$tls"
  for i in $(seq "$n"); do
    wait_healthy "${pids[i - 1]}" "${ports[i - 1]}" "$dir/m$i/etcd.log" || { cluster_stop "$dir"; exit 1; }
  done
  echo "${pids[*]}"
}

member_start() {
  local mdir pid scheme sec ctl
  mdir=$(member_dir "$1" "$2")
  if [ -f "$mdir/etcd.pid" ] && ! stopped "$(cat "$mdir/etcd.pid")"; then
    die "member $2 of $1 is running (PID $(cat "$mdir/etcd.pid"))"
  fi
  pid=$(launch "$1" "$2")
  tls_flags "$(conf "$mdir/member.conf" pki)"
  wait_healthy "$pid" "$(conf "$mdir/member.conf" port)" "$mdir/etcd.log" || exit 1
  echo "$pid"
}

member_stop() {
  local mdir
  mdir=$(member_dir "$1" "$2")
  [ -f "$mdir/etcd.pid" ] || return 0
  stop "$(cat "$mdir/etcd.pid")" "${3:-}"
}

cluster_stop() {
  local dir=$1 conf_file i status=0
  for conf_file in "$dir"/m[1-9]/member.conf; do
    [ -f "$conf_file" ] || continue
    i=$(basename "$(dirname "$conf_file")")
    member_stop "$dir" "${i#m}" || status=1
  done
  return $status
}

# Gone or a zombie waiting for its reaper: either way it no longer serves.
stopped() { [ ! -r "/proc/$1/stat" ] || [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" = Z ]; }

stop() {
  local pid=$1 how=${2:-}
  [[ $pid =~ ^[0-9]+$ ]] || die "PID must be a number, got '$pid'"
  stopped "$pid" && return 0
  # -f on both sides: the cache folder may be reached through a symlink
  [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$BIN/etcd")" ] || die "PID $pid is not $BIN/etcd, not stopping it"
  case "$how" in
  KILL) kill -KILL "$pid" ;;
  "") kill "$pid" ;;
  *) die "stop how? expected KILL or nothing, got '$how'" ;;
  esac
  for _ in $(seq 100); do
    stopped "$pid" && return 0
    sleep 0.05
  done
  kill -KILL "$pid"
}

USAGE="install | pki DIR | start PORT DIR [PEER_PORT] [PKI_DIR] | stop PID | cluster-start DIR PKI_DIR PORT1..PORTn PEER1..PEERn | member-start DIR I | member-stop DIR I [KILL] | cluster-stop DIR"
case "${1:-}" in
install) install && echo "$BIN" ;;
pki) [ $# -eq 2 ] || die "usage: $0 pki DIR"; pki "$2" ;;
start) [ $# -ge 3 ] || die "usage: $0 start PORT DIR [PEER_PORT] [PKI_DIR]"; start "$2" "$3" "${4:-}" "${5:-}" ;;
stop) [ $# -eq 2 ] || die "usage: $0 stop PID"; stop "$2" ;;
cluster-start) [ $# -ge 5 ] || die "usage: $0 cluster-start DIR PKI_DIR PORT1..PORTn PEER1..PEERn"; shift; cluster_start "$@" ;;
member-start) [ $# -eq 3 ] || die "usage: $0 member-start DIR I"; member_start "$2" "$3" ;;
member-stop) [ $# -eq 3 ] || [ $# -eq 4 ] || die "usage: $0 member-stop DIR I [KILL]"; member_stop "$2" "$3" "${4:-}" ;;
cluster-stop) [ $# -eq 2 ] || die "usage: $0 cluster-stop DIR"; cluster_stop "$2" ;;
*) die "usage: $0 $USAGE" ;;
esac
