#!/bin/bash
# Build the shared initramfs: static busybox + the virtio, SCSI, ISO9660 and FAT modules of the
# Debian cloud kernel (they are modules there, not built in), then mount root= and switch_root.
# usage: initramfs.sh KVER OUT.cpio.gz
set -euo pipefail
KVER=$1 OUT=$2
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W"/{bin,proc,sys,dev,newroot,lib/modules}
cp /usr/bin/busybox "$W/bin/busybox"
for a in sh mount umount insmod switch_root sleep cat mkdir echo; do ln -s busybox "$W/bin/$a"; done
MODS=""
for m in virtio_pci virtio_blk virtio_scsi sd_mod virtio_net virtio_console virtio-rng isofs vfat nls_cp437 nls_ascii; do
  for ko in $(modprobe -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'); do
    b=$(basename "$ko")
    [ -f "$W/lib/modules/$b" ] || { cp "$ko" "$W/lib/modules/$b"; MODS="$MODS $b"; }
  done
done
cat >"$W/init" <<INIT
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $MODS; do insmod /lib/modules/\$m 2>/dev/null; done
root=/dev/vda; rootfstype=ext4; init=/sbin/init
for x in \$(cat /proc/cmdline); do
  case \$x in osimg.probe) echo "OSIMG-PROBE-OK" >/dev/ttyS0; exec /bin/busybox poweroff -f;; esac
  case \$x in root=*) root=\${x#root=};; rootfstype=*) rootfstype=\${x#rootfstype=};; init=*) init=\${x#init=};; esac
done
n=0; while [ ! -b "\$root" ] && [ \$n -lt 200 ]; do sleep 0.05; n=\$((n+1)); done
mount -t "\$rootfstype" -o rw "\$root" /newroot || { echo "osimg-initramfs: cannot mount \$root"; exec sh; }
mount --move /dev /newroot/dev; mount --move /proc /newroot/proc; mount --move /sys /newroot/sys
exec switch_root /newroot "\$init"
INIT
chmod 755 "$W/init"
(cd "$W" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT"
