"""Host-service VIOS backend: one ``qemu-storage-daemon`` per node, exports added over its QMP monitor.

The daemon listens for NBD on one unix socket in the node's folder (mode 0666 so QEMU's user can
connect; the folder is 0755 so it can be traversed); every LU is an export named after the LU on
that socket. Base images are opened read-only, writable LUs with QEMU's image locking on, so a
second process opening the same file for writing is refused instead of corrupting it.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import time
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import StorageError
from .lus import LU, Export
from .qmp import Qmp

SOCKET_PATH_MAX = 107  # sun_path


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
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)
        self.nbd_socket.unlink(missing_ok=True)
        self.proc = storage.start_storage_daemon(self.qmp_socket, self.folder / "qsd.pid", self.folder / "qsd.log")
        self._qmp = Qmp(self.qmp_socket)
        self._qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(self.nbd_socket)}})
        self.nbd_socket.chmod(0o666)

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
        return {"socket": str(self.nbd_socket), "port": None}

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
