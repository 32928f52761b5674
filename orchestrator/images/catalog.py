"""The image catalog: records of golden images, their files, clones, snapshots, imports and verification.

Layout: ``OSIMG_HOME/images/NAME/`` holds ``disk.qcow2``, ``vmlinuz``, ``initrd.img`` and, for
captured images, ``state.sav`` (the builder's memory state: the design's paging device). The
catalog lives in the cluster store (kind ``image``) with hashes, sizes, lineage and OS version.

- **build**: boot a hidden builder guest from a recipe or an image, run build steps over SSH, then
  **capture**: sync, save the memory state (the domain stops with its disk frozen at that point),
  and copy the disk flattened into the repository. The builder is removed, also on failure.
- **clone**: full copy of data and metadata (``qemu-img convert``), independent of its source.
- **snapshot**: metadata only, a qcow2 overlay whose backing file is the (read-only) source. It
  stays empty forever (images are immutable), so its content equals the source's and the source's
  memory state, kernel and initrd remain valid for it (they are used in place, not copied).
- **import**: catalog a disk prepared elsewhere, booting with a known image's kernel and keys.

Images are immutable once captured: files are mode 0444 and nothing in osimg opens them for
writing; guests always write to their own overlays. An image file reference is either a recipe
build (``FAMILY:VERSION``) or a catalog name.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import recipes
from ..context import Context
from ..errors import ConflictError, NotFoundError, StorageError, ValidationError
from ..host import qemu_img
from ..settings import private_dir
from ..validate import file_name, inside, short
from ..validate import name as valid_name

KIND = "image"
DISK = "disk.qcow2"
STATE = "state.sav"
BOOT_FILES = ("vmlinuz", "initrd.img")

@dataclass
class BootImage:
    """Everything needed to boot (or page in) a guest from an image, whatever its origin."""

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


@dataclass
class Image:
    """A catalog record."""

    name: str
    kind: str  # built | clone | snapshot | imported
    parent: str | None
    source: str
    family: str
    os_version: str
    files: dict[str, str]  # file name -> sha256
    virtual_size: int
    allocated_size: int
    has_memory_state: bool
    state_from: str | None  # the image whose state.sav this one uses (itself, or a snapshot's source)
    host_key: str
    cmdline: str
    memory_mib: int
    ready_marker: str
    app_port: int
    created: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)


# -- catalog ----------------------------------------------------------------------------------------------
def image_dir(ctx: Context, name: str) -> Path:
    return ctx.settings.images_dir / name


def _to_image(rec: dict[str, Any]) -> Image:
    """A catalog record as an Image, its names checked: they become paths under the repository
    (an image's folder, its source's state file), and a record is data, not trust."""
    try:
        img = Image(**rec)
    except TypeError:
        raise ValidationError(f"image record {short(rec.get('name'))} is malformed") from None
    valid_name(img.name, "image name in the catalog")
    for what, value in (("parent", img.parent), ("state_from", img.state_from)):
        if value is not None:
            valid_name(value, f"image {img.name}: {what}")
    for fname in img.files:
        file_name(fname, f"image {img.name}: file")
    return img


def get(ctx: Context, name: str) -> Image:
    valid_name(name, "image name")
    rec = ctx.store.get(KIND, name)
    if rec is None:
        known = ", ".join(sorted(i.name for i in list_images(ctx))) or "none yet"
        raise NotFoundError(f"no image named {name!r} in the repository (images: {known}; "
                            f"recipes: {', '.join(f + ':VERSION' for f in recipes.FAMILIES)})")
    return _to_image(rec)


def list_images(ctx: Context) -> list[Image]:
    return sorted((_to_image(r) for r in ctx.store.list(KIND)), key=lambda i: i.created)


def check_new_name(ctx: Context, name: str) -> None:
    valid_name(name, "image name")
    if ctx.store.get(KIND, name) is not None or image_dir(ctx, name).exists():
        raise ConflictError(f"an image named {name!r} already exists (remove it first with 'osimg image rm {name}')")


def resolve(ctx: Context, ref: str) -> BootImage:
    """Find the image called ``ref`` (a catalog name, or a recipe ``FAMILY:VERSION`` built on demand)."""
    if ":" in ref:
        build = recipes.ensure_built(ctx.settings, ref)
        if len(qemu_img.backing_chain(build.disk)) != 1:
            raise StorageError(f"recipe image {ref}: {build.disk} has a backing file; a recipe build stands alone")
        m = build.manifest
        return BootImage(
            ref=ref, disk=build.disk, kernel=build.dir / "vmlinuz", initrd=build.dir / "initrd.img",
            cmdline=str(m["cmdline"]), host_key=build.host_key, os_version=str(m["os_version"]),
            family=build.family, memory_mib=int(str(m.get("memory_mib", 256))),
            ready_marker=str(m.get("ready_marker", "OSIMG-READY")), app_port=int(str(m.get("app_port", 8080))),
        )
    img = get(ctx, ref)
    d = image_dir(ctx, ref)
    boot = _boot_dir(ctx, img)
    state = image_dir(ctx, img.state_from) / STATE if img.has_memory_state and img.state_from else None
    if state is not None:
        # only a catalog image's own save file is paged in (it carries a QEMU command line)
        state = inside(state, [ctx.settings.images_dir], f"image {ref}: memory state")
    return BootImage(
        ref=ref, disk=d / DISK, kernel=boot / "vmlinuz", initrd=boot / "initrd.img", cmdline=img.cmdline,
        host_key=img.host_key, os_version=img.os_version, family=img.family, memory_mib=img.memory_mib,
        ready_marker=img.ready_marker, app_port=img.app_port, state_file=state,
    )


def _boot_dir(ctx: Context, img: Image) -> Path:
    """The folder holding an image's kernel and initrd: a snapshot uses its source's."""
    while img.kind == "snapshot" and img.parent:
        img = get(ctx, img.parent)
    return image_dir(ctx, img.name)


def _record_files(d: Path) -> dict[str, str]:
    return {f.name: qemu_img.sha256(f) for f in sorted(d.iterdir()) if f.is_file() and f.name != "manifest.json"}


def finish(ctx: Context, tmp: Path, img: Image) -> Image:
    """Hash, write-protect and publish a prepared image folder, then record it in the catalog."""
    img.files = _record_files(tmp)
    disk = qemu_img.info(tmp / DISK)
    img.virtual_size = disk.virtual_size
    img.allocated_size = sum(qemu_img.allocated_bytes(tmp / f) for f in img.files)
    (tmp / "manifest.json").write_text(json.dumps(asdict(img), indent=2))
    for f in tmp.iterdir():
        qemu_img.write_protect(f)
    private_dir(tmp)
    final = image_dir(ctx, img.name)
    tmp.rename(final)
    ctx.store.put(KIND, img.name, asdict(img))
    return img


def staging(ctx: Context, name: str) -> Path:
    ctx.settings.ensure_dirs()
    tmp = ctx.settings.images_dir / f".tmp-{name}-{uuidlib.uuid4().hex[:8]}"
    private_dir(tmp)
    return tmp


def stat_key(path: Path) -> list[int]:
    """What changes when a file is replaced or written: size, mtime, ctime (not settable by a user) and inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


