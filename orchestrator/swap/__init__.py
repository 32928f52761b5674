"""Quiesce-swap-resume: replace the OS of running guests, warm or cold, with health checks and rollback.

**warm** (the invention): the target image was captured with its memory state. For guest G, before
anything of G stops: a fresh overlay on the new base, and G's own page-in file, *staged*
(``swap.staging``): the golden state restored into a staging domain on that overlay, reseeded, given
G's settings (host key, machine-id, hostname, address, accounts, modules, mounts other than the data
volume) and an empty stand-in disk in the data volume's slot, then saved under G's identity. Then
the downtime window: quiesce G (stop its application, unmount and detach its data volume, suspend:
no fsfreeze, the internal snapshot of a paused guest holds memory and disk at one instant); page out
the old OS into an internal snapshot of its own overlay (memory and disk, for rollback); page in the
staged state (with a new VM generation ID; its XML names the real data volume where the stand-in
was, so nothing is hot-plugged); reseed its RNG and set its clock through the guest agent, before
anything else runs in it; mount the data volume and start G's application (one guest-agent call);
verify; commit or roll back. Where the image has CRIU (Debian), G's application is not stopped and
started but carried: checkpointed in the quiesce and restored on the new OS right after its mounts,
with its memory (``swap.checkpoints``). Guests on a libvirt network are not staged (see
``swap.staging``): their page-in file is the golden state under their identity, the data volume is
hot-plugged and the whole customization runs in the window.

**cold** (the baseline): shut G down, put a fresh overlay on the new base under it, boot (the
config drive re-applies G's customization and the image starts the application), verify.

What we learned from libvirt 9.0 while building this:

- Restoring a saved state with changed XML runs libvirt's ABI check, which treats the domain
  UUID as guest-visible and refuses a different one ("Target domain uuid ... does not match
  source"). Paging one golden state into many guests therefore uses a per-guest copy of the save
  file whose embedded XML carries that guest's name, UUID, disks, console log and port forwards
  (``host.domain.rewrite_identity`` and ``retarget_saved_state``). The copy is made before the guest is quiesced, so it
  costs no downtime. The device model, MAC and PCI layout stay exactly as saved.
- A restored state needs the very disk it was saved with: each swap gives the guest a *fresh*
  overlay on the new base (``os-<image>-<id>.qcow2``); the old overlay stays untouched for rollback.
- The golden state has no data volume and no config drive: the data volume is hot-plugged after
  page-in, the config drive only returns in the persistent definition (for cold boots).
- Paging the old OS out with ``virDomainSave`` took ~2 s for a 256 MiB TCG guest; an internal
  snapshot (QEMU savevm into the qcow2 overlay; the read-only config drive is skipped) takes
  ~0.4 s and ``revertToSnapshot`` brings the old OS back for a rollback. The data volume is
  detached first so the snapshot never covers it and a rollback cannot rewind the data.
- Tearing down a paused domain (``virDomainDestroy``) costs ~0.2 s on this host (libvirt's cleanup
  after QEMU exits), restoring a ~100 MiB state ~0.35 s, the internal snapshot ~0.15 s: these three
  (the page-out, the destroy and the page-in) are what a warm swap cannot stage, about 0.7 s of a
  tiny guest's window under TCG. The rest is guest work: the release (~0.25 s), the data volume's
  hot-unplug (the guest must let go: ~0.25 s), the reseed (its first agent call waits for the
  agent to reconnect: ~0.2 s), the mount and the application's start.
- A hot-plugged disk takes a TCG guest ~0.5 s to notice; a staged page-in avoids that by saving the
  staging domain with an empty stand-in disk of the data volume's size in that slot and restoring
  with the data volume's path there (a disk's path is not guest-visible ABI). The guest dropped the
  stand-in's cached blocks (``blockdev --flushbufs``) before it mounts the real one.
- A cold swap cannot carry the old overlay's blocks onto another base safely (they describe
  the old filesystem's layout), so it too starts from a fresh overlay: a guest's own state lives
  in its data volume and its customization, which both strategies keep.

Every step is written to a journal in the cluster store (kind ``swap``) before it is taken, and one
guest is never swapped twice at once (a store lock with a lease; every journal write is fenced by
it). ``resume()`` finishes or rolls back whatever a killed orchestrator left behind: files named
in ``preparing`` are removed, a swap that reached ``committing`` is finished, anything between is
rolled back (or finished, if the new OS already passed its health check). SIGINT/SIGTERM stop a
swap at its next step and roll it back; a store failure or a lost lease stops it where it stands
and leaves the journal to ``resume``. Failpoints (``orchestrator.failpoints``) sit at every step;
tests/test_crash.py kills the orchestrator at each.
"""

