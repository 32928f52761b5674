#!/usr/bin/env python3
"""Application downtime of warm vs cold OS swaps, measured from the host, side by side in one run.

For each image family (tiny, debian): golden images v1 and v2 are built, 3 guests with data volumes
are provisioned on v1, and then on the same guests:
  warm v1 -> v2 (measured; on Debian the application's processes are carried with CRIU),
  Debian only: warm v2 -> v1 with the carry switched off (measured: the application restarts),
  a reset to v1 where needed (not measured), cold v1 -> v2 (measured).

Two sides measure each outage and must agree:
- the host probe asks the guest's application for its counter every 50 ms (overlapping requests);
  each answer names the OS version that served it, so the probe's downtime is the gap between the
  last prompt answer of the old OS and the first prompt answer of the new one (a gap among answers
  of one OS cannot be taken for the swap's);
- the orchestrator's ``SwapResult.downtime`` (from the start of the quiesce to the first answer of
  the new OS).
They must differ by at most the probe interval plus 20% of the larger one; otherwise the line says
DISAGREE and the bench exits with status 1 at the end. Every swap line also says where the two
differ: how long the application still answered after the orchestrator's window began (its
progress messages are timestamped) and how the two ends compare.

Then, as medians of the guests, per family and strategy: each step's duration (``SwapResult.steps``
holds seconds since the swap's start; the table shows differences), and the warm page-in split into
libvirt's destroy of the paused old domain and the restore of a saved state, timed apart on a
scratch guest. Also: rollout time of 4 tiny guests with batch 1 vs batch 2. Ratios are printed
last, and for carried processes the checkpoint size and the dump and restore times.

usage: .venv/bin/python bench/swap_downtime.py [--families tiny,debian] [--guests 3] [--no-rollout]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from homes import bench_home

from orchestrator import guests, swap
from orchestrator.context import Context
from orchestrator.images import lifecycle

PROBE_EVERY = 0.05
AGREE_SHARE = 0.2  # the probe and the orchestrator agree within PROBE_EVERY + 20% of the larger figure
SLOW = 0.5  # an answer slower than this was held during an outage (healthy: ~0.05 s tiny, ~0.2 s Debian)
# At most MAX_INFLIGHT requests are open, each for up to REQUEST_TIMEOUT: every request runs a CGI in
# the guest that goes on when the probe gives up, and 24 open requests given up after 1 s piled up
# CGIs until the OOM killer of a 256 MiB tiny guest took its agent. A request held by a paused guest
# ends when the old QEMU goes (slirp closes it), not after 3 s; while all are open the probe skips
# ticks, so each swap's line says how long it sent nothing before its first answer of the new OS.
REQUEST_TIMEOUT = 3.0
MAX_INFLIGHT = 8
NAN = float("nan")


class Probe:
    """Asks one guest's application for its counter every 50 ms, each request in its own thread.

    Requests overlap: one request sent during an outage may wait seconds (QEMU's user-mode network
    accepts the connection while the guest is paused or gone), and a probe that waited for it
    would miss the moment the application came back. The old OS's last answer counts only if it
    came back within ``SLOW`` of its request (a late one says little about when the old OS still
    served); the new OS's first answer counts whenever it came, prompt or late: the new OS served it
    by then at the latest (a booting guest may answer slowly for a while, and the orchestrator counts
    such an answer too). A request is given up after ``REQUEST_TIMEOUT``. At most
    ``MAX_INFLIGHT`` requests are open at once, so a slow guest is not buried under abandoned
    requests; a tick without a request (all open) is counted and printed. Each answer is kept with the OS version that
    served it ("COUNTER VERSION ..."), so the outage is found between the two OSes.
    """

    def __init__(self, port: int, every: float = PROBE_EVERY) -> None:
        self.port = port
        self.every = every
        self.ok: list[tuple[float, str, float]] = []  # (answered, version, sent) of prompt answers
        self.sends: list[float] = []
        self.late: list[tuple[float, str, float]] = []  # (answered, version, sent) of answers slower than SLOW
        self.sent = 0
        self.skipped = 0  # ticks without a request: MAX_INFLIGHT requests were open
        self._inflight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _one(self, sent: float) -> None:
        try:
            answer = guests.app_answer(self.port, timeout=REQUEST_TIMEOUT)
            done = time.monotonic()
            parts = (answer or "").split()
            if len(parts) >= 2 and parts[0].isdigit():
                with self._lock:
                    if done - sent <= SLOW:
                        self.ok.append((done, parts[1], sent))
                    else:
                        self.late.append((done, parts[1], sent))
        finally:
            with self._lock:
                self._inflight -= 1

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                room = self._inflight < MAX_INFLIGHT
                if room:
                    self._inflight += 1
                    self.sent += 1
                    now = time.monotonic()
                    self.sends.append(now)
                else:
                    self.skipped += 1
            if room:
                threading.Thread(target=self._one, args=(now,), daemon=True).start()
            self._stop.wait(self.every)

    def __enter__(self) -> Probe:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def answered_after(self, t: float, version: str) -> int:
        with self._lock:
            return sum(a > t and v == version for a, v, _ in self.ok)

    def outage(self, old: str, new: str) -> tuple[float, float, float]:
        """(last prompt answer of the old OS, first answer of the new OS after it, how long the
        probe sent nothing before the request that got that first answer); NaN where missing.
        The last figure bounds how late the probe may have noticed the new OS."""
        with self._lock:
            pts = sorted(self.ok)
            sends = list(self.sends)
            late = sorted(self.late)
        first = next(((a, s) for a, v, s in sorted(pts + late) if v == new), None)
        if first is None:
            return NAN, NAN, NAN
        before = [a for a, v, _ in pts if a < first[0] and v == old]
        earlier = [s for s in sends if s < first[1]]
        blind = first[1] - earlier[-1] if earlier else NAN
        return (before[-1] if before else NAN), first[0], blind


class Timeline:
    """The orchestrator's progress messages with the moment each arrived (a rollout's ``progress``).

    Both strategies announce "<guest>: quiesce" right as their downtime window begins (``down`` in
    swap/warm.py and swap/cold.py; the cold swap journals one step in between), so the bench knows
    where the orchestrator starts counting without changing it.
    """

    def __init__(self) -> None:
        self.marks: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        with self._lock:
            self.marks.append((time.monotonic(), msg))

    def at(self, msg: str) -> float:
        with self._lock:
            return next((t for t, m in self.marks if m == msg), NAN)


def step_durations(steps: dict[str, float]) -> dict[str, float]:
    """``SwapResult.steps`` holds seconds since the swap began, per step: each step's own duration."""
    out, prev = {}, 0.0
    for name, t in steps.items():
        out[name] = round(t - prev, 3)
        prev = t
    return out


