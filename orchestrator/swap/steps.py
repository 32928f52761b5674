"""What both swap strategies share: the result, health check, guest commands, commit and rollback."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import guests
from ..cluster.events import Event
from ..cluster.store import Lease
from ..context import Context
from ..customize import live_script
from ..errors import ClusterError, GuestError, OsimgError, SwapError
from ..failpoints import failpoint
from ..host.domain import domain_xml
from ..images import catalog
from ..process import Progress
from . import journal

ROLLBACK_SNAPSHOT = "osimg-rollback"
PAGEIN_FILE = "pagein.sav"
RESUME_HINT = "run 'osimg swap --resume'"


@dataclass
class SwapResult:
    guest: str
    strategy: str
    from_image: str
    to_image: str
    old_version: str
    new_version: str | None = None
    ok: bool = False
    rolled_back: bool = False
    skipped: bool = False
    downtime: float | None = None
    counter_before: int | None = None
    counter_after: int | None = None
    error: str | None = None
    steps: dict[str, float] = field(default_factory=dict)



RELEASE_DATA = """
/usr/sbin/osimg-app stop
sync
# requests already being served finish first: retry for up to 2 s while /data is busy
n=0
while grep -q " /data " /proc/mounts && ! umount /data 2>/dev/null; do
  n=$((n+1)); [ $n -gt 40 ] && { /usr/sbin/osimg-app start; echo "/data stays busy" >&2; exit 1; }
  sleep 0.05
done
"""



def step(res: SwapResult, name: str, t0: float) -> None:
    res.steps[name] = round(time.monotonic() - t0, 3)


def new_overlay_name(image: str) -> str:
    return f"os-{image}-{uuidlib.uuid4().hex[:6]}.qcow2"


def health(ctx: Context, g: guests.Guest, version: str, counter_before: int | None,
            timeout: float) -> int | None:
    """SSH with the pinned key, the expected OS version, and the application's counter not lower."""
    with guests.session(ctx, g, timeout=timeout) as s:
        osr = s.run(["cat", "/etc/os-release"], check=True).out
    if f"VERSION_ID={version}" not in osr and f'VERSION_ID="{version}"' not in osr:
        raise GuestError(f"{g.name}: /etc/os-release does not show version {version}")
    if counter_before is None:
        return None  # no application answered before the swap: nothing to compare
    n = guests.wait_app(g.app_port, timeout=min(timeout, 30))
    if n is None:
        raise GuestError(f"{g.name}: the application does not answer on 127.0.0.1:{g.app_port}")
    if counter_before is not None and n < counter_before:
        raise GuestError(f"{g.name}: the application's counter went back from {counter_before} to {n}")
    return n


def guest_sh(ctx: Context, g: guests.Guest, script: str, what: str, timeout: float = 120) -> str:
    """Run a shell script in the guest through the agent (fast) or, without one, over SSH."""
    if ctx.hv.agent_ping(g.name, timeout=2):
        rc, out, err = ctx.hv.guest_exec(g.name, ["/bin/sh", "-s"], stdin=script, timeout=timeout)
    else:
        with guests.session(ctx, g, timeout=timeout) as s:
            r = s.script(script, timeout=timeout)
        rc, out, err = r.rc, r.out, r.err
    if rc != 0:
        raise GuestError(f"{g.name}: {what} failed ({rc}): {(err or out).strip()[-300:]}")
    return out


def moved(g: guests.Guest, target: catalog.BootImage, overlay: str) -> guests.Guest:
    """The guest's record as it will be on the target image."""
    return guests.Guest(**{**asdict(g), "image": target.ref, "base": str(target.disk),
                               "kernel": str(target.kernel), "initrd": str(target.initrd), "cmdline": target.cmdline,
                               "host_key": target.host_key, "os_version": target.os_version, "family": target.family,
                               "ready_marker": target.ready_marker, "overlay_file": overlay})


def describe(err: BaseException) -> str:
    """An error as one line: osimg's own errors say enough, others (OSError...) get their type."""
    return str(err) if isinstance(err, OsimgError) else f"{type(err).__name__}: {err}"


