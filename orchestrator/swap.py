"""Quiesce-swap-resume: replace the OS of running guests, warm or cold, with health checks and rollback.

**warm** (the invention): the target image was captured with its memory state. For guest G:
prepare G's own page-in file (the golden state carrying G's identity) and a fresh overlay on the
new base; quiesce G (stop its application, unmount and detach its data volume, guest-agent
fsfreeze, suspend); page out the old OS into an internal snapshot of its own overlay (memory and
disk, for rollback); page in the golden state; hot-attach G's data volume; apply G's
customization live through the guest agent; start G's application; verify; commit or roll back.

**cold** (the baseline): shut G down, put a fresh overlay on the new base under it, boot (the
config drive re-applies G's customization and the image starts the application), verify.

What we learned from libvirt 9.0 while building this:

- Restoring a saved state with changed XML runs libvirt's ABI check, which treats the domain
  UUID as guest-visible and refuses a different one ("Target domain uuid ... does not match
  source"). Paging one golden state into many guests therefore uses a per-guest copy of the save
  file whose embedded XML carries that guest's name, UUID, disks, console log and port forwards
  (``hypervisor.retarget_saved_state``). The copy is made before the guest is quiesced, so it
  costs no downtime. The device model, MAC and PCI layout stay exactly as saved.
- A restored state needs the very disk it was saved with: each swap gives the guest a *fresh*
  overlay on the new base (``os-<image>-<id>.qcow2``); the old overlay stays untouched for rollback.
- The golden state has no data volume and no config drive: the data volume is hot-plugged after
  page-in, the config drive only returns in the persistent definition (for cold boots).
- Paging the old OS out with ``virDomainSave`` took ~2 s for a 256 MiB TCG guest; an internal
  snapshot (QEMU savevm into the qcow2 overlay; the read-only config drive is skipped) takes
  ~0.4 s and ``revertToSnapshot`` brings the old OS back for a rollback. The data volume is
  detached first so the snapshot never covers it and a rollback cannot rewind the data.
- Tearing down a domain costs ~1.6 s on this host even after SIGKILL (libvirt's cleanup), and it
  sits inside the downtime window; it dominates what remains of the warm downtime here.
- A cold swap cannot carry the old overlay's blocks onto another base safely (they describe
  the old filesystem's layout), so it too starts from a fresh overlay: a guest's own state lives
  in its data volume and its customization, which both strategies keep.

Every step is written to a journal in the cluster store (kind ``swap``) and one guest is never
swapped twice at once (a store lock with a lease). ``resume()`` finishes or rolls back whatever a
killed orchestrator left behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from . import images, partitions, storage
from .context import Context
from .customize import Customization
from .errors import GuestError, OsimgError, SwapError, ValidationError
from .hypervisor import DiskSpec, retarget_saved_state, rewrite_identity

JOURNAL = "swap"
STRATEGIES = ("warm", "cold")
LOCK_TTL = 10.0  # refreshed while a swap runs; a killed orchestrator frees it after this
ROLLBACK_SNAPSHOT = "osimg-rollback"
PAGEIN_FILE = "pagein.sav"

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


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


@dataclass
class Plan:
    guests: list[str]
    to_image: str
    strategy: str
    batch: int
    max_failures: int
    batches: list[list[str]]

    def describe(self) -> list[str]:
        lines = [f"swap {len(self.guests)} guest(s) to {self.to_image} ({self.strategy}), batch {self.batch}, "
                 f"stop after {self.max_failures} failure(s)"]
        for i, b in enumerate(self.batches, 1):
            lines.append(f"  batch {i}: {', '.join(b)}")
        return lines


# -- application probe -------------------------------------------------------------------------------------
def app_counter(port: int, timeout: float = 2.0) -> int | None:
    """Ask the demo application for its counter (each request increments it); None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/counter", timeout=timeout) as r:
            return int(r.read().decode().split()[0])
    except (urllib.error.URLError, OSError, ValueError, IndexError, TimeoutError):
        return None


