"""The only module that runs storage tools (``qemu-img``, ``mkfs.ext4``, ``qemu-storage-daemon``,
``debugfs``): files, overlays, hashes, and reading files inside an image without mounting it.

Every command is an argument list (never a shell string), and failures become StorageError with
the tool's own message, because "qemu-img failed" alone tells a user nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StorageError
from ..settings import READONLY_MODE

CHUNK = 4 << 20


@dataclass
class ImageInfo:
    path: str
    fmt: str
    virtual_size: int
    actual_size: int
    backing: str | None
    backing_fmt: str | None = None


def run(args: list[str], what: str, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise StorageError(f"{what}: {args[0]} is not installed (run 'make setup')") from None
    except subprocess.TimeoutExpired:
        raise StorageError(f"{what}: {args[0]} did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise StorageError(f"{what}: {msg[-1] if msg else f'{args[0]} exited {proc.returncode}'}")
    return proc.stdout


FORMATS = ("qcow2", "raw")


def _fmt(fmt: str) -> str:
    """Every qemu-img call names the format: a probe would open a raw disk that a guest wrote, and that
    starts with a qcow2 header naming /etc/shadow as its backing file, as qcow2."""
    if fmt not in FORMATS:
        raise StorageError(f"unsupported image format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def _image_info(d: dict[str, Any], path: str) -> ImageInfo:
    return ImageInfo(
        path=path,
        fmt=str(d.get("format")),
        virtual_size=int(d.get("virtual-size", 0)),
        actual_size=int(d.get("actual-size", 0)),
        backing=d.get("full-backing-filename") or d.get("backing-filename"),
        backing_fmt=d.get("backing-filename-format"),
    )


def info(path: str | Path, fmt: str = "qcow2") -> ImageInfo:
    """``qemu-img info`` of one file of format ``fmt``; ``-U`` so it also works while a guest has it open."""
    out = run(["qemu-img", "info", "-U", "-f", _fmt(fmt), "--output=json", str(path)], f"inspect {path}")
    return _image_info(json.loads(out), str(path))


def backing_chain(path: str | Path, fmt: str = "qcow2") -> list[ImageInfo]:
    """The file and its backing files, top first; raises StorageError on a loop, a missing link or a
    link whose format its overlay does not record (QEMU would probe it)."""
    out = run(["qemu-img", "info", "-U", "-f", _fmt(fmt), "--backing-chain", "--output=json", str(path)],
              f"inspect chain of {path}")
    chain = [_image_info(d, str(d.get("filename"))) for d in json.loads(out)]
    for link in chain:
        if link.backing and link.backing_fmt not in FORMATS:
            raise StorageError(f"{link.path}: its backing file {link.backing} has no recorded format "
                               f"(it would be probed); rebase it with -F qcow2")
    return chain


def check(path: str | Path, fmt: str = "qcow2") -> None:
    """Structural check of a qcow2 file (``qemu-img check``)."""
    run(["qemu-img", "check", "-U", "-q", "-f", _fmt(fmt), str(path)], f"check {path}")


def create_overlay(path: Path, backing: Path, size: int | None = None) -> None:
    """A qcow2 whose reads fall through to ``backing`` and whose writes stay in ``path``."""
    # qemu-img create spins forever on a backing chain that loops; info refuses it at once
    backing_chain(backing)
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()), "-F", "qcow2", str(path)]
    if size:
        args.append(str(size))
    run(args, f"create overlay {path.name}")


def create_blank(path: Path, size: int) -> None:
    """An empty qcow2 of ``size`` bytes (a stand-in disk: the same device, none of the data)."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], f"create {path.name}")


def convert(src: Path, dst: Path, fmt: str = "qcow2", src_fmt: str = "qcow2") -> None:
    """Full copy (data and metadata), flattening any backing chain: the result is independent."""
    run(["qemu-img", "convert", "-f", _fmt(src_fmt), "-O", _fmt(fmt), str(src), str(dst)],
        f"copy {src.name} to {dst.name}")


def resize(path: Path, size: int, fmt: str = "qcow2") -> None:
    run(["qemu-img", "resize", "-q", "-f", _fmt(fmt), str(path), str(size)], f"resize {path.name}")


def make_ext4_volume(path: Path, size: int, label: str, uuid: str, owner: str | None = None) -> None:
    """A qcow2 data volume holding a fresh ext4 filesystem, made without mounting anything."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "vol.raw"
        with raw.open("wb") as f:
            f.truncate(size)
        args = ["mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid]
        if owner:
            args += ["-E", f"root_owner={owner}"]
        run([*args, str(raw)], f"format {path.name}")
        convert(raw, path, src_fmt="raw")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def allocated_bytes(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


def write_protect(path: Path) -> None:
    path.chmod(READONLY_MODE)


@contextlib.contextmanager
def raw_view(disk: Path) -> Iterator[Path]:
    """A read-only raw view of a qcow2 image (backing chain included) as a file, without a kernel
    block device or a mount: qemu-storage-daemon's FUSE export, in a private temporary folder."""
    with tempfile.TemporaryDirectory(prefix="osimg-view-") as tmp:
        view, pidfile = Path(tmp) / "disk.raw", Path(tmp) / "qsd.pid"
        view.touch(mode=0o600)
        name = str(disk).replace(",", ",,")  # QEMU's option syntax doubles a literal comma
        run(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={name},read-only=on",
             "--blockdev", "driver=qcow2,node-name=q,file=f,read-only=on",
             "--export", f"type=fuse,id=e,node-name=q,mountpoint={view}", "--daemonize", "--pidfile", str(pidfile)],
            f"reading {disk.name}", timeout=60)
        pid = int(pidfile.read_text().strip())
        try:
            yield view
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.01)


MISSING = "missing"
STAT_SIZE = re.compile(r"\bSize: (\d+)")
STAT_MTIME = re.compile(r"\bmtime: 0x([0-9a-f]+)")


def files_in_image(disk: Path, stat_paths: list[str], hash_paths: list[str]) -> dict[str, str]:
    """What ``stat -c '%s %Y %n'`` (``stat_paths``) and ``sha256sum`` (``hash_paths``) print for
    files in the ext4 file system of ``disk``, read with debugfs from a raw view, keyed "stat PATH" /
    "hash PATH"; MISSING for a file that is not there. A path that is not a regular file, or that
    debugfs cannot name (white space, quotes), is left out: the caller cannot judge it from here."""
    out: dict[str, str] = {}
    fine = [p for p in {*stat_paths, *hash_paths} if p.startswith("/") and not re.search(r"[\s\"'\\]", p)]
    if not fine:
        return out
    with raw_view(disk) as view, tempfile.TemporaryDirectory(prefix="osimg-files-") as tmp:
        for p in sorted(fine):
            st = run(["debugfs", "-R", f"stat {p}", str(view)], f"reading {p} in {disk.name}", timeout=60)
            size, mtime = STAT_SIZE.search(st), STAT_MTIME.search(st)
            if not st.strip():  # debugfs said "File not found" (on stderr)
                for kind in ("stat", "hash"):
                    out[f"{kind} {p}"] = MISSING
                continue
            if "Type: regular" not in st or size is None or mtime is None:
                continue
            if p in stat_paths:
                out[f"stat {p}"] = f"{size[1]} {int(mtime[1], 16)} {p}"
            if p in hash_paths:
                dst = Path(tmp) / "f"
                run(["debugfs", "-R", f"dump {p} {dst}", str(view)], f"reading {p} in {disk.name}", timeout=60)
                if dst.exists():
                    out[f"hash {p}"] = f"{sha256(dst)}  {p}"
                    dst.unlink()
    return out

