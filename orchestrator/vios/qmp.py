"""A minimal QMP client for a VIOS node's own ``qemu-storage-daemon`` (unix socket, JSON lines).

Guests' QEMU processes are reached through libvirt (``Hypervisor.qmp``); this client is only for the
storage daemon a node started itself, which libvirt does not know about.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from ..errors import StorageError


class Qmp:
    """One QMP session; ``execute`` returns the ``return`` value or raises StorageError."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as err:
            self._sock.close()
            raise StorageError(f"cannot reach the storage daemon's monitor {path}: {err.strerror or err}") from None
        self._buf = b""
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as err:
                raise StorageError(f"storage daemon monitor {self.path}: {err}") from None
            if not chunk:
                raise StorageError(f"storage daemon monitor {self.path} closed the connection (daemon died?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as err:
            raise StorageError(f"storage daemon monitor {self.path}: {err}") from None
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise StorageError(f"storage daemon refused {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