def wait_app(port: int, timeout: float, poll: float = 0.05) -> int | None:
    """Poll until the application answers. Each request may take up to 3 s: a request given up on
    keeps running in the guest, and on a slow guest (Debian's CGI forks several processes under
    TCG) abandoned requests pile up behind the counter's lock faster than they finish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = app_counter(port, timeout=3.0)
        if n is not None:
            return n
        time.sleep(poll)
    return None


# -- live customization ---------------------------------------------------------------------------------------
def live_script(c: Customization, guest: str, data_uuid: str | None) -> str:
    """The guest's NoCloud customization as a POSIX shell script for a *running* OS.

    A warm swap pages in a golden state that booted without this guest's config drive, so the same
    settings are applied live: hostname, address, accounts, mounts, modules, init scripts, the app.
    Written for both busybox and Debian userlands (``ip``, ``findfs`` and plain file edits).
    """
    q = _sh_quote
    lines = ["set -u", f"H={q(c.hostname or guest)}", 'echo "$H" >/etc/hostname; hostname "$H"']
    if c.address:
        lines += [
            "ip addr flush dev eth0",
            f"ip addr add {q(c.address)} dev eth0",
            "ip link set eth0 up",
        ]
        if c.gateway:
            lines.append(f"ip route replace default via {q(c.gateway)} dev eth0")
    lines.append(
        'addgroup_() { grep -q "^$1:" /etc/group || echo "$1:x:${2:-$(awk -F: \'$3>=1000 && $3<60000 '
        '{m=$3} END {print (m ? m+1 : 1000)}\' /etc/group)}:" >>/etc/group; }'
    )
    lines.append(
        'member_() { awk -F: -v g="$1" -v u="$2" \'BEGIN{OFS=":"} $1==g { n=split($4,a,","); f=0; '
        'for(i=1;i<=n;i++) if(a[i]==u) f=1; if(!f) $4=($4=="" ? u : $4","u) } {print}\' /etc/group '
        '>/etc/group.new && cat /etc/group.new >/etc/group && rm -f /etc/group.new; }'
    )
    for g in c.groups:
        lines.append(f"addgroup_ {q(g)}")
    for u in c.users:
        uid = str(u.uid) if u.uid is not None else ""
        lines += [
            f"U={q(u.name)}; UID_={q(uid)}",
            'if ! grep -q "^$U:" /etc/passwd; then',
            '  [ -n "$UID_" ] || UID_=$(awk -F: \'$3>=1000 && $3<60000 {m=$3} END {print (m ? m+1 : 1000)}\' '
            "/etc/passwd)",
            '  addgroup_ "$U" "$UID_"; GID_=$(awk -F: -v g="$U" \'$1==g{print $3}\' /etc/group)',
            f'  mkdir -p "/home/$U"; echo "$U:*:$UID_:$GID_:$U:/home/$U:"{q(u.shell)} >>/etc/passwd',
            '  chown "$UID_:$GID_" "/home/$U"',
            "fi",
        ]
        for g in u.groups:
            lines.append(f'addgroup_ {q(g)}; member_ {q(g)} "$U"')
        if u.ssh_authorized_keys:
            keys = "\n".join(u.ssh_authorized_keys)
            lines += [
                'HOME_=$(awk -F: -v u="$U" \'$1==u{print $6}\' /etc/passwd)',
                'mkdir -p "$HOME_/.ssh"',
                f'printf "%s\\n" {q(keys)} >"$HOME_/.ssh/authorized_keys"',
                'chmod 700 "$HOME_/.ssh"; chmod 600 "$HOME_/.ssh/authorized_keys"; chown -R "$U" "$HOME_/.ssh"',
            ]
    for m in c.kernel_modules:
        lines.append(f"modprobe {q(m)} || true")
    mounts = list(c.mounts)
    if data_uuid and not any(m.path == "/data" or m.device == f"UUID={data_uuid}" for m in mounts):
        from .customize import Mount

        mounts.append(Mount(device=f"UUID={data_uuid}", path="/data"))
    for mnt in mounts:
        lines += [
            f"D={q(mnt.device)}; MP={q(mnt.path)}",
            # the device node of a hot-plugged disk can take a moment to appear
            'n=0; while :; do case $D in UUID=*|LABEL=*) DEV=$(findfs "$D" 2>/dev/null);; *) DEV=$D;; esac',
            '  [ -n "$DEV" ] && [ -b "$DEV" ] && break; n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.05; done',
            'mkdir -p "$MP"',
            f'grep -q " $MP " /proc/mounts || mount -t {q(mnt.fstype)} -o {q(mnt.options)} "$DEV" "$MP"',
        ]
    for script in c.init_scripts:
        lines.append(f"sh -c {q(script)} || echo \"init script failed: $?\" >&2")
    # the application keeps its state on the data volume: no /data, no application
    lines.append('if grep -q " /data " /proc/mounts; then /usr/sbin/osimg-app start; fi')
    return "\n".join(lines) + "\n"


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


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


# -- journal and lock ----------------------------------------------------------------------------------------
def _holder() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _journal(ctx: Context, name: str, **fields: Any) -> None:
    def upd(rec: dict[str, Any] | None) -> dict[str, Any]:
        out = dict(rec or {})
        out.update(fields)
        out["updated"] = time.time()
        return out

    ctx.store.update(JOURNAL, name, upd)


def journal(ctx: Context) -> list[dict[str, Any]]:
    return ctx.store.list(JOURNAL)


# -- planning ----------------------------------------------------------------------------------------------
def plan(ctx: Context, guests: list[str], to_image: str, strategy: str = "warm", batch: int = 1,
         max_failures: int = 1) -> Plan:
    """Validate everything a rollout needs before any guest is touched."""
    if strategy not in STRATEGIES:
        raise ValidationError(f"unknown strategy {strategy!r}: use warm or cold")
    if batch < 1:
        raise ValidationError(f"batch must be at least 1, got {batch}")
    if max_failures < 1:
        raise ValidationError(f"max-failures must be at least 1, got {max_failures}")
    if not guests:
        raise ValidationError("no guests given")
    if len(set(guests)) != len(guests):
        raise ValidationError("a guest is named twice")
    for g in guests:
        partitions.load(ctx, g)
    if ":" in to_image:
        raise ValidationError(f"swap targets must be captured images from the repository, not recipe {to_image!r} "
                              f"(build one with 'osimg image build NAME --from {to_image}')")
    img = images.get(ctx, to_image)
    problems = images.verify(ctx, to_image)
    if problems:
        raise SwapError(f"refusing to swap to image {to_image!r}: it failed verification ({'; '.join(problems)}); "
                        "no guest was touched")
    if strategy == "warm" and not img.has_memory_state:
        raise ValidationError(f"image {to_image!r} has no memory state; use --strategy cold or rebuild it")
    batches = [guests[i:i + batch] for i in range(0, len(guests), batch)]
    return Plan(guests, to_image, strategy, batch, max_failures, batches)


def rollout(ctx: Context, p: Plan, progress: Progress = _quiet) -> list[SwapResult]:
    """Swap guests batch by batch (a batch in parallel); stop once ``max_failures`` guests failed."""
    results: list[SwapResult] = []
    failures = 0
    for bi, group in enumerate(p.batches, 1):
        if failures >= p.max_failures:
            for g in group:
                rec = partitions.load(ctx, g)
                results.append(SwapResult(g, p.strategy, rec.image, p.to_image, rec.os_version, skipped=True,
                                          error=f"not attempted: {failures} failure(s) reached the limit"))
            continue
        progress(f"batch {bi}/{len(p.batches)}: {', '.join(group)}")
        if len(group) == 1:
            batch_results = [swap_guest(ctx, group[0], p.to_image, p.strategy, progress)]
        else:
            with ThreadPoolExecutor(max_workers=len(group)) as pool:
                batch_results = list(pool.map(lambda g: _swap_in_own_context(ctx, g, p, progress), group))
        results += batch_results
        failures += sum(1 for r in batch_results if not r.ok)
    return results


def _swap_in_own_context(ctx: Context, guest: str, p: Plan, progress: Progress) -> SwapResult:
    """libvirt connections and store handles are per thread: each parallel swap gets its own."""
    own = Context(ctx.settings)
    try:
        return swap_guest(own, guest, p.to_image, p.strategy, progress)
    finally:
        own.close()


# -- one guest ---------------------------------------------------------------------------------------------
def swap_guest(ctx: Context, name: str, to_image: str, strategy: str = "warm",
               progress: Progress = _quiet, health_timeout: float = 120) -> SwapResult:
    """Swap one guest; never raises for a failed swap (see the result), only for refused input."""
    g = partitions.load(ctx, name)
    res = SwapResult(name, strategy, g.image, to_image, g.os_version)
    target = images.resolve(ctx, to_image)
    holder = _holder()
    try:
        with ctx.store.lock(f"swap-{name}", holder, LOCK_TTL):
            if ctx.store.get(JOURNAL, name) is not None:
                raise SwapError(f"guest {name} has an unfinished swap; run 'osimg swap --resume' first")
            if ctx.hv.state(name) != "running":
                raise SwapError(f"guest {name} is {ctx.hv.state(name)}, not running")
            fn = _warm if strategy == "warm" else _cold
            fn(ctx, g, target, res, progress, health_timeout)
    except OsimgError as err:
        res.error = res.error or str(err)
    return res


def _step(res: SwapResult, name: str, t0: float) -> None:
    res.steps[name] = round(time.monotonic() - t0, 3)


def _new_overlay_name(image: str) -> str:
    return f"os-{image}-{uuidlib.uuid4().hex[:6]}.qcow2"


def _health(ctx: Context, g: partitions.Guest, version: str, counter_before: int | None,
            timeout: float) -> int | None:
    """SSH with the pinned key, the expected OS version, and the application's counter not lower."""
    with partitions.session(ctx, g, timeout=timeout) as s:
        osr = s.run(["cat", "/etc/os-release"], check=True).out
    if f"VERSION_ID={version}" not in osr and f'VERSION_ID="{version}"' not in osr:
        raise GuestError(f"{g.name}: /etc/os-release does not show version {version}")
    if counter_before is None:
        return None  # no application answered before the swap: nothing to compare
    n = wait_app(g.app_port, timeout=min(timeout, 30))
    if n is None:
        raise GuestError(f"{g.name}: the application does not answer on 127.0.0.1:{g.app_port}")
    if counter_before is not None and n < counter_before:
        raise GuestError(f"{g.name}: the application's counter went back from {counter_before} to {n}")
    return n


