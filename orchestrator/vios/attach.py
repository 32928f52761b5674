"""Client side: give a guest an LU served by VIOS nodes as a virtio-scsi disk.

Every attachment gets the guest's cluster-wide client ID and a virtual adapter ID per LU; the
adapter ID is the SCSI LUN the guest sees (``/sys/bus/scsi/devices/*:0:0:<adapter id>``), so no two
disks of one client collide. Before anything touches QEMU, the LU is reserved: exclusive for a
writable LU, shared-read for a read-only one; a second writer is refused with the holder's name.

Two ways to plug the disk in:

- ``via='libvirt'``: a plain ``<disk type='network'>`` NBD disk, when one node serves the LU and no
  failover is wanted. libvirt tracks it; but libvirt 9.0 cannot set NBD ``reconnect-delay``, so if
  the node goes away the guest gets I/O errors.
- ``via='qmp'`` (default when the LU has a second export): the disk's block graph is declared
  through QMP passthrough: one ``nbd`` node per path (with ``reconnect-delay``: a node restarting on
  the same socket is invisible to the guest) under a ``quorum`` node with vote threshold 1 and
  ``read-pattern=fifo``, under a ``scsi-hd`` with ``werror/rerror=stop``. Failover adds the new
  path as a quorum child and removes the dead one (``x-blockdev-change``): QEMU 7.2's
  ``blockdev-reopen`` cannot swap the child of a node whose old child is dead, because reopening
  flushes it first and the flush fails. Requests that failed meanwhile paused the guest
  (``werror=stop``) and are retried on the new path when the guest resumes, so it never sees an
  error. libvirt marks such a domain tainted (custom-monitor); ``osimg cluster status`` says so.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..cluster.events import ATTACHED, DETACHED, LIFECYCLE
from ..cluster.store import EXCLUSIVE, SHARED_READ, Record
from ..context import Context
from ..errors import ConflictError, HypervisorError, NotFoundError, OsimgError, ValidationError
from ..host.domain import DiskSpec
from ..validate import inside
from ..validate import name as valid_name
from . import lus, tls
from .lus import ATTACH_KIND, SERVING, STANDBY, Export

RECONNECT_DELAY = 2  # seconds an NBD path waits for its server to come back before failing requests
TAINT = "custom-monitor: the disk was declared through QMP passthrough, libvirt does not track it"


@dataclass
class Path_:
    """One route from the guest to the LU: a node's export and the guest-side block node for it."""

    node: str
    export: str
    socket: str | None
    port: int | None
    blockdev: str = ""
    child: str = ""  # the quorum child name ("children.N")
    connected: bool = False
    tls: str | None = None  # the node's key folder: the export is reached over TCP with TLS


@dataclass
class Attachment:
    guest: str
    lu: str
    client_id: int
    adapter_id: int
    mode: str
    readonly: bool
    via: str
    device: str
    quorum: str = ""
    next_child: int = 0
    next_path: int = 0
    paths: list[Path_] = field(default_factory=list)
    failovers: int = 0
    created: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return valid_name(f"{self.guest}.{self.lu}", "attachment name (shorten the guest or LU name)")

    @property
    def unit(self) -> int:
        return self.adapter_id

    @property
    def tainted(self) -> bool:
        return self.via == "qmp"

    def connected(self) -> list[Path_]:
        return [p for p in self.paths if p.connected]

    def to_record(self) -> Record:
        return asdict(self)

    @classmethod
    def new(cls, guest: str, lu: str, client_id: int, adapter_id: int, mode: str, readonly: bool,
            via: str) -> Attachment:
        """A fresh attachment; its QEMU device and quorum node names follow from the two IDs."""
        return cls(guest, lu, client_id, adapter_id, mode, readonly, via, device=f"vios-{client_id}-{adapter_id}",
                   quorum=f"vios{client_id}x{adapter_id}q")

    def quorum_blockdev(self) -> dict[str, Any]:
        """The quorum node over every connected path (threshold 1: any live path serves reads and writes)."""
        return {"driver": "quorum", "node-name": self.quorum, "vote-threshold": 1, "read-pattern": "fifo",
                "read-only": self.readonly, "children": [p.blockdev for p in self.connected()]}

    def scsi_device(self, drive: str) -> dict[str, Any]:
        """The guest's virtio-scsi disk at LUN ``unit``; I/O errors pause the guest until a path is back."""
        return {"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": 0, "lun": self.unit, "drive": drive,
                "id": self.device, "werror": "stop", "rerror": "stop"}

    @classmethod
    def from_record(cls, rec: Record) -> Attachment:
        paths = [Path_(**p) for p in rec.get("paths", [])]
        return cls(**{**{k: v for k, v in rec.items() if k in cls.__dataclass_fields__}, "paths": paths})


def scsi_target(unit: int) -> str:
    """libvirt target name for a SCSI unit (sda, sdb, ..., sdaa); the guest names disks its own way."""
    letters = ""
    n = unit
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "sd" + letters


