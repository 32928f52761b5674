"""The warm swap (the design's invention): page the new OS's captured memory state in, no boot at all.

See ``swap/__init__.py`` for the whole story and what libvirt taught us.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid as uuidlib
from dataclasses import asdict
from pathlib import Path

from .. import guests, hosts
from ..cluster.store import Lease
from ..context import Context
from ..customize import Carry, live_script
from ..errors import ClusterError, GuestError, OsimgError, SwapError
from ..failpoints import failpoint
from ..images import catalog
from ..process import Progress
from . import checkpoints, journal, staging
from .steps import (
    PAGEIN_FILE,
    ROLLBACK_SNAPSHOT,
    LastAnswer,
    SwapResult,
    carried,
    checkpoint_token,
    data_mount,
    finish,
    guest_sh,
    health,
    held,
    mark,
    moved,
    new_overlay_name,
    page_in_file,
    preparing,
    quiesce,
    record_trees,
    reseed,
    roll_back,
    start_workload,
    step,
)


def cache(path: Path) -> None:
    """Ask the kernel to read a page-in file into the page cache now, not inside the downtime."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def warm(ctx: Context, g: guests.Guest, target: catalog.BootImage, res: SwapResult, progress: Progress,
         health_timeout: float, lease: Lease) -> None:
    t0 = time.monotonic()
    gdir = g.dir(ctx)
    old = guests.Guest(**asdict(g))
    new_overlay = new_overlay_name(target.ref)
    if target.state_file is None:
        raise SwapError(f"image {target.ref} has no memory state")
    new = moved(g, target, new_overlay, paged_in=True)
    staged = staging.possible(g)
    files = [new_overlay, PAGEIN_FILE, *(staging.FILES if staged else [])]
    journal.begin(ctx, lease, g.name, strategy="warm", from_image=g.image, to_image=target.ref, old=asdict(old),
                  new=asdict(new), files=files, snapshot=ROLLBACK_SNAPSHOT, holder=lease.fence.holder,
                  started=time.time())
    failpoint("warm-preparing")
    # everything that costs time happens before the application stops
    where = g.files(ctx)
    with preparing(ctx, lease, where, files, g.name, "warm"):
        progress(f"{g.name}: preparing page-in of {target.ref}")
        where.create_overlay(new_overlay, hosts.image_path(ctx, g.host, str(target.disk)))
        failpoint("warm-overlay-created")
        # which process trees can be carried, and the fingerprint of the files they run
        token = checkpoint_token(new_overlay) or ""
        mount = data_mount(g)
        candidates = carried(g)
        ready: list[Carry] = []
        prints: dict[str, list[str]] = {}
        judged: set[str] = set()  # trees whose files the host compared in the target image, every one
        if mount and candidates:
            out = guest_sh(ctx, g, checkpoints.prepare_script(candidates, mount, token), "preparing the checkpoints")
            record_trees(g, res, out)
            found, prints = checkpoints.ready(out), checkpoints.fingerprints(out)
            for t in (t for t in candidates if t.name in found):
                whole, differs = checkpoints.target_differs(target.disk, prints.get(t.name, []))
                if whole:
                    judged.add(t.name)
                if differs is None:
                    ready.append(t)
                else:
                    record_trees(g, res, f"carry {t.name} restarted the target image's {differs} differs\n")
        machine_id = uuidlib.uuid4().hex
        if staged:
            progress(f"{g.name}: staging {target.ref} with the guest's settings")
            # the files the carried trees run, read once in the staging domain: in the staged state's
            # page cache, the fingerprint check and CRIU's restore in the window do not wait for the disk
            staging.stage(ctx, new, target, machine_id,
                          read_ahead=[f for t in ready for f in checkpoints.paths(prints.get(t.name, []))])
        else:
            page_in_file(ctx, target.state_file, where, PAGEIN_FILE, guests.domain_spec(ctx, new))
        failpoint("warm-pagein-written")
        if isinstance(where, hosts.LocalFiles):
            cache(gdir / PAGEIN_FILE)
        held(ctx, g, res)
        res.counter_before = guests.app_counter(g.app_port)
        mark(ctx, lease, g.name, journal.PREPARED)
        failpoint("warm-prepared")
    step(res, "prepare", t0)

    down = time.monotonic()
    watch = LastAnswer(g.app_port, down) if res.counter_before is not None else None
    try:
        progress(f"{g.name}: quiesce")
        # The old OS lets go of the data volume first: its page cache of /data must not survive
        # into a rollback after the new OS has written there.
        mark(ctx, lease, g.name, "releasing")
        failpoint("warm-releasing")
        quiesce(ctx, g, res, ready, token, scanned=True, flush=False)
        if watch is not None:
            down = watch.stop()  # the application's downtime starts at its last answer
        step(res, "release", t0)
        data_disk = guests.data_disk(ctx, g)
        if data_disk is not None:
            ctx.hv.detach_disk(g.name, data_disk)
        step(res, "detach", t0)
        mark(ctx, lease, g.name, "released")
        failpoint("warm-released")
        # no fsfreeze (two agent round trips): the internal snapshot of a paused guest holds its
        # memory and its disk at one instant, and a rollback resumes exactly that memory
        ctx.hv.suspend(g.name)
        mark(ctx, lease, g.name, "quiesced")
        failpoint("warm-quiesced")
        step(res, "quiesce", t0)
        progress(f"{g.name}: page out old OS")
        ctx.hv.snapshot_create(g.name, ROLLBACK_SNAPSHOT)
        failpoint("warm-snapshot-taken")
        mark(ctx, lease, g.name, "paged-out")
        failpoint("warm-paged-out")
        step(res, "page-out", t0)
        progress(f"{g.name}: page in {target.ref}")
        ctx.hv.destroy(g.name)
        failpoint("warm-old-destroyed")
        step(res, "destroy", t0)
        ctx.hv.restore(where.path(PAGEIN_FILE))
        mark(ctx, lease, g.name, "paged-in")
        failpoint("warm-paged-in")
        step(res, "page-in", t0)
        # before anything else runs in the guest: it resumed with the golden state's RNG and clock
        reseeded = reseed(ctx, g.name)
        if reseeded:
            step(res, "reseed", t0)
        else:
            with contextlib.suppress(OsimgError):
                ctx.hv.agent(g.name, "guest-set-time", {"time": time.time_ns()}, timeout=5)
        if data_disk is not None and not staged:  # a staged page-in has it already (swap.staging)
            ctx.hv.attach_disk(g.name, data_disk)
        failpoint("warm-data-attached")
        step(res, "attach", t0)
        progress(f"{g.name}: customize and start the application")
        # the guest's own host key (the golden state presents the builder's) and a new machine-id,
        # in the same agent call as the rest of the customization, before anything connects over SSH
        # carried process trees come back right after the mounts, before anything else touches /data
        dumped = {p["name"] for p in res.processes if p.get("dump_seconds") is not None}
        trees = [t for t in ready if t.name in dumped]
        restore = checkpoints.restore_script(trees, mount, token, judged) if trees and mount else ""
        # staged: only what needs the data volume is left (swap.staging)
        out = guest_sh(ctx, new, live_script(new.custom(), new.name, new.data_uuid, new.own_key(ctx), machine_id,
                                             after_mounts=restore, part="data" if staged else "all"),
                       "live customization", agent_up=reseeded)
        record_trees(new, res, out)
        start_workload(ctx, new)
        mark(ctx, lease, g.name, "customized")
        failpoint("warm-customized")
        step(res, "customize", t0)
        first = (guests.wait_app(new.app_port, timeout=health_timeout, poll=0.02)
                 if res.counter_before is not None else 0)
        res.downtime = round(time.monotonic() - down, 3)
        if first is None:
            raise GuestError(f"{g.name}: the application does not answer on the new OS")
        res.counter_after = health(ctx, new, target.os_version, res.counter_before, health_timeout)
        step(res, "health", t0)
    except ClusterError:
        raise  # the store failed or the lease is lost: stop where we stand, the journal stays for resume
    except Exception as err:  # whatever failed in the window, the guest must get its OS back
        roll_back(ctx, lease, res, old, new_overlay, err, progress)
        return
    finally:
        if watch is not None:
            watch.stop()
    finish(ctx, lease, res, old, new, t0)
    if res.ok and mount and res.processes:
        # outside the downtime: resumed trees get a scope of their own, the checkpoints go
        with contextlib.suppress(OsimgError):
            guest_sh(ctx, new, checkpoints.cleanup_script(candidates, mount), "removing the checkpoints")
