"""The swap journal (kind ``swap`` in the cluster store, one record per guest) and the per-guest lock.

Journal first, always: a step is recorded before the orchestrator acts on it, so ``resume`` can
finish or roll back whatever a killed orchestrator left behind. The first entry, ``preparing``,
names every file the swap will create (the new overlay, the page-in file) and the rollback
snapshot, before any of them exists; ``committing`` is written before anything of the old OS is
deleted, and from there a resume only rolls forward.

Every write is fenced: it happens in the store only while this orchestrator still holds the
guest's lock (``Lease``), so a process that lost its lock cannot record, and therefore not take,
another step.
"""

from __future__ import annotations

import time
from typing import Any

from ..cluster.store import Lease
from ..context import Context
from ..errors import SwapError

KIND = "swap"
LOCK_TTL = 10.0  # refreshed while a swap runs; a killed orchestrator frees it after this

PREPARING = "preparing"
PREPARED = "prepared"
COMMITTING = "committing"
ROLLING_BACK = "rolling-back"
OLD_OS_BACK = "old-os-back"  # a rollback's progress: the old OS runs again, only data and cleanup remain
# Steps in which the guest never left its old OS (it may be quiesced, not replaced).
BEFORE_PAGE_OUT = (PREPARING, PREPARED, "releasing", "released", "quiesced", "stopping", OLD_OS_BACK)


def lock_name(guest: str) -> str:
    return f"swap-{guest}"


def begin(ctx: Context, lease: Lease, name: str, **fields: Any) -> None:
    """The first entry of a swap (step ``preparing``), written before any file of the swap exists."""

    def new(rec: dict[str, Any] | None) -> dict[str, Any]:
        if rec is not None:
            raise_unfinished(name)
        return {**fields, "guest": name, "step": PREPARING, "updated": time.time()}

    lease.check()
    ctx.store.update(KIND, name, new, fence=lease.fence)


def raise_unfinished(name: str) -> None:
    raise SwapError(f"guest {name} has an unfinished swap; run 'osimg swap --resume' first")


def write(ctx: Context, lease: Lease, name: str, **fields: Any) -> None:
    """Merge ``fields`` into the guest's journal record, only while ``lease`` is still ours."""

    def upd(rec: dict[str, Any] | None) -> dict[str, Any]:
        out = dict(rec or {})
        out.update(fields)
        out["updated"] = time.time()
        return out

    lease.check()
    ctx.store.update(KIND, name, upd, fence=lease.fence)


def get(ctx: Context, name: str) -> dict[str, Any] | None:
    return ctx.store.get(KIND, name)


def drop(ctx: Context, lease: Lease, name: str) -> None:
    """The swap is over (finished or rolled back): its entry goes, fenced like every write."""
    lease.check()
    ctx.store.update(KIND, name, lambda _rec: None, fence=lease.fence)


def drop_unlocked(ctx: Context, name: str) -> None:
    """Forget the entry of a guest that no longer exists (nothing left to act on)."""
    ctx.store.delete(KIND, name)


def entries(ctx: Context) -> list[dict[str, Any]]:
    return ctx.store.list(KIND)