def _guest_sh(ctx: Context, g: partitions.Guest, script: str, what: str, timeout: float = 120) -> str:
    """Run a shell script in the guest through the agent (fast) or, without one, over SSH."""
    if ctx.hv.agent_ping(g.name, timeout=2):
        rc, out, err = ctx.hv.guest_exec(g.name, ["/bin/sh", "-s"], stdin=script, timeout=timeout)
    else:
        with partitions.session(ctx, g, timeout=timeout) as s:
            r = s.script(script, timeout=timeout)
        rc, out, err = r.rc, r.out, r.err
    if rc != 0:
        raise GuestError(f"{g.name}: {what} failed ({rc}): {(err or out).strip()[-300:]}")
    return out


def _data_disk(ctx: Context, g: partitions.Guest) -> DiskSpec | None:
    data = g.data_volume(ctx)
    return DiskSpec("vdc", path=str(data), serial="osimg-data") if data is not None else None


def _warm(ctx: Context, g: partitions.Guest, target: images.BootImage, res: SwapResult, progress: Progress,
          health_timeout: float) -> None:
    t0 = time.monotonic()
    gdir = g.dir(ctx)
    old = partitions.Guest(**asdict(g))
    new_overlay = _new_overlay_name(target.ref)
    if target.state_file is None:
        raise SwapError(f"image {target.ref} has no memory state")
    # everything that costs time happens before the application stops
    progress(f"{g.name}: preparing page-in of {target.ref}")
    storage.create_overlay(gdir / new_overlay, target.disk)
    new = _moved(g, target, new_overlay)
    spec = partitions.domain_spec(ctx, new)
    saved_xml = ctx.hv.saved_xml(str(target.state_file))
    retarget_saved_state(target.state_file, gdir / PAGEIN_FILE, rewrite_identity(saved_xml, spec))
    res.counter_before = app_counter(g.app_port)
    _journal(ctx, g.name, guest=g.name, strategy="warm", step="prepared", from_image=g.image, to_image=target.ref,
             old=asdict(old), new=asdict(new), holder=_holder(), started=time.time())
    _step(res, "prepare", t0)

    down = time.monotonic()
    try:
        progress(f"{g.name}: quiesce")
        # The old OS lets go of the data volume first: its page cache of /data must not survive
        # into a rollback after the new OS has written there.
        _journal(ctx, g.name, step="releasing")
        _guest_sh(ctx, g, RELEASE_DATA, "stopping the application and unmounting /data", timeout=60)
        data_disk = _data_disk(ctx, g)
        if data_disk is not None:
            ctx.hv.detach_disk(g.name, data_disk)
        _journal(ctx, g.name, step="released")
        if ctx.hv.agent_ping(g.name):
            with contextlib.suppress(OsimgError):
                ctx.hv.fs_freeze(g.name)
        ctx.hv.suspend(g.name)
        _journal(ctx, g.name, step="quiesced")
        _step(res, "quiesce", t0)
        progress(f"{g.name}: page out old OS")
        ctx.hv.snapshot_create(g.name, ROLLBACK_SNAPSHOT)
        _journal(ctx, g.name, step="paged-out")
        _step(res, "page-out", t0)
        progress(f"{g.name}: page in {target.ref}")
        ctx.hv.destroy(g.name)
        ctx.hv.restore(str(gdir / PAGEIN_FILE))
        _journal(ctx, g.name, step="paged-in")
        _step(res, "page-in", t0)
        if data_disk is not None:
            ctx.hv.attach_disk(g.name, data_disk)
        _step(res, "attach", t0)
        # the golden state's clock stopped at capture time
        with contextlib.suppress(OsimgError):
            ctx.hv.agent(g.name, "guest-set-time", {"time": time.time_ns()}, timeout=5)
        progress(f"{g.name}: customize and start the application")
        _guest_sh(ctx, new, live_script(new.custom(), new.name, new.data_uuid), "live customization")
        _journal(ctx, g.name, step="customized")
        _step(res, "customize", t0)
        first = wait_app(new.app_port, timeout=health_timeout, poll=0.02) if res.counter_before is not None else 0
        res.downtime = round(time.monotonic() - down, 3)
        if first is None:
            raise GuestError(f"{g.name}: the application does not answer on the new OS")
        res.counter_after = _health(ctx, new, target.os_version, res.counter_before, health_timeout)
        _step(res, "health", t0)
    except OsimgError as err:
        _roll_back(ctx, res, old, new_overlay, err, progress)
        return
    _finish(ctx, res, old, new, t0)


