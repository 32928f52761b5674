#!/usr/bin/env python3
"""How the warm swap's downtime window grows with guest memory and with the number of guests at once.

Tiny family (fast under TCG), one run, two tables:

1. **Memory size** (256 MiB, 1 GiB, 2 GiB). A golden image's memory state has the size of its
   builder's memory (``lifecycle.build(..., memory_mib=)``; by default the recipe's, 256 MiB for
   tiny). Each builder touches ``FILL_SHARE`` of its memory with non-zero data
   (``fill_script``) before capture, so the golden state holds that much (QEMU skips only zero
   pages). A guest paged in from it has the same touched memory, so every measured swap pages out
   a touched old OS and pages in a touched new one. Per size: one guest, an unmeasured warm swap
   first (the guest was cold-booted from disk), then ``--swaps`` measured warm swaps.
2. **Batch size** (1, 2, 4 guests at once; ``swap.plan(..., batch=K)``): 4 guests on the 256 MiB
   full goldens, one rollout per batch size: rollout wall time, downtime per guest, step medians.

Then one contrast swap: a 2 GiB guest touched by the bench (through the guest agent) is swapped to
a golden state captured right after boot (256 MiB, not touched): the page-out carries the old
guest's touched memory, the page-in only the golden state's, and the line shows the memory the
guest runs with after the swap (the golden state's, whatever the guest's record says).

Every swap is watched by the host probe of bench/swap_downtime.py (here every 100 ms) and judged by
its rule (probe and orchestrator within the probe interval plus 20%); any DISAGREE or failed swap makes the exit
status 1. Takes ~10 minutes here.

usage: .venv/bin/python bench/swap_scaling.py [--sizes 256,1024,2048] [--batches 1,2,4] [--swaps 3]
       [--probe-every 0.1] [--no-contrast]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

from homes import bench_home
from swap_downtime import Measured, measure_rollout, report_agreement

from orchestrator import guests
from orchestrator.context import Context
from orchestrator.host.domain import DomainDocument
from orchestrator.images import catalog, lifecycle

FAMILY = "tiny"
FILL_SHARE = 0.7  # of the guest's memory, touched with non-zero data
# Each probe request runs a CGI in the guest: at 50 ms, four probed TCG guests took more than this
# host's 2 cores before any swap began. The agreement rule scales with the interval.
PROBE_EVERY = 0.1
WINDOW_STEPS = ("release", "detach", "quiesce", "page-out", "destroy", "page-in", "reseed", "attach", "customize")


def fill_script(mib: int) -> str:
    """POSIX sh for busybox: touch up to ``mib`` MiB of the guest's memory with non-zero data (less if
    the guest has not that much available: 32 MiB stay free), then free it again.

    The data goes into a tmpfs on /mnt and is deleted: the pages stay non-zero in the guest's free
    memory (the Debian cloud kernel does not clear freed pages: CONFIG_INIT_ON_FREE_DEFAULT_ON is not
    set), so a page-out or page-in carries them (QEMU skips only zero pages), while the guest keeps
    its memory to work with. A 256 MiB guest that kept its memory full met the OOM killer: killed
    while holding the demo application's lock, a CGI made every later request wait, and they piled up.
    A 1 MiB random seed is doubled up to 16 MiB, then copied: few forks (tens of ms each under TCG)."""
    return f"""set -e