def agree(probe: float, orch: float | None, every: float = PROBE_EVERY) -> tuple[bool, float]:
    """The issue's rule: both figures exist and differ by at most the probe interval plus 20% of the
    larger one. Returns (agree, tolerance)."""
    if orch is None or probe != probe:
        return False, NAN
    tol = every + AGREE_SHARE * max(probe, orch)
    return abs(probe - orch) <= tol, tol


@dataclass
class Measured:
    """One measured swap, seen from both sides."""

    family: str
    strategy: str
    guest: str
    probe: float
    orchestrator: float | None
    agrees: bool
    lead: float  # how long the application still answered after the orchestrator's window began
    tail: float  # the orchestrator's window end minus the probe's first answer of the new OS
    steps: dict[str, float] = field(default_factory=dict)  # durations
    result: swap.SwapResult | None = None
    blind: float = NAN  # how long the probe sent nothing before its first answer of the new OS


MEASURED: list[Measured] = []


def measure_rollout(ctx: Context, fam: str, names: list[str], to: str, strategy: str,
                    batch: int = 1, every: float = PROBE_EVERY, per_host: int | None = None,
                    settle: float = 0.5) -> tuple[float, list[Measured]]:
    """One rollout of ``names`` to ``to`` (``batch`` at once, at most ``per_host`` of one host), each
    guest watched by its own probe (a request every ``every`` seconds, from ``settle`` seconds before).
    Returns the rollout's wall time and one ``Measured`` per guest (also added to ``MEASURED``),
    each printed with the verdict of ``agree``; a failed swap has NaN for the probe."""
    old_v = {n: guests.load(ctx, n).os_version for n in names}
    tl = Timeline()
    probes = {n: Probe(guests.load(ctx, n).app_port, every) for n in names}
    for p in probes.values():
        p.__enter__()
    try:
        time.sleep(settle)
        t0 = time.monotonic()
        results = swap.rollout(ctx, swap.plan(ctx, names, to, strategy, batch=batch, max_failures=len(names),
                                              per_host=per_host), progress=tl)
        wall = time.monotonic() - t0
        if swap.interrupted():  # the rollout took the Ctrl-C (its swaps in flight rolled back): stop here
            raise SystemExit(f"interrupted by {swap.interrupted()}")
        # a probe may still be waiting on a request sent during the outage: keep them running until
        # each has prompt answers from the new OS (without them the gap would end at an answer of the old)
        end = time.monotonic()
        for r in results:
            while r.ok and probes[r.guest].answered_after(end, r.new_version or "?") < 3 \
                    and time.monotonic() < end + 30:
                time.sleep(0.05)
    finally:
        for p in probes.values():
            p.__exit__()
    out = []
    for r in results:
        out.append(judge(fam, r, probes[r.guest], tl, old_v[r.guest]))
    return wall, out


