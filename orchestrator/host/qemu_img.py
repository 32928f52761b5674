"""The only module that runs storage tools (``qemu-img``, ``mkfs.ext4``): files, overlays, hashes.

Every command is an argument list (never a shell string), and failures become StorageError with
the tool's own message, because "qemu-img failed" alone tells a user nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StorageError

CHUNK = 4 << 20


@dataclass
class ImageInfo:
    path: str
    fmt: str
    virtual_size: int
    actual_size: int
    backing: str | None


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


def info(path: str | Path, chain: bool = False) -> ImageInfo:
    """``qemu-img info`` of one file; ``-U`` so it also works while a guest has the file open."""
    out = run(["qemu-img", "info", "-U", "--output=json", str(path)], f"inspect {path}")
    data: dict[str, Any] = json.loads(out)
    return ImageInfo(
        path=str(path),
        fmt=str(data.get("format")),
        virtual_size=int(data.get("virtual-size", 0)),
        actual_size=int(data.get("actual-size", 0)),
        backing=data.get("full-backing-filename") or data.get("backing-filename"),
    )


def backing_chain(path: str | Path) -> list[ImageInfo]:
    """The file and its backing files, top first; raises StorageError on a loop or missing link."""
    out = run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)], f"inspect chain of {path}")
    items: list[dict[str, Any]] = json.loads(out)
    return [
        ImageInfo(
            path=str(d.get("filename")),
            fmt=str(d.get("format")),
            virtual_size=int(d.get("virtual-size", 0)),
            actual_size=int(d.get("actual-size", 0)),
            backing=d.get("full-backing-filename") or d.get("backing-filename"),
        )
        for d in items
    ]


def check(path: str | Path) -> None:
    """Structural check of a qcow2 file (``qemu-img check``)."""
    run(["qemu-img", "check", "-U", "-q", str(path)], f"check {path}")


def create_overlay(path: Path, backing: Path, size: int | None = None) -> None:
    """A qcow2 whose reads fall through to ``backing`` and whose writes stay in ``path``."""
    # qemu-img create spins forever on a backing chain that loops; info refuses it at once
    backing_chain(backing)
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()), "-F", "qcow2", str(path)]
    if size:
        args.append(str(size))
    run(args, f"create overlay {path.name}")


def create_blank(path: Path, size: int) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], f"create {path.name}")


def convert(src: Path, dst: Path, fmt: str = "qcow2") -> None:
    """Full copy (data and metadata), flattening any backing chain: the result is independent."""
    run(["qemu-img", "convert", "-O", fmt, str(src), str(dst)], f"copy {src.name} to {dst.name}")


def resize(path: Path, size: int) -> None:
    run(["qemu-img", "resize", "-q", str(path), str(size)], f"resize {path.name}")


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
        convert(raw, path)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def allocated_bytes(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


def write_protect(path: Path) -> None:
    path.chmod(0o444)
