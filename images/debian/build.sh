#!/bin/bash
# Build the "debian" guest image: Debian 12 with systemd, OpenSSH, qemu-guest-agent and cloud-init,
# made with mmdebstrap into a directory and turned into ext4 with mkfs.ext4 -d (nothing mounted).
# Same contract as images/tiny: usage: build.sh OUT VERSION CLIENT_PUBKEY_FILE
# writes OUT/{disk.qcow2,vmlinuz,initrd.img,host_key.pub,manifest.json}
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$1 VERSION=$2 PUBKEY=$3
KVER=${KVER:-$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -1 | sed "s#/boot/vmlinuz-##")}
SUITE=bookworm
# the Debian mirror the host's apt uses; listed explicitly (with updates and security) so that
# mmdebstrap never falls back to another source
MIRROR=http://deb.debian.org/debian
SECURITY=http://deb.debian.org/debian-security
# the guest boots the host's kernel, so it gets the host's modules (modprobe, udev, bootcmd)
MODULES=/lib/modules/$KVER
[ -d "$MODULES" ] || { echo "no $MODULES for kernel $KVER" >&2; exit 1; }
W=$(mktemp -d)
# --one-file-system: never follow a mount that an interrupted mmdebstrap might have left behind
trap 'rm -rf --one-file-system "$W"' EXIT
mkdir -p "$OUT"
R=$W/rootfs

# 1. Debian packages. The merged-usr hook makes /bin etc. symlinks the way debootstrap does, so
# the usrmerge package and its perl dependency stay out. Documentation and translations are not
# unpacked (copyright files are kept); that setting stays in the image for later installs too.
# stdin from /dev/null: mmdebstrap would read a sources.list from a non-terminal stdin.
mmdebstrap --mode=root --variant=apt --format=directory \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include=systemd-sysv,udev,dbus,libpam-systemd,openssh-server,qemu-guest-agent,iproute2,ifupdown,cloud-init,busybox,kmod,e2fsprogs,netbase,criu \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --aptopt='Acquire::Retries "3"' \
  "$SUITE" "$R" \
  "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY $SUITE-security main" \
  </dev/null

# 2. osimg's files: cloud-init and network defaults, sshd, units, the demo app. The family's own
# files come last: its demo app (a Python server with in-memory state, so a carried process is
# visible) replaces the common busybox CGI one.
cp -R --no-preserve=ownership "$HERE/../common/app/." "$HERE/rootfs/." "$R/"
rm -rf "$R/usr/lib/osimg/www"
mkdir -p "$R/data" "$R/usr/lib/modules"
# the RNG reseed helper a warm swap runs through the guest agent (static: nothing to copy with it)
bash "$HERE/../common/reseed/build.sh" "$R/usr/sbin/osimg-reseed"
cp -a "$MODULES" "$R/usr/lib/modules/"
rm -f "$R/usr/lib/modules/$KVER/build" "$R/usr/lib/modules/$KVER/source"
echo "osimg-debian" >"$R/etc/hostname"
echo "$VERSION" >"$R/etc/osimg-version"
# Debian's os-release with osimg's name and version in front (a file instead of the symlink)
rm -f "$R/etc/os-release"
{
  echo "PRETTY_NAME=\"osimg debian $VERSION (Debian 12)\""
  echo "NAME=\"osimg debian\""
  echo "VERSION_ID=$VERSION"
  echo "VERSION=\"$VERSION (Debian 12 $SUITE)\""
  grep -v -E '^(PRETTY_NAME|NAME|VERSION_ID|VERSION)=' "$R/usr/lib/os-release"
} >"$R/etc/os-release"
# Masked: apt's timers (guests must not reach the Internet on their own); e2scrub (no LVM here,
# and it takes seconds of the one emulated CPU at boot); cloud-init's config stage (its module
# runs in the final stage, see 90_osimg.cfg).
chroot "$R" systemctl --root=/ --quiet mask apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer e2scrub_reap.service cloud-config.service
chroot "$R" systemctl --root=/ --quiet enable osimg-ready.service osimg-app.service

# 3. SSH: root logs in with the client key; one ed25519 host key generated here, not in the
# guest (no entropy wait under TCG, and the public half is pinned before the first boot)
mkdir -p "$R/root/.ssh"; chmod 700 "$R/root/.ssh"
cp "$PUBKEY" "$R/root/.ssh/authorized_keys"; chmod 600 "$R/root/.ssh/authorized_keys"
rm -f "$R"/etc/ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N '' -C root@osimg-debian -f "$R/etc/ssh/ssh_host_ed25519_key"
cut -d' ' -f1,2 "$R/etc/ssh/ssh_host_ed25519_key.pub" >"$OUT/host_key.pub"

# 4. leftovers of the build that should not be in every guest (mmdebstrap already cleaned apt)
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id" "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old
rm -rf "$R"/var/lib/cloud/* "$R"/var/log/apt/* "$R/var/log/dpkg.log" "$R"/tmp/*

# 5. kernel + initramfs
cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
bash "$HERE/../common/initramfs.sh" "$KVER" "$OUT/initrd.img"

# 6. ext4 from the directory (no mount), then a compressed qcow2: the root stays 2 GiB inside
# the guest while the file holds only what is used
truncate -s 2G "$W/root.raw"
mkfs.ext4 -q -F -L root -E root_owner=0:0 -d "$R" "$W/root.raw"
qemu-img convert -c -O qcow2 -o compression_type=zstd "$W/root.raw" "$OUT/disk.qcow2"
cat >"$OUT/manifest.json" <<JSON
{"family": "debian", "version": "$VERSION", "os_version": "$VERSION", "kernel_release": "$KVER",
 "cmdline": "console=ttyS0 root=/dev/vda rootfstype=ext4 net.ifnames=0 quiet panic=-1", "memory_mib": 512,
 "ready_marker": "OSIMG-READY", "agent": true, "app_port": 8080}
JSON
