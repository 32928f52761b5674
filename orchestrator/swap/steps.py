"""What both swap strategies share: the result, health check, guest commands, commit and rollback."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import struct
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import guests, hosts
from ..cluster.events import Event
from ..cluster.store import Lease
from ..context import Context
from ..customize import DATA_MOUNT, Carry, live_script, sh_quote
from ..errors import ClusterError, GuestError, OsimgError, SwapError
from ..failpoints import failpoint
from ..host.domain import DomainSpec, domain_xml, rewrite_identity, saved_domain_xml
from ..images import catalog
from ..process import Progress
from . import checkpoints, journal

ROLLBACK_SNAPSHOT = "osimg-rollback"
PAGEIN_FILE = "pagein.sav"
RESUME_HINT = "run 'osimg swap --resume'"
RESEED_HELPER = "/usr/sbin/osimg-reseed"  # images/common/reseed, built into every guest image
RESEED_BYTES = 64
STAGING_SUFFIX = "~staged"  # "~" is not allowed in a guest name: a staging domain is never taken for a guest
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
    # the workload the quiesce met: processes that had /data before it ("PID NAME"), and those it
    # had to kill because they kept /data busy past the grace
    stopped: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    refused: bool = False  # a journal record that failed its checks: nothing was done for it
    note: str | None = None  # what the user should know about a successful swap (e.g. deferred settings)
    # the process trees a warm swap carried: checkpoints.TreeResult as dicts (resumed or restarted, why)
    processes: list[dict[str, Any]] = field(default_factory=list)



QUIESCED = "osimg-quiesced"  # the source name of the read-only tmpfs that covers an unmounted /data

# processes with $M (or a file under it) as working directory, root, open file or mapping, except
# the line of ancestors in $anc: "PID NAME"
HOLDERS = r"""
holders() {
  ls -l /proc/[0-9]*/cwd /proc/[0-9]*/root /proc/[0-9]*/fd 2>/dev/null | awk -v m="$M" -v anc="$anc" '
    function hit(p) { if (index(anc, " " p " ") == 0 && !(p in seen)) { seen[p] = 1
        c = "?"; if ((getline c < ("/proc/" p "/comm")) <= 0) c = "?"; close("/proc/" p "/comm"); print p, c } }
    FILENAME !~ /maps$/ && /^\/proc\/[0-9]+\/fd:$/ { split($0, a, "/"); pid = a[3]; next }
    FILENAME !~ /maps$/ && / -> / { i = index($0, " -> "); t = substr($0, i + 4); src = substr($0, 1, i - 1)
        p = pid; if (match(src, /\/proc\/[0-9]+\/(cwd|root)$/)) { split(substr(src, RSTART), a, "/"); p = a[3] }
        if (t == m || index(t, m "/") == 1) hit(p); next }
    FILENAME ~ /maps$/ && index($0, " " m "/") { split(FILENAME, a, "/"); hit(a[3]) }
  ' - /proc/[0-9]*/maps 2>/dev/null
}
"""

# POSIX sh for busybox and Debian. $1 the data mount point, $2 the grace in seconds, $3 the workload's
# stop command (may be empty), $4 options: "scan" to list the holders first (a warm swap lists them
# before its window, see HELD), "sync" to flush every file system first. Prints "held PID NAME" for
# each process that had /data before the stop commands, "killed PID NAME" for each killed after the
# grace, "quiesced" at the end.
QUIESCE = r"""
set -u
M=$1; GRACE=$2; STOP=$3
# few processes: under TCG each fork costs tens of milliseconds of downtime
mounts=$(cat /proc/mounts)
case "$mounts" in *" $M "*) ;; *) echo quiesced; exit 0;; esac
case "$mounts" in *"QUIESCED $M "*) echo quiesced; exit 0;; esac
# this script's own line of ancestors (the guest agent or the SSH session running it) is never touched
anc=" 0 1 2 $$ "; p=$$
while [ "$p" -gt 1 ]; do
  q=0; while read -r k v; do [ "$k" = PPid: ] && { q=$v; break; }; done <"/proc/$p/status" || q=0
  p=$q; anc="$anc$p "
