"""Guest OS images built from the recipes in ``images/`` and cached by content hash.

A recipe is a folder ``images/FAMILY`` with a ``build.sh OUT VERSION PUBKEY`` that writes
``disk.qcow2, vmlinuz, initrd.img, host_key.pub, manifest.json``. The cache key hashes the recipe
and the shared ``images/common`` files, the client public key and the host kernel, so editing a
recipe rebuilds it and an unchanged one is reused in milliseconds.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import NotFoundError, StorageError, ValidationError
from .host import ssh
from .settings import RECIPES_DIR, Settings, create_private
from .validate import name as valid_name

FAMILIES = ("tiny", "debian", "vios")
# recipes that copy files from another recipe's folder: a change there must rebuild them too
USES = {"vios": ("tiny",)}
FILES = ("disk.qcow2", "vmlinuz", "initrd.img", "host_key.pub", "manifest.json")


@dataclass
class Build:
    """A finished recipe build: the files a guest boots from."""

    family: str
    version: str
    dir: Path
    manifest: dict[str, object]

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def host_key(self) -> str:
        return (self.dir / "host_key.pub").read_text().strip()


def client_key(settings: Settings) -> Path:
    """The client key under OSIMG_HOME, made if there is none (for building images that trust it)."""
    key = existing_client_key(settings)
    ssh.ensure_client_key(key)
    return key


def existing_client_key(settings: Settings) -> Path:
    """The client key for logging into guests; a key an older osimg kept in the cache is copied there
    once, so guests and cached images that trust it stay reachable. Never made here: a new key would
    be trusted by no guest, so a missing one must be reported, not replaced."""
    key, old = settings.client_key, settings.legacy_client_key
    if not key.exists() and old.exists() and old.with_suffix(".pub").exists():
        copy_private(old, key)
        copy_private(old.with_suffix(".pub"), key.with_suffix(".pub"))
    return key


def copy_private(src: Path, dst: Path) -> None:
    """Copy a file created 0600 from its first byte (``settings.create_private``), then renamed into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.parent.chmod(0o700)
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    create_private(tmp, src.read_bytes())
    tmp.rename(dst)


def kernel_release() -> str:
    kernels = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not kernels:
        raise StorageError("no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64 (make setup)")
    return kernels[-1].removeprefix("/boot/vmlinuz-")


def parse_ref(ref: str) -> tuple[str, str]:
    """``tiny:v1`` -> ("tiny", "v1")."""
    family, sep, version = ref.partition(":")
    if not sep:
        raise ValidationError(f"invalid recipe reference {ref!r}: expected FAMILY:VERSION, e.g. tiny:v1")
    if family not in FAMILIES:
        raise NotFoundError(f"unknown recipe family {family!r}: known families are {', '.join(FAMILIES)}")
    valid_name(version, "recipe version")
    return family, version


def recipe_hash(family: str, pubkey: str) -> str:
    h = hashlib.sha256()
    for folder in (RECIPES_DIR / "common", *(RECIPES_DIR / u for u in USES.get(family, ())), RECIPES_DIR / family):
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(RECIPES_DIR)).encode() + b"\0")
            h.update(f.read_bytes())
            h.update(f.stat().st_mode.to_bytes(4, "little"))
    h.update(pubkey.encode())
    h.update(kernel_release().encode())
    return h.hexdigest()[:16]


def ensure_built(settings: Settings, ref: str, log: Path | None = None) -> Build:
    """Return the cached build of ``ref``, building it first when the recipe changed."""
    family, version = parse_ref(ref)
    key = client_key(settings)
    pub = key.with_suffix(".pub")
    digest = recipe_hash(family, pub.read_text())
    root = settings.cache / "images"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    out = root / f"{family}-{version}-{digest}"
    with open(root / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if not all((out / f).exists() for f in FILES):
            _build(family, version, pub, out, root, log)
    manifest = json.loads((out / "manifest.json").read_text())
    return Build(family, version, out, manifest)


def _build(family: str, version: str, pub: Path, out: Path, root: Path, log: Path | None) -> None:
    tmp: Path = root / f".build-{family}-{version}-{time.time_ns()}"
    script = RECIPES_DIR / family / "build.sh"
    logf = log or root / f"{family}-{version}.log"
    try:
        with open(logf, "w") as lf:
            proc = subprocess.run(
                ["bash", str(script), str(tmp), version, str(pub)],
                stdout=lf, stderr=subprocess.STDOUT, check=False,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OSIMG_DEB_CACHE": str(root / "debs"), "HOME": "/root"},
            )
        if proc.returncode != 0:
            tail = logf.read_text(errors="replace").strip().splitlines()[-3:]
            raise StorageError(f"building {family}:{version} failed (log {logf}): {' | '.join(tail)}")
        missing = [f for f in FILES if not (tmp / f).exists()]
        if missing:
            raise StorageError(f"recipe {family} did not produce {', '.join(missing)} (log {logf})")
        for produced in tmp.iterdir():
            produced.chmod(0o444)
        tmp.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def probe_boot_files(settings: Settings) -> tuple[Path, Path]:
    """Kernel and the shared initramfs, for the KVM probe (no root disk needed)."""
    kver = kernel_release()
    out = settings.cache / "probe"
    initrd: Path = out / f"initrd-{kver}-{recipe_hash('tiny', '')[:8]}.img"
    if not initrd.exists():
        out.mkdir(parents=True, exist_ok=True)
        out.chmod(0o755)
        tmp = initrd.with_suffix(".tmp")
        subprocess.run(["bash", str(RECIPES_DIR / "common" / "initramfs.sh"), kver, str(tmp)],
                       check=True, capture_output=True)
        tmp.chmod(0o644)
        tmp.rename(initrd)
    return Path(f"/boot/vmlinuz-{kver}"), initrd
