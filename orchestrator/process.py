"""What this process is to others: its lock holder id, and the progress callback long work reports to.

Both are needed by every operation layer (swap, fleet, image builds, VIOS); they live once, low down.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable

Progress = Callable[[str], None]
HOLDER_MAX = 63  # the cluster store's limit for a lock holder (a name)


def quiet(_msg: str) -> None:
    """The progress callback that reports nothing (the default of every API call)."""
    return None


def holder_id(pid: int | None = None, tag: str = "") -> str:
    """This process (or process ``pid`` on this host) as a lock holder: host name, an optional tag
    and the PID, cut to the store's limit.

    The PID stays at the end, whole, because it is what tells two orchestrators on one host apart;
    a long host name is what gets cut. ``tag`` tells apart two lock takers in one process (two
    swaps of one guest from two threads): taking a lock one holds only refreshes it, so each needs
    its own holder id (``call_holder_id``).
    """
    tail = f"-{tag}-{os.getpid() if pid is None else pid}" if tag else f"-{os.getpid() if pid is None else pid}"
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname()) or "host"
    return (host[: HOLDER_MAX - len(tail)] + tail).lstrip("._-") or f"pid{tail}"


def call_holder_id() -> str:
    """A holder id of this process unique to one call (see ``holder_id``)."""
    return holder_id(tag=secrets.token_hex(3))


def dead_local_holder(holder: str) -> bool:
    """True if ``holder`` names a process of this host that no longer exists (killed, crashed).

    Its locks need not wait for their lease to run out. A PID reused since only makes us wait.
    """
    parts = holder.rsplit("-", 2)
    pid = parts[-1]
    tag = parts[-2] if len(parts) == 3 and len(parts[-2]) == 6 else ""
    if not pid.isdigit() or holder not in (holder_id(int(pid)), holder_id(int(pid), tag)) or int(pid) == os.getpid():
        return False
    return not os.path.exists(f"/proc/{pid}")