grep -q " /mnt " /proc/mounts || mount -t tmpfs -o size={mib + 16}m fill /mnt
cd /mnt; rm -f f* s*
while read -r k v u; do [ "$k" = MemAvailable: ] && avail=$((v / 1024)); done </proc/meminfo
left={mib}; [ "$left" -gt $((avail - 32)) ] && left=$((avail - 32))
left=$((left / 16 * 16)); total=$left
dd if=/dev/urandom of=s1 bs=1M count=1 2>/dev/null
cat s1 s1 s1 s1 >s4; rm s1; cat s4 s4 s4 s4 >s16; rm s4
n=0
while [ "$left" -gt 16 ]; do cat s16 >f$n; n=$((n + 1)); left=$((left - 16)); done
mv s16 f$n; cd /; umount /mnt; echo "touched $total MiB"
"""


def build(ctx: Context, name: str, version: str, mib: int, fill: bool) -> float:
    """Build a golden image whose memory state has ``mib`` MiB (filled or not); returns the state's MiB."""
    t = time.monotonic()
    steps = lifecycle.BuildSteps(commands=[fill_script(int(mib * FILL_SHARE))]) if fill else None
    lifecycle.build(ctx, name, f"{FAMILY}:{version}", steps, boot_timeout=300, memory_mib=mib)
    state = catalog.resolve(ctx, name).state_file
    size = state.stat().st_size / (1 << 20) if state else float("nan")
    print(f"[build] {name}: {mib} MiB guest, {'touched' if fill else 'not touched'}, state file {size:.0f} MiB, "
          f"{time.monotonic() - t:.0f}s", flush=True)
    return size


def provision(ctx: Context, names: list[str], image: str, mib: int | None = None) -> None:
    for n in names:
        guests.create(ctx, n, image, memory_mib=mib, data_size=64 << 20)
    for n in names:
        g = guests.load(ctx, n)
        guests.wait_ready(ctx, g, timeout=300)
        if guests.wait_app(g.app_port, 60) is None:
            raise SystemExit(f"{n}: application did not start")


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def step_medians(ms: list[Measured]) -> list[float]:
    return [med([m.steps[k] for m in ms if k in m.steps]) for k in WINDOW_STEPS]


def table_head(first: str) -> str:
    return f"{first:>10} " + " ".join(f"{k:>9}" for k in ("downtime", "probe")) + " " + \
        " ".join(f"{k:>9}" for k in WINDOW_STEPS)


def table_row(first: str, ms: list[Measured]) -> str:
    return f"{first:>10} {med([m.orchestrator or float('nan') for m in ms]):9.3f} " \
        f"{med([m.probe for m in ms]):9.3f} " + " ".join(f"{x:9.3f}" for x in step_medians(ms))


def memory_run(ctx: Context, tag: str, mib: int, swaps: int) -> tuple[float, list[Measured]]:
    v1, v2 = f"{tag}-m{mib}-v1", f"{tag}-m{mib}-v2"
    build(ctx, v1, "v1", mib, fill=True)
    state = build(ctx, v2, "v2", mib, fill=True)
    name = f"{tag}-m{mib}"
    provision(ctx, [name], v1)
    print(f"[memory {mib} MiB] unmeasured warm swap to {v2} (touches the guest's memory)", flush=True)
    measure_rollout(ctx, f"mem{mib}-warmup", [name], v2, "warm", every=PROBE_EVERY)
    ms = []
    for i in range(swaps):
        _, [m] = measure_rollout(ctx, f"mem{mib}", [name], v1 if i % 2 == 0 else v2, "warm", every=PROBE_EVERY)
        ms.append(m)
    guests.remove(ctx, name)
    return state, ms


def batch_run(ctx: Context, tag: str, v1: str, v2: str, batches: list[int]) -> dict[int, tuple[float, list[Measured]]]:
    names = [f"{tag}-b{i}" for i in range(max(batches))]
    provision(ctx, names, v1)
    print("[batch] unmeasured warm rollout (touches the guests' memory)", flush=True)
    measure_rollout(ctx, "batch-warmup", names, v2, "warm", batch=len(names), every=PROBE_EVERY)
    out = {}
    to = v1
    for k in batches:
        wall, ms = measure_rollout(ctx, f"batch{k}", names, to, "warm", batch=k, every=PROBE_EVERY)
        print(f"[batch {k}] {len(names)} guests in {wall:.1f}s", flush=True)
        out[k] = (wall, ms)
        to = v2 if to == v1 else v1
    for n in names:
        guests.remove(ctx, n)
    return out


