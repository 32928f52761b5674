#!/usr/bin/env python3
"""Application downtime of warm vs cold OS swaps, measured from the host, side by side in one run.

For each image family (tiny, debian): golden images v1 and v2 are built, 3 guests with data volumes
are provisioned on v1, and then on the same guests:
  warm v1 -> v2 (measured; on Debian the application's processes are carried with CRIU),
  Debian only: warm v2 -> v1 with the carry switched off (measured: the application restarts),
  a reset to v1 where needed (not measured), cold v1 -> v2 (measured).
A probe asks each guest's application for its counter every 50 ms (overlapping requests); downtime
is the gap between the last prompt answer before the swap and the first one after it, printed
beside the orchestrator's own figure (the two must agree). Also: rollout time of 4 tiny
guests with batch 1 vs batch 2. Ratios are printed last, and for carried processes the checkpoint
size and the dump and restore times (both inside the downtime).

usage: .venv/bin/python bench/swap_downtime.py [--families tiny,debian] [--guests 3]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import threading
import time
import uuid

from orchestrator import guests, swap
from orchestrator.context import Context
from orchestrator.images import lifecycle
from orchestrator.settings import SOURCE_ROOT

PROBE_EVERY = 0.05
MAX_INFLIGHT = 8
SLOW = 0.5  # an answer slower than this was held during an outage (healthy: ~0.05 s tiny, ~0.2 s Debian)


class Probe:
    """Asks one guest's application for its counter every 50 ms, each request in its own thread.

    Requests overlap: one request sent during an outage may wait seconds (QEMU's user-mode network
    accepts the connection while the guest is paused or gone), and a probe that waited for it
    would miss the moment the application came back. An answer counts only if it came back
    within ``SLOW`` of its request: a late answer to a held request says nothing about when the
    application answered again. At most ``MAX_INFLIGHT`` requests are open at once, so a slow
    guest is not buried under abandoned requests.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok: list[float] = []
        self.late: list[tuple[float, float]] = []  # (sent, answered) of answers slower than SLOW
        self._inflight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _one(self, sent: float) -> None:
        try:
            if guests.app_counter(self.port, timeout=3.0) is not None:
                done = time.monotonic()
                with self._lock:
                    if done - sent <= SLOW:
                        self.ok.append(done)
                    else:
                        self.late.append((sent, done))
        finally:
            with self._lock:
                self._inflight -= 1

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                room = self._inflight < MAX_INFLIGHT
                if room:
                    self._inflight += 1
            if room:
                threading.Thread(target=self._one, args=(time.monotonic(),), daemon=True).start()
            self._stop.wait(PROBE_EVERY)

    def __enter__(self) -> Probe:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def answered_after(self, t: float) -> int:
        with self._lock:
            return sum(x > t for x in self.ok)

    def downtime(self, start: float) -> float:
        """Longest gap between prompt answers from just before ``start`` on."""
        with self._lock:
            pts = sorted(t for t in self.ok if t >= start - 1.0)
        gaps = [b - a for a, b in itertools.pairwise(pts)]
        return max(gaps) if gaps else float("nan")


def measured_swap(ctx: Context, guest: str, to: str, strategy: str) -> tuple[float, swap.SwapResult]:
    """Downtime seen by the probe; NaN when the swap failed (and was rolled back). The orchestrator's
    own figure (quiesce to the first answer of the new OS) is printed beside it: the two measure the
    same outage from two sides and must agree."""
    g = guests.load(ctx, guest)
    with Probe(g.app_port) as p:
        time.sleep(0.5)
        start = time.monotonic()
        [r] = swap.rollout(ctx, swap.plan(ctx, [guest], to, strategy))
        if not r.ok:
            state = "rolled back" if r.rolled_back else "not rolled back"
            print(f"    {strategy} {guest}: FAILED ({state}): {r.error}", flush=True)
            return float("nan"), r
        # the probe may still be waiting on a request sent during the outage: keep it running until
        # it has prompt answers from the new OS, or the gap would end at the last answer before
        # the swap (that made warm AND cold swaps look 0.1 s long)
        end = time.monotonic()
        while p.answered_after(end) < 3 and time.monotonic() < end + 30:
            time.sleep(0.05)
    seen = p.downtime(start) if p.answered_after(end) >= 3 else float("nan")
    agree = "agree" if r.downtime is not None and abs(seen - r.downtime) <= max(0.5, 0.25 * r.downtime) \
        else "DISAGREE"
    print(f"    {strategy} {guest}: probe {seen:.3f}s, orchestrator {r.downtime}s ({agree}); "
          f"late answers {len(p.late)}; steps {r.steps}", flush=True)
    for t in r.processes:
        print(f"    {strategy} {guest}: process tree {t}", flush=True)
    return seen, r


def set_carry(ctx: Context, name: str, carry: list[dict[str, object]] | None) -> None:
    """Switch a guest's process carry (None: the image's demo application; []: none, it restarts)."""
    g = guests.load(ctx, name)
    g.customization = {**g.customization, "carry": carry}
    g.save(ctx)


def provision(ctx: Context, names: list[str], image: str) -> None:
    for n in names:
        guests.create(ctx, n, image, data_size=64 << 20)
    for n in names:
        g = guests.load(ctx, n)
        guests.wait_ready(ctx, g, timeout=240)
        if guests.wait_app(g.app_port, 60) is None:
            raise SystemExit(f"{n}: application did not start")


