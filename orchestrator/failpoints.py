"""Named failpoints (like etcd's gofail): places where a test can make this process die or fail.

Off unless the environment variable ``OSIMG_FAILPOINT`` names a point: ``NAME`` or ``NAME=kill``
SIGKILLs this process there (a crash: no cleanup, no ``finally``), ``NAME=error`` raises an
OSError there (an unexpected failure, like a full disk), ``NAME=stop`` stops this process there
(SIGSTOP: a test changes the world, e.g. restarts libvirtd, then sends SIGCONT). Several points are separated by commas,
e.g. ``warm-paged-in=error,rollback-reverted`` fails a swap and then kills its rollback.

Every journaled step and every gap between the file operations of commit and rollback calls
``failpoint("literal-name")``; tests/test_crash.py finds the calls in the source and kills the
orchestrator at each, so a point must be a string literal and a new step needs one.
"""

from __future__ import annotations

import os
import signal

ENV = "OSIMG_FAILPOINT"
ACTIONS = ("kill", "error", "stop")


def armed() -> dict[str, str]:
    """The points set in the environment, with their action."""
    out: dict[str, str] = {}
    for item in os.environ.get(ENV, "").split(","):
        name, _, action = item.strip().partition("=")
        if name:
            out[name] = action or "kill"
    return out


def failpoint(name: str) -> None:
    """Die (SIGKILL), fail (OSError) or pause (SIGSTOP) here if the environment asks; otherwise nothing."""
    if ENV not in os.environ:
        return
    action = armed().get(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "error":
        raise OSError(f"failpoint {name}: injected failure")
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