def _moved(g: partitions.Guest, target: images.BootImage, overlay: str) -> partitions.Guest:
    """The guest's record as it will be on the target image."""
    return partitions.Guest(**{**asdict(g), "image": target.ref, "base": str(target.disk),
                               "kernel": str(target.kernel), "initrd": str(target.initrd), "cmdline": target.cmdline,
                               "host_key": target.host_key, "os_version": target.os_version, "family": target.family,
                               "ready_marker": target.ready_marker, "overlay_file": overlay})


def _cold(ctx: Context, g: partitions.Guest, target: images.BootImage, res: SwapResult, progress: Progress,
          health_timeout: float) -> None:
    t0 = time.monotonic()
    old = partitions.Guest(**asdict(g))
    new_overlay = _new_overlay_name(target.ref)
    storage.create_overlay(g.dir(ctx) / new_overlay, target.disk)
    new = _moved(g, target, new_overlay)
    res.counter_before = app_counter(g.app_port)
    _journal(ctx, g.name, guest=g.name, strategy="cold", step="prepared", from_image=g.image, to_image=target.ref,
             old=asdict(old), new=asdict(new), holder=_holder(), started=time.time())
    down = time.monotonic()
    try:
        progress(f"{g.name}: shut down")
        ctx.hv.shutdown(g.name)
        _journal(ctx, g.name, step="stopped")
        _step(res, "shutdown", t0)
        progress(f"{g.name}: boot {target.ref}")
        g.console(ctx).unlink(missing_ok=True)
        ctx.hv.define(_persistent_xml(ctx, new))
        ctx.hv.start(g.name)
        _journal(ctx, g.name, step="booted")
        partitions.wait_ready(ctx, new, timeout=health_timeout)
        _step(res, "boot", t0)
        n = _health(ctx, new, target.os_version, res.counter_before, health_timeout)
        res.downtime = round(time.monotonic() - down, 3)
        res.counter_after = n
        _step(res, "health", t0)
    except OsimgError as err:
        _roll_back(ctx, res, old, new_overlay, err, progress)
        return
    _finish(ctx, res, old, new, t0)


