#!/bin/bash
# Build osimg-reseed as a static binary for the guest images (they have no compiler).
# usage: build.sh OUT_FILE    (needs gcc and libc6-dev on the host)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
gcc -static -Os -s -Wall -Wextra -Werror -o "$1" "$HERE/osimg-reseed.c"
chmod 0755 "$1"
