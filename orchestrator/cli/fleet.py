"""``osimg fleet up|down|status|validate SPEC``: guests declared in a YAML fleet spec."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from ..context import Context
from ..fleet import reconcile
from ..fleet import spec as spec_mod
from .common import Table, add, emit_json, mib, out, status


def register(nouns: dict[str, Any]) -> None:
    verbs = nouns["fleet"]
    u = add(verbs, "up", cmd_fleet_up, "create and start the spec's guests; a second run changes nothing")
    u.add_argument("spec", help="fleet spec (YAML, see examples/fleet.yaml)")
    u.add_argument("--no-wait", action="store_true", help="return once started, without waiting for SSH")
    u.add_argument("--prune", action="store_true", help="remove guests of this fleet that left the spec")
    u.add_argument("--timeout", type=float, default=300, help="seconds to wait for the guests (default 300)")
    d = add(verbs, "down", cmd_fleet_down, "remove the fleet's guests with their overlays, drives and volumes")
    d.add_argument("spec")
    s = add(verbs, "status", cmd_fleet_status, "show the fleet's guests, their state, disks and drift")
    s.add_argument("spec")
    v = add(verbs, "validate", cmd_fleet_validate, "check a spec without touching anything")
    v.add_argument("spec")


@contextmanager
def _fleet_context(ctx: Context, a: argparse.Namespace) -> Iterator[tuple[Context, spec_mod.FleetSpec]]:
    """Load the spec, then drive its libvirt host: --uri beats the spec's uri, which beats OSIMG_URI."""
    spec = spec_mod.load(a.spec, ctx)
    fctx = ctx if a.uri else reconcile.context_for(ctx, spec)
    try:
        yield fctx, spec
    finally:
        if fctx is not ctx:
            fctx.close()


def _print_actions(res: reconcile.FleetResult, a: argparse.Namespace) -> None:
    if a.json:
        emit_json({"fleet": res.fleet, "changed": res.changed, "guests": [asdict(x) for x in res.actions]})
        return
    t = Table("guest", "action", "detail", "ready", title=f"fleet {res.fleet}")
    for x in res.actions:
        ready = f"{x.ready_seconds:.1f}s" if x.ready_seconds is not None else "-"
        t.add_row(x.name, x.action, x.detail, ready)
    out.print(t)
    out.print(res.summary())


def cmd_fleet_up(ctx: Context, a: argparse.Namespace) -> int:
    with _fleet_context(ctx, a) as (fctx, spec), status(a, f"fleet {spec.name}: up") as progress:
        res = reconcile.up(fctx, spec, wait=not a.no_wait, prune=a.prune, timeout=a.timeout, progress=progress)
    _print_actions(res, a)
    return 0


def cmd_fleet_down(ctx: Context, a: argparse.Namespace) -> int:
    with _fleet_context(ctx, a) as (fctx, spec), status(a, f"fleet {spec.name}: down") as progress:
        res = reconcile.down(fctx, spec, progress=progress)
    _print_actions(res, a)
    return 0


def cmd_fleet_status(ctx: Context, a: argparse.Namespace) -> int:
    with _fleet_context(ctx, a) as (fctx, spec):
        rows = reconcile.status(fctx, spec)
    if a.json:
        emit_json({"fleet": spec.name, "guests": rows})
        return 0
    t = Table("guest", "state", "image", "address", "ssh", "overlay", "data", "note", title=f"fleet {spec.name}")
    for r in rows:
        note = "; ".join(r["drift"]) or ("" if r["in_spec"] else "not in the spec")
        if r["in_spec"] and not r["member"] and r["state"] != "absent":
            note = "not created by this fleet"
        t.add_row(r["name"], r["state"], str(r["image"] or "-"), str(r["address"] or "-"), str(r["ssh_port"] or "-"),
                  mib(r["overlay_bytes"]), mib(r["data_bytes"]), note)
    out.print(t)
    return 0


def cmd_fleet_validate(ctx: Context, a: argparse.Namespace) -> int:
    spec = spec_mod.load(a.spec, ctx)
    if a.json:
        emit_json({"fleet": spec.name, "valid": True, "guests": [g.name for g in spec.guests],
                   "networks": sorted(spec.networks)})
    else:
        out.print(f"{spec.path}: fleet {spec.name} is valid: {len(spec.guests)} guest(s) on "
                  f"{', '.join(sorted(spec.networks))}")
    return 0
