"""What this process is to others: its lock holder id, and the progress callback long work reports to.

Both are needed by every operation layer (swap, fleet, image builds, VIOS); they live once, low down.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

Progress = Callable[[str], None]
HOLDER_MAX = 63  # the cluster store's limit for a lock holder (a name)


def quiet(_msg: str) -> None:
    """The progress callback that reports nothing (the default of every API call)."""
    return None


def holder_id(pid: int | None = None) -> str:
    """This process (or process ``pid`` on this host) as a lock holder: host name and PID, cut to
    the store's limit.

    The PID stays at the end, whole, because it is what tells two orchestrators on one host apart;
    a long host name is what gets cut.
    """
    tail = f"-{os.getpid() if pid is None else pid}"
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname()) or "host"
    return (host[: HOLDER_MAX - len(tail)] + tail).lstrip("._-") or f"pid{tail}"


def dead_local_holder(holder: str) -> bool:
    """True if ``holder`` names a process of this host that no longer exists (killed, crashed).

    Its locks need not wait for their lease to run out. A PID reused since only makes us wait.
    """
    pid = holder.rsplit("-", 1)[-1]
    if not pid.isdigit() or holder != holder_id(int(pid)) or int(pid) == os.getpid():
        return False
    return not os.path.exists(f"/proc/{pid}")