done
# process trees checkpointed for a carry (swap.checkpoints): left stopped, and never thawed here
carried=" "
#CARRY-DUMP#
#HOLDERS#
case " ${4:-} " in *" scan "*) holders | while read -r p c; do echo "held $p $c"; done;; esac
[ -n "$STOP" ] && { sh -c "$STOP" </dev/null >/dev/null 2>&1 || echo "stop command failed: $?" >&2; }
ap=; [ -f /run/osimg-app.pid ] && read -r ap </run/osimg-app.pid  # a builtin: no fork in the window
case "$carried" in *" ${ap:-none} "*) ;; *) [ -x /usr/sbin/osimg-app ] && /usr/sbin/osimg-app stop >/dev/null 2>&1
esac
# the umount writes /data back; "sync" also flushes the root file system, which a cold swap's
# rollback boots again (a warm swap's rollback resumes the snapshot's memory, page cache and all)
case " ${4:-} " in *" sync "*) sync;; esac
# Everything but our ancestors is frozen (SIGSTOP) for the moment between the unmount and the
# read-only cover: a writer must not slip a file onto the root file system in between.
frozen=
freeze() { frozen=; for d in /proc/[0-9]*; do p=${d#/proc/}
  case "$anc$carried" in *" $p "*) ;; *) frozen="$frozen $p";; esac
  done; [ -n "$frozen" ] && kill -STOP $frozen 2>/dev/null; }
thaw() { [ -n "$frozen" ] && kill -CONT $frozen 2>/dev/null; frozen=; }
trap thaw EXIT
n=0; rounds=$((GRACE * 10))  # a round sleeps 0.1 s and takes longer: the grace is at least GRACE seconds
while :; do
  freeze
  if umount "$M" 2>/dev/null; then
    mount -t tmpfs -o ro,size=4k,mode=0555 QUIESCED "$M"; thaw; echo quiesced; exit 0
  fi
  if [ "$n" = 0 ] && [ "$carried" != " " ]; then
    # A carried tree with a file under $M still open (a request in flight at its checkpoint): the
    # checkpoint holds the file, so the stopped original is ended now, not after the grace (a
    # rollback restores it from the checkpoint).
    holders | while read -r p c; do case "$carried" in *" $p "*) echo "killed $p $c"; kill -KILL "$p";; esac
    done 2>/dev/null
    thaw; n=1; continue
  fi
  if [ "$n" -ge "$rounds" ]; then
    [ "$n" -gt $((rounds + 50)) ] && { thaw; echo "$M stays busy: $(holders | tr '\n' ' ')" >&2; exit 1; }
    holders | while read -r p c; do echo "killed $p $c"; kill -KILL "$p" 2>/dev/null; done
  fi
  thaw
  n=$((n + 1))
  sleep 0.1
