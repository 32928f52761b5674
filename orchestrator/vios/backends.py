"""The two ways a VIOS node serves LUs (``node.Backend``): a host service and a VIOS guest.

**Host service** (``QsdBackend``): one ``qemu-storage-daemon`` per node, exports added over its QMP monitor.

The daemon listens for NBD on one unix socket in the node's folder (mode 0666 so QEMU's user can
connect; the folder is 0755 so it can be traversed); every LU is an export named after the LU on
that socket. Base images are opened read-only, writable LUs with QEMU's image locking on, so a
second process opening the same file for writing is refused instead of corrupting it.

**VIOS guest** (``GuestBackend``): a domain booted from the ``vios`` recipe (the tiny image plus
``qemu-nbd``). Serving an LU attaches its file to the VIOS domain as a virtio-scsi disk (read-only
for base images and paging files), then starts ``qemu-nbd`` inside the guest on that disk, found by
its SCSI address. The host reaches the export only through a slirp forward on 127.0.0.1: the
forwards must be on the QEMU command line when the domain starts (one added later is lost on
save/restore), so the guest gets ``slots`` of them, ports 10809.. inside, free ports outside, and
each export takes one. Nothing on the host ever contacts the guest's own address, and there is no bridge.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from .. import guests, recipes
from ..context import Context
from ..errors import ConflictError, GuestError, OsimgError, StorageError, ValidationError
from ..host.domain import DiskSpec
from ..host.ssh import Session
from ..settings import SOCKET_MODE, private_dir, qemu_gid
from . import tls
from .attach import scsi_target
from .lus import LU, Export
from .qmp import Qmp

SOCKET_PATH_MAX = 107  # sun_path
IMAGE = "vios:v1"  # the recipe a VIOS guest boots
NBD_PORT = 10809  # qemu-nbd's first port inside a VIOS guest


class QsdBackend:
    """Serves LUs from a ``qemu-storage-daemon`` started (and stopped) by PID."""

    kind = "service"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.nbd_socket = folder / "nbd.sock"
        self.qmp_socket = folder / "qmp.sock"
        if len(str(self.nbd_socket)) > SOCKET_PATH_MAX:
            raise StorageError(f"socket path {self.nbd_socket} is longer than {SOCKET_PATH_MAX} bytes: "
                               "use a shorter OSIMG_HOME or node name")
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._nodes: dict[str, str] = {}  # export name -> block node name
        self._seq = itertools.count(1)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        private_dir(self.folder)
        self.nbd_socket.unlink(missing_ok=True)
        self.proc = start_storage_daemon(self.qmp_socket, self.folder / "qsd.pid", self.folder / "qsd.log")
        self._qmp = Qmp(self.qmp_socket)
        self._qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(self.nbd_socket)}})
        # QEMU (its group) connects; nobody else: the socket serves every guest's disks
        gid = qemu_gid()
        if gid is not None:
            os.chown(self.nbd_socket, 0, gid)
        self.nbd_socket.chmod(SOCKET_MODE)

    def alive(self) -> str | None:
        """None while serving, else why not."""
        if self.proc is None:
            return "storage daemon not started"
        if self.proc.poll() is not None:
            return f"qemu-storage-daemon (pid {self.proc.pid}) exited with {self.proc.returncode}"
        return None

    def serving(self) -> set[str]:
        return set(self._nodes)

    def serve(self, exp: Export, lu: LU) -> dict[str, Any]:
        """Open the LU's file and export it; returns where clients connect."""
        if self._qmp is None:
            raise StorageError("storage daemon not started")
        node = f"lu{next(self._seq)}"
        ro = lu.readonly
        self._qmp.execute(
            "blockdev-add", driver=lu.fmt, **{"node-name": node, "read-only": ro},
            file={"driver": "file", "filename": lu.path, "read-only": ro},
        )
        try:
            self._qmp.execute("block-export-add", type="nbd", id=node, **{"node-name": node},
                              name=lu.name, writable=not ro)
        except StorageError:
            with contextlib.suppress(StorageError):
                self._qmp.execute("blockdev-del", **{"node-name": node})
            raise
        self._nodes[exp.name] = node
        return {"socket": str(self.nbd_socket), "port": None, "tls": None}

    def unserve(self, export: str) -> None:
        node = self._nodes.pop(export, None)
        if node is None or self._qmp is None:
            return
        with contextlib.suppress(StorageError):
            self._qmp.execute("block-export-del", id=node, mode="hard")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # the export is removed asynchronously; its node stays busy until then
            exports = self._qmp.execute("query-block-exports") or []
            if not any(e.get("id") == node for e in exports):
                break
            time.sleep(0.02)
        self._qmp.execute("blockdev-del", **{"node-name": node})

    def stop(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(StorageError):
                self._qmp.execute("quit")
            self._qmp.close()
            self._qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._nodes.clear()
        for s in (self.nbd_socket, self.qmp_socket):
            s.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it when the process that started it dies.

    A VIOS node's storage daemon must not outlive the node that heartbeats for it, or it would go on
    serving LUs whose reservations already lapsed with the node's lease.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def start_storage_daemon(qmp_socket: Path, pidfile: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``qemu-storage-daemon`` with only a QMP monitor on a unix socket; exports are added over QMP.

    The daemon dies with the calling process. Returns once the monitor socket exists.
    """
    qmp_socket.unlink(missing_ok=True)
    args = [
        "qemu-storage-daemon",
        "--chardev", f"socket,id=qmp0,path={qmp_socket},server=on,wait=off",
        "--monitor", "chardev=qmp0",
        "--pidfile", str(pidfile),
    ]
    try:
        with open(log, "ab") as logf:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)
    except FileNotFoundError:
        raise StorageError("qemu-storage-daemon is not installed (Debian package qemu-system-common)") from None
    deadline = time.monotonic() + 10
    while not qmp_socket.exists():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise StorageError(f"qemu-storage-daemon exited with {proc.returncode}: {' '.join(tail)} (log {log})")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise StorageError(f"qemu-storage-daemon did not open its monitor {qmp_socket} within 10 s (log {log})")
        time.sleep(0.01)
    return proc


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
        self.guest: guests.Guest | None = None
        self.ports: dict[int, int] = {}  # slot -> host port on 127.0.0.1
        self._serving: dict[str, int] = {}  # export -> slot
        self._disks: dict[str, DiskSpec] = {}
        self._session: Session | None = None
        self.tls_dir = tls.ensure_key(folder)

    @property
    def pid(self) -> int | None:
        return self.ctx.hv.qemu_pid(self.domain)

    def start(self) -> None:
        ctx = self.ctx
        if ctx.hv.exists(self.domain) or (ctx.settings.guests_dir / self.domain).exists():
            # a VIOS guest left by a node that died: its disks and exports are stale, start afresh
            guests.remove(ctx, self.domain)
        g = guests.create(ctx, self.domain, self.image, hidden=True, start=False)
        self.guest = g
        try:
            spec = guests.domain_spec(ctx, g)
            assert spec.net is not None
            self.ports = {slot: guests.free_port() for slot in range(self.slots)}
            spec.net.forwards.update({NBD_PORT + slot: port for slot, port in self.ports.items()})
            spec.metadata["vios"] = "1"
            ctx.hv.create(spec)
            guests.wait_ready(ctx, g, timeout=300)
            self._session = guests.session(ctx, g)
            # the node's NBD key reaches the guest over the pinned SSH session, never a disk or a port
            self._run(f"umask 077; mkdir -p {tls.GUEST_DIR}; "
                      f"printf '%s\\n' {shlex.quote(tls.key_line(self.tls_dir))} > {tls.GUEST_DIR}/{tls.PSK_FILE}")
        except BaseException:
            with contextlib.suppress(OsimgError):
                guests.remove(ctx, self.domain)
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
               *tls.server_args(), "--persistent", "--shared=16", "--fork", f"--pid-file=/run/nbd-{slot}.pid"]
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
        return {"socket": None, "port": self.ports[slot], "tls": str(self.tls_dir)}

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
            guests.remove(self.ctx, self.domain)
