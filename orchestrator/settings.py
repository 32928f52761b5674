"""Where osimg keeps its state and which host it drives, from the environment with sane defaults.

``OSIMG_HOME``  repository and guest files (default /var/lib/osimg; must be readable by the QEMU user)
``OSIMG_URI``   libvirt URI (default qemu:///system)
``OSIMG_CACHE`` build cache: recipe images, etcd (default /var/cache/osimg, shared by every checkout)
``OSIMG_ACCEL`` force ``kvm`` or ``tcg`` instead of probing
``OSIMG_STORE`` cluster store URL (default sqlite under OSIMG_HOME; ``etcd://127.0.0.1:2379``)
``OSIMG_KVM_DEVICE`` the KVM device the probe checks (default /dev/kvm; a missing path forces the TCG fallback)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ValidationError

SOURCE_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = SOURCE_ROOT / "images"
DEFAULT_CACHE = "/var/cache/osimg"  # FHS: regenerable data of a root tool, shared by every checkout
QEMU_USER = "libvirt-qemu"  # Debian's user for libvirt's QEMU processes

@dataclass(frozen=True)
class Settings:
    home: Path
    uri: str
    cache: Path
    accel: str | None
    store_url: str
    kvm_device: str = "/dev/kvm"

    @classmethod
    def from_env(cls, home: str | None = None, uri: str | None = None, store: str | None = None) -> Settings:
        h = Path(home or os.environ.get("OSIMG_HOME", "/var/lib/osimg")).resolve()
        accel = os.environ.get("OSIMG_ACCEL") or None
        if accel not in (None, "kvm", "tcg"):
            raise ValidationError(f"OSIMG_ACCEL={accel!r}: expected 'kvm' or 'tcg'")
        return cls(
            home=h,
            uri=uri or os.environ.get("OSIMG_URI", "qemu:///system"),
            cache=Path(os.environ.get("OSIMG_CACHE") or DEFAULT_CACHE).resolve(),
            accel=accel,
            store_url=store or os.environ.get("OSIMG_STORE") or f"sqlite://{h / 'cluster.sqlite'}",
            kvm_device=os.environ.get("OSIMG_KVM_DEVICE") or "/dev/kvm",
        )

    @property
    def guests_dir(self) -> Path:
        return self.home / "guests"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def client_key(self) -> Path:
        """The private key osimg logs into guests with (created by ``recipes.client_key``).

        It lives with the guests that trust it, under OSIMG_HOME: changing the build cache must not
        lock osimg out of existing guests."""
        return self.home / "keys" / "id_ed25519"

    @property
    def legacy_client_key(self) -> Path:
        """Where the client key lived before it moved under OSIMG_HOME (copied from there once)."""
        return self.cache / "keys" / "id_ed25519"

    def ensure_dirs(self) -> None:
        """Create the state folders world-traversable: QEMU runs as another user and must reach them."""
        for d in (self.home, self.guests_dir, self.images_dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
