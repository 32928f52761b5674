"""The cold swap (the baseline): shut down, fresh overlay on the new base, boot."""

from __future__ import annotations

import time
from dataclasses import asdict

from .. import guests
from ..context import Context
from ..errors import OsimgError
from ..host import qemu_img
from ..images import catalog
from ..process import Progress, holder_id
from . import journal
from .steps import (
    SwapResult,
    finish,
    health,
    moved,
    new_overlay_name,
    persistent_xml,
    quiesce,
    roll_back,
    start_workload,
    step,
)


def cold(ctx: Context, g: guests.Guest, target: catalog.BootImage, res: SwapResult, progress: Progress,
          health_timeout: float) -> None:
    t0 = time.monotonic()
    old = guests.Guest(**asdict(g))
    new_overlay = new_overlay_name(target.ref)
    qemu_img.create_overlay(g.dir(ctx) / new_overlay, target.disk)
    new = moved(g, target, new_overlay)
    res.counter_before = guests.app_counter(g.app_port)
    journal.write(ctx, g.name, guest=g.name, strategy="cold", step="prepared", from_image=g.image, to_image=target.ref,
             old=asdict(old), new=asdict(new), holder=holder_id(), started=time.time())
    down = time.monotonic()
    try:
        progress(f"{g.name}: quiesce")
        # a workload that keeps writing through the shutdown would write onto the old root file system
        quiesce(ctx, g, res)
        step(res, "quiesce", t0)
        progress(f"{g.name}: shut down")
        ctx.hv.shutdown(g.name)
        journal.write(ctx, g.name, step="stopped")
        step(res, "shutdown", t0)
        progress(f"{g.name}: boot {target.ref}")
        g.console(ctx).unlink(missing_ok=True)
        ctx.hv.define(persistent_xml(ctx, new))
        ctx.hv.start(g.name)
        journal.write(ctx, g.name, step="booted")
        guests.wait_ready(ctx, new, timeout=health_timeout)
        start_workload(ctx, new)
        step(res, "boot", t0)
        n = health(ctx, new, target.os_version, res.counter_before, health_timeout)
        res.downtime = round(time.monotonic() - down, 3)
        res.counter_after = n
        step(res, "health", t0)
    except OsimgError as err:
        roll_back(ctx, res, old, new_overlay, err, progress)
        return
    finish(ctx, res, old, new, t0)


