"""Redundant VIOS: re-point a guest's disk to another node's export when the serving node fails.

The primary node's daemon calls ``check`` continuously; anyone may call ``failover`` directly. A
path is dead when its node's lease is no longer alive (lost or left) or its export is not serving
any more. For a read-only LU every live node is already a quorum child: the dead child is only
removed (reads had fallen back to the next child at once). For a writable LU the standby export on
another node is activated first: its node opens the image only now, after the dead node's storage
process is gone (QEMU's image lock refuses while it is not), then the reservation moves to that
node and the new path replaces the dead one. A guest paused by a failed request (``werror=stop``)
is resumed and the request retried on the new path.
"""

from __future__ import annotations

import logging

from ..cluster.events import LIFECYCLE
from ..cluster.store import EXCLUSIVE, SHARED_READ
from ..context import Context
from ..errors import ConflictError, NotFoundError, OsimgError
from ..process import holder_id
from . import lus
from .attach import Attachment, Path_, add_blockdev, get, list_attachments, qmp, require_qmp, save
from .lus import SERVING, STANDBY

log = logging.getLogger("osimg.vios")

LOCK_TTL = 60.0


def dead_paths(ctx: Context, att: Attachment, alive: dict[str, int] | None = None) -> list[Path_]:
    alive = lus.alive_nodes(ctx) if alive is None else alive
    serving = {e.name for e in lus.exports_of(ctx, att.lu) if e.status == SERVING}
    return [p for p in att.connected() if p.node not in alive or p.export not in serving]


def check(ctx: Context) -> list[str]:
    """Fail over every QMP attachment of a running guest that has a dead path; returns what moved."""
    moved = []
    alive = lus.alive_nodes(ctx)
    for att in list_attachments(ctx):
        if att.via != "qmp" or not dead_paths(ctx, att, alive) or not ctx.hv.is_active(att.guest):
            continue
        try:
            failover(ctx, att.guest, att.lu)
            moved.append(att.name)
        except OsimgError as err:
            log.warning("failover of %s: %s", att.name, err)
    return moved


def failover(ctx: Context, guest: str, lu_name: str) -> Attachment:
    """Replace the dead paths of one attachment by live ones; a no-op when none is dead."""
    att = get(ctx, guest, lu_name)
    if att is None:
        raise NotFoundError(f"LU {lu_name} is not attached to guest {guest}")
    require_qmp(att)
    with ctx.store.lock(f"failover.{att.name}"[:63], holder_id(), LOCK_TTL, wait=LOCK_TTL):
        att = get(ctx, guest, lu_name)
        if att is None:
            raise NotFoundError(f"LU {lu_name} was detached from guest {guest}")
        alive = lus.alive_nodes(ctx)
        dead = dead_paths(ctx, att, alive)
        if not dead:
            return att
        live = [p for p in att.connected() if p not in dead]
        dead_nodes = {p.node for p in dead}
        log.info("%s: paths through %s are dead", att.name, ", ".join(sorted(dead_nodes)))
        if not live:
            p = _new_path(ctx, att, alive, dead_nodes)
            add_blockdev(ctx, att, p)
            qmp(ctx, guest, "x-blockdev-change", parent=att.quorum, node=p.blockdev)
            p.child = f"children.{att.next_child}"
            att.next_child += 1
            live = [p]
        for p in dead:
            qmp(ctx, guest, "x-blockdev-change", parent=att.quorum, child=p.child)
            qmp(ctx, guest, "blockdev-del", **{"node-name": p.blockdev})
            p.connected, p.blockdev, p.child = False, "", ""
            if p.node in alive:
                ctx.store.release(att.lu, alive[p.node], guest)
        status = qmp(ctx, guest, "query-status")
        if status.get("status") == "io-error":
            ctx.hv.resume(guest)  # the failed requests are retried, now on the new path
        att.failovers += 1
        save(ctx, att)
    lus.publish(ctx, LIFECYCLE, "failed-over", f"lu/{att.lu}", guest=guest, dead=sorted(dead_nodes),
                nodes=[p.node for p in live], resumed=status.get("status") == "io-error")
    return att


def _new_path(ctx: Context, att: Attachment, alive: dict[str, int], dead_nodes: set[str]) -> Path_:
    """Pick (and for a writable LU activate and reserve) another node's export of the LU."""
    exports = [e for e in lus.exports_of(ctx, att.lu) if e.node in alive and e.node not in dead_nodes]
    exports.sort(key=lambda e: e.status != SERVING)
    if not exports:
        raise ConflictError(f"LU {att.lu} of guest {att.guest} has no live VIOS node left to fail over to")
    exp = exports[0]
    if not att.readonly:
        for old in lus.exports_of(ctx, att.lu):
            if old.node in dead_nodes and old.active:
                lus.demote(ctx, old.name)
    if exp.status == STANDBY or exp.status != SERVING:
        exp = lus.activate(ctx, exp.name)
    # the dead node's reservation for this client would block the new one until its lease ends
    ids = {n.name: n.id for n in ctx.store.nodes()}
    for node in dead_nodes:
        if node in ids:
            ctx.store.release(att.lu, ids[node], att.guest)
    ctx.store.reserve(att.lu, alive[exp.node], att.guest, SHARED_READ if att.readonly else EXCLUSIVE)
    for p in att.paths:
        if p.node == exp.node:
            p.export, p.socket, p.port = exp.name, exp.socket, exp.port
            return p
    p = Path_(exp.node, exp.name, exp.socket, exp.port, tls=exp.tls)
    att.paths.append(p)
    return p
