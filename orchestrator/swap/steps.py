"""What both swap strategies share: the result, health check, guest commands, commit and rollback."""

from __future__ import annotations

import contextlib
import os
import struct
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field

from .. import guests
from ..cluster.events import Event
from ..context import Context
from ..customize import live_script
from ..errors import GuestError, OsimgError
from ..host.domain import domain_xml
from ..images import catalog
from ..process import Progress
from . import journal

ROLLBACK_SNAPSHOT = "osimg-rollback"
PAGEIN_FILE = "pagein.sav"
RESEED_HELPER = "/usr/sbin/osimg-reseed"  # images/common/reseed, built into every guest image
RESEED_BYTES = 64
# For the experiment in the README only (are restored RNG states really identical?): "1" skips the
# reseed. Never set it in production: guests paged in from one state then share their RNG output.
NO_RESEED_ENV = "OSIMG_EXPERIMENT_NO_RESEED"


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


def guest_sh(ctx: Context, g: guests.Guest, script: str, what: str, timeout: float = 120,
             agent_up: bool = False) -> str:
    """Run a shell script in the guest through the agent (fast) or, without one, over SSH.
    ``agent_up``: the agent just answered, so skip asking it (one round trip less in a downtime)."""
    if agent_up or ctx.hv.agent_ping(g.name, timeout=2):
        rc, out, err = ctx.hv.guest_exec(g.name, ["/bin/sh", "-s"], stdin=script, timeout=timeout)
    else:
        with guests.session(ctx, g, timeout=timeout) as s:
            r = s.script(script, timeout=timeout)
        rc, out, err = r.rc, r.out, r.err
    if rc != 0:
        raise GuestError(f"{g.name}: {what} failed ({rc}): {(err or out).strip()[-300:]}")
    return out


def reseed(ctx: Context, name: str, agent_timeout: float = 10) -> bool:
    """Push fresh host entropy into a just paged-in guest's RNG, force an immediate CRNG reseed and
    set the guest's clock (stopped when the state was saved) to the host's.

    A memory state restored into many guests resumes them all with one RNG state, so without this
    they would draw the same "random" bytes (keys, nonces, TCP sequence numbers). The Debian 6.1
    cloud kernel has no CONFIG_VMGENID, so the guest does not notice the new generation ID itself:
    the host does it, through the guest agent (a channel only the host has), with one guest-exec of
    the image's static helper (RNDADDENTROPY + RNDRESEEDCRNG, then clock_settime), before anything
    else runs in the guest. The agent reconnects a moment after a restore: until ``agent_timeout``
    the call is retried while the agent does not answer (a repeated reseed is harmless). Returns
    False when switched off for the experiment (NO_RESEED_ENV).
    """
    if os.environ.get(NO_RESEED_ENV) == "1":
        return False
    deadline = time.monotonic() + agent_timeout
    agent_was_up = False
    while True:
        data = os.urandom(RESEED_BYTES) + struct.pack("<q", time.time_ns())
        try:
            rc, _, err = ctx.hv.guest_exec(name, [RESEED_HELPER], stdin=data, timeout=10)
            break
        except OsimgError as e:
            # an agent that answered and still cannot run the helper (an image captured before the
            # helper existed) will not do better later: fail on the second such try, the swap rolls back
            up = ctx.hv.agent_ping(name, timeout=1)
            if time.monotonic() > deadline or (up and agent_was_up):
                raise GuestError(f"{name}: could not reseed the guest's RNG through the agent ({e}); the image "
                                 f"needs {RESEED_HELPER} and a running guest agent (rebuild it with this osimg)"
                                 ) from None
            agent_was_up = agent_was_up or up
            time.sleep(0.02)
    if rc != 0:
        raise GuestError(f"{name}: reseeding the guest's RNG failed ({rc}): {err.strip()[-200:]}")
    return True


def moved(g: guests.Guest, target: catalog.BootImage, overlay: str) -> guests.Guest:
    """The guest's record as it will be on the target image."""
    return guests.Guest(**{**asdict(g), "image": target.ref, "base": str(target.disk),
                               "kernel": str(target.kernel), "initrd": str(target.initrd), "cmdline": target.cmdline,
                               "host_key": g.host_key if g.own_host_key else target.host_key,
                               "os_version": target.os_version, "family": target.family,
                               "ready_marker": target.ready_marker, "overlay_file": overlay})


