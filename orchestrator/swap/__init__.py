"""Quiesce-swap-resume: replace the OS of running guests, warm or cold, with health checks and rollback.

**warm** (the invention): the target image was captured with its memory state. For guest G:
prepare G's own page-in file (the golden state carrying G's identity) and a fresh overlay on the
new base; quiesce G (stop its application, unmount and detach its data volume, guest-agent
fsfreeze, suspend); page out the old OS into an internal snapshot of its own overlay (memory and
disk, for rollback); page in the golden state (with a new VM generation ID); reseed its RNG and
set its clock through the guest agent, before anything else runs in it; hot-attach G's data
volume; apply G's customization live through the guest agent (with G's own SSH host key and a new
machine-id); start G's application; verify; commit or roll back.

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

from concurrent.futures import ThreadPoolExecutor

from .. import guests
from ..context import Context
from ..errors import OsimgError, SwapError
from ..images import catalog
from ..process import Progress, holder_id, quiet
from . import journal
from .cold import cold
from .plan import STRATEGIES, Plan, plan
from .steps import SwapResult, commit, health, rollback
from .warm import warm

__all__ = ["STRATEGIES", "Plan", "SwapResult", "plan", "resume", "rollout", "swap_guest"]


def rollout(ctx: Context, p: Plan, progress: Progress = quiet) -> list[SwapResult]:
    """Swap guests batch by batch (a batch in parallel); stop once ``max_failures`` guests failed."""
    results: list[SwapResult] = []
    failures = 0
    for bi, group in enumerate(p.batches, 1):
        if failures >= p.max_failures:
            for g in group:
                rec = guests.load(ctx, g)
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


def swap_guest(ctx: Context, name: str, to_image: str, strategy: str = "warm",
               progress: Progress = quiet, health_timeout: float = 120) -> SwapResult:
    """Swap one guest; never raises for a failed swap (see the result), only for refused input."""
    g = guests.load(ctx, name)
    res = SwapResult(name, strategy, g.image, to_image, g.os_version)
    target = catalog.resolve(ctx, to_image)
    holder = holder_id()
    try:
        with ctx.store.lock(journal.lock_name(name), holder, journal.LOCK_TTL):
            if journal.get(ctx, name) is not None:
                raise SwapError(f"guest {name} has an unfinished swap; run 'osimg swap --resume' first")
            if ctx.hv.state(name) != "running":
                raise SwapError(f"guest {name} is {ctx.hv.state(name)}, not running")
            fn = warm if strategy == "warm" else cold
            fn(ctx, g, target, res, progress, health_timeout)
    except OsimgError as err:
        res.error = res.error or str(err)
    return res


def resume(ctx: Context, progress: Progress = quiet) -> list[SwapResult]:
    """Finish or roll back every swap a killed orchestrator left in the journal."""
    out = []
    for rec in journal.entries(ctx):
        name = rec["guest"]
        if not (ctx.settings.guests_dir / name).exists():
            progress(f"{name}: the guest was removed; dropping its journal entry")
            journal.drop(ctx, name)
            continue
        old = guests.Guest(**rec["old"])
        new = guests.Guest(**rec["new"])
        res = SwapResult(name, rec.get("strategy", "?"), old.image, new.image, old.os_version)
        try:
            with ctx.store.lock(journal.lock_name(name), holder_id(), journal.LOCK_TTL, wait=journal.LOCK_TTL + 5):
                done = False
                if rec.get("step") in ("customized", "booted") and ctx.hv.is_active(name):
                    try:
                        health(ctx, new, new.os_version, None, 60)
                        done = True
                    except OsimgError as err:
                        progress(f"{name}: new OS unhealthy after resume ({err})")
                if done:
                    commit(ctx, old, new)
                    res.ok, res.new_version = True, new.os_version
                    progress(f"{name}: finished the swap to {new.image}")
                else:
                    rollback(ctx, old, new.overlay_file)
                    res.rolled_back = True
                    progress(f"{name}: rolled back to {old.image}")
        except OsimgError as err:
            res.error = str(err)
        out.append(res)
    return out