from __future__ import annotations

import contextlib
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .. import guests, hosts
from ..cluster.store import Lease
from ..context import Context
from ..errors import ClusterError, HostUnreachableError, OsimgError, SwapError, ValidationError
from ..images import catalog
from ..process import Progress, call_holder_id, dead_local_holder, quiet
from ..validate import NAME_RE, short
from ..validate import name as valid_name
from . import journal
from .cold import cold
from .plan import STRATEGIES, Plan, plan
from .steps import RESUME_HINT, SIGNALS, SwapResult, commit, describe, discard, health, rollback, stopped_by_store
from .warm import warm

__all__ = ["RESUME_HINT", "STRATEGIES", "Plan", "ResumeAction", "SwapResult", "interrupted", "plan", "resume",
           "resume_plan", "rollout", "swap_guest"]


def interrupted() -> str | None:
    """The signal (SIGINT, SIGTERM) that interrupted the last rollout, if any."""
    return SIGNALS.received


ROLLOUT_KIND = "rollout"  # a rollout in the cluster store: kept while a lost host leaves guests pending


def rollout(ctx: Context, p: Plan, progress: Progress = quiet, record: str | None = None) -> list[SwapResult]:
    """Swap guests batch by batch (a batch in parallel); stop once ``max_failures`` guests failed.

    SIGINT/SIGTERM stop the swaps in flight at their next step (they roll back) and start no more.
    A host whose libvirtd stops answering loses its place: its swap in flight fails (its journal
    stays when it could not roll back), its other guests are not attempted, the other hosts go on.
    Once a host is lost the rollout is recorded in the cluster store (``record``: the one to
    continue) with the guests it leaves pending, so ``osimg swap --resume`` finishes it once the host
    is back (a rollout that loses no host leaves no record: a killed one is the journal's business).
    """
    rid = record or f"{int(time.time())}-{uuidlib.uuid4().hex[:8]}"
    results: list[SwapResult] = []
    failures = 0
    lost: dict[str, str] = {}  # host -> why it is taken for lost
    pending: list[str] = []  # left for --resume: guests of lost hosts
    todo = list(p.guests)
    with SIGNALS.deferred():
        for bi, group in enumerate(p.batches, 1):
            why = (f"not attempted: {failures} failure(s) reached the limit" if failures >= p.max_failures
                   else f"not attempted: interrupted by {SIGNALS.received}" if SIGNALS.received else None)
            skipped = [g for g in group if why is not None or p.hosts.get(g, "local") in lost]
            for g in skipped:
                h = p.hosts.get(g, "local")
                rec = guests.load(ctx, g)
                because = why or (f"not attempted: host {h} does not answer ({short(lost[h], 160)}); "
                                  f"'osimg swap --resume' swaps it once the host is back")
                results.append(SwapResult(g, p.strategy, rec.image, p.to_image, rec.os_version, skipped=True,
                                          error=because))
                if why is None:
                    pending.append(g)
                todo.remove(g)
            group = [g for g in group if g not in skipped]
            if not group:
                continue
            progress(f"batch {bi}/{len(p.batches)}: {', '.join(group)}")
            if len(group) == 1:
                batch_results = [swap_guest(ctx, group[0], p.to_image, p.strategy, progress, p.health_timeout)]
            else:
                with ThreadPoolExecutor(max_workers=len(group)) as pool:
                    batch_results = list(pool.map(lambda g: _swap_in_own_context(ctx, g, p, progress), group))
            results += batch_results
            failures += sum(1 for r in batch_results if not r.ok)
            for r in batch_results:
                todo.remove(r.guest)
                h = p.hosts.get(r.guest, "local")
                if r.ok or h == "local":
                    continue
                if h not in lost:
                    down = host_down(ctx, h)
                    if down is not None:
                        lost[h] = down
                        progress(f"host {h} does not answer: its guests not yet swapped are skipped")
                if h in lost:
                    pending.append(r.guest)
            if lost:
                _record_rollout(ctx, rid, p, todo + pending)
    if pending and not SIGNALS.received:
        _record_rollout(ctx, rid, p, pending)
    elif lost or record is not None:
        with contextlib.suppress(OsimgError):
            ctx.store.delete(ROLLOUT_KIND, rid)
    return results


