"""``osimg swap GUEST... --to IMAGE`` and ``osimg swap --resume``."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from .. import swap
from ..context import Context
from ..errors import SwapError, ValidationError
from .common import Table, add, emit_json, out, status


def register(nouns: dict[str, Any]) -> None:
    sw = add(nouns["_top"], "swap", cmd_swap,
             "replace the OS of running guests (quiesce, swap, resume; rollback on failure)")
    sw.add_argument("guests", nargs="*", metavar="GUEST")
    sw.add_argument("--to", metavar="IMAGE", help="captured image to swap to")
    sw.add_argument("--strategy", choices=swap.STRATEGIES, default="warm")
    sw.add_argument("--batch", type=int, default=1, help="guests swapped at once")
    sw.add_argument("--max-failures", type=int, default=1, help="stop the rollout after this many failures")
    sw.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    sw.add_argument("--resume", action="store_true", help="finish or roll back swaps an interrupted run left")


def cmd_swap(ctx: Context, a: argparse.Namespace) -> int:
    if a.resume:
        with status(a, "resuming interrupted swaps"):
            results = swap.resume(ctx, progress=(lambda m: None) if a.json else (lambda m: out.print(m)))
        return _report_swaps(results, a.json, empty="no interrupted swap in the journal")
    if not a.guests or not a.to:
        raise ValidationError("give GUEST... --to IMAGE (or --resume)")
    p = swap.plan(ctx, a.guests, a.to, a.strategy, a.batch, a.max_failures)
    if a.dry_run:
        if a.json:
            emit_json(asdict(p))
        else:
            for line in p.describe():
                out.print(line)
        return 0
    with status(a, "swapping") as progress:
        results = swap.rollout(ctx, p, progress=progress)
    return _report_swaps(results, a.json)


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
    return 0 if all(r.ok for r in results) else SwapError.exit_code


