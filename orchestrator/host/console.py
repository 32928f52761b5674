"""A guest's serial console log, read from the host: the boot and readiness markers guests print."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import GuestError, OsimgError


def wait_for_serial(path: Path, marker: str, timeout: float, is_alive: Callable[[], bool] | None = None) -> float:
    """Wait until ``marker`` appears in a serial log; returns seconds waited."""
    return wait_for_text(lambda: path.read_text(errors="replace"), str(path), marker, timeout, is_alive)


def wait_for_text(read: Callable[[], str], where: str, marker: str, timeout: float,
                  is_alive: Callable[[], bool] | None = None, poll: float = 0.05) -> float:
    """Wait until ``marker`` appears in what ``read`` returns (a console log read locally, or through
    libvirt from another host); returns seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError, OsimgError):
            if marker in read():
                return time.monotonic() - start
        if is_alive is not None and not is_alive():
            raise GuestError(f"guest stopped before printing {marker!r}; console log: {where}")
        time.sleep(poll)
    raise GuestError(f"no {marker!r} on the console within {timeout:.0f}s; console log: {where}")