def host_down(ctx: Context, host: str) -> str | None:
    """Why ``host``'s libvirtd is taken for lost (it does not answer), or None when it answers."""
    try:
        hosts.context(ctx, host).hv.versions()
    except HostUnreachableError as err:
        return str(err)
    except OsimgError:
        return None
    return None


def _record_rollout(ctx: Context, rid: str, p: Plan, pending: list[str]) -> None:
    ctx.store.put(ROLLOUT_KIND, rid, {"to_image": p.to_image, "strategy": p.strategy, "batch": p.batch,
                                      "max_failures": p.max_failures, "per_host": p.per_host,
                                      "health_timeout": p.health_timeout, "pending": pending,
                                      "updated": time.time()})


def pending_rollouts(ctx: Context) -> list[tuple[str, dict[str, Any]]]:
    """Rollouts a lost host left unfinished, each with the guests still to swap (checked: data)."""
    out = []
    for rid, rec in ctx.store.items(ROLLOUT_KIND):
        if not isinstance(rec, dict) or not isinstance(rec.get("pending"), list):
            continue
        names = [g for g in rec["pending"] if isinstance(g, str) and NAME_RE.match(g)
                 and (ctx.settings.guests_dir / g / "guest.json").exists()]
        out.append((rid, {**rec, "pending": names}))
    return out


def _swap_in_own_context(ctx: Context, guest: str, p: Plan, progress: Progress) -> SwapResult:
    """libvirt connections and store handles are per thread: each parallel swap gets its own."""
    own = Context(ctx.settings)
    try:
        return swap_guest(own, guest, p.to_image, p.strategy, progress, p.health_timeout)
    finally:
        own.close()


def swap_guest(ctx: Context, name: str, to_image: str, strategy: str = "warm",
               progress: Progress = quiet, health_timeout: float = 120) -> SwapResult:
    """Swap one guest; never raises for a failed swap (see the result), only for refused input."""
    g = guests.load(ctx, name)
    res = SwapResult(name, strategy, g.image, to_image, g.os_version)
    target = catalog.resolve(ctx, to_image)
    try:
        if g.host is not None:
            hosts.ship(ctx, g.host, to_image)  # the host gets the image (and its memory state) first
        ctx = g.at(ctx)
        with ctx.store.lock(journal.lock_name(name), call_holder_id(), journal.LOCK_TTL) as lease:
            if journal.get(ctx, name) is not None:
                journal.raise_unfinished(name)
            if ctx.hv.state(name) != "running":
                raise SwapError(f"guest {name} is {ctx.hv.state(name)}, not running")
            fn = warm if strategy == "warm" else cold
            fn(ctx, g, target, res, progress, health_timeout, lease)
            notes = []
            if strategy == "warm" and res.ok and g.custom().kernel_params:
                # the paged-in kernel was booted with the golden image's command line
                notes.append(f"kernel_params {' '.join(g.custom().kernel_params)} take effect at next boot "
                             "(a warm swap keeps the running kernel's command line; use --strategy cold to apply now)")
            if strategy == "warm" and res.ok and g.memory_mib != target.memory_mib:
                # a saved state keeps its memory size (libvirt's ABI check); the record now says so
                notes.append(f"memory is now {target.memory_mib} MiB, the size {target.ref}'s memory state was "
                             f"captured with (was {g.memory_mib} MiB; a cold swap keeps the guest's own)")
            res.note = "; ".join(notes) or None
    except ClusterError as err:
        if not res.ok:
            res.error = res.error or stopped_by_store(ctx, err, name)
    except OsimgError as err:
        res.error = res.error or str(err)
    return res


