"""Benchmark (issue 9): sequential read MiB/s inside one client guest, three ways to reach one LU.

1. **local**: the qcow2 file attached through libvirt as a virtio-scsi disk (QEMU reads the file).
2. **host VIOS**: the same file served by a host-service VIOS node (qemu-storage-daemon, NBD on a
   unix socket), attached through libvirt as a virtio-scsi NBD disk.
3. **guest VIOS**: the same file attached to a VIOS guest, served by qemu-nbd inside it, reached
   through its slirp forward on 127.0.0.1, attached to the client the same way.

The LU is a qcow2 holding ``SIZE_MIB`` of random data (so no path can skip reading it), opened
read-only by all three at once. Inside the client each disk is read with
``dd bs=1M iflag=direct`` (no guest page cache), as many passes as make a run last about 2 s
(the guest clock ticks in 10 ms), ``RUNS`` runs in turns, and the best run of each counts. The host
has the file in its page cache after the first pass, for all three paths alike. Everything runs
under TCG on a shared 2-core host: the absolute numbers are small and noisy, the ratios matter.

Run: ``.venv/bin/python bench/vios_io.py`` (as root, libvirtd running; about 2 minutes).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
import uuid

from orchestrator import guests
from orchestrator.context import Context
from orchestrator.errors import OsimgError
from orchestrator.host import qemu_img
from orchestrator.host.domain import DiskSpec
from orchestrator.host.ssh import Session
from orchestrator.settings import SOURCE_ROOT
from orchestrator.vios import attach, lus, node

SIZE_MIB = int(os.environ.get("VIOS_BENCH_MIB", "64"))
RUNS = int(os.environ.get("VIOS_BENCH_RUNS", "3"))


def read_mib_s(s: Session, unit: int, passes: int) -> tuple[float, float]:
    """Read the whole disk ``passes`` times; returns (MiB/s, seconds). /proc/uptime ticks in 10 ms."""
    script = (f"D=/dev/$(ls /sys/bus/scsi/devices/*:0:0:{unit}/block); sync; echo 3 >/proc/sys/vm/drop_caches; "
              f"a=$(cut -d' ' -f1 /proc/uptime); for i in $(seq {passes}); do "
              "dd if=$D of=/dev/null bs=1M iflag=direct 2>/dev/null; done; "
              "b=$(cut -d' ' -f1 /proc/uptime); echo $a $b")
    res = s.script(script, timeout=600, check=True)
    a, b = (float(x) for x in res.out.split())
    took = max(b - a, 0.01)
    return SIZE_MIB * passes / took, took


def wait_unit(s: Session, unit: int) -> None:
    s.script(f"n=0; until ls /sys/bus/scsi/devices/*:0:0:{unit}/block >/dev/null 2>&1; do n=$((n+1)); "
             "[ $n -gt 200 ] && exit 1; sleep 0.05; done", check=True)


def main() -> int:
    run_id = uuid.uuid4().hex[:6]
    home = SOURCE_ROOT / ".cache" / f"bench-vios-{run_id}"
    home.mkdir(parents=True)
    home.chmod(0o755)
    ctx = Context.from_env(home=str(home))
    host, vg, client = f"bv{run_id}-host", f"bv{run_id}-vg", f"bv{run_id}-client"
    started: list[str] = []
    try:
        raw = home / "lu.raw"
        with open(raw, "wb") as f:
            for _ in range(SIZE_MIB):
                f.write(os.urandom(1 << 20))
        lu_file = home / "lu.qcow2"
        qemu_img.convert(raw, lu_file, src_fmt="raw")
        raw.unlink()
        lu_file.chmod(0o644)
        # one file, two LU records: an attachment is per (guest, LU), and the bench attaches it twice
        lus.define_lu(ctx, "bench-h", lu_file, "paging")
        lus.define_lu(ctx, "bench-g", lu_file, "paging")
        t0 = time.monotonic()
        g = guests.create(ctx, client, "tiny:v1")
        node.start(ctx, host, ttl=10)
        started.append(host)
        node.start(ctx, vg, as_guest=True, ttl=10, slots=1, timeout=300)
        started.append(vg)
        guests.wait_ready(ctx, g, timeout=300)
        lus.export_lu(ctx, "bench-h", host)
        lus.export_lu(ctx, "bench-g", vg, wait=120)
        print(f"set-up (client, host VIOS, VIOS guest) {time.monotonic() - t0:.1f}s; LU {SIZE_MIB} MiB random data")
        local_unit = 30
        ctx.hv.attach_disk(client, DiskSpec(attach.scsi_target(local_unit), path=str(lu_file), bus="scsi",
                                            scsi_unit=local_unit, readonly=True))
        ah = attach.attach(ctx, client, "bench-h", nodes=[host], via="libvirt")
        ag = attach.attach(ctx, client, "bench-g", nodes=[vg], via="libvirt")
        ways = {"local qcow2 file": local_unit, "host-service VIOS (qsd, unix socket)": ah.unit,
                "VIOS guest (qemu-nbd, 127.0.0.1 fwd)": ag.unit}
        best: dict[str, float] = {}
        with guests.session(ctx, g) as s:
            for unit in ways.values():
                wait_unit(s, unit)
            # one pass each to calibrate, then enough passes that a run lasts about 2 s
            passes = {}
            for label, unit in ways.items():
                _, took = read_mib_s(s, unit, 1)
                passes[label] = max(1, math.ceil(2.0 / took))
            for i in range(RUNS):
                for label, unit in ways.items():
                    r, took = read_mib_s(s, unit, passes[label])
                    best[label] = max(best.get(label, 0.0), r)
                    print(f"  run {i + 1} {label:40s} {r:8.1f} MiB/s ({passes[label]} x {SIZE_MIB} MiB in {took:.2f}s)",
                          flush=True)
        local = best["local qcow2 file"]
        print(f"\nsequential read inside the client (dd bs=1M iflag=direct, {SIZE_MIB} MiB, best of {RUNS}, TCG):")
        print(f"{'path':42s} {'MiB/s':>8s} {'vs local':>9s}")
        for label, v in best.items():
            print(f"{label:42s} {v:8.1f} {v / local:8.2f}x")
        h, gv = best["host-service VIOS (qsd, unix socket)"], best["VIOS guest (qemu-nbd, 127.0.0.1 fwd)"]
        print(f"{'VIOS guest vs host-service VIOS':42s} {'':8s} {gv / h:8.2f}x")
        return 0
    finally:
        with contextlib.suppress(OsimgError):
            attach.detach_all(ctx, client)
        with contextlib.suppress(OsimgError):
            guests.remove(ctx, client)
        for n in started:
            with contextlib.suppress(OsimgError):
                node.stop(ctx, n)
        ctx.hv.undefine(vg)
        ctx.close()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
