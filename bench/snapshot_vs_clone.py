"""Benchmark (issue 3): ``catalog.snapshot`` versus ``catalog.clone`` on bases of 1, 4 and 16 GiB.

Each base is a qcow2 of that virtual size with 1 GiB of real data (qemu-io writes 0xa5), imported
into a throw-away repository with ``catalog.import_disk`` (no guest boots: the bench measures the
repository, not a build). Then, per base, the same run snapshots it a few times and clones it once,
and prints the seconds and the bytes allocated on disk by the new image's files.

A clone is more than ``qemu-img convert``: it first verifies the source (sha256 of every file) and
then hashes the copy for the catalog. ``qemu_img.run`` and ``qemu_img.sha256`` are wrapped with timers
during each operation, so both times are broken down into those parts, not one opaque number.

Every timed operation starts after ``sync``: otherwise the writeback of the previous step's
gigabyte lands in the next measurement (the catalog's SQLite commit waits for it). The clone's own
writeback is timed separately (a ``sync`` right after it): catalog.clone returns before all of its
copy is on disk. ``sync`` is host-wide, so other work on the host can inflate that number.

Run: ``.venv/bin/python bench/snapshot_vs_clone.py`` (as root, libvirt not needed; ~1-2 minutes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from orchestrator.context import Context
from orchestrator.host import qemu_img
from orchestrator.images import catalog
from orchestrator.settings import SOURCE_ROOT

GiB = 1 << 30
BASE_SIZES_GIB = (1, 4, 16)
DATA = "1G"  # real data written into every base
SNAPSHOT_RUNS = 7  # snapshots take milliseconds: the median of a few is steadier on a shared host
SHA_SOURCE, SHA_COPY, OTHER = "sha256 of source", "sha256 of copy", "other"
LIKE = "tiny:v1"  # kernel, initrd and keys the imported bases boot with


def run(args: list[str]) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=300)


def prepare_base(path: Path, size_gib: int) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_gib}G"])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xa5 0 {DATA}", str(path)])


def allocated(d: Path) -> dict[str, int]:
    return {f.name: qemu_img.allocated_bytes(f) for f in sorted(d.iterdir()) if f.is_file()}


@dataclass
class Measured:
    seconds: float
    parts: dict[str, float]  # where the time went: storage tool runs and hashing, by what they did
    files: dict[str, int]  # bytes allocated on disk by each file of the new image

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    def part(self, label: str) -> float:
        return self.parts.get(label, 0.0) if label != OTHER else self.seconds - sum(self.parts.values())


@contextmanager
def timed_storage(parts: dict[str, float]) -> Iterator[None]:
    """Accumulate, while the block runs, the time spent in each qemu-img subcommand and in hashing."""
    orig_run, orig_sha = qemu_img.run, qemu_img.sha256

    def timed_run(args: list[str], *a: Any, **kw: Any) -> str:
        t0 = time.perf_counter()
        try:
            return orig_run(args, *a, **kw)
        finally:
            parts[f"qemu-img {args[1]}"] += time.perf_counter() - t0

    def timed_sha(path: str | Path) -> str:
        # the staging folder holds the new image; anything else is the source being verified
        label = SHA_COPY if Path(path).parent.name.startswith(".tmp-") else SHA_SOURCE
        t0 = time.perf_counter()
        try:
            return orig_sha(path)
        finally:
            parts[label] += time.perf_counter() - t0

    qemu_img.run, qemu_img.sha256 = timed_run, timed_sha
    try:
        yield
    finally:
        qemu_img.run, qemu_img.sha256 = orig_run, orig_sha


def measure(ctx: Context, op: Callable[[], catalog.Image]) -> Measured:
    """Time one repository operation, starting with no writeback pending from earlier steps."""
    os.sync()
    parts: dict[str, float] = defaultdict(float)
    with timed_storage(parts):
        t0 = time.perf_counter()
        img = op()
        seconds = time.perf_counter() - t0
    return Measured(seconds, dict(parts), allocated(catalog.image_dir(ctx, img.name)))


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.2f} MiB"


def main() -> int:
    home = SOURCE_ROOT / ".cache" / f"bench-snapclone-{uuid.uuid4().hex[:6]}"
    home.mkdir(parents=True)
    home.chmod(0o755)
    ctx = Context.from_env(home=str(home), store=f"sqlite://{home / 'cluster.sqlite'}")
    rows: list[tuple[int, Measured, list[float], Measured, float]] = []
    t_start = time.monotonic()
    try:
        prep = home / "prep"
        prep.mkdir()
        print(f"repository: {home} (removed at the end)")
        print(f"bases: {', '.join(f'{s} GiB' for s in BASE_SIZES_GIB)} virtual, {DATA}iB of 0xa5 data each, "
              f"imported with catalog.import_disk (boot files from {LIKE})\n")
        for size in BASE_SIZES_GIB:
            base = f"base-{size}g"
            t0 = time.perf_counter()
            prepare_base(prep / f"{base}.qcow2", size)
            t_write = time.perf_counter() - t0
            t0 = time.perf_counter()
            catalog.import_disk(ctx, base, prep / f"{base}.qcow2", like=LIKE)
            t_import = time.perf_counter() - t0
            (prep / f"{base}.qcow2").unlink()
            info = qemu_img.info(catalog.image_dir(ctx, base) / catalog.DISK)
            print(f"{base}: written in {t_write:.2f}s (qemu-io), imported in {t_import:.2f}s; "
                  f"virtual {info.virtual_size / GiB:.0f} GiB, disk allocated {mib(info.actual_size)}")

            snaps = [measure(ctx, partial(catalog.snapshot, ctx, base, f"{base}-snap{i}"))
                     for i in range(SNAPSHOT_RUNS)]
            snap = sorted(snaps, key=lambda m: m.seconds)[SNAPSHOT_RUNS // 2]
            clone = measure(ctx, partial(catalog.clone, ctx, base, f"{base}-clone"))
            t0 = time.perf_counter()
            os.sync()
            rows.append((size, snap, [m.seconds for m in snaps], clone, time.perf_counter() - t0))

        print(f"\nper operation (snapshot: the median of {SNAPSHOT_RUNS} runs; "
              "bytes: allocated on disk by the new image's files)")
        print(f"{'base':>5}  {'op':<9} {'seconds':>8}  {'bytes':>14}  files")
        for size, snap, samples, clone, _ in rows:
            for op, m in (("snapshot", snap), ("clone", clone)):
                files = ", ".join(f"{k} {v:,}" for k, v in m.files.items())
                runs = f"  (all runs: {', '.join(f'{x:.3f}' for x in samples)})" if op == "snapshot" else ""
                print(f"{size:>4}G  {op:<9} {m.seconds:>8.3f}  {m.bytes:>14,}  {files}{runs}")

        print("\nwhere the time went, seconds (catalog.clone verifies the source and hashes the copy;"
              " 'other' is Python, file copies and the catalog's SQLite commit)")
        labels = (SHA_SOURCE, "qemu-img convert", SHA_COPY, "qemu-img create", "qemu-img info", "qemu-img check",
                  OTHER)
        print(f"{'base':>5}  {'op':<9}" + "".join(f"{x:>21}" for x in labels))
        for size, snap, _, clone, _ in rows:
            for op, m in (("snapshot", snap), ("clone", clone)):
                print(f"{size:>4}G  {op:<9}" + "".join(f"{m.part(x):>21.3f}" for x in labels))
        print("after each clone, sync (its writeback, not part of the clone's time; host-wide): "
              + ", ".join(f"{size}G {t:.3f}s" for size, *_, t in rows))

        print("\nratios")
        print("(time: snapshot median; in brackets the fastest snapshot run, i.e. with the least interference"
              " from other work on the host)")
        heads = ("snapshot/clone time", "snapshot/clone bytes", "snapshot time / 1 GiB one")
        print(f"{'base':>5}" + "".join(f"{h:>30}" for h in heads))
        for size, snap, samples, clone, _ in rows:
            t_ratio = f"{snap.seconds / clone.seconds:.3%} ({min(samples) / clone.seconds:.3%})"
            scale = f"{snap.seconds / rows[0][1].seconds:.2f}x ({min(samples) / min(rows[0][2]):.2f}x)"
            print(f"{size:>4}G{t_ratio:>30}{snap.bytes / clone.bytes:>30.4%}{scale:>30}")
        print(f"\ntotal bench time {time.monotonic() - t_start:.1f}s")
        return 0
    finally:
        ctx.close()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