def qmp(ctx: Context, guest: str, command: str, **arguments: Any) -> Any:
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    reply = ctx.hv.qmp(guest, msg)
    if "error" in reply:
        raise HypervisorError(f"{guest}: QEMU refused {command}: {reply['error'].get('desc', reply['error'])}")
    return reply.get("return")


def get(ctx: Context, guest: str, lu: str) -> Attachment | None:
    rec = ctx.store.get(ATTACH_KIND, f"{guest}.{lu}")
    return None if rec is None else Attachment.from_record(rec)


def list_attachments(ctx: Context, guest: str | None = None) -> list[Attachment]:
    out = [Attachment.from_record(r) for r in ctx.store.list(ATTACH_KIND)]
    return [a for a in out if guest is None or a.guest == guest]


def nbd_blockdev(p: Path_, lu: str, readonly: bool) -> dict[str, Any]:
    server: dict[str, Any] = (
        {"type": "unix", "path": p.socket} if p.socket else {"type": "inet", "host": "127.0.0.1", "port": str(p.port)}
    )
    bd = {"driver": "nbd", "node-name": p.blockdev, "server": server, "export": lu,
          "reconnect-delay": RECONNECT_DELAY, "read-only": readonly}
    if p.tls:
        bd["tls-creds"] = tls.creds_id(p.node)
    return bd


def check_path(ctx: Context, p: Path_) -> Path_:
    """A path read from an export record, made safe to hand to QEMU: its unix socket must be one of
    osimg's (under OSIMG_HOME), its node a valid name. Returns ``p``."""
    valid_name(p.node, "VIOS node name in an export record")
    if p.socket:
        p.socket = str(inside(p.socket, [ctx.settings.home], f"NBD socket of node {p.node}"))
    return p


def tls_object(ctx: Context, p: Path_) -> dict[str, Any] | None:
    """The client TLS object a path needs, None for a unix socket. The key folder comes from a store
    record: it must lie under OSIMG_HOME before QEMU is told to load a key from it."""
    if not p.tls:
        return None
    d = inside(p.tls, [ctx.settings.home], f"TLS key folder of node {p.node}")
    return tls.client_object(p.node, d)


def ensure_tls_object(ctx: Context, guest: str, p: Path_) -> None:
    """Load the node's key into the guest's QEMU once (``object-add``), before a blockdev names it."""
    obj = tls_object(ctx, p)
    if obj is None:
        return
    present = {o.get("name") for o in (qmp(ctx, guest, "qom-list", path="/objects") or [])}
    if obj["id"] not in present:
        qmp(ctx, guest, "object-add", **obj)


def _path_for(exp: Export) -> Path_:
    return Path_(exp.node, exp.name, exp.socket, exp.port, tls=exp.tls)


def attach(
    ctx: Context, guest: str, lu_name: str, nodes: list[str] | None = None, via: str | None = None
) -> Attachment:
    """Attach an LU to a running guest as a virtio-scsi disk; idempotent.

    ``nodes`` limits and orders the VIOS nodes to use (default: every node exporting the LU). The
    first serving node carries the I/O of a writable LU; the others are failover targets.
    """
    valid_name(guest, "guest name")
    lu = lus.get_lu(ctx, lu_name)
    if not ctx.hv.is_active(guest):
        raise NotFoundError(f"guest {guest} is not running; start it before attaching LU {lu.name}")
    old = get(ctx, guest, lu.name)
    if old is not None:
        return old
    alive = lus.alive_nodes(ctx)
    exports = lus.exports_of(ctx, lu.name)
    if nodes is not None:
        exports = sorted((e for e in exports if e.node in nodes), key=lambda e: nodes.index(e.node))
    exports = [e for e in exports if e.node in alive]
    serving = [e for e in exports if e.status == SERVING]
    standby = [e for e in exports if e.status == STANDBY]
    if not serving and not standby:
        where = ", ".join(f"{e.node} ({e.status})" for e in exports) or "no live node"
        raise NotFoundError(f"LU {lu.name} is not served by any live VIOS node ({where}); "
                            f"export it with 'osimg vios export {lu.name} NODE'")
    over_tls = any(e.tls for e in exports)
    if via is None:
        via = "qmp" if len(exports) > 1 or over_tls else "libvirt"
    if via not in ("qmp", "libvirt"):
        raise OsimgError(f"invalid attachment method {via!r}: expected qmp or libvirt")
    if via == "libvirt" and over_tls:
        raise ValidationError(f"LU {lu.name} is served over TCP with a TLS key, which libvirt 9.0 cannot give an "
                              "NBD disk; attach it with --via qmp")
    mode = SHARED_READ if lu.readonly else EXCLUSIVE
    cid = ctx.store.allocate_client_id(guest)
    aid = ctx.store.allocate_adapter_id(cid, lu.name)
    att = Attachment.new(guest, lu.name, cid, aid, mode, lu.readonly, via)
    # reserve before touching QEMU: a refused writer must leave nothing behind
    use = serving if lu.readonly and via == "qmp" else (serving or standby)[:1]
    reserved: list[str] = []
    try:
        for e in use:
            ctx.store.reserve(lu.name, alive[e.node], guest, mode)
            reserved.append(e.node)
        if not serving:
            # only a standby is left (its partner is down or idle): open the LU there now
            exports = [lus.activate(ctx, use[0].name) if e.name == use[0].name else e for e in exports]
        att.paths = [check_path(ctx, _path_for(e)) for e in exports]
        if via == "libvirt":
            p = next(x for x in att.paths if x.node == use[0].node)
            ctx.hv.attach_disk(guest, _disk_spec(att, p))
            p.connected = True
        else:
            for p in att.paths:
                if p.node in reserved:
                    add_blockdev(ctx, att, p)
            qmp(ctx, guest, "blockdev-add", **att.quorum_blockdev())
            att.next_child = len(att.connected())
            for i, p in enumerate(att.connected()):
                p.child = f"children.{i}"
            qmp(ctx, guest, "device_add", **att.scsi_device(att.quorum))
    except BaseException:
        if via == "qmp":
            _drop_graph(ctx, att)
        for n in reserved:
            ctx.store.release(lu.name, alive[n], guest)
        raise
    ctx.store.put(ATTACH_KIND, att.name, att.to_record())
    lus.publish(ctx, LIFECYCLE, ATTACHED, f"lu/{lu.name}", guest=guest, client_id=cid, adapter_id=aid,
                unit=att.unit, via=via, nodes=[p.node for p in att.connected()])
    return att


