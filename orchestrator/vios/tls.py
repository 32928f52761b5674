"""TLS for NBD exports that travel over TCP (a VIOS guest's ``qemu-nbd``, forwarded to 127.0.0.1).

QEMU's own ``tls-creds-psk`` objects on both ends, no crypto of ours: a pre-shared key per VIOS node,
made by osimg in the node's folder, handed to the VIOS guest over its pinned SSH session, and named
by every client blockdev (``tls-creds``). ``qemu-nbd --tls-creds`` refuses a client without TLS, and
the handshake fails for a client without the key, so a local user who reaches the forwarded port
reads nothing. The host-side key file is 0640 root:<QEMU's group> (QEMU itself loads it when a guest
connects), in a 2750 folder: root and QEMU only.

Host-service exports (unix sockets) need none: the socket is 0660 root:<QEMU's group>.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from ..settings import FILE_MODE, create_private, private_dir

PSK_USER = "osimg"
PSK_FILE = "keys.psk"  # the name QEMU's tls-creds-psk reads in its ``dir``
GUEST_DIR = "/run/osimg-nbd"


def key_dir(node_folder: Path) -> Path:
    return node_folder / "tls"


def ensure_key(node_folder: Path) -> Path:
    """The node's key folder, with a new 256-bit key the first time (mode set at creation)."""
    d = private_dir(key_dir(node_folder))
    f = d / PSK_FILE
    if not f.exists():
        create_private(f, f"{PSK_USER}:{secrets.token_hex(32)}\n".encode(), mode=FILE_MODE)
    return d


def key_line(d: Path) -> str:
    return (d / PSK_FILE).read_text().strip()


def creds_id(node: str) -> str:
    return f"tls-psk-{node}"


def client_object(node: str, d: Path) -> dict[str, Any]:
    """The QOM object a client QEMU (or qemu-img) needs to reach ``node``'s exports."""
    return {"qom-type": "tls-creds-psk", "id": creds_id(node), "endpoint": "client", "dir": str(d),
            "username": PSK_USER}


def server_args(guest_dir: str = GUEST_DIR) -> list[str]:
    """``qemu-nbd`` arguments that make it refuse anything but TLS with the node's key."""
    return ["--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={guest_dir}", "--tls-creds", "tls0"]
