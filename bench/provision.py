"""Benchmark (issue 4): provision N tiny guests from one base, as overlays versus as full copies.

    .venv/bin/python bench/provision.py [--counts 1,2,4,8] [--memory 256] [--image tiny:v1]

For each N, two ways in one run, one after the other:

- ``overlay``: osimg's way. Every guest's OS disk is a qcow2 overlay on the shared read-only base
  (``guests.create``): creating it writes a few hundred bytes, whatever the base's size.
- ``copy``: what a peer without linked clones does. Every guest gets a full copy of the base
  (``qemu-img convert``, data and metadata) and boots from that.

Both boot the same guests (same image, memory, vCPUs, an empty customization drive), all N at
once. Per N and way the bench prints: seconds from the first create to every guest answering SSH,
host disk bytes per guest after boot (the allocated bytes of its OS disk file: the overlay, or the
copy; for overlays also with an Nth share of the base, the fairer per-guest cost of a fleet), and
host RSS per guest (VmRSS of each guest's QEMU process, from ``Hypervisor.qemu_pid``). Ratios
(overlay / copy) come last. Under TCG on 2 cores boot time dominates and grows with N (the guests
share the CPUs); the disk ratio is the point of overlays and does not depend on the CPU.

Every guest the bench starts is removed in a ``finally`` (also on Ctrl-C), and it uses its own
OSIMG_HOME under .cache/, deleted at the end. Run as root on a host with libvirtd; a few minutes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from homes import bench_home

from orchestrator import guests
from orchestrator.context import Context
from orchestrator.errors import OsimgError
from orchestrator.host import qemu_img
from orchestrator.images import catalog

MIB = 1 << 20


@dataclass
class Run:
    mode: str
    n: int
    ready_s: float
    disk_bytes: float  # per guest: its own OS disk file, measured the moment that guest was ready
    disk_end_bytes: float  # the same once all n were ready (early guests kept writing meanwhile)
    rss_bytes: float  # per guest: its QEMU process, once all n were ready
    base_bytes: int

    @property
    def disk_with_base_share(self) -> float:
        return self.disk_bytes + (self.base_bytes / self.n if self.mode == "overlay" else 0)


def rss(pid: int | None) -> int:
    if pid is None:
        return 0
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def provision(ctx: Context, mode: str, n: int, image: str, memory: int, timeout: float) -> Run:
    """Create and boot n guests one way, measure, and remove them again (also on failure)."""
    base = catalog.resolve(ctx, image).disk
    names = [f"bench-{os.getpid()}-{mode}-{n}-{i}" for i in range(n)]
    created: list[guests.Guest] = []
    try:
        t0 = time.monotonic()
        for name in names:
            g = guests.create(ctx, name, image, memory_mib=memory, start=False)
            created.append(g)
            if mode == "copy":
                overlay = g.overlay(ctx)
                overlay.unlink()
                qemu_img.convert(base, overlay)
            guests.start(ctx, g)

        def ready(g: guests.Guest) -> int:
            guests.wait_ready(ctx, g, timeout=max(5.0, timeout - (time.monotonic() - t0)))
            return qemu_img.allocated_bytes(g.overlay(ctx))

        with ThreadPoolExecutor(max_workers=n) as pool:
            at_ready = list(pool.map(ready, created))  # raises the first guest's failure, if any
        ready_s = time.monotonic() - t0
        disk_end = statistics.mean(qemu_img.allocated_bytes(g.overlay(ctx)) for g in created)
        mem = statistics.mean(rss(ctx.hv.qemu_pid(g.name)) for g in created)
        return Run(mode, n, ready_s, statistics.mean(at_ready), disk_end, mem, qemu_img.allocated_bytes(base))
    finally:
        for name in names:
            with suppress(OsimgError):
                guests.remove(ctx, name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="1,2,4,8", help="guest counts, comma-separated (default 1,2,4,8)")
    p.add_argument("--memory", type=int, default=256, help="MiB per guest (default 256)")
    p.add_argument("--image", default="tiny:v1", help="the base (default tiny:v1)")
    p.add_argument("--timeout", type=float, default=300, help="seconds for all guests of one step to be ready")
    a = p.parse_args()
    counts = [int(c) for c in a.counts.split(",")]
    runs: list[Run] = []
    with bench_home(f"bench-provision-{os.getpid()}") as ctx:
        base = catalog.resolve(ctx, a.image).disk
        info = qemu_img.info(base)
        print(f"base {a.image}: {base} ({info.virtual_size / MIB:.0f} MiB virtual, "
              f"{qemu_img.allocated_bytes(base) / MIB:.1f} MiB on disk); accelerator {ctx.accel.label}; "
              f"{a.memory} MiB per guest", flush=True)
        print(f"{'mode':<8} {'N':>2} {'all SSH-ready s':>15} {'disk/guest MiB':>14} {'at end MiB':>10} "
              f"{'+base share MiB':>15} {'RSS/guest MiB':>13}", flush=True)
        for n in counts:
            for mode in ("overlay", "copy"):
                r = provision(ctx, mode, n, a.image, a.memory, a.timeout)
                runs.append(r)
                share = f"{r.disk_with_base_share / MIB:15.2f}" if mode == "overlay" else f"{'-':>15}"
                print(f"{mode:<8} {n:>2} {r.ready_s:15.1f} {r.disk_bytes / MIB:14.2f} {r.disk_end_bytes / MIB:10.2f} "
                      f"{share} {r.rss_bytes / MIB:13.1f}", flush=True)
    print("\nratios overlay / copy (below 1: overlays are cheaper)")
    print(f"{'N':>2} {'time to ready':>13} {'disk/guest':>10} {'at end':>7} {'disk+base share':>15} {'RSS/guest':>9}")
    by = {(r.mode, r.n): r for r in runs}
    for n in counts:
        o, c = by[("overlay", n)], by[("copy", n)]
        print(f"{n:>2} {o.ready_s / c.ready_s:13.2f} {o.disk_bytes / c.disk_bytes:10.3f} "
              f"{o.disk_end_bytes / c.disk_end_bytes:7.3f} {o.disk_with_base_share / c.disk_bytes:15.3f} "
              f"{o.rss_bytes / c.rss_bytes:9.2f}")
    worst = max(by[("overlay", n)].disk_bytes / by[("copy", n)].disk_bytes for n in counts)
    worst_end = max(by[("overlay", n)].disk_end_bytes / by[("copy", n)].disk_end_bytes for n in counts)
    verdict = "met" if worst < 0.05 else "NOT met"
    print(f"\noverlay bytes per guest right after boot: at most {worst:.1%} of a full copy (target < 5%: {verdict}); "
          f"once all N were ready: at most {worst_end:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