def _disk_spec(att: Attachment, p: Path_) -> DiskSpec:
    return DiskSpec(scsi_target(att.unit), bus="scsi", scsi_unit=att.unit, readonly=att.readonly,
                    nbd_export=att.lu, nbd_socket=p.socket, nbd_port=p.port)


def add_blockdev(ctx: Context, att: Attachment, p: Path_) -> None:
    p.blockdev = f"vios{att.client_id}x{att.adapter_id}p{att.next_path}"
    att.next_path += 1
    check_path(ctx, p)
    ensure_tls_object(ctx, att.guest, p)
    qmp(ctx, att.guest, "blockdev-add", **nbd_blockdev(p, att.lu, att.readonly))
    p.connected = True


def _drop_graph(ctx: Context, att: Attachment) -> None:
    """Remove the device and block nodes of a QMP attachment, whatever exists of them."""
    if not ctx.hv.is_active(att.guest):
        return
    try:
        qmp(ctx, att.guest, "device_del", id=att.device)
    except HypervisorError as err:
        if "not found" not in str(err):
            raise
    names = [att.quorum] + [p.blockdev for p in att.paths if p.blockdev]
    deadline = time.monotonic() + 10
    for node_name in names:
        while True:
            try:
                qmp(ctx, att.guest, "blockdev-del", **{"node-name": node_name})
                break
            except HypervisorError as err:
                msg = str(err)
                if "Failed to find" in msg or "Cannot find" in msg:
                    break
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the device unplug finishes asynchronously and still holds the node


def detach(ctx: Context, guest: str, lu_name: str) -> None:
    """Unplug the disk, end the reservations, forget the attachment."""
    att = get(ctx, guest, lu_name)
    if att is None:
        raise NotFoundError(f"LU {lu_name} is not attached to guest {guest}")
    if att.via == "libvirt":
        if ctx.hv.is_active(guest):
            for p in att.connected():
                ctx.hv.detach_disk(guest, _disk_spec(att, p))
    else:
        _drop_graph(ctx, att)
    ids = {n.name: n.id for n in ctx.store.nodes()}
    for p in att.paths:
        if p.node in ids:
            ctx.store.release(att.lu, ids[p.node], guest)
    ctx.store.delete(ATTACH_KIND, att.name)
    lus.publish(ctx, LIFECYCLE, DETACHED, f"lu/{att.lu}", guest=guest, client_id=att.client_id,
                adapter_id=att.adapter_id)


def detach_all(ctx: Context, guest: str) -> None:
    for att in list_attachments(ctx, guest):
        detach(ctx, guest, att.lu)


def guest_device_path(unit: int) -> str:
    """Shell snippet (for the guest) printing the /dev node of the disk at SCSI LUN ``unit``."""
    return f"/dev/$(ls /sys/bus/scsi/devices/*:0:0:{unit}/block)"


def save(ctx: Context, att: Attachment) -> None:
    ctx.store.put(ATTACH_KIND, att.name, att.to_record())


def require_qmp(att: Attachment) -> None:
    if att.via != "qmp":
        raise ConflictError(f"LU {att.lu} is attached to {att.guest} as a libvirt NBD disk, which cannot fail "
                            "over (libvirt 9.0 has no NBD reconnect); attach it with a second node for failover")
