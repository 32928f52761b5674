"""Fleet reconciliation: converge a libvirt host to a spec (``up``), remove a fleet (``down``), report it.

``up`` creates missing guests, starts stopped ones and changes nothing when everything already
matches (a second run says so). A guest that exists but differs from the spec is refused rather
than silently rebuilt, because rebuilding throws its overlay away. ``down`` removes the fleet's
guests with their overlays, config drives and data volumes. Which guests belong to which fleet is
recorded in the cluster store (kind ``fleet``), so ``down`` also finds guests dropped from the spec
since ``up`` and never removes a guest the fleet did not create.

``drift`` is the one rule for "is this guest what its spec asks for?": the CLI, ``plan_up`` and the
Ansible guest module all use it.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from .. import guests, hosts
from ..context import Context
from ..errors import ConflictError, GuestError, NotFoundError, OsimgError
from ..images import catalog
from ..process import Progress, holder_id, quiet
from .spec import LIBVIRT, FleetSpec, GuestSpec, check_images

KIND = "fleet"
LOCK_WAIT = 10.0  # seconds another up/down of the same fleet may hold it before we give up
MAX_PARALLEL = 32  # guests created at once (a thread each): a fleet of 1000 must not start 1000 threads


@dataclass
class GuestAction:
    """What up/down did (or found) for one guest."""

    name: str
    action: str  # created | started | resumed | unchanged | removed | absent | kept
    detail: str = ""
    ready_seconds: float | None = None


@dataclass
class FleetResult:
    fleet: str
    actions: list[GuestAction]

    @property
    def changed(self) -> bool:
        return any(a.action in ("created", "started", "resumed", "removed") for a in self.actions)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for a in self.actions:
            counts[a.action] = counts.get(a.action, 0) + 1
        what = ", ".join(f"{n} {action}" for action, n in counts.items())
        return f"fleet {self.fleet}: {what}" + ("" if self.changed else "; nothing to do")


def context_for(ctx: Context, spec: FleetSpec) -> Context:
    """A context driving the spec's libvirt host (``ctx`` itself when it already does)."""
    if not spec.uri or spec.uri == ctx.settings.uri:
        return ctx
    return Context(replace(ctx.settings, uri=spec.uri))


def members(ctx: Context, fleet: str) -> dict[str, dict[str, Any]]:
    """The guests a fleet created, with the spec each was made from."""
    rec = ctx.store.get(KIND, fleet)
    return dict(rec.get("guests", {})) if rec else {}


def _owner(ctx: Context, guest: str) -> str | None:
    for name, rec in ctx.store.items(KIND):
        if guest in rec.get("guests", {}):
            return name
    return None


def _record(ctx: Context, spec: FleetSpec, guest: str, config: dict[str, Any] | None) -> None:
    """Add (config given) or drop (None) one guest in the fleet's record; the record goes when empty."""

    def upd(rec: dict[str, Any] | None) -> dict[str, Any] | None:
        out = dict(rec or {"guests": {}})
        out["spec"] = str(spec.path.resolve())
        out["uri"] = ctx.settings.uri
        guests = dict(out.get("guests", {}))
        if config is None:
            guests.pop(guest, None)
        else:
            guests[guest] = config
        out["guests"] = guests
        return out if guests else None

    ctx.store.update(KIND, spec.name, upd)


