"""The swap journal (kind ``swap`` in the cluster store, one record per guest) and the per-guest lock.

Every step of a swap is written here before the orchestrator moves on, so ``resume`` can finish or
roll back whatever a killed orchestrator left behind.
"""

from __future__ import annotations

import time
from typing import Any

from ..context import Context

KIND = "swap"
LOCK_TTL = 10.0  # refreshed while a swap runs; a killed orchestrator frees it after this


def lock_name(guest: str) -> str:
    return f"swap-{guest}"


def write(ctx: Context, name: str, **fields: Any) -> None:
    """Merge ``fields`` into the guest's journal record (created on first write)."""

    def upd(rec: dict[str, Any] | None) -> dict[str, Any]:
        out = dict(rec or {})
        out.update(fields)
        out["updated"] = time.time()
        return out

    ctx.store.update(KIND, name, upd)


def get(ctx: Context, name: str) -> dict[str, Any] | None:
    return ctx.store.get(KIND, name)


def drop(ctx: Context, name: str) -> None:
    ctx.store.delete(KIND, name)


def entries(ctx: Context) -> list[dict[str, Any]]:
    return ctx.store.list(KIND)
