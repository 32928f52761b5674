#!/usr/bin/env python3
"""Host memory per guest (issue 17 item 5): N guests paged in from one golden state vs N cold-booted
guests, each with KSM off and on.

    .venv/bin/python bench/density.py [--counts 1,4,8] [--pages-to-scan 20000] [--settle 10]

One golden image is captured from ``tiny:v1`` (``osimg image build``: a builder boots, its disk and
memory state are saved). Then for each N:

- ``cold``: N guests created on ``tiny:v1`` (its own overlay, config drive and data volume each),
  all booted at once, measured once every one answers SSH and runs its application;
- ``restored``: the same N guests warm-swapped to the golden image (``osimg swap --strategy warm``,
  the product's page-in: each gets a copy of the one golden state carrying its identity, restored
  into a new QEMU process, then reseeded and customized live), measured after the swap.

Each is measured with KSM off (ksmd stopped, every page unmerged) and then with KSM on: ksmd runs
with ``--pages-to-scan`` pages every 20 ms and the bench waits until it has finished at least 2
full scans after the guests settled and merging stopped growing (less than 2% more pages per scan).

Host memory per guest = the sum of the guests' QEMU processes' Pss (``/proc/PID/smaps_rollup``; a
page shared by k processes counts 1/k in each, so the sum is the memory they really take; the PIDs
come from libvirt's pid files) divided by N. Every figure is read twice, ``--settle`` seconds
apart, and the bench fails loudly when the two differ by more than 10%. Also printed: KSM's host-wide
``pages_shared``/``pages_sharing`` and the pages of these guests that ksmd merged
(``/proc/PID/ksm_merging_pages``). KSM is host-wide: other QEMU guests running on the host (another
test run) are scanned too, and a page of ours merged with one of theirs lowers our Pss as well.

The host's KSM settings are read first and put back in a ``finally`` (a ksmd that was off is
stopped with every page unmerged). Every guest and image the bench makes lives in its own
OSIMG_HOME under .cache/, and every domain of that home is undefined at the end, also on failure.
Run as root on a host with libvirtd and KSM, through ``guestlock``; about 8 minutes under TCG.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from homes import bench_home

from orchestrator import guests, swap
from orchestrator.context import Context
from orchestrator.errors import OsimgError
from orchestrator.host import ksm
from orchestrator.images import lifecycle

MIB = 1 << 20
AGREE = 0.10  # two readings of the same configuration may differ by at most this much
CONVERGED = 0.02  # KSM has converged when a full scan adds fewer merged pages than this share
KSM_SLEEP_MS = 20


@dataclass
class Reading:
    """One configuration's memory, per guest (bytes), and KSM's host-wide counters."""

    pss: float
    rss: float
    merged: float  # this configuration's guest pages that ksmd merged
    mergeable: float  # guest memory QEMU marked mergeable (the guest RAM)
    pages_shared: int
    pages_sharing: int
    full_scans: int
    others: int  # running domains on the host that this bench did not make (KSM scans them too)


def read(ctx: Context, names: list[str]) -> Reading:
    pids = [ctx.hv.qemu_pid(n) for n in names]
    if None in pids:
        raise SystemExit(f"no QEMU process for {[n for n, p in zip(names, pids, strict=True) if p is None]}")
    mem = [ksm.process_memory(p) for p in pids if p is not None]
    st = ksm.status()
    n = len(names)
    others = sum(d.state == "running" and d.metadata.get("home") != str(ctx.settings.home)
                 for d in ctx.hv.list_domains())
    return Reading(sum(m.pss for m in mem) / n, sum(m.rss for m in mem) / n, sum(m.ksm_merging for m in mem) / n,
                   sum(m.mergeable for m in mem) / n, st.pages_shared, st.pages_sharing, st.full_scans, others)


def measure(ctx: Context, names: list[str], label: str, settle: float) -> Reading:
    """Two readings ``settle`` seconds apart that must agree; returns the second."""
    first = read(ctx, names)
    time.sleep(settle)
    second = read(ctx, names)
    diff = abs(second.pss - first.pss) / first.pss
    print(f"    {label}: Pss/guest {first.pss / MIB:.1f} then {second.pss / MIB:.1f} MiB ({diff:.1%} apart), "
          f"RSS/guest {second.rss / MIB:.1f} MiB, merged by ksmd {second.merged / MIB:.1f} MiB/guest, "
          f"mergeable {second.mergeable / MIB:.1f} MiB/guest; host-wide pages_shared {second.pages_shared} "
          f"pages_sharing {second.pages_sharing}; other running domains on the host {first.others}, "
          f"{second.others}", flush=True)
    if diff > AGREE:
        raise SystemExit(f"{label}: two readings {settle:.0f}s apart DISAGREE: Pss/guest {first.pss / MIB:.1f} vs "
                         f"{second.pss / MIB:.1f} MiB ({diff:.1%} > {AGREE:.0%})")
    if second.mergeable < 0.5 * guests.load(ctx, names[0]).memory_mib * MIB:
        raise SystemExit(f"{label}: QEMU marked only {second.mergeable / MIB:.0f} MiB per guest mergeable; "
                         "guest RAM should be (mem-merge=on)")
    return second


def ksmd_cpu() -> float:
    """CPU seconds the kernel thread ksmd has used so far (NaN when it cannot be found)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with suppress(OSError):
            if comm.read_text().strip() == "ksmd":
                fields = (comm.parent / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return float("nan")


def converge(pages_to_scan: int, timeout: float = 300) -> tuple[int, float]:
    """Turn ksmd on and wait for at least 2 full scans after now, then until a full scan no longer
    adds merged pages; returns (full scans waited, seconds)."""
    t0 = time.monotonic()
    start = ksm.enable(pages_to_scan=pages_to_scan, sleep_ms=KSM_SLEEP_MS).full_scans
    # the scan under way when ksmd starts is partial: two full scans have ended at start + 3
    last_scan, last_sharing = start, 0
    while time.monotonic() - t0 < timeout:
        st = ksm.status()
        if st.full_scans > last_scan:
            grew = st.pages_sharing - last_sharing
            if st.full_scans >= start + 3 and grew <= CONVERGED * max(st.pages_sharing, 1):
                return st.full_scans - start, time.monotonic() - t0
            last_scan, last_sharing = st.full_scans, st.pages_sharing
        time.sleep(0.2)
    raise SystemExit(f"KSM did not converge within {timeout:.0f}s ({ksm.status()})")


def both(ctx: Context, names: list[str], label: str, a: argparse.Namespace) -> dict[str, Reading]:
    """The guests measured with KSM off (every page unmerged), then on (converged); KSM off again after."""
    ksm.disable(unmerge=True)
    time.sleep(a.settle)
    off = measure(ctx, names, f"{label}, KSM off", a.settle)
    cpu0 = ksmd_cpu()
    scans, took = converge(a.pages_to_scan)
    cpu1 = ksmd_cpu()
    on = measure(ctx, names, f"{label}, KSM on", a.settle)
    cpu2 = ksmd_cpu()
    print(f"    {label}: ksmd converged after {scans} full scans in {took:.1f}s using {cpu1 - cpu0:.1f} CPU s; "
          f"then {(cpu2 - cpu1) / a.settle:.0%} of a core while measuring ({a.pages_to_scan} pages every "
          f"{KSM_SLEEP_MS} ms)", flush=True)
    ksm.disable(unmerge=True)
    return {"off": off, "on": on}


def boot(ctx: Context, names: list[str], image: str) -> float:
    """All at once, then wait for each one's SSH and application; seconds until all are ready."""
    t0 = time.monotonic()
    made = [guests.create(ctx, n, image, data_size=64 << 20) for n in names]

    def ready(g: guests.Guest) -> None:
        guests.wait_ready(ctx, g, timeout=300)
        if guests.wait_app(g.app_port, 120) is None:
            raise SystemExit(f"{g.name}: application did not start")

    with ThreadPoolExecutor(max_workers=len(made)) as pool:
        list(pool.map(ready, made))
    return time.monotonic() - t0


def run_n(ctx: Context, n: int, golden: str, tag: str, a: argparse.Namespace) -> dict[str, dict[str, Reading]]:
    names = [f"{tag}-{n}-{i}" for i in range(n)]
    try:
        took = boot(ctx, names, "tiny:v1")
        print(f"[N={n}] {n} guests cold-booted on tiny:v1, all ready in {took:.1f}s", flush=True)
        cold = both(ctx, names, f"N={n} cold", a)
        t0 = time.monotonic()
        res = swap.rollout(ctx, swap.plan(ctx, names, golden, "warm", batch=2, max_failures=n))
        bad = [f"{r.guest}: {r.error}" for r in res if not r.ok]
        if bad:
            raise SystemExit(f"warm swap to {golden} failed: {bad}")
        print(f"[N={n}] {n} guests warm-swapped to {golden} (paged in from its one state) in "
              f"{time.monotonic() - t0:.1f}s", flush=True)
        restored = both(ctx, names, f"N={n} restored", a)
        return {"cold": cold, "restored": restored}
    finally:
        for name in names:
            with suppress(OsimgError):
                guests.remove(ctx, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1,4,8", help="guest counts, comma-separated (default 1,4,8)")
    ap.add_argument("--pages-to-scan", type=int, default=20000, help="ksmd's rate while measuring (per 20 ms)")
    ap.add_argument("--settle", type=float, default=10, help="seconds between the two readings of a figure")
    a = ap.parse_args()
    counts = [int(c) for c in a.counts.split(",")]
    try:
        before = ksm.status()
    except OsimgError as err:
        raise SystemExit(f"density: {err}") from None
    tag = f"d{uuid.uuid4().hex[:4]}"
    with bench_home(f"bench-density-{tag}") as ctx:
        print(f"accelerator: {ctx.accel.label}; host KSM before: {before.state} (run={before.run}, "
              f"pages_to_scan={before.pages_to_scan}, sleep_ms={before.sleep_ms}); it is put back at the end",
              flush=True)
        results: dict[int, dict[str, dict[str, Reading]]] = {}
        t_start = time.monotonic()
        try:
            golden = f"{tag}-gold"
            t0 = time.monotonic()
            lifecycle.build(ctx, golden, "tiny:v1", boot_timeout=300)
            print(f"golden image {golden} captured from tiny:v1 in {time.monotonic() - t0:.1f}s", flush=True)
            for n in counts:
                results[n] = run_n(ctx, n, golden, tag, a)
        finally:
            with suppress(OsimgError):
                ksm.restore(before.settings)
            print(f"host KSM restored: {ksm.status().state} ({ksm.status().settings})", flush=True)
    print(f"\nhost memory per guest (sum of the QEMU processes' Pss / N, MiB; tiny guests, 256 MiB RAM each; "
          f"{time.monotonic() - t_start:.0f}s in all)")
    print(f"{'N':>2} {'restored KSM off':>16} {'restored KSM on':>15} {'cold KSM off':>12} {'cold KSM on':>11}"
          f" {'merged/guest restored':>21} {'merged/guest cold':>17}")
    for n, r in results.items():
        print(f"{n:>2} {r['restored']['off'].pss / MIB:16.1f} {r['restored']['on'].pss / MIB:15.1f} "
              f"{r['cold']['off'].pss / MIB:12.1f} {r['cold']['on'].pss / MIB:11.1f} "
              f"{r['restored']['on'].merged / MIB:21.1f} {r['cold']['on'].merged / MIB:17.1f}")
    print("\nratios (below 1: less memory per guest)")
    print(f"{'N':>2} {'restored on/off':>15} {'cold on/off':>11} {'restored on / cold off':>22} "
          f"{'restored on / cold on':>21} {'restored off / cold off':>23}")
    for n, r in results.items():
        ro, rn, co, cn = (r[k][s].pss for k, s in (("restored", "off"), ("restored", "on"), ("cold", "off"),
                                                    ("cold", "on")))
        print(f"{n:>2} {rn / ro:15.2f} {cn / co:11.2f} {rn / co:22.2f} {rn / cn:21.2f} {ro / co:23.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
