"""VIOS guest: a storage-server domain serving LUs to client guests, and clients booting from it.

The VIOS guest boots the ``vios`` recipe (the tiny image plus ``qemu-nbd``). Serving an LU attaches
its file to the VIOS domain as a virtio-scsi disk (read-only for base images and paging files),
then starts ``qemu-nbd`` inside the guest on that disk, found by its SCSI address. The host reaches
the export only through a slirp forward on 127.0.0.1: the forwards must be on the QEMU command line
when the domain starts (one added later is lost on save/restore), so the guest gets ``slots`` of
them, ports 10809.. inside, free ports outside, and each export takes one. Nothing on the host
ever contacts the guest's own address, and there is no bridge.

A client booting from a VIOS-served base (``create_client``) has its root disk declared on its QEMU
command line: its private qcow2 overlay (a local file, where its writes go) whose backing is a
``quorum`` of NBD connections to every VIOS serving the base. Its kernel finds the root on the
virtio-scsi bus (``root=/dev/sda``). The attachment is recorded like any QMP attachment, so the
primary VIOS node fails it over (drops a dead VIOS's connection, adds a live one) the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
from pathlib import Path
from typing import Any

from .. import partitions, recipes
from ..cluster.events import ATTACHED, LIFECYCLE
from ..cluster.store import SHARED_READ
from ..context import Context
from ..errors import ConflictError, GuestError, NotFoundError, OsimgError, ValidationError
from ..hypervisor import DiskSpec
from ..remote import Session
from . import lus
from .attach import Attachment, Path_, _nbd_blockdev, scsi_target
from .lus import ATTACH_KIND, LU, SERVING, Export

IMAGE = "vios:v1"
NBD_PORT = 10809
QEMU_USER = "libvirt-qemu"


class GuestBackend:
    """Serves LUs from a VIOS guest domain named after the node."""

    kind = "guest"

    def __init__(self, ctx: Context, name: str, folder: Path, slots: int = 4, image: str = IMAGE) -> None:
        if not 1 <= slots <= 64:
            raise ValidationError(f"invalid slot count {slots}: a VIOS guest serves 1 to 64 exports")
        recipes.parse_ref(image)
        self.ctx = ctx
        self.domain = name
        self.folder = folder
        self.image = image
        self.slots = slots
        self.guest: partitions.Guest | None = None
        self.ports: dict[int, int] = {}  # slot -> host port on 127.0.0.1
        self._serving: dict[str, int] = {}  # export -> slot
        self._disks: dict[str, DiskSpec] = {}
        self._session: Session | None = None

    @property
    def pid(self) -> int | None:
        return self.ctx.hv.qemu_pid(self.domain)

    def start(self) -> None:
        ctx = self.ctx
        if ctx.hv.exists(self.domain) or (ctx.settings.guests_dir / self.domain).exists():
            # a VIOS guest left by a node that died: its disks and exports are stale, start afresh
            partitions.remove(ctx, self.domain)
        g = partitions.create(ctx, self.domain, self.image, hidden=True, start=False)
        self.guest = g
        try:
            spec = partitions.domain_spec(ctx, g)
            assert spec.net is not None
            self.ports = {slot: partitions.free_port() for slot in range(self.slots)}
            spec.net.forwards.update({NBD_PORT + slot: port for slot, port in self.ports.items()})
            spec.metadata["vios"] = "1"
            ctx.hv.create(spec)
            partitions.wait_ready(ctx, g, timeout=300)
            self._session = partitions.session(ctx, g)
        except BaseException:
            with contextlib.suppress(OsimgError):
                partitions.remove(ctx, self.domain)
            raise
        (self.folder / "ports.json").write_text(json.dumps(self.ports))

    def alive(self) -> str | None:
        if not self.ctx.hv.is_active(self.domain):
            return f"VIOS guest domain {self.domain} is not running"
        return None

    def serving(self) -> set[str]:
        return set(self._serving)

    def _run(self, script: str) -> str:
        if self._session is None:
            raise GuestError(f"VIOS guest {self.domain} is not started")
        res = self._session.script(script, timeout=60)
        if res.rc != 0:
            raise GuestError(f"VIOS guest {self.domain}: {(res.err or res.out).strip()[-300:]}")
        return res.out

    def serve(self, exp: Export, lu: LU) -> dict[str, Any]:
        free = [s for s in range(self.slots) if s not in self._serving.values()]
        if not free:
            raise ConflictError(f"VIOS guest {self.domain} serves {self.slots} LUs already (its port forwards are "
                                "fixed at boot); start it with more --slots")
        slot = free[0]
        unit = slot + 1
        disk = DiskSpec(scsi_target(unit), path=lu.path, fmt=lu.fmt, bus="scsi", scsi_unit=unit, readonly=lu.readonly)
        self.ctx.hv.attach_disk(self.domain, disk)
        ro = ["-r"] if lu.readonly else []
        # inside the guest, on its private slirp network: the host reaches it only via the 127.0.0.1 forward
        anywhere = "0.0.0.0"  # noqa: S104
        nbd = ["qemu-nbd", "-f", "raw", *ro, "-x", lu.name, "-b", anywhere, "-p", str(NBD_PORT + slot),
               "--persistent", "--shared=16", "--fork", f"--pid-file=/run/nbd-{slot}.pid"]
        try:
            self._run(
                f"n=0; until ls /sys/bus/scsi/devices/*:0:0:{unit}/block >/dev/null 2>&1; do n=$((n+1)); "
                f"[ $n -gt 200 ] && {{ echo 'no disk at SCSI LUN {unit}' >&2; exit 1; }}; sleep 0.05; done\n"
                f"D=/dev/$(ls /sys/bus/scsi/devices/*:0:0:{unit}/block)\n"
                f"{shlex.join(nbd)} \"$D\"\n"
            )
        except OsimgError:
            with contextlib.suppress(OsimgError):
                self.ctx.hv.detach_disk(self.domain, disk)
            raise
        self._serving[exp.name] = slot
        self._disks[exp.name] = disk
        return {"socket": None, "port": self.ports[slot]}

    def unserve(self, export: str) -> None:
        slot = self._serving.pop(export, None)
        if slot is None:
            return
        with contextlib.suppress(OsimgError):
            self._run(f"[ -f /run/nbd-{slot}.pid ] && kill $(cat /run/nbd-{slot}.pid); rm -f /run/nbd-{slot}.pid; true")
        disk = self._disks.pop(export, None)
        if disk is not None and self.ctx.hv.is_active(self.domain):
            self.ctx.hv.detach_disk(self.domain, disk)

    def stop(self) -> None:
        if self._session is not None:
            with contextlib.suppress(OsimgError):
                self._session.close()
            self._session = None
        self._serving.clear()
        with contextlib.suppress(OsimgError):
            partitions.remove(self.ctx, self.domain)


def _qemu_owns(path: Path) -> None:
    """Files declared only on the QEMU command line are not relabelled by libvirt: hand them over."""
    try:
        pw = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return  # QEMU runs as root here
    os.chown(path, pw.pw_uid, pw.pw_gid)


def create_client(ctx: Context, name: str, image: str, lu_name: str, nodes: list[str] | None = None,
                  memory_mib: int | None = None) -> tuple[partitions.Guest, Attachment]:
    """Create and start a guest whose OS is read from a VIOS-served base LU, writes in its own overlay.

    ``image`` names the image the LU serves (its kernel, initrd and host key boot the client);
    ``nodes`` orders the VIOS nodes (default: every node serving the LU). Returns once started.
    """
    from .node import alive_nodes

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
    g = partitions.create(ctx, name, image, memory_mib=memory_mib, start=False)
    cid = ctx.store.allocate_client_id(name)
    aid = ctx.store.allocate_adapter_id(cid, lu.name)
    att = Attachment(name, lu.name, cid, aid, SHARED_READ, True, "qmp", device=f"vios-{cid}-{aid}",
                     quorum=f"vios{cid}x{aid}q")
    reserved: list[int] = []
    try:
        for e in exports:
            ctx.store.reserve(lu.name, alive[e.node], name, SHARED_READ)
            reserved.append(alive[e.node])
        for i, e in enumerate(exports):
            att.paths.append(Path_(e.node, e.name, e.socket, e.port, blockdev=f"vios{cid}x{aid}p{i}",
                                   child=f"children.{i}", connected=True))
        att.next_path = att.next_child = len(att.paths)
        overlay = g.overlay(ctx)
        _qemu_owns(overlay)
        ovl, ovl_file = f"vios{cid}x{aid}o", f"vios{cid}x{aid}f"
        blockdevs: list[dict[str, Any]] = [_nbd_blockdev(p, lu.name, True) for p in att.paths]
        blockdevs += [
            {"driver": "quorum", "node-name": att.quorum, "vote-threshold": 1, "read-pattern": "fifo",
             "read-only": True, "children": [p.blockdev for p in att.paths]},
            {"driver": "file", "node-name": ovl_file, "filename": str(overlay)},
            {"driver": "qcow2", "node-name": ovl, "file": ovl_file, "backing": att.quorum},
        ]
        device = {"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": 0, "lun": att.unit, "drive": ovl,
                  "id": att.device, "werror": "stop", "rerror": "stop"}
        spec = partitions.domain_spec(ctx, g)
        spec.disks = [d for d in spec.disks if d.target != "vda"]
        spec.cmdline = spec.cmdline.replace("root=/dev/vda", "root=/dev/sda")
        # -device must be JSON too: QEMU 7.2 creates legacy "k=v" devices before libvirt's controller
        for bd in blockdevs:
            spec.extra_qemu_args += ["-blockdev", json.dumps(bd)]
        spec.extra_qemu_args += ["-device", json.dumps(device)]
        ctx.hv.create(spec)
    except BaseException:
        for node_id in reserved:
            ctx.store.release(lu.name, node_id, name)
        with contextlib.suppress(OsimgError):
            partitions.remove(ctx, name)
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
    partitions.remove(ctx, name)
