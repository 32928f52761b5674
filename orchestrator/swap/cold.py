"""The cold swap (the baseline): shut down, fresh overlay on the new base, boot."""

from __future__ import annotations

import time
from dataclasses import asdict

from .. import guests, hosts
from ..cluster.store import Lease
from ..context import Context
from ..errors import ClusterError, GuestError
from ..failpoints import failpoint
from ..images import catalog
from ..process import Progress
from . import journal
from .steps import (
    SwapResult,
    finish,
    health,
    mark,
    moved,
    new_overlay_name,
    persistent_xml,
    preparing,
    quiesce,
    roll_back,
    start_workload,
    step,
)


def cold(ctx: Context, g: guests.Guest, target: catalog.BootImage, res: SwapResult, progress: Progress,
         health_timeout: float, lease: Lease) -> None:
    t0 = time.monotonic()
    old = guests.Guest(**asdict(g))
    new_overlay = new_overlay_name(target.ref)
    new = moved(g, target, new_overlay)
    journal.begin(ctx, lease, g.name, strategy="cold", from_image=g.image, to_image=target.ref, old=asdict(old),
                  new=asdict(new), files=[new_overlay], holder=lease.fence.holder, started=time.time())
    failpoint("cold-preparing")
    where = g.files(ctx)
    with preparing(ctx, lease, where, [new_overlay], g.name, "cold"):
        where.create_overlay(new_overlay, hosts.image_path(ctx, g.host, str(target.disk)))
        failpoint("cold-overlay-created")
        res.counter_before = guests.app_counter(g.app_port)
        mark(ctx, lease, g.name, journal.PREPARED)
        failpoint("cold-prepared")
    down = time.monotonic()
    try:
        # journaled first: a resume from 'prepared' only removes files and expects the workload running
        mark(ctx, lease, g.name, "stopping")
        failpoint("cold-stopping")
        progress(f"{g.name}: quiesce")
        # a workload that keeps writing through the shutdown would write onto the old root file system
        quiesce(ctx, g, res)
        step(res, "quiesce", t0)
        progress(f"{g.name}: shut down")
        ctx.hv.shutdown(g.name)
        mark(ctx, lease, g.name, "stopped")
        failpoint("cold-stopped")
        step(res, "shutdown", t0)
        progress(f"{g.name}: boot {target.ref}")
        where.unlink(guests.CONSOLE)
        ctx.hv.define(persistent_xml(ctx, new))
        failpoint("cold-defined")
        ctx.hv.start(g.name)
        mark(ctx, lease, g.name, "booted")
        failpoint("cold-booted")
        # the downtime ends at the application's first answer (the image starts it at boot), as a
        # warm swap's; the ready marker, SSH and the health check follow
        if res.counter_before is not None:
            if guests.wait_app(new.app_port, timeout=health_timeout, poll=0.02, request_timeout=1.0) is None:
                raise GuestError(f"{g.name}: the application does not answer on the new OS")
            res.downtime = round(time.monotonic() - down, 3)
        guests.wait_ready(ctx, new, timeout=health_timeout)
        start_workload(ctx, new)
        step(res, "boot", t0)
        n = health(ctx, new, target.os_version, res.counter_before, health_timeout)
        if res.downtime is None:
            res.downtime = round(time.monotonic() - down, 3)
        res.counter_after = n
        step(res, "health", t0)
    except ClusterError:
        raise  # the store failed or the lease is lost: stop where we stand, the journal stays for resume
    except Exception as err:  # whatever failed in the window, the guest must get its OS back
        roll_back(ctx, lease, res, old, new_overlay, err, progress)
        return
    finish(ctx, lease, res, old, new, t0)
