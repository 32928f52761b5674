"""Several libvirt hosts: the host registry, a handle per host, and the files of guests and images there.

A host is a libvirtd reached by URI (``qemu:///system``, ``qemu+ssh://root@b/system``,
``qemu+unix:///system?socket=...``), kept in the cluster store (kind ``host``) so every orchestrator
of the cluster sees the same hosts. A guest created with no host stays the classic local guest: its
files live under ``OSIMG_HOME`` and osimg writes them directly. A guest placed on a registered host
(even one whose URI is this machine's libvirtd) has its files in that host's storage pools, and osimg
reaches them **only through libvirt**: image files are uploaded with ``virStorageVolUpload`` and
checked by hash on the host's own copy (``virStorageVolDownload``), overlays and blank disks are
created by the host's libvirtd (``virStorageVolCreateXML``, qemu-img on that host), a warm swap's
page-in file is copied within the host (``virStorageVolCreateXMLFrom``) and only its header (the
guest's identity, a few KiB) crosses the connection. No shared file system is assumed.

On each host, under its ``root`` (default ``/var/lib/libvirt/osimg``), one folder per pool, named
as the pool, with a hash of OSIMG_HOME in it, so two homes sharing a host never share files::

    ROOT/osimg-HOMEID-i-IMAGE/   one pool per image
    ROOT/osimg-HOMEID-g-GUEST/   one pool per guest

All sit right under ROOT, which osimg makes 0750 with QEMU's group (folders libvirtd makes on the
way to a pool's folder get libvirtd's umask, which may shut QEMU out).

The records kept here are data, not trust: a host's name, URI and root are checked before use.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from .context import Context
from .errors import ConflictError, NotFoundError, StorageError, ValidationError
from .host import qemu_img
from .host.domain import retarget_saved_state, saved_header
from .host.libvirt import Hypervisor
from .images import catalog
from .settings import host_uri_ok, qemu_gid
from .validate import NAME_RE, short
from .validate import name as valid_name

KIND = "host"
SHIPPED = "host-image"  # records of images uploaded to a host and verified there (``shipped_key``)
DEFAULT_ROOT = "/var/lib/libvirt/osimg"
ROOT_RE = re.compile(r"^/[A-Za-z0-9._/-]{1,200}$")
MAX_HOSTS = 64


@dataclass
class Host:
    """A registered libvirt host."""

    name: str
    uri: str
    root: str = DEFAULT_ROOT
    address: str = "127.0.0.1"  # where the guests' forwarded ports of this host are reached
    accel: str = "tcg"  # "kvm" only when the operator says the host has working KVM (not probed remotely)
    added: float = field(default_factory=time.time)

    def validate(self, what: str = "host") -> Host:
        valid_name(self.name, f"{what} name")
        if not host_uri_ok(self.uri):
            raise ValidationError(f"{what} {self.name}: uri {short(self.uri)} is not a libvirt URI such as "
                                  "qemu+ssh://root@HOST/system")
        if (not isinstance(self.root, str) or not ROOT_RE.match(self.root) or ".." in self.root.split("/")):
            raise ValidationError(f"{what} {self.name}: root {short(self.root)} is not an absolute folder path")
        if self.address not in ("127.0.0.1", "::1", "localhost"):
            # forwards of guests are only ever reached on loopback (on a remote host: through a tunnel)
            raise ValidationError(f"{what} {self.name}: address {short(self.address)} is not a loopback address "
                                  "(reach a remote host's forwards through an SSH tunnel on 127.0.0.1)")
        if self.accel not in ("kvm", "tcg"):
            raise ValidationError(f"{what} {self.name}: accel {short(self.accel)} is not kvm or tcg")
        return self


def _from_record(rec: object, name: str) -> Host:
    if not isinstance(rec, dict):
        raise StorageError(f"host record {short(name)} is broken (not a mapping); remove it with 'osimg host rm'")
    try:
        h = Host(**{k: v for k, v in rec.items() if k in Host.__dataclass_fields__})
        return h.validate(f"host record {short(name)}")
    except (TypeError, ValidationError) as err:
        raise StorageError(f"host record {short(name)} is broken ({err}); remove it with 'osimg host rm'") from None


def add(ctx: Context, name: str, uri: str, root: str = DEFAULT_ROOT, accel: str = "tcg",
        replace: bool = False) -> Host:
    """Register a host after checking its libvirtd answers; same settings again is no change."""
    h = Host(name, uri, root, accel=accel).validate()
    old = ctx.store.get(KIND, name)
    if old is not None:
        known = _from_record(old, name)
        if (known.uri, known.root, known.accel) == (h.uri, h.root, h.accel):
            return known
        if not replace:
            raise ConflictError(f"host {name} is registered with uri {short(known.uri)}; remove it first "
                                f"('osimg host rm {name}')")
    if len(ctx.store.items(KIND)) >= MAX_HOSTS and old is None:
        raise ValidationError(f"at most {MAX_HOSTS} hosts can be registered")
    probe = Hypervisor(h.uri, home=str(ctx.settings.home))
    try:
        probe.versions()  # reachable, or a one-line error
    finally:
        probe.close()
    ctx.store.put(KIND, name, asdict(h))
    return h


def get(ctx: Context, name: str) -> Host:
    valid_name(name, "host name")
    rec = ctx.store.get(KIND, name)
    if rec is None:
        known = ", ".join(h.name for h in list_hosts(ctx)) or "none yet"
        raise NotFoundError(f"no host named {name!r} (hosts: {known}; add one with 'osimg host add NAME URI')")
    return _from_record(rec, name)


def list_hosts(ctx: Context) -> list[Host]:
    out = []
    for name, rec in ctx.store.items(KIND):
        try:
            out.append(_from_record(rec, name))
        except StorageError:
            continue
    return sorted(out, key=lambda h: h.name)


def remove(ctx: Context, name: str, guest_names: list[str]) -> None:
    """Forget a host (its images' pools there are removed first); refused while guests live on it."""
    h = get(ctx, name)
    if guest_names:
        raise ConflictError(f"host {name} still runs guests {short(', '.join(guest_names), 80)}: remove or "
                            "move them first")
    for image in shipped(ctx, name):
        unship(ctx, name, image)
    ctx.store.delete(KIND, h.name)


def context(ctx: Context, host: str | None) -> Context:
    """The handle for a host's libvirtd (the cluster store is shared); ``ctx`` itself for no host."""
    if host is None:
        return ctx
    h = get(ctx, host)
    return ctx.child(h.uri, h.accel)


# -- where a home's files live on a host ----------------------------------------------------------------
def home_id(ctx: Context) -> str:
    return hashlib.sha256(str(ctx.settings.home).encode()).hexdigest()[:8]


def pool_name(ctx: Context, kind: str, name: str) -> str:
    return _pool_name(home_id(ctx), kind, name)


def _pool_name(home: str, kind: str, name: str) -> str:
    """``kind`` "i" (an image's pool) or "g" (a guest's), of the home whose id is ``home``."""
    return f"osimg-{home}-{kind}-{name}"


def _hv(ctx: Context, h: Host) -> Hypervisor:
    """The connection to a host whose record is already read (``context`` reads it again)."""
    return ctx.child(h.uri, h.accel).hv


def folder(ctx: Context, h: Host, kind: str, name: str) -> str:
    return str(PurePosixPath(h.root) / pool_name(ctx, kind, name))


def ensure_pool(ctx: Context, h: Host, kind: str, name: str) -> tuple[Hypervisor, str]:
    """The pool (and its folder under the host's root) of an image or guest, made if missing; once
    per process per pool. Returns the host's handle and the pool's name."""
    hv = _hv(ctx, h)
    pool = pool_name(ctx, kind, name)
    if (h.uri, h.root) not in _ensured:
        hv.make_dir(h.root, qemu_gid())
        _ensured.add((h.uri, h.root))
    if (h.uri, pool) not in _ensured:
        hv.pool_ensure(pool, folder(ctx, h, kind, name), qemu_gid())
        _ensured.add((h.uri, pool))
    return hv, pool


class Files(Protocol):
    """A guest's own files (overlays, config drive, data volume, console log, page-in files), by name."""

    def path(self, name: str) -> str: ...
    def exists(self, name: str) -> bool: ...
    def unlink(self, name: str) -> None: ...
    def create_overlay(self, name: str, backing: str) -> None: ...
    def create_blank(self, name: str, size: int) -> None: ...
    def put(self, name: str, src: Path) -> None: ...
    def virtual_size(self, name: str) -> int: ...
    def allocated(self, name: str) -> int | None: ...
    def read_text(self, name: str, limit: int = 1 << 20) -> str: ...
    def page_in(self, name: str, golden: Path, xml: str) -> None: ...


@dataclass
class LocalFiles:
    """A local guest's folder under OSIMG_HOME: written directly."""

    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def exists(self, name: str) -> bool:
        return (self.dir / name).exists()

    def unlink(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)

    def create_overlay(self, name: str, backing: str) -> None:
        qemu_img.create_overlay(self.dir / name, Path(backing))

    def create_blank(self, name: str, size: int) -> None:
        qemu_img.create_blank(self.dir / name, size)

    def put(self, name: str, src: Path) -> None:
        src.rename(self.dir / name)

    def virtual_size(self, name: str) -> int:
        return qemu_img.info(self.dir / name).virtual_size

    def allocated(self, name: str) -> int | None:
        p = self.dir / name
        return qemu_img.allocated_bytes(p) if p.exists() else None

    def read_text(self, name: str, limit: int = 1 << 20) -> str:
        with open(self.dir / name, "rb") as f:
            return f.read(limit).decode(errors="replace")

    def page_in(self, name: str, golden: Path, xml: str) -> None:
        retarget_saved_state(golden, self.dir / name, xml)


@dataclass
class PoolFiles:
    """A guest's folder on a registered host: a storage pool there, reached only through libvirt."""

    hv: Hypervisor
    pool: str
    dir: str
    home: str  # the home's id: the golden state's own pool on the host is osimg-HOME-i-IMAGE

    def path(self, name: str) -> str:
        return str(PurePosixPath(self.dir) / name)

    def exists(self, name: str) -> bool:
        return self.hv.vol_size(self.pool, name) is not None

    def unlink(self, name: str) -> None:
        self.hv.vol_delete(self.pool, name)

    def create_overlay(self, name: str, backing: str) -> None:
        self.hv.vol_delete(self.pool, name)
        self.hv.vol_create(self.pool, name, 0, "qcow2", (backing, "qcow2"))

    def create_blank(self, name: str, size: int) -> None:
        self.hv.vol_delete(self.pool, name)
        self.hv.vol_create(self.pool, name, size, "qcow2")

    def put(self, name: str, src: Path) -> None:
        try:
            self.hv.vol_upload(self.pool, name, src)
        finally:
            src.unlink(missing_ok=True)

    def virtual_size(self, name: str) -> int:
        return self.hv.vol_capacity(self.pool, name)

    def allocated(self, name: str) -> int | None:
        return self.hv.vol_allocation(self.pool, name)

    def read_text(self, name: str, limit: int = 1 << 20) -> str:
        chunks: list[bytes] = []
        self.hv.vol_download(self.pool, name, chunks.append, limit)
        return b"".join(chunks).decode(errors="replace")

    def page_in(self, name: str, golden: Path, xml: str) -> None:
        """``golden``: the local copy of the image's state (equal by hash to the host's copy)."""
        header = saved_header(golden, xml)
        # the memory body is copied on the host from its verified copy of the golden state; only the
        # header with this guest's identity goes over the connection
        self.hv.vol_delete(self.pool, name)
        self.hv.vol_clone(self.pool, name, _pool_name(self.home, "i", golden.parent.name), golden.name)
        with tempfile.NamedTemporaryFile(prefix="osimg-header-") as f:
            f.write(header)
            f.flush()
            self.hv.vol_upload(self.pool, name, Path(f.name), create=False)


def guest_files(ctx: Context, host: str | None, guest: str, gdir: Path) -> Files:
    """The files of a guest: its folder under OSIMG_HOME (no host) or its pool on its host."""
    if host is None:
        return LocalFiles(gdir)
    h = get(ctx, host)
    hv, pool = ensure_pool(ctx, h, "g", guest)
    return PoolFiles(hv, pool, folder(ctx, h, "g", guest), home_id(ctx))


_ensured: set[tuple[str, str]] = set()  # (uri, pool or root) this process made sure of: one lookup, not one per file


def remove_guest_files(ctx: Context, host: str, guest: str) -> None:
    _drop_pool(ctx, host, "g", guest)


def _drop_pool(ctx: Context, host: str, kind: str, name: str) -> None:
    """Remove an image's or a guest's pool, with its files, from a host."""
    h = get(ctx, host)
    pool = pool_name(ctx, kind, name)
    _ensured.discard((h.uri, pool))
    _hv(ctx, h).pool_remove(pool)


# -- images on hosts -------------------------------------------------------------------------------------
def image_path(ctx: Context, host: str | None, local: str) -> str:
    """Where a catalog image's file (a path under OSIMG_HOME/images) is on ``host``."""
    if host is None:
        return local
    p = Path(local)
    if p.parent.parent != ctx.settings.images_dir:
        raise StorageError(f"{short(local)} is not a catalog image's file; only catalog images reach other hosts")
    return str(PurePosixPath(folder(ctx, get(ctx, host), "i", p.parent.name)) / p.name)


@dataclass
class Shipment:
    host: str
    image: str
    files: dict[str, str]
    bytes_sent: int
    seconds: float
    already: bool


def ship(ctx: Context, host: str, image: str, progress: Any = None) -> Shipment:
    """Make sure ``host`` has ``image``: every file uploaded into the image's pool there and its
    sha256, read back from the host's copy, equal to the catalog's. Recorded per host; a host that
    has the image with the same hashes is left alone (and ``already`` says so)."""
    h = get(ctx, host)
    img = catalog.get(ctx, image)
    if img.kind == "snapshot":
        raise ValidationError(f"image {image} is a snapshot (an overlay of {img.parent}); only self-contained "
                              f"images reach other hosts: 'osimg image clone {image} NEW' makes one")
    rec_name = shipped_key(host, image)
    have = ctx.store.get(SHIPPED, rec_name)
    if isinstance(have, dict) and have.get("files") == img.files:
        return Shipment(host, image, img.files, 0, 0.0, True)
    catalog.verify_source(ctx, image)
    t0 = time.monotonic()
    hv, pool = ensure_pool(ctx, h, "i", image)
    sent = 0
    d = catalog.image_dir(ctx, image)
    for fname, digest in sorted(img.files.items()):
        if progress is not None:
            progress(f"{host}: uploading {image}/{fname}")
        src = d / fname
        hv.vol_upload(pool, fname, src)
        sent += src.stat().st_size
        h256 = hashlib.sha256()
        hv.vol_download(pool, fname, h256.update)
        if h256.hexdigest() != digest:
            hv.vol_delete(pool, fname)
            raise StorageError(f"image {image}: {fname} arrived on host {host} with another hash "
                               f"({h256.hexdigest()[:12]}, not {digest[:12]}); the upload was removed, try again")
    ctx.store.put(SHIPPED, rec_name, {"host": host, "image": image, "files": img.files, "at": time.time()})
    return Shipment(host, image, img.files, sent, round(time.monotonic() - t0, 3), False)


def shipped_key(host: str, image: str) -> str:
    """The store name of "``image`` is on ``host``": both names may hold dots, so a digest of the pair."""
    return "s" + hashlib.sha256(f"{host}\0{image}".encode()).hexdigest()[:40]


def _shipments(ctx: Context) -> list[tuple[str, str]]:
    """(host, image) of every shipment record whose names are sound (records are data)."""
    out = []
    for _, rec in ctx.store.items(SHIPPED):
        host, image = (rec.get("host"), rec.get("image")) if isinstance(rec, dict) else (None, None)
        if isinstance(host, str) and isinstance(image, str) and NAME_RE.match(host) and NAME_RE.match(image):
            out.append((host, image))
    return out


def having(ctx: Context, image: str) -> list[str]:
    """The hosts an image was shipped to."""
    return sorted(h for h, i in _shipments(ctx) if i == image)


def unship(ctx: Context, host: str, image: str) -> None:
    """Remove an image's pool (and its files) from a host, then its record."""
    _drop_pool(ctx, host, "i", image)
    ctx.store.delete(SHIPPED, shipped_key(host, image))


def shipped(ctx: Context, host: str) -> list[str]:
    """The images a host has (uploaded and verified there)."""
    return sorted(i for h, i in _shipments(ctx) if h == host)
