"""The main job end to end (``osimg demo``): the whole life cycle on one host, then a report.

spec -> validate -> golden v1 built in a hidden builder and captured (disk + memory) -> three
guests as overlays on v1 with their own customization and data volumes -> the application
counts on each -> golden v2 -> rolling warm swap, batch 1 -> per-guest report. Everything it
created is removed at the end unless ``keep`` is set.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import guests, swap
from .context import Context
from .errors import OsimgError, SwapError, ValidationError
from .fleet import reconcile
from .fleet import spec as fleet_spec
from .host import qemu_img
from .images import catalog, lifecycle
from .process import Progress
from .settings import SOURCE_ROOT
from .validate import short

SPEC = SOURCE_ROOT / "examples" / "demo.yaml"
V1, V2 = "demo-v1", "demo-v2"
REQUESTS = 3  # application requests per guest before the swap, so every counter is above zero


@dataclass
class GuestReport:
    guest: str
    hostname: str | None
    old_version: str
    new_version: str | None
    downtime: float | None
    counter_before: int | None
    counter_after: int | None
    overlay_bytes: int
    ok: bool
    error: str | None
    # the application's own answer right before and after the swap: on the Debian family it carries
    # its in-memory state (pid, start time, requests served), the same process or a new one
    app_before: str | None = None
    app_after: str | None = None
    processes: list[str] = field(default_factory=list)  # "app resumed" / "app restarted: why"


@dataclass
class DemoReport:
    accel: str
    store: str
    family: str = "tiny"
    guests: list[GuestReport] = field(default_factory=list)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    kept: bool = False
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.guests) and all(g.ok for g in self.guests) and not self.leftovers


def _cleanup(ctx: Context, spec: fleet_spec.FleetSpec) -> None:
    """Remove what a previous demo left (its fleet and its two images), nothing else."""
    reconcile.down(ctx, spec)
    for name in (V2, V1):
        with contextlib.suppress(OsimgError):
            lifecycle.remove(ctx, name)


def _build_golden(ctx: Context, name: str, recipe: str, progress: Progress) -> None:
    version = recipe.partition(":")[2]
    steps = lifecycle.BuildSteps(files=[{"path": "/etc/motd", "content": f"osimg demo golden image {version}\n",
                                      "mode": "0644"}])
    lifecycle.build(ctx, name, recipe, steps, progress=lambda m: progress(f"{name}: {m}"))


def leftovers(ctx: Context, spec: fleet_spec.FleetSpec) -> list[str]:
    out = [f"domain {g.name}" for g in spec.guests if ctx.hv.exists(g.name)]
    out += [f"guest folder {g.name}" for g in spec.guests if (ctx.settings.guests_dir / g.name).exists()]
    out += [f"image {n}" for n in (V1, V2) if ctx.store.get(catalog.KIND, n) is not None
            or catalog.image_dir(ctx, n).exists()]
    out += [f"hidden builder {d.name}" for d in ctx.hv.list_domains()
            if d.metadata.get("home") == str(ctx.settings.home) and d.name.startswith((f"build-{V1}", f"build-{V2}"))]
    return out


FAMILIES = ("tiny", "debian")
DEBIAN_MEMORY_MIB = 512  # what the Debian image needs; the spec's 256M fits the tiny one


def run(ctx: Context, keep: bool = False, progress: Progress = lambda _m: None, spec_path: Path = SPEC,
        family: str = "tiny") -> DemoReport:
    """``family`` debian shows the application's processes carried across the swap (CRIU): the same
    process answers on v2 with the start time and request count it had in memory on v1."""
    if family not in FAMILIES:
        raise ValidationError(f"unknown image family {short(family)}: use {' or '.join(FAMILIES)}")
    t_all = time.monotonic()
    rep = DemoReport(accel=ctx.accel.label, store=ctx.settings.store_url, family=family)

    def phase(name: str, t0: float) -> None:
        rep.phases[name] = round(time.monotonic() - t0, 2)

    t0 = time.monotonic()
    progress("validating the fleet spec")
    spec = fleet_spec.load(spec_path)
    if family == "debian":
        for gs in spec.guests:
            gs.memory_mib = max(gs.memory_mib or 0, DEBIAN_MEMORY_MIB)
    _cleanup(ctx, spec)
    phase("validate", t0)
    try:
        t0 = time.monotonic()
        progress(f"building golden image {V1} in a hidden builder (capture: disk + memory)")
        _build_golden(ctx, V1, f"{family}:v1", progress)
        phase("build v1", t0)

        t0 = time.monotonic()
        progress("provisioning 3 guests as overlays on the shared base")
        fleet_spec.check_images(ctx, spec)
        reconcile.up(ctx, spec, progress=progress)
        phase("provision", t0)

        t0 = time.monotonic()
        progress("starting the application on each guest")
        for gs in spec.guests:
            g = guests.load(ctx, gs.name)
            if guests.wait_app(g.app_port, 120) is None:
                raise SwapError(f"{g.name}: the demo application did not start")
            for _ in range(REQUESTS):
                guests.app_counter(g.app_port)
        phase("application", t0)

        t0 = time.monotonic()
        progress(f"building golden image {V2}")
        _build_golden(ctx, V2, f"{family}:v2", progress)
        phase("build v2", t0)

        t0 = time.monotonic()
        progress("rolling warm swap v1 -> v2, batch 1")
        plan = swap.plan(ctx, [g.name for g in spec.guests], V2, "warm", batch=1, max_failures=1)
        before = {gs.name: guests.app_answer(guests.load(ctx, gs.name).app_port) for gs in spec.guests}
        results = swap.rollout(ctx, plan, progress=progress)
        phase("rolling swap", t0)

        for r, gs in zip(results, spec.guests, strict=True):
            g = guests.load(ctx, r.guest)
            rep.guests.append(GuestReport(
                guest=r.guest, hostname=gs.custom.hostname, old_version=r.old_version, new_version=r.new_version,
                downtime=r.downtime, counter_before=r.counter_before, counter_after=r.counter_after,
                overlay_bytes=qemu_img.allocated_bytes(g.overlay(ctx)), ok=r.ok, error=r.error,
                app_before=before.get(r.guest), app_after=guests.app_answer(g.app_port),
                processes=[f"{p['name']} {p['outcome']}" + (f": {p['reason']}" if p.get("reason") else "")
                           for p in r.processes]))
        rep.lineage = [{"name": i.name, "kind": i.kind, "source": i.source, "parent": i.parent,
                        "os_version": i.os_version, "memory_state": i.has_memory_state}
                       for i in catalog.list_images(ctx) if i.name in (V1, V2)]
    finally:
        if not keep:
            t0 = time.monotonic()
            progress("removing everything the demo created")
            _cleanup(ctx, spec)
            rep.leftovers = leftovers(ctx, spec)
            phase("cleanup", t0)
    rep.kept = keep
    rep.phases["total"] = round(time.monotonic() - t_all, 2)
    return rep


def as_dict(rep: DemoReport) -> dict[str, Any]:
    return {**asdict(rep), "ok": rep.ok}