def _roll_back(ctx: Context, res: SwapResult, old: partitions.Guest, new_overlay: str, err: OsimgError,
               progress: Progress) -> None:
    res.error = f"{res.strategy} swap failed: {err}"
    res.downtime = None
    progress(f"{old.name}: rolling back ({err})")
    _rollback(ctx, old, new_overlay)
    res.rolled_back = True
    res.counter_after = app_counter(old.app_port)


def _finish(ctx: Context, res: SwapResult, old: partitions.Guest, new: partitions.Guest, t0: float) -> None:
    _commit(ctx, old, new)
    res.ok = True
    res.new_version = new.os_version
    _step(res, "commit", t0)


def _persistent_xml(ctx: Context, g: partitions.Guest) -> str:
    from .hypervisor import domain_xml

    return domain_xml(partitions.domain_spec(ctx, g))


def _commit(ctx: Context, old: partitions.Guest, new: partitions.Guest) -> None:
    """Make the new OS permanent: next-boot definition, record, cleanup of the old delta."""
    gdir = new.dir(ctx)
    ctx.hv.define(_persistent_xml(ctx, new))
    # the snapshot's data lives in the old overlay, which goes away with it
    ctx.hv.snapshot_delete(new.name, ROLLBACK_SNAPSHOT, metadata_only=True)
    new.save(ctx)
    (gdir / PAGEIN_FILE).unlink(missing_ok=True)
    if old.overlay_file != new.overlay_file:
        old.overlay(ctx).unlink(missing_ok=True)
    ctx.store.delete(JOURNAL, new.name)
    _publish(ctx, new.name, old.image, new.image)