def family_run(ctx: Context, fam: str, n: int, tag: str) -> dict[str, list[float]]:
    v1, v2 = f"{tag}-{fam}-v1", f"{tag}-{fam}-v2"
    print(f"[{fam}] building golden images {v1}, {v2}", flush=True)
    lifecycle.build(ctx, v1, f"{fam}:v1", boot_timeout=300)
    lifecycle.build(ctx, v2, f"{fam}:v2", boot_timeout=300)
    names = [f"{tag}-{fam[0]}{i}" for i in range(n)]
    print(f"[{fam}] provisioning {n} guests on {v1}", flush=True)
    provision(ctx, names, v1)
    out: dict[str, list[float]] = {"warm": [], "cold": []}
    for name in names:
        seen, r = measured_swap(ctx, name, v2, "warm")
        out["warm"].append(seen)
        carried = [t for t in r.processes if t["outcome"] == "resumed"]
        if carried:
            out.setdefault("dump", []).append(sum(t["dump_seconds"] or 0 for t in carried))
            out.setdefault("restore", []).append(sum(t["restore_seconds"] or 0 for t in carried))
            out.setdefault("checkpoint_mib", []).append(sum(t["checkpoint_kib"] or 0 for t in carried) / 1024)
            # the same guest, the same swap the other way, with the application restarted instead
            set_carry(ctx, name, [])
            out.setdefault("warm-restart", []).append(measured_swap(ctx, name, v1, "warm")[0])
            set_carry(ctx, name, None)
        if guests.load(ctx, name).image != v1:
            swap.rollout(ctx, swap.plan(ctx, [name], v1, "cold"))
        out["cold"].append(measured_swap(ctx, name, v2, "cold")[0])
        restart = f"  warm-restart {out['warm-restart'][-1]:.2f}s" if carried else ""
        print(f"[{fam}] {name}: warm {out['warm'][-1]:.2f}s{restart}  cold {out['cold'][-1]:.2f}s", flush=True)
    for name in names:
        guests.remove(ctx, name)
    return out


def rollout_run(ctx: Context, tag: str) -> dict[int, float]:
    v1, v2 = f"{tag}-tiny-v1", f"{tag}-tiny-v2"
    names = [f"{tag}-r{i}" for i in range(4)]
    provision(ctx, names, v1)
    out = {}
    for batch, to in ((1, v2), (2, v1)):
        t0 = time.monotonic()
        res = swap.rollout(ctx, swap.plan(ctx, names, to, "warm", batch=batch, max_failures=4))
        out[batch] = time.monotonic() - t0
        if not all(r.ok for r in res):
            raise SystemExit(f"rollout batch {batch} failed: {[r.error for r in res if not r.ok]}")
        print(f"[rollout] 4 guests, batch {batch}: {out[batch]:.1f}s", flush=True)
    for name in names:
        guests.remove(ctx, name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="tiny,debian")
    ap.add_argument("--guests", type=int, default=3)
    a = ap.parse_args()
    tag = f"b{uuid.uuid4().hex[:4]}"
    home = SOURCE_ROOT / ".cache" / f"bench-swap-{tag}"
    home.mkdir(parents=True)
    home.chmod(0o755)
    ctx = Context.from_env(home=str(home))
    print(f"accelerator: {ctx.accel.label}", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    rollout: dict[int, float] = {}
    try:
        for fam in a.families.split(","):
            results[fam] = family_run(ctx, fam, a.guests, tag)
        if "tiny" in results:
            rollout = rollout_run(ctx, tag)
    finally:
        for d in ctx.hv.list_domains():
            if d.metadata.get("home") == str(home):
                ctx.hv.undefine(d.name)
        ctx.close()
        shutil.rmtree(home, ignore_errors=True)
    print("\nfamily   warm median   cold median   warm/cold   (downtime, host probe every 50 ms)")
    for fam, r in results.items():
        ok = {k: [x for x in v if x == x] for k, v in r.items()}  # NaN marks a failed swap
        if not ok["warm"] or not ok["cold"]:
            print(f"{fam:8} no ratio: failed swaps {r}")
            continue
        w, c = statistics.median(ok["warm"]), statistics.median(ok["cold"])
        print(f"{fam:8} {w:10.2f}s {c:12.2f}s {w / c:11.2f}   warm {[round(x, 2) for x in r['warm']]} "
              f"cold {[round(x, 2) for x in r['cold']]} (nan: failed, rolled back)")
    for fam, r in results.items():
        ok = {k: [x for x in v if x == x] for k, v in r.items()}
        if not ok.get("warm-restart") or not ok["warm"] or not ok["cold"]:
            continue
        carry, restart, c = (statistics.median(ok[k]) for k in ("warm", "warm-restart", "cold"))
        print(f"\n{fam}: application carried (CRIU) vs restarted vs cold, median downtime of {len(ok['warm'])}:")
        print(f"  warm, carried   {carry:6.2f}s")
        print(f"  warm, restarted {restart:6.2f}s   carried/restarted {carry / restart:.2f}")
        print(f"  cold            {c:6.2f}s   carried/cold {carry / c:.2f}")
        print(f"  checkpoint {statistics.median(r['checkpoint_mib']):.1f} MiB, "
              f"dump {statistics.median(r['dump']):.2f}s, restore {statistics.median(r['restore']):.2f}s "
              "(medians; both inside the downtime)")
    if rollout:
        print(f"rollout of 4 guests: batch 1 {rollout[1]:.1f}s, batch 2 {rollout[2]:.1f}s, "
              f"batch2/batch1 {rollout[2] / rollout[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
