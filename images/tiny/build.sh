#!/bin/bash
# Build the "tiny" guest image offline from Debian packages, without mounting anything:
# static busybox + dropbear + qemu-guest-agent, an init that reads a NoCloud drive, the demo app.
# usage: build.sh OUT VERSION CLIENT_PUBKEY_FILE
# Other busybox families reuse this script through FAMILY, EXTRA_PKGS, EXTRA_BINS (paths inside
# the unpacked packages, copied to /usr/sbin with their libraries) and MODULES (see images/vios).
# writes OUT/{disk.qcow2,vmlinuz,initrd.img,host_key.pub,manifest.json}
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$1 VERSION=$2 PUBKEY=$3
FAMILY=${FAMILY:-tiny}
MODULES=${MODULES:-dummy tun nbd}
KVER=${KVER:-$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -1 | sed "s#/boot/vmlinuz-##")}
DEBS=${OSIMG_DEB_CACHE:-$OUT/../debs}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$OUT" "$DEBS"

# 1. .debs fetched with apt-get download (nothing installed, no service started), then unpacked
PKGS="dropbear-bin qemu-guest-agent libtomcrypt1 libtommath1 ${EXTRA_PKGS:-}"
(cd "$DEBS" && for p in $PKGS; do ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download "$p" >/dev/null 2>&1; done)
ST=$W/stage; mkdir -p "$ST"
for p in $PKGS; do dpkg-deb -x "$(ls "$DEBS/${p}"_*.deb | head -1)" "$ST"; done

# 2. root directory
R=$W/rootfs
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc/dropbear,root/.ssh,proc,sys,dev,run,tmp,mnt,home,var/log,data}
ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"; ln -s ../run "$R/var/run"
chmod 1777 "$R/tmp"; chmod 700 "$R/root" "$R/root/.ssh"
cp -a "$HERE/rootfs/." "$HERE/../common/app/." "$R/"
cp /usr/bin/busybox "$R/bin/busybox"
for a in $(/usr/bin/busybox --list-full); do [ -e "$R/$a" ] || ln -s /bin/busybox "$R/$a"; done
BINS="/usr/sbin/dropbear /usr/bin/dropbearconvert /usr/sbin/qemu-ga ${EXTRA_BINS:-}"
for b in $BINS; do cp "$ST$b" "$R/usr/sbin/"; done
# the RNG reseed helper a warm swap runs through the guest agent (static: nothing to copy with it)
bash "$HERE/../common/reseed/build.sh" "$R/usr/sbin/osimg-reseed"
for b in $BINS; do
  b=$R/usr/sbin/$(basename "$b")
  LD_LIBRARY_PATH="$ST/usr/lib/x86_64-linux-gnu" ldd "$b" | grep -o '/[^ ]*' | while read -r lib; do
    case "$lib" in
      */ld-linux-x86-64.so.2) cp -L "$lib" "$R/usr/lib64/ld-linux-x86-64.so.2" ;;
      *) cp -L "$lib" "$R/usr/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
    esac
  done
done
# kernel modules that a customization may ask to load (busybox modprobe reads modules.dep)
for m in $MODULES; do
  for ko in $(modprobe -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'); do
    mkdir -p "$R$(dirname "$ko")"; cp "$ko" "$R$ko"
  done
done
depmod -b "$R" "$KVER" 2>/dev/null
printf 'root:*:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"
echo '/bin/sh' >"$R/etc/shells"
echo 'passwd: files' >"$R/etc/nsswitch.conf"
echo "osimg-$FAMILY" >"$R/etc/hostname"
echo "$VERSION" >"$R/etc/osimg-version"
cat >"$R/etc/os-release" <<OSR
PRETTY_NAME="osimg $FAMILY $VERSION"
NAME="osimg $FAMILY"
ID=osimg-$FAMILY
VERSION_ID=$VERSION
VERSION="$VERSION"
OSR
# qemu-ga's guest-shutdown runs /sbin/shutdown -h -P +0; busybox has no shutdown applet
rm -f "$R/sbin/shutdown"
printf '#!/bin/sh\n/etc/init.d/rcK\nsync\nexec /bin/busybox poweroff -f\n' >"$R/sbin/shutdown"
chmod 755 "$R/sbin/shutdown"
cp "$PUBKEY" "$R/root/.ssh/authorized_keys"; chmod 600 "$R/root/.ssh/authorized_keys"
# host key generated here, not in the guest: no entropy wait under TCG, and the public half is pinned
LD_LIBRARY_PATH="$ST/usr/lib/x86_64-linux-gnu" "$ST/usr/bin/dropbearkey" -t ed25519 \
  -f "$R/etc/dropbear/dropbear_ed25519_host_key" >/dev/null 2>&1
LD_LIBRARY_PATH="$ST/usr/lib/x86_64-linux-gnu" "$ST/usr/bin/dropbearkey" -y \
  -f "$R/etc/dropbear/dropbear_ed25519_host_key" | grep '^ssh-ed25519' | cut -d' ' -f1,2 >"$OUT/host_key.pub"

# 3. kernel + initramfs
cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
bash "$HERE/../common/initramfs.sh" "$KVER" "$OUT/initrd.img"

# 4. ext4 from the directory (no mount), then qcow2
truncate -s 256M "$W/root.raw"
mkfs.ext4 -q -F -L root -E root_owner=0:0 -d "$R" "$W/root.raw"
qemu-img convert -O qcow2 "$W/root.raw" "$OUT/disk.qcow2"
cat >"$OUT/manifest.json" <<JSON
{"family": "$FAMILY", "version": "$VERSION", "os_version": "$VERSION", "kernel_release": "$KVER",
 "cmdline": "console=ttyS0 root=/dev/vda rootfstype=ext4 quiet panic=-1", "memory_mib": 256,
 "ready_marker": "OSIMG-READY", "agent": true, "app_port": 8080}
JSON
