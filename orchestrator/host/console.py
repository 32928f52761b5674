"""A guest's serial console log, read from the host: the boot and readiness markers guests print."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import GuestError


def wait_for_serial(path: Path, marker: str, timeout: float, is_alive: Callable[[], bool] | None = None) -> float:
    """Wait until ``marker`` appears in a serial log; returns seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError):
            if marker in path.read_text(errors="replace"):
                return time.monotonic() - start
        if is_alive is not None and not is_alive():
            raise GuestError(f"guest stopped before printing {marker!r}; console log: {path}")
        time.sleep(0.05)
    raise GuestError(f"no {marker!r} on the console within {timeout:.0f}s; console log: {path}")