class Interrupted(SwapError):
    """SIGINT or SIGTERM arrived during a swap: it stops at the next step and rolls back."""


class Signals:
    """SIGINT/SIGTERM during a rollout: remembered, acted on at the next step boundary.

    A signal must not cut a step in half (a guest paused with its data disk detached, a page-in
    half done): the handler only records it; ``mark`` raises Interrupted at the next journaled
    step, which rolls the swap back like any failure, and no further guest is started.
    """

    def __init__(self) -> None:
        self.received: str | None = None

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted(f"interrupted by {self.received}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[Signals]:
        """Install the handlers for the block (main thread only: Python delivers signals there)."""
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, _frame: object) -> None:
            self.received = self.received or signal.Signals(signum).name

        saved = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in saved.items():
                signal.signal(s, h)


SIGNALS = Signals()


def mark(ctx: Context, lease: Lease, name: str, step: str) -> None:
    """Journal that the swap moves on to ``step`` (fenced); a pending signal stops it here instead."""
    SIGNALS.check()
    journal.write(ctx, lease, name, step=step)


def discard(ctx: Context, lease: Lease, gdir: Path, files: list[str], name: str) -> None:
    """Remove what a swap prepared before its downtime window, then its journal entry."""
    for f in files:
        (gdir / f).unlink(missing_ok=True)
    failpoint("discard-files-removed")
    journal.drop(ctx, lease, name)


def roll_back(ctx: Context, lease: Lease, res: SwapResult, old: guests.Guest, new_overlay: str,
              err: BaseException, progress: Progress) -> None:
    """A failure in the downtime window: roll back; if that fails too, report both and keep the journal."""
    res.error = f"{res.strategy} swap failed: {describe(err)}"
    res.downtime = None
    progress(f"{old.name}: rolling back ({describe(err)})")
    try:
        rollback(ctx, lease, old, new_overlay)
    except Exception as err2:  # any failure of the rollback must be reported with the first
        res.error += f"; the rollback failed too: {describe(err2)}; the journal is kept: {RESUME_HINT}"
        return
    res.rolled_back = True
    res.counter_after = guests.app_counter(old.app_port)


def finish(ctx: Context, lease: Lease, res: SwapResult, old: guests.Guest, new: guests.Guest, t0: float) -> None:
    try:
        commit(ctx, lease, old, new)
    except ClusterError:
        raise
    except Exception as err:  # the new OS passed its checks: a resume finishes the commit, never rolls back
        res.error = f"{res.strategy} swap passed its checks but its commit failed: {describe(err)}; " \
                    f"the journal is kept: {RESUME_HINT}"
        return
    res.ok = True
    res.new_version = new.os_version
    step(res, "commit", t0)


def persistent_xml(ctx: Context, g: guests.Guest) -> str:
    return domain_xml(guests.domain_spec(ctx, g))


def commit(ctx: Context, lease: Lease, old: guests.Guest, new: guests.Guest) -> None:
    """Make the new OS permanent: next-boot definition, record, cleanup of the old delta.

    ``committing`` is journaled before anything of the old OS goes; every operation after it is
    idempotent, so a resume rolls forward by running this again.
    """
    gdir = new.dir(ctx)
    journal.write(ctx, lease, new.name, step=journal.COMMITTING)
    failpoint("commit-committing")
    ctx.hv.define(persistent_xml(ctx, new))
    failpoint("commit-defined")
    # the snapshot's data lives in the old overlay, which goes away with it
    ctx.hv.snapshot_delete(new.name, ROLLBACK_SNAPSHOT, metadata_only=True)
    failpoint("commit-snapshot-dropped")
    new.save(ctx)
    failpoint("commit-record-saved")
    (gdir / PAGEIN_FILE).unlink(missing_ok=True)
    failpoint("commit-pagein-removed")
    if old.overlay_file != new.overlay_file:
        old.overlay(ctx).unlink(missing_ok=True)
    failpoint("commit-old-overlay-removed")
    journal.drop(ctx, lease, new.name)
    publish(ctx, new.name, old.image, new.image)