done
""".replace("QUIESCED", QUIESCED).replace("#HOLDERS#\n", HOLDERS)

# Which processes hold $1 (the data mount): "held PID NAME" lines, the quiesce's report, run before a
# warm swap's window (the listing reads every process's maps: ~0.1 s of a tiny guest under TCG)
HELD = r"""
M=$1; anc=" 0 1 2 $$ "
HOLDERS
holders | while read -r p c; do echo "held $p $c"; done
exit 0
""".replace("HOLDERS\n", HOLDERS)

# The reverse, for a rollback to the old OS: lift the read-only cover so /data can be mounted again.
UNQUIESCE = f"""
if grep -q "^{QUIESCED} $1 " /proc/mounts; then umount "$1"; fi
"""



class LastAnswer:
    """The application's last answer while a warm swap's release stops it.

    A thread asks for the counter every ``every`` seconds (0.5 s per request) until the application
    stops answering. The downtime a swap reports starts at the last answer, not at the release's
    start: the release stops the application a moment in (on Debian the CRIU dump reads the process
    tree for ~0.5 s before it freezes it), and until then the application still serves. ``last`` is
    the release's start when nothing answered after it.
    """

    def __init__(self, port: int, start: float, every: float = 0.05) -> None:
        self.port, self.every, self.last = port, every, start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if guests.app_counter(self.port, timeout=0.5) is None:
                return
            self.last = time.monotonic()
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=1)
        return self.last


def page_in_file(ctx: Context, src: Path, where: hosts.Files, dst: str, spec: DomainSpec) -> None:
    """Write ``dst`` among ``where``'s files: the save file ``src`` carrying the identity of ``spec``
    (name, UUID, disks, log, forwards; see ``host.domain.rewrite_identity``). ``src`` is local (a
    golden state in the repository, or a staged state); on another host the copy is made there."""
    xml = ctx.hv.saved_xml(str(src)) if isinstance(where, hosts.LocalFiles) else saved_domain_xml(src)
    where.page_in(dst, src, rewrite_identity(xml, spec))


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


def data_mount(g: guests.Guest) -> str | None:
    """Where the guest mounts its data volume (``/data`` unless a fleet spec chose), or None without one."""
    if not g.data_uuid:
        return None
    for m in g.custom().with_data(g.data_uuid).mounts:
        if m.device == f"UUID={g.data_uuid}":
            return m.path
    return DATA_MOUNT


def carried(g: guests.Guest) -> list[Carry]:
    """The process trees a warm swap of ``g`` tries to carry (its spec's, or the image's demo app)."""
    return g.custom().carried() if data_mount(g) is not None else []


def record_trees(g: guests.Guest, res: SwapResult, out: str) -> None:
    """Fold the ``carry ...`` lines of a guest script into ``res.processes``. A tree the spec did not
    name (the default demo application) on a guest without CRIU was never a candidate: not reported."""
    known = {p["name"]: checkpoints.TreeResult(**p) for p in res.processes}
    checkpoints.parse(out, known)
    if g.custom().carry is None:
        known = {k: v for k, v in known.items() if v.reason != checkpoints.NO_CRIU}
    res.processes = [asdict(t) for t in known.values()]


def held(ctx: Context, g: guests.Guest, res: SwapResult) -> None:
    """List the processes that hold the data mount into ``res.stopped`` (a warm swap does it before
    its window, so the quiesce in the window goes straight to stopping them)."""
    mount = data_mount(g)
    if mount is not None:
        _fold(res, guest_sh(ctx, g, f"set -- {sh_quote(mount)}\n{HELD}", f"listing what holds {mount}"))


def _fold(res: SwapResult, out: str) -> None:
    for line in out.splitlines():
        kind, _, what = line.partition(" ")
        if kind == "held" and what not in res.stopped:
            res.stopped.append(what)
        elif kind == "killed" and what not in res.killed:
            res.killed.append(what)


def quiesce(ctx: Context, g: guests.Guest, res: SwapResult, trees: list[Carry] | None = None,
            token: str = "", scanned: bool = False, flush: bool = True) -> None:
    """Stop the guest's workload and let go of its data volume, so no later write can go astray.

    The guest's own stop command and the image's application stop first; whatever still holds the
    data mount after the grace is killed (a file system with open files cannot be unmounted, and a
    process kept across the swap would write into a file system the other OS changed). Then /data
    is unmounted and covered by an empty read-only tmpfs: a writer the image does not know gets an
    error (and retries) instead of writing onto the root file system, where the write would be
    hidden on rollback and deleted on commit.

    ``trees`` (a warm swap's, prepared under ``token``) are checkpointed first and left stopped
    (``swap.checkpoints``); in the same guest command, so the release stays one agent round trip.
    ``scanned``: ``held`` already listed the holders (not again inside the window). ``flush``: sync
    every file system, not only /data (which its unmount writes back)."""
    mount = data_mount(g)
    if mount is None:
        guest_sh(ctx, g, "[ -x /usr/sbin/osimg-app ] && /usr/sbin/osimg-app stop; sync; exit 0\n",
                 "stopping the application")
        return
    q = g.custom().quiesce
    dump = checkpoints.dump_script(trees or [], mount, token)
    opts = " ".join(o for o, on in (("scan", not scanned), ("sync", flush)) if on)
    script = f"set -- {sh_quote(mount)} {math.ceil(q.grace)} {sh_quote(q.stop or '')} {sh_quote(opts)}\n" + \
        QUIESCE.replace("#CARRY-DUMP#", dump)
    out = guest_sh(ctx, g, script, f"quiescing the workload and unmounting {mount}", timeout=q.grace + 120)
    _fold(res, out)
    record_trees(g, res, out)


def unquiesce(g: guests.Guest) -> str:
    """The script that lifts the quiesce's read-only cover (for the live script of a rollback)."""
    mount = data_mount(g)
    return f"set -- {sh_quote(mount)}\n{UNQUIESCE}" if mount else ""


def start_workload(ctx: Context, g: guests.Guest) -> None:
    """The guest's own start command, once its data volume is mounted again (new OS or rollback)."""
    cmd = g.custom().quiesce.start
    if cmd:
        guest_sh(ctx, g, f"sh -c {sh_quote(cmd)} </dev/null >/dev/null 2>&1\n", "starting the workload")


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


def moved(g: guests.Guest, target: catalog.BootImage, overlay: str, paged_in: bool = False) -> guests.Guest:
    """The guest's record as it will be on the target image (``paged_in``: with the memory size of
    the target's captured state, which a page-in cannot change)."""
    return guests.Guest(**{**asdict(g), "image": target.ref, "base": str(target.disk),
                               "kernel": str(target.kernel), "initrd": str(target.initrd), "cmdline": target.cmdline,
                               "host_key": g.host_key if g.own_host_key else target.host_key,
                               "os_version": target.os_version, "family": target.family,
                               "ready_marker": target.ready_marker, "overlay_file": overlay,
                               **({"memory_mib": target.memory_mib} if paged_in else {})})


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


def staging_name(guest: str) -> str:
    """The name of the domain a warm swap stages ``guest``'s page-in in (``swap.staging``)."""
    return guest + STAGING_SUFFIX


def discard(ctx: Context, lease: Lease, where: hosts.Files, files: list[str], name: str) -> None:
    """Remove what a swap prepared before its downtime window (a staging domain and files), then its
    journal entry."""
    ctx.hv.destroy(staging_name(name))
    for f in files:
        where.unlink(f)
    failpoint("discard-files-removed")
    journal.drop(ctx, lease, name)


@contextlib.contextmanager
def preparing(ctx: Context, lease: Lease, where: hosts.Files, files: list[str], name: str,
              strategy: str) -> Iterator[None]:
    """The part of a swap before the guest is touched: whatever fails in it (a store failure aside,
    which leaves the journal to resume) removes the files it made and says the guest was not touched."""
    try:
        yield
    except ClusterError:
        raise
    except Exception as err:  # nothing was touched yet: clean up, whatever failed
        discard(ctx, lease, where, files, name)
        raise SwapError(f"{strategy} swap of {name} not started: {describe(err)}; the guest was not touched") from None


def roll_back(ctx: Context, lease: Lease, res: SwapResult, old: guests.Guest, new_overlay: str,
              err: BaseException, progress: Progress) -> None:
    """A failure in the downtime window: roll back; if that fails too, report both and keep the journal."""
    res.error = f"{res.strategy} swap failed: {describe(err)}"
    res.downtime = None
    progress(f"{old.name}: rolling back ({describe(err)})")
    try:
        out = rollback(ctx, lease, old, new_overlay)
    except Exception as err2:  # any failure of the rollback must be reported with the first
        res.error += f"; the rollback failed too: {describe(err2)}; the journal is kept: {RESUME_HINT}"
        return
    res.rolled_back = True
    record_trees(old, res, out)
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
    where = new.files(ctx)
    journal.write(ctx, lease, new.name, step=journal.COMMITTING)
    failpoint("commit-committing")
    ctx.hv.define(persistent_xml(ctx, new))
    failpoint("commit-defined")
    # the snapshot's data lives in the old overlay, which goes away with it
    ctx.hv.snapshot_delete(new.name, ROLLBACK_SNAPSHOT, metadata_only=True)
    failpoint("commit-snapshot-dropped")
    new.save(ctx)
    failpoint("commit-record-saved")
    where.unlink(PAGEIN_FILE)
    failpoint("commit-pagein-removed")
    if old.overlay_file != new.overlay_file:
        where.unlink(old.overlay_file)
    failpoint("commit-old-overlay-removed")
    journal.drop(ctx, lease, new.name)
    publish(ctx, new.name, old.image, new.image)


def publish(ctx: Context, guest: str, old: str, new: str) -> None:
    with contextlib.suppress(OsimgError, ValueError):
        ctx.store.publish(Event(kind="lifecycle", type="swapped", obj=f"guest/{guest}",
                                data={"from": old, "to": new}))


def checkpoint_token(overlay: str | None) -> str | None:
    """A warm swap's name for its checkpoints: its new overlay's (unique per swap, in the journal)."""
    return overlay.removesuffix(".qcow2") if overlay else None


def rollback(ctx: Context, lease: Lease, old: guests.Guest, new_overlay: str | None) -> str:
    """Bring the guest back on its old OS with its data; idempotent, so it also serves ``resume``.
    Returns the output of the old OS's live script (what became of carried process trees).

    Journaled as ``rolling-back`` (keeping the step it started from) before it acts. Refuses a swap
    that reached ``committing``: the old OS may already be gone, only rolling forward is safe.
    """
    where = old.files(ctx)
    rec = journal.get(ctx, old.name) or {}
    step = str(rec.get("rollback_from") or rec.get("step", ""))
    if step == journal.COMMITTING:
        raise SwapError(f"{old.name}: the swap reached 'committing'; it can only be finished: {RESUME_HINT}")
    journal.write(ctx, lease, old.name, step=journal.ROLLING_BACK, rollback_from=step)
    failpoint("rollback-started")
    exists = ctx.hv.exists(old.name)
    reverted = False
    if exists and ctx.hv.has_snapshot(old.name, ROLLBACK_SNAPSHOT):
        # paged out: page the old OS back in from its snapshot (memory and disk as they were)
        ctx.hv.destroy(old.name)
        failpoint("rollback-new-destroyed")
        ctx.hv.define(persistent_xml(ctx, old))
        ctx.hv.snapshot_revert(old.name, ROLLBACK_SNAPSHOT)
        reverted = True
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
        where.unlink(guests.CONSOLE)
        ctx.hv.define(persistent_xml(ctx, old))
        ctx.hv.start(old.name)
        failpoint("rollback-old-booted")
        guests.wait_ready(ctx, old)
        journal.write(ctx, lease, old.name, rollback_from=journal.OLD_OS_BACK)
    if ctx.hv.state(old.name) == "paused":
        ctx.hv.resume(old.name)
    with contextlib.suppress(OsimgError):
        ctx.hv.fs_thaw(old.name)
    if reverted:
        # a revert is a page-in too: the old OS resumes with the RNG state it was snapshotted with
        with contextlib.suppress(OsimgError):
            reseed(ctx, old.name)
    data_disk = guests.data_disk(ctx, old)
    if data_disk is not None and str(data_disk.path) not in ctx.hv.xml(old.name):
        ctx.hv.attach_disk(old.name, data_disk)
    failpoint("rollback-data-attached")
    mount = data_mount(old)
    revive = checkpoints.revive_script(carried(old), mount, checkpoint_token(new_overlay)) if mount else ""
    out = guest_sh(ctx, old, unquiesce(old) + live_script(old.custom(), old.name, old.data_uuid, old.own_key(ctx),
                                                          after_mounts=revive),
                   "re-attaching data and application")
    with contextlib.suppress(OsimgError):
        start_workload(ctx, old)  # the old OS is back either way; a workload that will not start is its own
    ctx.hv.define(persistent_xml(ctx, old))
    old.save(ctx)
    failpoint("rollback-record-saved")
    if new_overlay and new_overlay != old.overlay_file:
        where.unlink(new_overlay)
    failpoint("rollback-overlay-removed")
    where.unlink(PAGEIN_FILE)
    journal.drop(ctx, lease, old.name)
    return out


def stopped_by_store(ctx: Context, err: ClusterError, name: str) -> str:
    """What to tell when the store fails or the lease is lost mid-swap: nothing more was done."""
    step = ""
    with contextlib.suppress(OsimgError):
        step = str((journal.get(ctx, name) or {}).get("step", ""))
    return f"{err}; the swap of {name} stopped where it stood{f' (step {step})' if step else ''} " \
           f"and its journal is kept: {RESUME_HINT}"
