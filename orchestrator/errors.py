"""One exception hierarchy: the CLI prints ``str(err)`` as one line and exits non-zero.

Messages name the object and what the user can do about it; never a traceback for expected failures.
"""

from __future__ import annotations


class OsimgError(Exception):
    """Base of every error osimg raises on purpose."""

    exit_code = 1


class ValidationError(OsimgError):
    """Input (a name, a spec file, an address) is malformed; nothing was changed."""

    exit_code = 2


class NotFoundError(OsimgError):
    """A named image, guest, node or LU does not exist."""

    exit_code = 3


class ConflictError(OsimgError):
    """The operation clashes with existing state (duplicate name, image in use, LU reserved)."""

    exit_code = 4


class HypervisorError(OsimgError):
    """libvirt or QEMU refused or failed an operation, or cannot be reached."""

    exit_code = 5


class HostUnreachableError(HypervisorError):
    """A libvirt host does not answer (its libvirtd stopped, its machine is gone): a rollout skips it
    and ``osimg swap --resume`` finishes its journaled swaps once it is back."""


class StorageError(OsimgError):
    """An image file is missing, corrupt, or a storage tool failed."""

    exit_code = 6


class GuestError(OsimgError):
    """A guest did not boot, answer SSH, or pass a health check in time."""

    exit_code = 7


class SwapError(OsimgError):
    """An OS swap failed; the message says whether the guest was rolled back."""

    exit_code = 8


class ClusterError(OsimgError):
    """The cluster store is unreachable or refused an update."""

    exit_code = 9


class LeaseLostError(ClusterError):
    """This process no longer holds the lock it acted under: it must stop where it stands."""