def roll_back(ctx: Context, res: SwapResult, old: guests.Guest, new_overlay: str, err: OsimgError,
               progress: Progress) -> None:
    res.error = f"{res.strategy} swap failed: {err}"
    res.downtime = None
    progress(f"{old.name}: rolling back ({err})")
    rollback(ctx, old, new_overlay)
    res.rolled_back = True
    res.counter_after = guests.app_counter(old.app_port)


def finish(ctx: Context, res: SwapResult, old: guests.Guest, new: guests.Guest, t0: float) -> None:
    commit(ctx, old, new)
    res.ok = True
    res.new_version = new.os_version
    step(res, "commit", t0)


def persistent_xml(ctx: Context, g: guests.Guest) -> str:
    return domain_xml(guests.domain_spec(ctx, g))


def commit(ctx: Context, old: guests.Guest, new: guests.Guest) -> None:
    """Make the new OS permanent: next-boot definition, record, cleanup of the old delta."""
    gdir = new.dir(ctx)
    ctx.hv.define(persistent_xml(ctx, new))
    # the snapshot's data lives in the old overlay, which goes away with it
    ctx.hv.snapshot_delete(new.name, ROLLBACK_SNAPSHOT, metadata_only=True)
    new.save(ctx)
    (gdir / PAGEIN_FILE).unlink(missing_ok=True)
    if old.overlay_file != new.overlay_file:
        old.overlay(ctx).unlink(missing_ok=True)
    journal.drop(ctx, new.name)
    publish(ctx, new.name, old.image, new.image)


def publish(ctx: Context, guest: str, old: str, new: str) -> None:
    with contextlib.suppress(OsimgError, ValueError):
        ctx.store.publish(Event(kind="lifecycle", type="swapped", obj=f"guest/{guest}",
                                data={"from": old, "to": new}))


def rollback(ctx: Context, old: guests.Guest, new_overlay: str | None) -> None:
    """Bring the guest back on its old OS with its data; idempotent, so it also serves ``resume``."""
    gdir = old.dir(ctx)
    step = (journal.get(ctx, old.name) or {}).get("step", "")
    exists = ctx.hv.exists(old.name)
    if exists and ctx.hv.has_snapshot(old.name, ROLLBACK_SNAPSHOT):
        # paged out: page the old OS back in from its snapshot (memory and disk as they were)
        ctx.hv.destroy(old.name)
        ctx.hv.define(persistent_xml(ctx, old))
        ctx.hv.snapshot_revert(old.name, ROLLBACK_SNAPSHOT)
        # a revert is a page-in too: the old OS resumes with the RNG state it was snapshotted with
        with contextlib.suppress(OsimgError):
            reseed(ctx, old.name)
        ctx.hv.snapshot_delete(old.name, ROLLBACK_SNAPSHOT)
    elif exists and ctx.hv.is_active(old.name) and step in ("prepared", "releasing", "released", "quiesced"):
        pass  # never left the old OS
    else:
        # cold swap, or nothing to page back in: boot the old OS again
        ctx.hv.destroy(old.name)
        old.console(ctx).unlink(missing_ok=True)
        ctx.hv.define(persistent_xml(ctx, old))
        ctx.hv.start(old.name)
        guests.wait_ready(ctx, old)
    if ctx.hv.state(old.name) == "paused":
        ctx.hv.resume(old.name)
    with contextlib.suppress(OsimgError):
        ctx.hv.fs_thaw(old.name)
    data_disk = guests.data_disk(ctx, old)
    if data_disk is not None and str(data_disk.path) not in ctx.hv.xml(old.name):
        ctx.hv.attach_disk(old.name, data_disk)
    guest_sh(ctx, old, live_script(old.custom(), old.name, old.data_uuid, old.own_key(ctx)),
             "re-attaching data and application")
    ctx.hv.define(persistent_xml(ctx, old))
    old.save(ctx)
    if new_overlay and new_overlay != old.overlay_file:
        (gdir / new_overlay).unlink(missing_ok=True)
    (gdir / PAGEIN_FILE).unlink(missing_ok=True)
    journal.drop(ctx, old.name)