def drift(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Readable differences between the spec a guest was made from and the spec now."""
    return guests.config_drift(recorded, wanted)


def plan_up(ctx: Context, spec: FleetSpec, prune: bool = False) -> FleetResult:
    """What ``up`` would do to each guest, refused for the reasons ``up`` refuses; changes nothing.

    Refused (ConflictError naming every problem): a guest whose spec changed since the fleet made
    it (rebuilding would discard its overlay; ``osimg guest resize`` grows disks), a guest or
    libvirt domain of the same name that the fleet did not create. Unknown images: ValidationError.
    """
    check_images(ctx, spec)
    mine = members(ctx, spec.name)
    actions: list[GuestAction] = []
    problems: list[str] = []
    for gs in spec.guests:
        exists = (ctx.settings.guests_dir / gs.name / "guest.json").exists()
        if gs.name in mine and exists:
            diffs = drift(mine[gs.name], gs.config())
            if diffs:
                problems.append(f"guest {gs.name} differs from the spec ({'; '.join(diffs)})")
            g = guests.load(ctx, gs.name)
            if gs.host is not None and g.host != gs.host:
                problems.append(f"guest {gs.name} runs on host {g.host or 'local'}, the spec says {gs.host} "
                                "(osimg does not move guests: remove it and run up again)")
            hv = g.at(ctx).hv
            state = hv.state(gs.name) if hv.exists(gs.name) else "undefined"
            if state == "running":
                actions.append(GuestAction(gs.name, "unchanged", "running"))
            elif state == "paused":
                actions.append(GuestAction(gs.name, "resumed", "was paused"))
            else:
                actions.append(GuestAction(gs.name, "started", f"was {state}"))
        elif exists:
            owner = _owner(ctx, gs.name)
            by = f"fleet {owner}" if owner else "'osimg guest create' or another tool"
            problems.append(f"guest {gs.name} already exists, created by {by}; remove it or rename the "
                            f"guest in the spec")
        elif ctx.hv.exists(gs.name):
            problems.append(f"libvirt already has a domain named {gs.name!r} that osimg does not manage")
        else:
            actions.append(GuestAction(gs.name, "created", f"overlay on {gs.image}"))
    if problems:
        raise ConflictError(f"{spec.path}: {'; '.join(problems)}. Nothing was changed; to rebuild a guest "
                            f"from the new spec, remove it first ('osimg guest rm NAME') and run up again")
    for name in sorted(set(mine) - {g.name for g in spec.guests}):
        actions.append(GuestAction(name, "removed", "no longer in the spec") if prune else
                       GuestAction(name, "kept", "no longer in the spec; 'fleet up --prune' removes it"))
    return FleetResult(spec.name, actions)


def up(ctx: Context, spec: FleetSpec, wait: bool = True, prune: bool = False, timeout: float = 180,
       progress: Progress = quiet) -> FleetResult:
    """Create what is missing, start what is stopped; a spec the host already matches changes nothing.

    Everything is checked (``plan_up``) before the first change. With ``prune``, guests the fleet
    created that are no longer in the spec are removed; without, they are reported and kept.
    """
    with ctx.store.lock(f"fleet-{spec.name}", holder_id(), ttl=60, wait=LOCK_WAIT):
        for hname, h in spec.hosts.items():
            hosts.add(ctx, hname, h["uri"], root=h.get("root", hosts.DEFAULT_ROOT), accel=h.get("accel", "tcg"))
        res = plan_up(ctx, spec, prune)
        new = [spec.guest(a.name) for a in res.actions if a.action == "created"]
        for image in dict.fromkeys(gs.image for gs in new):
            progress(f"resolving image {image}")
            catalog.resolve(ctx, image)
        placed = place(ctx, spec, new)
        for a in res.actions:
            if a.action == "created":
                gs = replace(spec.guest(a.name), host=placed.get(a.name))
                where = f" on host {gs.host}" if gs.host else ""
                progress(f"creating {a.name} on an overlay of {gs.image}{where}")
                a.detail += where
                _create(ctx, spec, gs)
            elif a.action == "resumed":
                progress(f"resuming {a.name}")
                guests.load(ctx, a.name).at(ctx).hv.resume(a.name)
            elif a.action == "started":
                progress(f"starting {a.name}")
                guests.start(ctx, guests.load(ctx, a.name))
            elif a.action == "removed":
                progress(f"removing {a.name} (no longer in the spec)")
                _remove(ctx, spec, a.name)
    if wait:
        _wait(ctx, spec, [a for a in res.actions if a.action in ("created", "started")], timeout, progress)
    return res


def place(ctx: Context, spec: FleetSpec, new: list[GuestSpec]) -> dict[str, str | None]:
    """The host of each new guest: the one its spec names, or, when the spec has hosts, the host with
    the fewest guests (all of this home's, counting the ones placed so far), then the most free
    memory, then the first by name. Without hosts in the spec, guests stay on this host (None)."""
    out: dict[str, str | None] = {gs.name: gs.host for gs in new}
    if not spec.hosts:
        return out
    count = dict.fromkeys(sorted(spec.hosts), 0)
    for g in guests.all_guests(ctx, hidden=True):
        if g.host in count:
            count[g.host] += 1
    for gs in new:
        if gs.host in count:
            count[gs.host] += 1
    free = {h: hosts.context(ctx, h).hv.free_memory() for h in count}
    for gs in new:
        if gs.host is None:
            best = min(count, key=lambda h: (count[h], -free[h], h))
            out[gs.name] = best
            count[best] += 1
    return out


def _create(ctx: Context, spec: FleetSpec, gs: GuestSpec) -> None:
    """One guest: overlay, data volume, config drive naming the data volume by UUID, then boot."""
    net = spec.networks[gs.network]
    # recorded first, so a failure half-way leaves nothing that 'down' would not find
    _record(ctx, spec, gs.name, gs.config())
    try:
        g = guests.create(
            ctx, gs.name, gs.image, custom=gs.custom, memory_mib=gs.memory_mib, vcpus=gs.vcpus,
            data_size=gs.data.size if gs.data else 0,
            network=net.libvirt_network if net.mode == LIBVIRT else None, start=False, config_drive=False,
            host=gs.host,
        )
    except BaseException:
        _record(ctx, spec, gs.name, None)
        raise
    try:
        if gs.data is not None:
            g.customization = g.custom().with_data(g.data_uuid, gs.data.mount).to_dict()
        g.save(ctx)
        guests.write_customization(ctx, g)
        guests.start(ctx, g)
    except BaseException:
        _remove(ctx, spec, gs.name)
        raise


def _remove(ctx: Context, spec: FleetSpec, name: str) -> None:
    with contextlib.suppress(NotFoundError):
        guests.remove(ctx, name)
    _record(ctx, spec, name, None)


def _wait(ctx: Context, spec: FleetSpec, actions: list[GuestAction], timeout: float, progress: Progress) -> None:
    """Wait for all booting guests at once; SSH through the forward where there is one."""
    if not actions:
        return
    progress(f"waiting for {len(actions)} guest(s) to be ready")

    def ready(a: GuestAction) -> float:
        g = guests.load(ctx, a.name)
        if g.network:
            return guests.wait_serial(ctx, g, timeout)
        return guests.wait_ready(ctx, g, timeout=timeout)

    _ = ctx.hv.conn  # connect once, before the threads share the connection
    failures = []
    with ThreadPoolExecutor(max_workers=min(len(actions), MAX_PARALLEL)) as pool:
        futures = [(a, pool.submit(ready, a)) for a in actions]
        for a, fut in futures:
            try:
                a.ready_seconds = fut.result()
            except OsimgError as err:
                failures.append(f"{a.name}: {err}")
    if failures:
        raise GuestError(f"fleet {spec.name}: {len(failures)} guest(s) did not become ready: {'; '.join(failures)} "
                         f"(they are left as they are for inspection; 'osimg fleet down' removes them)")


def plan_down(ctx: Context, spec: FleetSpec) -> FleetResult:
    """What ``down`` would do to each guest; changes nothing."""
    mine = members(ctx, spec.name)
    actions = []
    for name in [g.name for g in spec.guests] + sorted(set(mine) - {g.name for g in spec.guests}):
        exists = (ctx.settings.guests_dir / name).exists() or ctx.hv.exists(name)
        if name in mine:
            actions.append(GuestAction(name, "removed") if exists else GuestAction(name, "absent", "already gone"))
        elif exists:
            actions.append(GuestAction(name, "kept", "not created by this fleet; 'osimg guest rm' removes it"))
        else:
            actions.append(GuestAction(name, "absent"))
    return FleetResult(spec.name, actions)


def down(ctx: Context, spec: FleetSpec, progress: Progress = quiet) -> FleetResult:
    """Remove the fleet's guests (those in the spec and those the fleet created since) and their files.

    Each guest's overlay, config drive and data volume go with it; the shared base stays. A guest
    of the same name that the fleet did not create is left alone and reported as ``kept``.
    """
    with ctx.store.lock(f"fleet-{spec.name}", holder_id(), ttl=60, wait=LOCK_WAIT):
        res = plan_down(ctx, spec)
        mine = members(ctx, spec.name)
        for a in res.actions:
            if a.action == "removed":
                progress(f"removing {a.name}")
                _remove(ctx, spec, a.name)
            elif a.name in mine:
                _record(ctx, spec, a.name, None)  # gone behind the fleet's back: forget it
    return res


def status(ctx: Context, spec: FleetSpec) -> list[dict[str, Any]]:
    """One row per guest of the spec or the fleet record: state, address, disks, drift."""
    mine = members(ctx, spec.name)
    rows = []
    for name in [g.name for g in spec.guests] + sorted(set(mine) - {g.name for g in spec.guests}):
        in_spec = any(g.name == name for g in spec.guests)
        row: dict[str, Any] = {"name": name, "in_spec": in_spec, "member": name in mine, "state": "absent",
                               "image": None, "address": None, "ssh_port": None, "overlay_bytes": None,
                               "base": None, "data_bytes": None, "drift": []}
        if in_spec:
            gs = spec.guest(name)
            row.update(image=gs.image, address=gs.custom.address)
            if name in mine:
                row["drift"] = drift(mine[name], gs.config())
        try:
            g = guests.load(ctx, name)
        except NotFoundError:
            rows.append(row)
            continue
        files = g.files(ctx)
        row.update(state=guests.status(ctx, g), image=g.image, base=g.base, ssh_port=g.ssh_port,
                   address=g.custom().address, overlay_bytes=files.allocated(g.overlay_file), host=g.host,
                   data_bytes=files.allocated(guests.DATA_VOLUME) if g.data_uuid else None)
        rows.append(row)
    return rows