def publish(ctx: Context, guest: str, old: str, new: str) -> None:
    with contextlib.suppress(OsimgError, ValueError):
        ctx.store.publish(Event(kind="lifecycle", type="swapped", obj=f"guest/{guest}",
                                data={"from": old, "to": new}))


def rollback(ctx: Context, lease: Lease, old: guests.Guest, new_overlay: str | None) -> None:
    """Bring the guest back on its old OS with its data; idempotent, so it also serves ``resume``.

    Journaled as ``rolling-back`` (keeping the step it started from) before it acts. Refuses a swap
    that reached ``committing``: the old OS may already be gone, only rolling forward is safe.
    """
    gdir = old.dir(ctx)
    rec = journal.get(ctx, old.name) or {}
    step = str(rec.get("rollback_from") or rec.get("step", ""))
    if step == journal.COMMITTING:
        raise SwapError(f"{old.name}: the swap reached 'committing'; it can only be finished: {RESUME_HINT}")
    journal.write(ctx, lease, old.name, step=journal.ROLLING_BACK, rollback_from=step)
    failpoint("rollback-started")
    exists = ctx.hv.exists(old.name)
    if exists and ctx.hv.has_snapshot(old.name, ROLLBACK_SNAPSHOT):
        # paged out: page the old OS back in from its snapshot (memory and disk as they were)
        ctx.hv.destroy(old.name)
        failpoint("rollback-new-destroyed")
        ctx.hv.define(persistent_xml(ctx, old))
        ctx.hv.snapshot_revert(old.name, ROLLBACK_SNAPSHOT)
        failpoint("rollback-reverted")
        ctx.hv.snapshot_delete(old.name, ROLLBACK_SNAPSHOT)
        # a resume from here must not boot the old OS again: its memory state is back
        journal.write(ctx, lease, old.name, rollback_from=journal.OLD_OS_BACK)
        failpoint("rollback-snapshot-removed")
    elif exists and ctx.hv.is_active(old.name) and step in journal.BEFORE_PAGE_OUT:
        pass  # never left the old OS
    else:
        # cold swap, or nothing to page back in: boot the old OS again
        ctx.hv.destroy(old.name)
        old.console(ctx).unlink(missing_ok=True)
        ctx.hv.define(persistent_xml(ctx, old))
        ctx.hv.start(old.name)
        failpoint("rollback-old-booted")
        guests.wait_ready(ctx, old)
        journal.write(ctx, lease, old.name, rollback_from=journal.OLD_OS_BACK)
    if ctx.hv.state(old.name) == "paused":
        ctx.hv.resume(old.name)
    with contextlib.suppress(OsimgError):
        ctx.hv.fs_thaw(old.name)
    data_disk = guests.data_disk(ctx, old)
    if data_disk is not None and str(data_disk.path) not in ctx.hv.xml(old.name):
        ctx.hv.attach_disk(old.name, data_disk)
    failpoint("rollback-data-attached")
    guest_sh(ctx, old, live_script(old.custom(), old.name, old.data_uuid), "re-attaching data and application")
    ctx.hv.define(persistent_xml(ctx, old))
    old.save(ctx)
    failpoint("rollback-record-saved")
    if new_overlay and new_overlay != old.overlay_file:
        (gdir / new_overlay).unlink(missing_ok=True)
    failpoint("rollback-overlay-removed")
    (gdir / PAGEIN_FILE).unlink(missing_ok=True)
    journal.drop(ctx, lease, old.name)


def stopped_by_store(ctx: Context, err: ClusterError, name: str) -> str:
    """What to tell when the store fails or the lease is lost mid-swap: nothing more was done."""
    step = ""
    with contextlib.suppress(OsimgError):
        step = str((journal.get(ctx, name) or {}).get("step", ""))
    return f"{err}; the swap of {name} stopped where it stood{f' (step {step})' if step else ''} " \
           f"and its journal is kept: {RESUME_HINT}"
