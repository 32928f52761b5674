"""Client guests that boot their OS from a VIOS-served base LU.

A client's root disk is declared on its QEMU command line: its private qcow2 overlay (a local file,
where its writes go) whose backing is a ``quorum`` of NBD connections to every VIOS serving the
base. Its kernel finds the root on the virtio-scsi bus (``root=/dev/sda``). The attachment is
recorded like any QMP attachment, so the primary VIOS node fails it over (drops a dead VIOS's
connection, adds a live one) the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
from pathlib import Path
from typing import Any

from .. import guests, recipes
from ..cluster.events import ATTACHED, LIFECYCLE
from ..cluster.store import SHARED_READ
from ..context import Context
from ..errors import NotFoundError, OsimgError, ValidationError
from ..settings import QEMU_USER
from . import lus
from .attach import Attachment, Path_, check_path, nbd_blockdev, tls_object
from .lus import ATTACH_KIND, SERVING, alive_nodes


def _qemu_owns(path: Path) -> None:
    """Files declared only on the QEMU command line are not relabelled by libvirt: hand them over."""
    try:
        pw = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return  # QEMU runs as root here
    os.chown(path, pw.pw_uid, pw.pw_gid)


def create_client(ctx: Context, name: str, image: str, lu_name: str, nodes: list[str] | None = None,
                  memory_mib: int | None = None) -> tuple[guests.Guest, Attachment]:
    """Create and start a guest whose OS is read from a VIOS-served base LU, writes in its own overlay.

    ``image`` names the image the LU serves (its kernel, initrd and host key boot the client);
    ``nodes`` orders the VIOS nodes (default: every node serving the LU). Returns once started.
    """
    lu = lus.get_lu(ctx, lu_name)
    if not lu.readonly:
        raise ValidationError(f"LU {lu.name} is writable; a client boots from a read-only base image LU")
    img = recipes.ensure_built(ctx.settings, image).disk if ":" in image else None
    if img is not None and img.resolve() != Path(lu.path).resolve():
        raise ValidationError(f"LU {lu.name} serves {lu.path}, not the disk of image {image} ({img})")
    alive = alive_nodes(ctx)
    exports = [e for e in lus.exports_of(ctx, lu.name) if e.status == SERVING and e.node in alive]
    if nodes is not None:
        exports = sorted((e for e in exports if e.node in nodes), key=lambda e: nodes.index(e.node))
    if not exports:
        raise NotFoundError(f"LU {lu.name} is not served by any live VIOS node")
    g = guests.create(ctx, name, image, memory_mib=memory_mib, start=False)
    cid = ctx.store.allocate_client_id(name)
    aid = ctx.store.allocate_adapter_id(cid, lu.name)
    att = Attachment.new(name, lu.name, cid, aid, SHARED_READ, True, "qmp")
    reserved: list[int] = []
    try:
        for e in exports:
            ctx.store.reserve(lu.name, alive[e.node], name, SHARED_READ)
            reserved.append(alive[e.node])
        for i, e in enumerate(exports):
            p = Path_(e.node, e.name, e.socket, e.port, tls=e.tls, blockdev=f"vios{cid}x{aid}p{i}",
                      child=f"children.{i}", connected=True)
            att.paths.append(check_path(ctx, p))
        att.next_path = att.next_child = len(att.paths)
        overlay = g.overlay(ctx)
        _qemu_owns(overlay)
        ovl, ovl_file = f"vios{cid}x{aid}o", f"vios{cid}x{aid}f"
        blockdevs: list[dict[str, Any]] = [nbd_blockdev(p, lu.name, True) for p in att.paths]
        blockdevs += [
            att.quorum_blockdev(),
            {"driver": "file", "node-name": ovl_file, "filename": str(overlay)},
            {"driver": "qcow2", "node-name": ovl, "file": ovl_file, "backing": att.quorum},
        ]
        device = att.scsi_device(ovl)
        spec = guests.domain_spec(ctx, g)
        spec.disks = [d for d in spec.disks if d.target != "vda"]
        spec.cmdline = spec.cmdline.replace("root=/dev/vda", "root=/dev/sda")
        # -device must be JSON too: QEMU 7.2 creates legacy "k=v" devices before libvirt's controller
        objects = {p.node: tls_object(ctx, p) for p in att.paths}
        for obj in objects.values():
            if obj is not None:
                spec.extra_qemu_args += ["-object", json.dumps(obj)]
        for bd in blockdevs:
            spec.extra_qemu_args += ["-blockdev", json.dumps(bd)]
        spec.extra_qemu_args += ["-device", json.dumps(device)]
        ctx.hv.create(spec)
    except BaseException:
        for node_id in reserved:
            ctx.store.release(lu.name, node_id, name)
        with contextlib.suppress(OsimgError):
            guests.remove(ctx, name)
        raise
    ctx.store.put(ATTACH_KIND, att.name, att.to_record())
    lus.publish(ctx, LIFECYCLE, ATTACHED, f"lu/{lu.name}", guest=name, client_id=cid, adapter_id=aid,
                unit=att.unit, via="qmp", boot=True, nodes=[p.node for p in att.paths])
    return g, att


def remove_client(ctx: Context, name: str) -> None:
    """Remove a client created by ``create_client``: domain, files, reservations, attachment records."""
    ids = {n.name: n.id for n in ctx.store.nodes()}
    for rec in ctx.store.list(ATTACH_KIND):
        if rec.get("guest") != name:
            continue
        att = Attachment.from_record(rec)
        for p in att.paths:
            if p.node in ids:
                ctx.store.release(att.lu, ids[p.node], name)
        ctx.store.delete(ATTACH_KIND, att.name)
    guests.remove(ctx, name)
