"""LUs and exports: what the VIOS cluster serves, as records in the cluster store.

- An **LU** (kind ``lu``) is a disk file a VIOS can serve: a base image (always read-only), a
  guest's overlay, a data volume or a paging file. It belongs to no node.
- An **export** (kind ``export``, named ``NODE.LU``) says that node NODE serves the LU. Its ``node``
  field makes it one of that node's devices (``NodeAgent`` keeps a local copy and drops exports
  deleted while the node was away). The node's daemon does the serving and reports back in the
  record: ``status`` is ``pending`` until it serves (``serving``, with the unix socket or the
  127.0.0.1 port), ``standby`` for a writable LU's second node, ``failed`` with ``error``.

A writable LU is open on one node at a time (QEMU's image locks refuse a second writer process, and
two qcow2 drivers caching one file's metadata would corrupt it), so its second export is a
*standby* opened only at failover, after the first node's process is gone. Read-only LUs are
served by all their nodes at once.

Callers create and delete records here; only the owning node's daemon touches its exports'
status fields. Every change publishes a lifecycle event so daemons and watchers re-read the store.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..cluster.events import ALERT, CREATED, DELETED, EXPORT_FAILED, LIFECYCLE, Event
from ..cluster.store import ALIVE, LU_KIND, Record
from ..context import Context
from ..errors import ConflictError, NotFoundError, StorageError, ValidationError
from ..host import qemu_img
from ..validate import inside, short
from ..validate import name as valid_name

EXPORT_KIND = "export"
ATTACH_KIND = "attachment"
NODE_KIND = "vios"
ROLES = ("base", "overlay", "data", "paging")
FORMATS = ("qcow2", "raw")

PENDING = "pending"
SERVING = "serving"
STANDBY = "standby"
FAILED = "failed"


@dataclass
class LU:
    name: str
    path: str
    fmt: str
    readonly: bool
    role: str
    size: int
    created: float = field(default_factory=time.time)


@dataclass
class Export:
    name: str
    node: str
    lu: str
    readonly: bool
    active: bool
    status: str = PENDING
    socket: str | None = None
    port: int | None = None
    error: str = ""
    created: float = field(default_factory=time.time)
    tls: str | None = None  # the node's key folder when the export is reached over TCP with TLS

    @property
    def usable(self) -> bool:
        return self.status == SERVING


def export_name(node: str, lu: str) -> str:
    return valid_name(f"{node}.{lu}", f"export name for LU {lu} on node {node} (shorten the names)")


def lu_from_record(rec: Record) -> LU:
    return LU(**{k: rec[k] for k in LU.__dataclass_fields__ if k in rec})


def checked_lu(ctx: Context, rec: Record) -> LU:
    """An LU record made safe to act on: its name follows the name rule, its file lies under the LU
    roots and its format is one osimg declares (never probed). Records are data, not trust: anyone
    who could write the store must not make root serve /etc/shadow."""
    lu = lu_from_record(rec)
    valid_name(lu.name, "LU name")
    lu.path = str(inside(lu.path, ctx.settings.lu_roots, f"LU {lu.name}: file"))
    if lu.fmt not in FORMATS:
        raise ValidationError(f"LU {lu.name}: format {short(lu.fmt)} is not one of {', '.join(FORMATS)}")
    return lu


def export_from_record(rec: Record) -> Export:
    return Export(**{k: rec[k] for k in Export.__dataclass_fields__ if k in rec})


def publish(ctx: Context, kind: str, type_: str, obj: str, **data: Any) -> None:
    ctx.store.publish(Event(kind, type_, obj, data))


# -- LUs --------------------------------------------------------------------------------------------------
def format_of(path: Path) -> str:
    """The format osimg declares for a file it made: ``*.qcow2`` files are qcow2, anything else raw.

    Never probed: a raw disk a guest wrote can start with a qcow2 header naming /etc/shadow as its
    backing file, and probing would open it as qcow2."""
    return "qcow2" if path.suffix == ".qcow2" else "raw"


def define_lu(ctx: Context, name: str, path: str | Path, role: str, readonly: bool | None = None,
              fmt: str | None = None) -> LU:
    """Record a disk file as an LU; base images and paging files are read-only whatever is asked.

    The file must lie under the LU roots (OSIMG_HOME, the build cache, ``OSIMG_LU_ROOTS``); its
    format is ``fmt``, or else the one its name declares (``format_of``)."""
    valid_name(name, "LU name")
    if role not in ROLES:
        raise ValidationError(f"invalid LU role {role!r}: expected one of {', '.join(ROLES)}")
    p = inside(path, ctx.settings.lu_roots, f"LU {name}: file")
    if not p.is_file():
        raise NotFoundError(f"LU {name}: no disk file at {p}")
    fmt = fmt or format_of(p)
    if fmt not in FORMATS:
        raise ValidationError(f"LU {name}: format {short(fmt)} is not one of {', '.join(FORMATS)}")
    ro = True if role in ("base", "paging") else bool(readonly)
    inf = qemu_img.info(p, fmt)
    lu = LU(name, str(p), fmt, ro, role, inf.virtual_size)

    def create(cur: Record | None) -> Record:
        if cur is not None and (cur.get("path") != lu.path or cur.get("readonly") != ro):
            raise ConflictError(f"an LU named {name!r} already exists for {cur.get('path')}; "
                                f"delete it first with 'osimg vios lu rm {name}'")
        return cur if cur is not None else asdict(lu)

    rec = ctx.store.update(LU_KIND, name, create)
    assert rec is not None
    publish(ctx, LIFECYCLE, CREATED, f"lu/{name}", path=lu.path, role=role, readonly=ro)
    return lu_from_record(rec)


def get_lu(ctx: Context, name: str) -> LU:
    rec = ctx.store.get(LU_KIND, valid_name(name, "LU name"))
    if rec is None:
        raise NotFoundError(f"no LU named {name!r} in the cluster (see 'osimg cluster status')")
    return checked_lu(ctx, rec)


def list_lus(ctx: Context) -> list[LU]:
    return [lu_from_record(r) for r in ctx.store.list(LU_KIND)]


def delete_lu(ctx: Context, name: str) -> None:
    """Delete an LU and every node's export of it; refused while a client has it reserved or attached.

    Nodes that are down keep a local record of their export: they drop it when they rejoin.
    """
    get_lu(ctx, name)
    holders = ctx.store.reservations(name)
    attached = [a for a in ctx.store.list(ATTACH_KIND) if a.get("lu") == name]
    if holders or attached:
        who = sorted({r.client for r in holders} | {str(a.get("guest")) for a in attached})
        raise ConflictError(f"LU {name} is in use by {', '.join(who)}; detach it first")
    for exp in exports_of(ctx, name):
        ctx.store.delete(EXPORT_KIND, exp.name)
        publish(ctx, LIFECYCLE, DELETED, f"export/{exp.name}", node=exp.node, lu=name)
    ctx.store.delete(LU_KIND, name)
    publish(ctx, LIFECYCLE, DELETED, f"lu/{name}")


# -- exports ----------------------------------------------------------------------------------------------
def get_export(ctx: Context, name: str) -> Export | None:
    rec = ctx.store.get(EXPORT_KIND, name)
    return None if rec is None else export_from_record(rec)


def exports_of(ctx: Context, lu: str | None = None, node: str | None = None) -> list[Export]:
    out = [export_from_record(r) for r in ctx.store.list(EXPORT_KIND)]
    return [e for e in out if (lu is None or e.lu == lu) and (node is None or e.node == node)]


def export_lu(ctx: Context, lu_name: str, node: str, standby: bool | None = None, wait: float = 30.0) -> Export:
    """Ask ``node`` to serve an LU and wait until its daemon reports back.

    A writable LU already served by another node gets a standby export (unless ``standby=False``,
    which the daemon will fail on the image lock while the other node holds it).
    """
    lu = get_lu(ctx, lu_name)
    valid_name(node, "VIOS node name")
    if ctx.store.get(NODE_KIND, node) is None:
        raise NotFoundError(f"no VIOS node named {node!r} (start one with 'osimg vios start {node}')")
    name = export_name(node, lu.name)
    if standby is None:
        standby = not lu.readonly and any(e.active for e in exports_of(ctx, lu.name) if e.node != node)
    active = lu.readonly or not standby
    exp = Export(name, node, lu.name, lu.readonly, active, PENDING)

    def create(cur: Record | None) -> Record:
        return cur if cur is not None else asdict(exp)

    rec = ctx.store.update(EXPORT_KIND, name, create)
    assert rec is not None
    publish(ctx, LIFECYCLE, CREATED, f"export/{name}", node=node, lu=lu.name, active=active)
    return wait_export(ctx, name, wait)


def wait_export(ctx: Context, name: str, timeout: float = 30.0) -> Export:
    """Wait until the owning node has acted on an export: serving, standby, or failed (raises)."""
    deadline = time.monotonic() + timeout
    while True:
        exp = get_export(ctx, name)
        if exp is None:
            raise NotFoundError(f"export {name} was deleted while waiting for it")
        if exp.status == FAILED:
            raise StorageError(f"node {exp.node} could not serve LU {exp.lu}: {exp.error}")
        if exp.status in (SERVING, STANDBY) and (exp.active == (exp.status == SERVING)):
            return exp
        if time.monotonic() > deadline:
            raise StorageError(f"node {exp.node} did not serve LU {exp.lu} within {timeout:.0f}s "
                               f"(is its daemon running? 'osimg vios list')")
        time.sleep(0.05)


def activate(ctx: Context, name: str, timeout: float = 30.0) -> Export:
    """Turn a standby export into a serving one (failover of a writable LU)."""

    def on(cur: Record | None) -> Record:
        if cur is None:
            raise NotFoundError(f"export {name} does not exist")
        return {**cur, "active": True, "status": PENDING, "error": ""}

    ctx.store.update(EXPORT_KIND, name, on)
    publish(ctx, LIFECYCLE, "activated", f"export/{name}")
    return wait_export(ctx, name, timeout)


def demote(ctx: Context, name: str) -> None:
    """Make a writable LU's export on a failed node a standby, so that node does not grab it back."""

    def off(cur: Record | None) -> Record | None:
        return None if cur is None else {**cur, "active": False, "status": PENDING, "socket": None, "port": None,
                                         "tls": None}

    ctx.store.update(EXPORT_KIND, name, off)
    publish(ctx, LIFECYCLE, "demoted", f"export/{name}")


