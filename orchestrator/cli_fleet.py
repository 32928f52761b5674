"""CLI verbs for fleets (``osimg fleet up|down|status|validate SPEC``) and ``osimg guest resize``.

Registered by cli.build_parser; handlers are ``fn(ctx, args) -> exit code`` like cli.py's.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import Any

from rich.table import Table

from . import fleet, partitions
from .context import Context


def register(sub: Any, add: Any) -> None:
    """Add this module's verbs to the top-level subparsers with ``add`` (see cli.add)."""
    from .cli import parse_size  # cli is fully imported by the time it calls register

    verbs = sub.add_parser("fleet", help="guests declared in a YAML fleet spec").add_subparsers(dest="sub",
                                                                                                required=True)
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

    guest = _subparsers(sub.choices["guest"])
    r = add(guest, "resize", cmd_guest_resize, "grow a guest's OS overlay or data volume (running or stopped)")
    r.add_argument("name")
    r.add_argument("--disk", choices=sorted(partitions.DISK_TARGETS), required=True, help="which disk")
    r.add_argument("--size", type=parse_size, required=True, help="new size, e.g. 20G (shrinking is refused)")


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    """The verbs of an existing noun (``guest``), to add ours next to cli.py's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(f"{parser.prog} has no sub-commands")


@contextmanager
def _fleet_context(ctx: Context, a: argparse.Namespace) -> Iterator[tuple[Context, fleet.FleetSpec]]:
    """Load the spec, then drive its libvirt host: --uri beats the spec's uri, which beats OSIMG_URI."""
    spec = fleet.load(a.spec, ctx)
    fctx = ctx if a.uri else fleet.context_for(ctx, spec)
    try:
        yield fctx, spec
    finally:
        if fctx is not ctx:
            fctx.close()


def _progress_status(a: argparse.Namespace, label: str) -> Any:
    from .cli import out

    return nullcontext() if a.json else out.status(label, spinner="dots")


def _print_actions(res: fleet.FleetResult, a: argparse.Namespace) -> None:
    from .cli import emit_json, out

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
    with _fleet_context(ctx, a) as (fctx, spec), _progress_status(a, f"fleet {spec.name}: up") as st:
        def progress(msg: str) -> None:
            if st is not None:
                st.update(f"fleet {spec.name}: {msg}")

        res = fleet.up(fctx, spec, wait=not a.no_wait, prune=a.prune, timeout=a.timeout, progress=progress)
    _print_actions(res, a)
    return 0


def cmd_fleet_down(ctx: Context, a: argparse.Namespace) -> int:
    with _fleet_context(ctx, a) as (fctx, spec), _progress_status(a, f"fleet {spec.name}: down") as st:
        def progress(msg: str) -> None:
            if st is not None:
                st.update(f"fleet {spec.name}: {msg}")

        res = fleet.down(fctx, spec, progress=progress)
    _print_actions(res, a)
    return 0


def cmd_fleet_status(ctx: Context, a: argparse.Namespace) -> int:
    from .cli import emit_json, out

    with _fleet_context(ctx, a) as (fctx, spec):
        rows = fleet.status(fctx, spec)
    if a.json:
        emit_json({"fleet": spec.name, "guests": rows})
        return 0
    t = Table("guest", "state", "image", "address", "ssh", "overlay", "data", "note", title=f"fleet {spec.name}")
    for r in rows:
        note = "; ".join(r["drift"]) or ("" if r["in_spec"] else "not in the spec")
        if r["in_spec"] and not r["member"] and r["state"] != "absent":
            note = "not created by this fleet"
        t.add_row(r["name"], r["state"], str(r["image"] or "-"), str(r["address"] or "-"), str(r["ssh_port"] or "-"),
                  _mib(r["overlay_bytes"]), _mib(r["data_bytes"]), note)
    out.print(t)
    return 0


def cmd_fleet_validate(ctx: Context, a: argparse.Namespace) -> int:
    from .cli import emit_json, out

    spec = fleet.load(a.spec, ctx)
    if a.json:
        emit_json({"fleet": spec.name, "valid": True, "guests": [g.name for g in spec.guests],
                   "networks": sorted(spec.networks)})
    else:
        out.print(f"{spec.path}: fleet {spec.name} is valid: {len(spec.guests)} guest(s) on "
                  f"{', '.join(sorted(spec.networks))}")
    return 0


def cmd_guest_resize(ctx: Context, a: argparse.Namespace) -> int:
    from .cli import emit_json, out

    live = ctx.hv.is_active(a.name)
    old, new = partitions.resize(ctx, a.name, a.disk, a.size)
    if a.json:
        emit_json({"name": a.name, "disk": a.disk, "old_bytes": old, "new_bytes": new, "changed": new != old,
                   "live": live})
    elif new == old:
        out.print(f"the {a.disk} disk of {a.name} is already {_mib(new)}; nothing to do")
    else:
        how = "live, the guest sees it now" if live else "offline, the guest sees it at its next start"
        out.print(f"grew the {a.disk} disk of {a.name} from {_mib(old)} to {_mib(new)} ({how})")
    return 0


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"