@dataclass
class ResumeAction:
    """What ``resume`` does (or, with --dry-run, would do) with one journal entry."""

    guest: str
    strategy: str
    step: str
    action: str


def _action(ctx: Context, rec: dict[str, Any]) -> str:
    name = str(rec.get("guest", "?"))
    step = str(rec.get("step", ""))
    to, back = rec.get("to_image", "?"), rec.get("from_image", "?")
    if not (ctx.settings.guests_dir / name).exists():
        return "drop the entry: the guest was removed"
    if step in (journal.PREPARING, journal.PREPARED):
        return f"remove the files the swap prepared ({', '.join(map(str, rec.get('files', []))) or 'none'}), " \
               f"keep {back}"
    if step == journal.COMMITTING:
        return f"finish the swap to {to} (it reached committing)"
    if step in ("customized", "booted"):
        return f"check the new OS; finish the swap to {to} if healthy, else roll back to {back}"
    return f"roll back to {back} (interrupted at step {rec.get('rollback_from') or step})"


def resume_plan(ctx: Context) -> list[ResumeAction]:
    """What ``resume`` would do, changing nothing (``osimg swap --resume --dry-run``)."""
    out = [ResumeAction(str(rec.get("guest", "?")), str(rec.get("strategy", "?")), str(rec.get("step", "")),
                        _action(ctx, rec)) for rec in journal.entries(ctx)]
    for rid, rec in pending_rollouts(ctx):
        out += [ResumeAction(g, str(rec.get("strategy", "?"))[:10], "pending",
                             f"swap to {short(rec.get('to_image'), 40)} (rollout {rid}: its host was lost)")
                for g in rec["pending"]]
    return out


def resume(ctx: Context, progress: Progress = quiet) -> list[SwapResult]:
    """Finish or roll back every swap a killed orchestrator left in the journal.

    Each entry is read again under the guest's lock and acted on as it is then: another process
    may have finished (or resumed) that swap meanwhile.
    """
    out = []
    for listed in journal.entries(ctx):
        try:
            name = valid_name(listed.get("guest"), "guest name in the swap journal")
            if (ctx.settings.guests_dir / name).exists():
                _records(ctx, name, listed)
        except OsimgError as err:
            # a record cut short, edited by hand or crafted: refused, nothing is done for it (its paths
            # would be unlinked or booted by root); a person looks at it
            out.append(SwapResult(str(listed.get("guest"))[:63], str(listed.get("strategy"))[:10], "?", "?", "?",
                                  error=f"{err}; nothing was done for this record", refused=True))
            continue
        if not (ctx.settings.guests_dir / name).exists():
            progress(f"{name}: the guest was removed; dropping its journal entry")
            journal.drop_unlocked(ctx, name)
            continue
        res = SwapResult(name, str(listed.get("strategy", "?"))[:10], str(listed.get("from_image", "?")),
                         str(listed.get("to_image", "?")), "?")
        try:
            holder = ctx.store.lock_holder(journal.lock_name(name))
            if holder is not None and dead_local_holder(holder):
                # killed on this host: its lease would only run out; it can act no more (fencing)
                progress(f"{name}: {holder} is gone; taking over its lock")
                ctx.store.release_lock(journal.lock_name(name), holder)
            with ctx.store.lock(journal.lock_name(name), call_holder_id(), journal.LOCK_TTL,
                                wait=journal.LOCK_TTL + 5) as lease:
                rec = journal.get(ctx, name)
                if rec is None:
                    progress(f"{name}: another process finished this swap meanwhile")
                    continue
                _resume_one(ctx, lease, rec, res, progress)
        except ClusterError as err:
            res.error = stopped_by_store(ctx, err, name)
        except OsimgError as err:
            res.error = f"resume failed: {err}; the journal is kept: {RESUME_HINT}"
        except Exception as err:  # a failed resume is reported, the journal stays for the next
            res.error = f"resume failed: {describe(err)}; the journal is kept: {RESUME_HINT}"
        out.append(res)
    return out + _continue_rollouts(ctx, progress)