def judge(fam: str, r: swap.SwapResult, p: Probe, tl: Timeline, old_v: str) -> Measured:
    """Both sides' figures of one swap, where they differ, and the verdict (printed, kept in ``MEASURED``)."""
    guest, strategy = r.guest, r.strategy
    if not r.ok:
        state = "rolled back" if r.rolled_back else "not rolled back"
        print(f"    {strategy} {guest}: FAILED ({state}): {r.error}", flush=True)
        m = Measured(fam, strategy, guest, NAN, None, False, NAN, NAN, result=r)
        MEASURED.append(m)
        return m
    last_old, first_new, blind = p.outage(old_v, r.new_version or "?")
    seen = first_new - last_old
    window = tl.at(f"{guest}: quiesce")
    lead = last_old - window
    tail = (window + r.downtime - first_new) if r.downtime is not None else NAN
    ok, tol = agree(seen, r.downtime, p.every)
    m = Measured(fam, strategy, guest, seen, r.downtime, ok, lead, tail, step_durations(r.steps), r, blind)
    MEASURED.append(m)
    verdict = "agree" if ok else "DISAGREE"
    print(f"    {strategy} {guest}: probe {seen:.3f}s, orchestrator {r.downtime}s: {verdict} "
          f"(tolerance {tol:.3f}s); the application answered {lead:+.3f}s after the window began, "
          f"the probe saw it back {tail:+.3f}s before the window's end; requests {p.sent}, "
          f"late answers {len(p.late)}, ticks skipped (all open) {p.skipped}, the probe sent nothing for "
          f"{blind:.3f}s before its first answer of the new OS", flush=True)
    print(f"    {strategy} {guest}: step durations {m.steps}", flush=True)
    for t in r.processes:
        print(f"    {strategy} {guest}: process tree {t}", flush=True)
    return m


def measured_swap(ctx: Context, fam: str, guest: str, to: str, strategy: str) -> tuple[float, swap.SwapResult]:
    """Downtime seen by the probe (NaN when the swap failed and was rolled back) and the result."""
    _, [m] = measure_rollout(ctx, fam, [guest], to, strategy)
    assert m.result is not None
    return m.probe, m.result


def set_carry(ctx: Context, name: str, carry: list[dict[str, object]] | None) -> None:
    """Switch a guest's process carry (None: the image's demo application; []: none, it restarts)."""
    g = guests.load(ctx, name)
    g.customization = {**g.customization, "carry": carry}
    g.save(ctx)


def provision(ctx: Context, names: list[str], image: str, placed: dict[str, str] | None = None,
              ready_timeout: float = 240, app_timeout: float = 60) -> None:
    """Create every guest (on its host in ``placed``, else locally), then wait for each one's
    application: the boots overlap."""
    for n in names:
        guests.create(ctx, n, image, data_size=64 << 20, host=(placed or {}).get(n))
    for n in names:
        g = guests.load(ctx, n)
        guests.wait_ready(ctx, g, timeout=ready_timeout)
        if guests.wait_app(g.app_port, app_timeout) is None:
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
        seen, r = measured_swap(ctx, fam, name, v2, "warm")
        out["warm"].append(seen)
        carried = [t for t in r.processes if t["outcome"] == "resumed"]
        if carried:
            out.setdefault("dump", []).append(sum(t["dump_seconds"] or 0 for t in carried))
            out.setdefault("restore", []).append(sum(t["restore_seconds"] or 0 for t in carried))
            out.setdefault("checkpoint_mib", []).append(sum(t["checkpoint_kib"] or 0 for t in carried) / 1024)
            # the same guest, the same swap the other way, with the application restarted instead
            set_carry(ctx, name, [])
            out.setdefault("warm-restart", []).append(measured_swap(ctx, fam, name, v1, "warm")[0])
            set_carry(ctx, name, None)
        if guests.load(ctx, name).image != v1:
            swap.rollout(ctx, swap.plan(ctx, [name], v1, "cold"))
        out["cold"].append(measured_swap(ctx, fam, name, v2, "cold")[0])
        restart = f"  warm-restart {out['warm-restart'][-1]:.2f}s" if carried else ""
        print(f"[{fam}] {name}: warm {out['warm'][-1]:.2f}s{restart}  cold {out['cold'][-1]:.2f}s", flush=True)
    for name in names:
        guests.remove(ctx, name)
    out.update(pagein_parts(ctx, fam, v2, tag))
    return out