VERIFIED = ".verified.json"


def verify_source(ctx: Context, name: str) -> None:
    """``verify`` an image used as a source (snapshot, guest create, fleet up), cached by the files'
    ``stat_key``: rehashing a 250 MB disk per guest costs a second, and a file changed since the last
    verification changes its key, so it is verified again."""
    img = get(ctx, name)
    d = image_dir(ctx, name)
    cache = ctx.settings.images_dir / VERIFIED
    try:
        known: dict[str, Any] = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    try:
        key = {f: [*stat_key(d / f), digest] for f, digest in sorted(img.files.items())}
    except OSError:
        key = None
    if key is not None and known.get(name) == key:
        if img.kind == "snapshot" and img.parent:
            verify_source(ctx, img.parent)
        return
    verify(ctx, name, raise_on_error=True)
    known[name] = key
    tmp = cache.with_suffix(f".{uuidlib.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(known))
    tmp.rename(cache)


def clone(ctx: Context, src_name: str, dst: str) -> Image:
    """Full, independent copy of an image (data and metadata, memory state included)."""
    src = get(ctx, src_name)
    check_new_name(ctx, dst)
    verify(ctx, src_name, raise_on_error=True)
    sdir = image_dir(ctx, src_name)
    tmp = staging(ctx, dst)
    try:
        qemu_img.convert(sdir / DISK, tmp / DISK)
        for f in BOOT_FILES:
            shutil.copyfile(_boot_dir(ctx, src) / f, tmp / f)
        if src.has_memory_state and src.state_from:
            for f in (STATE, "domain.xml"):
                if (image_dir(ctx, src.state_from) / f).exists():
                    shutil.copyfile(image_dir(ctx, src.state_from) / f, tmp / f)
        img = Image(**{**asdict(src), "name": dst, "kind": "clone", "parent": src_name, "source": src_name,
                       "state_from": dst if src.has_memory_state else None, "created": time.time(),
                       "notes": [f"full copy of {src_name}"]})
        return finish(ctx, tmp, img)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def snapshot(ctx: Context, src_name: str, dst: str) -> Image:
    """Metadata-only image: an empty qcow2 overlay on the read-only source."""
    src = get(ctx, src_name)
    check_new_name(ctx, dst)
    verify_source(ctx, src_name)
    sdir = image_dir(ctx, src_name)
    tmp = staging(ctx, dst)
    try:
        qemu_img.create_overlay(tmp / DISK, sdir / DISK)
        img = Image(**{**asdict(src), "name": dst, "kind": "snapshot", "parent": src_name, "source": src_name,
                       "created": time.time(), "notes": [f"overlay on {src_name}"]})
        return finish(ctx, tmp, img)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_disk(ctx: Context, name: str, disk_path: Path, like: str = "tiny:v1", fmt: str = "qcow2") -> Image:
    """Catalog a disk prepared outside osimg (copied in, flattened), booting with ``like``'s kernel and keys.

    No builder runs, so there is no memory state; the caller vouches that the disk holds ``like``'s
    OS, and says its format ``fmt`` (never probed).
    """
    check_new_name(ctx, name)
    if not disk_path.is_file():
        raise NotFoundError(f"cannot import {disk_path}: no such file")
    src = resolve(ctx, like)
    tmp = staging(ctx, name)
    try:
        qemu_img.convert(disk_path, tmp / DISK, src_fmt=fmt)
        shutil.copyfile(src.kernel, tmp / "vmlinuz")
        shutil.copyfile(src.initrd, tmp / "initrd.img")
        img = Image(
            name=name, kind="imported", parent=None, source=str(disk_path.resolve()), family=src.family,
            os_version=src.os_version, files={}, virtual_size=0, allocated_size=0, has_memory_state=False,
            state_from=None, host_key=src.host_key, cmdline=src.cmdline, memory_mib=src.memory_mib,
            ready_marker=src.ready_marker, app_port=src.app_port,
            notes=[f"disk imported from {disk_path}, boots like {like}"],
        )
        return finish(ctx, tmp, img)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- verify and remove ------------------------------------------------------------------------------------
def verify(ctx: Context, name: str, raise_on_error: bool = False) -> list[str]:
    """Recompute hashes and check the backing chain stays inside the repository without loops."""
    img = get(ctx, name)
    d = image_dir(ctx, name)
    problems: list[str] = []
    for fname, digest in img.files.items():
        p = d / fname
        if not p.exists():
            problems.append(f"{fname} is missing")
        elif qemu_img.sha256(p) != digest:
            problems.append(f"{fname} was modified or truncated (sha256 mismatch)")
        elif p.stat().st_mode & 0o222:
            problems.append(f"{fname} is writable; images must be read-only")
    if not problems:
        try:
            chain = qemu_img.backing_chain(d / DISK)
            repo = ctx.settings.images_dir.resolve()
            for link in chain:
                lp = Path(link.path).resolve()
                if repo not in lp.parents:
                    problems.append(f"backing chain leaves the repository: {link.path}")
            qemu_img.check(d / DISK)
        except StorageError as err:
            problems.append(f"disk check failed: {err}")
    if img.kind == "snapshot" and img.parent:
        # its content, memory state, kernel and initrd are the source's
        problems += [f"source {img.parent}: {p}" for p in verify(ctx, img.parent)]
    if problems and raise_on_error:
        raise StorageError(f"image {name!r} failed verification: {'; '.join(problems)}")
    return problems