def _continue_rollouts(ctx: Context, progress: Progress) -> list[SwapResult]:
    """Swap the guests a lost host left pending (those now on the target need nothing)."""
    out: list[SwapResult] = []
    for rid, rec in pending_rollouts(ctx):
        to = str(rec.get("to_image", ""))
        try:
            names = [g for g in rec["pending"] if guests.load(ctx, g).image != to and journal.get(ctx, g) is None]
            if not names:
                ctx.store.delete(ROLLOUT_KIND, rid)
                continue
            progress(f"rollout {short(rid, 40)}: swapping {', '.join(names)}, left pending by a lost host")
            per, batch, most = rec.get("per_host"), rec.get("batch", 1), rec.get("max_failures", 1)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (batch, most)):
                raise ValidationError("its batch or max-failures is not a number")
            p = plan(ctx, names, to, str(rec.get("strategy", "warm")), batch, most,
                     per if isinstance(per, int) and not isinstance(per, bool) else None)
        except OsimgError as err:  # a record is data: a broken one is reported and left for a person
            out.append(SwapResult(str(rec["pending"][0])[:63] if rec["pending"] else "?",
                                  str(rec.get("strategy", "?"))[:10], "?", to[:63], "?",
                                  error=f"rollout {short(rid, 40)} cannot go on: {err}", refused=True))
            continue
        out += rollout(ctx, p, progress, record=rid)
    return out


def _records(ctx: Context, name: str, rec: dict[str, Any]) -> tuple[guests.Guest, guests.Guest]:
    """The old and new guest records of a journal entry, checked like any record before use."""
    hint = "; inspect the guest by hand and remove the entry"
    try:
        old = guests.from_record(ctx, rec.get("old"), f"swap journal record of {name}: old", hint)
        new = guests.from_record(ctx, rec.get("new"), f"swap journal record of {name}: new", hint)
    except OsimgError as err:
        raise ValidationError(str(err)) from None
    if old.name != name or new.name != name:
        raise ValidationError(f"swap journal record of {name}: its records name guest {short(old.name)} "
                              f"and {short(new.name)}{hint}")
    return old, new


def _resume_one(ctx: Context, lease: Lease, rec: dict[str, Any], res: SwapResult, progress: Progress) -> None:
    name = res.guest
    old, new = _records(ctx, name, rec)
    ctx = old.at(ctx)  # the guest's libvirt host (an unreachable one fails this guest's resume alone)
    res.old_version = old.os_version
    step = str(rec.get("step", ""))
    if step in (journal.PREPARING, journal.PREPARED) and ctx.hv.is_active(name):
        files = [f for f in map(str, rec.get("files", [])) if f and "/" not in f and f != old.overlay_file]
        discard(ctx, lease, old.files(ctx), files, name)
        res.rolled_back = True
        res.error = f"interrupted at step {step}, before the guest was touched: removed {', '.join(files)}; " \
                    f"it still runs {old.image}"
        progress(f"{name}: {res.error}")
        return
    healthy = step == journal.COMMITTING
    back = rec.get("rollback_from")
    why = "interrupted while rolling back" if back == journal.OLD_OS_BACK else f"interrupted at step {back or step}"
    if step in ("customized", "booted") and ctx.hv.is_active(name):
        try:
            health(ctx, new, new.os_version, None, 60)
            healthy = True
        except OsimgError as err:
            why += f" and the new OS is unhealthy ({err})"
            progress(f"{name}: new OS unhealthy after resume ({err})")
    if healthy:
        commit(ctx, lease, old, new)
        if not ctx.hv.is_active(name):
            ctx.hv.start(name)
            guests.wait_ready(ctx, new)
        res.ok, res.new_version = True, new.os_version
        progress(f"{name}: finished the swap to {new.image}")
        return
    rollback(ctx, lease, old, new.overlay_file)
    res.rolled_back = True
    res.error = f"{why}: rolled back to {old.image}"
    progress(f"{name}: {res.error}")