def pagein_parts(ctx: Context, fam: str, image: str, tag: str, runs: int = 3) -> dict[str, list[float]]:
    """The warm page-in step is libvirt's destroy of the paused old domain, then the restore of the
    page-in file: both timed apart, ``runs`` times, on a scratch guest (no data volume) whose own
    state was saved once (the same kind of file, with the same memory size, as the golden state).

    Each run restores the file, pauses the domain at once and destroys it: like the swap's, a
    destroy of a paused domain. The disk the state expects changes only by the moment it runs."""
    name = f"{tag}-{fam[0]}pi"
    g = guests.create(ctx, name, image)
    out: dict[str, list[float]] = {"libvirt destroy": [], "libvirt restore": [], "state MiB": []}
    try:
        guests.wait_ready(ctx, g, timeout=240)
        path = g.dir(ctx) / "bench.sav"
        ctx.hv.save(name, str(path))
        out["state MiB"].append(path.stat().st_size / (1 << 20))
        for _ in range(runs):
            t = time.monotonic()
            ctx.hv.restore(str(path))
            out["libvirt restore"].append(time.monotonic() - t)
            ctx.hv.suspend(name)
            t = time.monotonic()
            ctx.hv.destroy(name)
            out["libvirt destroy"].append(time.monotonic() - t)
        print(f"[{fam}] page-in parts: destroy {[round(x, 3) for x in out['libvirt destroy']]}s, "
              f"restore {[round(x, 3) for x in out['libvirt restore']]}s, "
              f"state file {out['state MiB'][0]:.1f} MiB", flush=True)
    finally:
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
    ap.add_argument("--no-rollout", action="store_true", help="skip the 4-guest rollout (bench/swap_scaling.py "
                    "measures batches more fully)")
    a = ap.parse_args()
    tag = f"b{uuid.uuid4().hex[:4]}"
    with bench_home(f"bench-swap-{tag}") as ctx:
        print(f"accelerator: {ctx.accel.label}", flush=True)
        results: dict[str, dict[str, list[float]]] = {}
        rollout: dict[int, float] = {}
        for fam in a.families.split(","):
            results[fam] = family_run(ctx, fam, a.guests, tag)
        if "tiny" in results and not a.no_rollout:
            rollout = rollout_run(ctx, tag)
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
    print_steps(results)
    return report_agreement()


def print_steps(results: dict[str, dict[str, list[float]]]) -> None:
    """Per family and strategy: each step's median duration over the measured swaps, then the warm
    page-in step split into libvirt's destroy and restore (timed apart on a scratch guest)."""
    groups: dict[tuple[str, str], list[Measured]] = {}
    for m in MEASURED:
        if m.result is not None and m.result.ok:
            groups.setdefault((m.family, m.strategy), []).append(m)
    for (fam, strategy), ms in groups.items():
        names = list(dict.fromkeys(k for m in ms for k in m.steps))
        print(f"\n{fam} {strategy}: step durations, median of {len(ms)} swaps (s)   [min..max]")
        for k in names:
            xs = [m.steps[k] for m in ms if k in m.steps]
            print(f"  {k:12} {statistics.median(xs):7.3f}   [{min(xs):.3f}..{max(xs):.3f}]")
        for label, xs in (("downtime (orchestrator)", [m.orchestrator or NAN for m in ms]),
                          ("downtime (probe)", [m.probe for m in ms]),
                          ("application answered into the window", [m.lead for m in ms])):
            print(f"  {label}: {statistics.median(xs):.3f}   [{min(xs):.3f}..{max(xs):.3f}]")
        r = results.get(fam, {})
        if strategy == "warm" and r.get("libvirt destroy"):
            d, rs = statistics.median(r["libvirt destroy"]), statistics.median(r["libvirt restore"])
            print(f"  page-in apart (scratch guest, {len(r['libvirt destroy'])} runs, state file "
                  f"{r['state MiB'][0]:.0f} MiB): libvirt destroy of the paused domain {d:.3f}s, "
                  f"libvirt restore {rs:.3f}s (medians)")


def report_agreement() -> int:
    """Exit status 1 when any measured swap failed or its two figures disagree (the issue's rule)."""
    bad = [m for m in MEASURED if not m.agrees]
    print(f"\nprobe vs orchestrator: {len(MEASURED) - len(bad)} of {len(MEASURED)} swaps agree within "
          f"the probe interval + {AGREE_SHARE:.0%} of the larger figure")
    for m in bad:
        why = "the swap failed" if m.result is None or not m.result.ok else \
            f"probe {m.probe:.3f}s vs orchestrator {m.orchestrator}s; the application answered " \
            f"{m.lead:+.3f}s into the window, the probe saw it back {m.tail:+.3f}s before its end " \
            f"(and sent nothing for {m.blind:.3f}s before that)"
        print(f"  DISAGREE {m.family} {m.strategy} {m.guest}: {why}")
    return 1 if bad else 0

if __name__ == "__main__":
    sys.exit(main())
