"""Where osimg keeps its state and which host it drives, from the environment with sane defaults.

``OSIMG_HOME``  repository and guest files (default /var/lib/osimg; must be readable by the QEMU user)
``OSIMG_URI``   libvirt URI (default qemu:///system)
``OSIMG_CACHE`` build cache: recipe images, etcd (default /var/cache/osimg, shared by every checkout)
``OSIMG_ACCEL`` force ``kvm`` or ``tcg`` instead of probing
``OSIMG_STORE`` cluster store URL (default sqlite under OSIMG_HOME; ``etcd://127.0.0.1:2379``)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ValidationError

SOURCE_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = SOURCE_ROOT / "images"
DEFAULT_CACHE = "/var/cache/osimg"  # FHS: regenerable data of a root tool, shared by every checkout
QEMU_USER = "libvirt-qemu"  # Debian's user for libvirt's QEMU processes
URI_RE = re.compile(r"^[a-z][a-z0-9+]*:///?[^\s]*$")
PSEUDO_FS = (Path("/proc"), Path("/sys"), Path("/dev"))


def short(value: object, limit: int = 80) -> str:
    """``repr`` cut short, as ``validate.short`` (a sibling layer, so not importable from here)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def state_folder(value: str, what: str) -> Path:
    """A folder osimg may keep state in: a directory (or not there yet), not / nor a kernel pseudo file system."""
    if "\0" in value:
        raise ValidationError(f"{what} {short(value)}: not a valid path")
    path = Path(value).resolve()
    if path == Path("/") or any(path == p or path.is_relative_to(p) for p in PSEUDO_FS):
        raise ValidationError(f"{what} {short(value)}: not a place for osimg's state (/, /proc, /sys and /dev "
                              "are refused); give a folder such as /var/lib/osimg")
    if path.exists() and not path.is_dir():
        raise ValidationError(f"{what} {short(value)} is a file, not a folder")
    return path


@dataclass(frozen=True)
class Settings:
    home: Path
    uri: str
    cache: Path
    accel: str | None
    store_url: str

    @classmethod
    def from_env(cls, home: str | None = None, uri: str | None = None, store: str | None = None) -> Settings:
        h = state_folder(home or os.environ.get("OSIMG_HOME") or "/var/lib/osimg", "--home/OSIMG_HOME")
        accel = os.environ.get("OSIMG_ACCEL") or None
        if accel not in (None, "kvm", "tcg"):
            raise ValidationError(f"OSIMG_ACCEL={short(accel)}: expected 'kvm' or 'tcg'")
        u = uri or os.environ.get("OSIMG_URI") or "qemu:///system"
        if not URI_RE.match(u):
            raise ValidationError(f"--uri/OSIMG_URI {short(u)}: expected a libvirt URI such as qemu:///system "
                                  "or qemu+ssh://host/system")
        return cls(
            home=h,
            uri=u,
            cache=state_folder(os.environ.get("OSIMG_CACHE") or DEFAULT_CACHE, "OSIMG_CACHE"),
            accel=accel,
            store_url=store or os.environ.get("OSIMG_STORE") or f"sqlite://{h / 'cluster.sqlite'}",
        )

    @property
    def guests_dir(self) -> Path:
        return self.home / "guests"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def client_key(self) -> Path:
        """The private key osimg logs into guests with (created by ``recipes.client_key``)."""
        return self.cache / "keys" / "id_ed25519"

    def ensure_dirs(self) -> None:
        """Create the state folders world-traversable: QEMU runs as another user and must reach them."""
        for d in (self.home, self.guests_dir, self.images_dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
