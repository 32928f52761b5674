"""``osimg swap GUEST... --to IMAGE`` and ``osimg swap --resume``."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from .. import swap
from ..context import Context
from ..errors import SwapError, ValidationError
from .common import Table, add, emit_json, err, out, status


def register(nouns: dict[str, Any]) -> None:
    sw = add(nouns["_top"], "swap", cmd_swap,
             "replace the OS of running guests (quiesce, swap, resume; rollback on failure)")
    sw.add_argument("guests", nargs="*", metavar="GUEST")
    sw.add_argument("--to", metavar="IMAGE", help="captured image to swap to")
    sw.add_argument("--strategy", choices=swap.STRATEGIES, default="warm")
    sw.add_argument("--batch", type=int, default=1, help="guests swapped at once")
    sw.add_argument("--max-failures", type=int, default=1, help="stop the rollout after this many failures")
    sw.add_argument("--per-host", type=int, metavar="K", help="at most K guests of one libvirt host at once")
    sw.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    sw.add_argument("--resume", action="store_true", help="finish or roll back swaps an interrupted run left")


def cmd_swap(ctx: Context, a: argparse.Namespace) -> int:
    if a.resume:
        return _resume(ctx, a)
    if not a.guests or not a.to:
        raise ValidationError("give GUEST... --to IMAGE (or --resume)")
    p = swap.plan(ctx, a.guests, a.to, a.strategy, a.batch, a.max_failures, a.per_host)
    if a.dry_run:
        if a.json:
            emit_json(asdict(p))
        else:
            for line in p.describe():
                out.print(line)
        return 0
    with status(a, "swapping") as progress:
        results = swap.rollout(ctx, p, progress=progress)
    code = _report_swaps(results, a.json)
    # unfinished: journaled swaps, and guests a lost host left pending (the rollout is kept for --resume)
    left = [r.guest for r in results
            if not r.ok and not r.rolled_back and (not r.skipped or "--resume" in (r.error or ""))]
    if swap.interrupted() or left:
        why = f"interrupted by {swap.interrupted()}" if swap.interrupted() else f"unfinished: {', '.join(left)}"
        err.print(f"osimg: swap {why}; to finish or roll back what the journal still holds: osimg swap --resume",
                  markup=False, highlight=False, soft_wrap=True)
        code = code or SwapError.exit_code
    return code


def _resume(ctx: Context, a: argparse.Namespace) -> int:
    extra = [f"GUEST ({' '.join(a.guests)})" if a.guests else "", "--to" if a.to else "",
             "--strategy" if a.strategy != "warm" else "", "--batch" if a.batch != 1 else "",
             "--max-failures" if a.max_failures != 1 else "", "--per-host" if a.per_host is not None else ""]
    if any(extra):
        raise ValidationError(f"--resume acts on every journaled swap and takes no {', '.join(e for e in extra if e)}")
    if a.dry_run:
        actions = swap.resume_plan(ctx)
        if a.json:
            emit_json([asdict(x) for x in actions])
        elif not actions:
            out.print("no interrupted swap in the journal")
        for x in [] if a.json else actions:
            out.print(f"{x.guest} ({x.strategy}, at step {x.step}): would {x.action}")
        return 0
    with status(a, "resuming interrupted swaps"):
        results = swap.resume(ctx, progress=(lambda m: None) if a.json else (lambda m: out.print(m)))
    code = _report_swaps(results, a.json, empty="no interrupted swap in the journal")
    for r in results:
        if r.rolled_back or not r.ok:
            what = "rolled back" if r.rolled_back else "not resumed"
            err.print(f"osimg: {r.guest}: {what}: {r.error}", markup=False, highlight=False, soft_wrap=True)
    if any(r.refused for r in results):
        code = ValidationError.exit_code  # a crafted or broken record is bad input: refused, nothing done
    return code


def _report_swaps(results: list[swap.SwapResult], as_json: bool, empty: str = "nothing to do") -> int:
    if as_json:
        emit_json([asdict(r) for r in results])
    elif not results:
        out.print(empty)
    else:
        t = Table("guest", "strategy", "from", "to", "result", "downtime", "counter", "error", title="swap")
        for r in results:
            state = "ok" if r.ok else "rolled back" if r.rolled_back else "skipped" if r.skipped else "FAILED"
            t.add_row(r.guest, r.strategy, f"{r.from_image} ({r.old_version})", r.to_image, state,
                      f"{r.downtime:.2f}s" if r.downtime is not None else "-",
                      f"{r.counter_before} -> {r.counter_after}", r.error or "")
        out.print(t)
        for r in results:
            if r.stopped or r.killed:
                out.print(f"{r.guest}: workload on /data: held by {', '.join(r.stopped) or 'nothing'}; "
                          f"killed after the grace: {', '.join(r.killed) or 'nothing'}", markup=False)
            for p in r.processes:
                out.print(f"{r.guest}: process tree {_tree(p)}", markup=False)
            if r.note:
                out.print(f"{r.guest}: {r.note}", markup=False)
    return 0 if all(r.ok for r in results) else SwapError.exit_code


def _tree(p: dict[str, object]) -> str:
    """One carried process tree: "app resumed (checkpoint 9 MiB, dump 0.82 s, restore 0.28 s)"."""
    bits = []
    if isinstance(p.get("checkpoint_kib"), int):
        bits.append(f"checkpoint {int(str(p['checkpoint_kib'])) / 1024:.1f} MiB")
    for k in ("dump", "restore"):
        v = p.get(f"{k}_seconds")
        if isinstance(v, (int, float)):
            bits.append(f"{k} {v:.2f} s")
    why = f": {p['reason']}" if p.get("reason") else ""
    extra = f" ({', '.join(bits)})" if bits else ""
    return f"{p.get('name')} {p.get('outcome')}{why}{extra}"

