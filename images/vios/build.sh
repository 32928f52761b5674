#!/bin/bash
# Build the "vios" guest image: the tiny image (busybox, dropbear, qemu-guest-agent, NoCloud init)
# plus qemu-nbd with its libraries, so the guest can serve its virtio-scsi disks over NBD.
# usage: build.sh OUT VERSION CLIENT_PUBKEY_FILE
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
FAMILY=vios EXTRA_PKGS=qemu-utils EXTRA_BINS=/usr/bin/qemu-nbd MODULES=nbd exec bash "$HERE/../tiny/build.sh" "$@"