def contrast_run(ctx: Context, tag: str, v1: str, mib: int) -> Measured | None:
    """A big, filled old guest swapped to a small golden state captured right after boot."""
    fresh = f"{tag}-fresh-v2"
    build(ctx, fresh, "v2", 256, fill=False)
    name = f"{tag}-c"
    provision(ctx, [name], v1, mib)
    rc, _, err = ctx.hv.guest_exec(name, ["/bin/sh", "-s"], stdin=fill_script(int(mib * FILL_SHARE)), timeout=600)
    if rc != 0:
        print(f"[contrast] touching the guest's memory failed ({rc}): {err.strip()[-200:]}", flush=True)
        guests.remove(ctx, name)
        return None
    _, [m] = measure_rollout(ctx, "contrast", [name], fresh, "warm", every=PROBE_EVERY)
    running = DomainDocument.parse(ctx.hv.xml(name)).memory_mib
    print(f"[contrast] {mib} MiB guest ({int(mib * FILL_SHARE)} MiB touched) -> {fresh} (256 MiB, not touched): "
          f"page-out {m.steps.get('page-out', float('nan')):.3f}s, page-in {m.steps.get('page-in', float('nan')):.3f}s;"
          f" after the swap the domain runs with {running} MiB, the guest's record says "
          f"{guests.load(ctx, name).memory_mib} MiB", flush=True)
    guests.remove(ctx, name)
    return m


def main() -> int:
    global PROBE_EVERY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024,2048")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--no-contrast", action="store_true")
    ap.add_argument("--probe-every", type=float, default=0.1,
                    help="seconds between probe requests (the agreement rule grows with it)")
    a = ap.parse_args()
    PROBE_EVERY = a.probe_every
    sizes = [int(x) for x in a.sizes.split(",") if x]
    batches = [int(x) for x in a.batches.split(",") if x]
    tag = f"s{uuid.uuid4().hex[:4]}"
    with bench_home(f"bench-scaling-{tag}") as ctx:
        print(f"accelerator: {ctx.accel.label}", flush=True)
        t0 = time.monotonic()
        mem: dict[int, tuple[float, list[Measured]]] = {}
        bat: dict[int, tuple[float, list[Measured]]] = {}
        contrast = None
        for mib in sizes:
            mem[mib] = memory_run(ctx, tag, mib, a.swaps)
        smallest = min(sizes)
        if batches:
            bat = batch_run(ctx, tag, f"{tag}-m{smallest}-v1", f"{tag}-m{smallest}-v2", batches)
        if not a.no_contrast:
            contrast = contrast_run(ctx, tag, f"{tag}-m{smallest}-v1", max(sizes))
    print(f"\nwarm swap window vs guest memory ({FAMILY}, up to {int(FILL_SHARE * 100)}% of memory touched in the "
          f"old and the new OS; medians of {a.swaps} swaps, seconds)")
    print(f"{'state MiB':>10} " + table_head("memory MiB"))
    for mib, (state, ms) in mem.items():
        print(f"{state:10.0f} " + table_row(str(mib), ms))
    if bat:
        n = max(batches)
        print(f"\nwarm rollout of {n} guests vs batch size ({FAMILY}, {smallest} MiB, touched; per-guest medians, "
              "seconds)")
        print(f"{'wall':>10} " + table_head("batch"))
        for k, (wall, ms) in bat.items():
            print(f"{wall:10.1f} " + table_row(str(k), ms))
    if contrast is not None:
        print(f"\ncontrast: {max(sizes)} MiB touched guest -> 256 MiB golden state not touched")
        print(table_head("") + "\n" + table_row("contrast", [contrast]))
    print(f"\nbench time {time.monotonic() - t0:.0f}s")
    return report_agreement()


if __name__ == "__main__":
    sys.exit(main())