def _publish(ctx: Context, guest: str, old: str, new: str) -> None:
    from .cluster.events import Event

    with contextlib.suppress(OsimgError, ValueError):
        ctx.store.publish(Event(kind="lifecycle", type="swapped", obj=f"guest/{guest}",
                                data={"from": old, "to": new}))


def _rollback(ctx: Context, old: partitions.Guest, new_overlay: str | None) -> None:
    """Bring the guest back on its old OS with its data; idempotent, so it also serves ``resume``."""
    gdir = old.dir(ctx)
    step = (ctx.store.get(JOURNAL, old.name) or {}).get("step", "")
    exists = ctx.hv.exists(old.name)
    if exists and ctx.hv.has_snapshot(old.name, ROLLBACK_SNAPSHOT):
        # paged out: page the old OS back in from its snapshot (memory and disk as they were)
        ctx.hv.destroy(old.name)
        ctx.hv.define(_persistent_xml(ctx, old))
        ctx.hv.snapshot_revert(old.name, ROLLBACK_SNAPSHOT)
        ctx.hv.snapshot_delete(old.name, ROLLBACK_SNAPSHOT)
    elif exists and ctx.hv.is_active(old.name) and step in ("prepared", "releasing", "released", "quiesced"):
        pass  # never left the old OS
    else:
        # cold swap, or nothing to page back in: boot the old OS again
        ctx.hv.destroy(old.name)
        old.console(ctx).unlink(missing_ok=True)
        ctx.hv.define(_persistent_xml(ctx, old))
        ctx.hv.start(old.name)
        partitions.wait_ready(ctx, old)
    if ctx.hv.state(old.name) == "paused":
        ctx.hv.resume(old.name)
    with contextlib.suppress(OsimgError):
        ctx.hv.fs_thaw(old.name)
    data_disk = _data_disk(ctx, old)
    if data_disk is not None and str(data_disk.path) not in ctx.hv.xml(old.name):
        ctx.hv.attach_disk(old.name, data_disk)
    _guest_sh(ctx, old, live_script(old.custom(), old.name, old.data_uuid), "re-attaching data and application")
    ctx.hv.define(_persistent_xml(ctx, old))
    old.save(ctx)
    if new_overlay and new_overlay != old.overlay_file:
        (gdir / new_overlay).unlink(missing_ok=True)
    (gdir / PAGEIN_FILE).unlink(missing_ok=True)
    ctx.store.delete(JOURNAL, old.name)


def resume(ctx: Context, progress: Progress = _quiet) -> list[SwapResult]:
    """Finish or roll back every swap a killed orchestrator left in the journal."""
    out = []
    for rec in journal(ctx):
        name = rec["guest"]
        if not (ctx.settings.guests_dir / name).exists():
            progress(f"{name}: the guest was removed; dropping its journal entry")
            ctx.store.delete(JOURNAL, name)
            continue
        old = partitions.Guest(**rec["old"])
        new = partitions.Guest(**rec["new"])
        res = SwapResult(name, rec.get("strategy", "?"), old.image, new.image, old.os_version)
        try:
            with ctx.store.lock(f"swap-{name}", _holder(), LOCK_TTL, wait=LOCK_TTL + 5):
                done = False
                if rec.get("step") in ("customized", "booted") and ctx.hv.is_active(name):
                    try:
                        _health(ctx, new, new.os_version, None, 60)
                        done = True
                    except OsimgError as err:
                        progress(f"{name}: new OS unhealthy after resume ({err})")
                if done:
                    _commit(ctx, old, new)
                    res.ok, res.new_version = True, new.os_version
                    progress(f"{name}: finished the swap to {new.image}")
                else:
                    _rollback(ctx, old, new.overlay_file)
                    res.rolled_back = True
                    progress(f"{name}: rolled back to {old.image}")
        except OsimgError as err:
            res.error = str(err)
        out.append(res)
    return out
