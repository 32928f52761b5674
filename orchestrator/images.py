"""The image repository: what a guest boots from.

An image reference is either a recipe build (``FAMILY:VERSION``, e.g. ``tiny:v1``, built and cached
from ``images/``) or a name in the repository catalog (golden images, clones and snapshots).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import recipes
from .settings import Settings


@dataclass
class BootImage:
    """Everything needed to boot a guest from an image, whatever its origin."""

    ref: str
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str
    host_key: str
    os_version: str
    family: str
    memory_mib: int
    ready_marker: str
    app_port: int
    state_file: Path | None = None


def resolve(settings: Settings, ref: str) -> BootImage:
    """Find (building when needed) the image called ``ref``; NotFoundError names what exists."""
    build = recipes.ensure_built(settings, ref)
    m = build.manifest
    return BootImage(
        ref=ref,
        disk=build.disk,
        kernel=build.dir / "vmlinuz",
        initrd=build.dir / "initrd.img",
        cmdline=str(m["cmdline"]),
        host_key=build.host_key,
        os_version=str(m["os_version"]),
        family=build.family,
        memory_mib=int(str(m.get("memory_mib", 256))),
        ready_marker=str(m.get("ready_marker", "OSIMG-READY")),
        app_port=int(str(m.get("app_port", 8080))),
    )