def unexport(ctx: Context, lu: str, node: str) -> None:
    """Stop serving an LU from a node; refused while a client reaches the LU through it."""
    name = export_name(node, lu)
    if get_export(ctx, name) is None:
        raise NotFoundError(f"node {node} does not export LU {lu}")
    for a in ctx.store.list(ATTACH_KIND):
        if a.get("lu") == lu and any(p.get("node") == node and p.get("connected") for p in a.get("paths", [])):
            raise ConflictError(f"guest {a.get('guest')} reaches LU {lu} through node {node}; detach it first")
    ctx.store.delete(EXPORT_KIND, name)
    publish(ctx, LIFECYCLE, DELETED, f"export/{name}", node=node, lu=lu)


def set_status(ctx: Context, name: str, status: str, error: str = "", **where: Any) -> None:
    """Owning node only: report what it did with an export."""

    def upd(cur: Record | None) -> Record | None:
        if cur is None:
            return None
        return {**cur, "status": status, "error": error, **where}

    ctx.store.update(EXPORT_KIND, name, upd)
    if status == FAILED:
        publish(ctx, ALERT, EXPORT_FAILED, f"export/{name}", error=error)


def alive_nodes(ctx: Context) -> dict[str, int]:
    """Name -> node ID of the VIOS nodes whose lease is alive."""
    return {n.name: n.id for n in ctx.store.nodes() if n.state == ALIVE}
