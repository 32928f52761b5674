"""Kernel samepage merging (KSM), osimg's opt-in memory-density setting, over ``/sys/kernel/mm/ksm``.

Guests paged in from one golden memory state hold many identical pages (the same kernel, the same
programs, the same page cache). With KSM on, the kernel thread ``ksmd`` scans memory that processes
marked mergeable (QEMU marks guest RAM so by default: ``mem-merge=on``; osimg's domains never ask
for ``<nosharepages/>``), keeps one copy-on-write copy of each identical page and frees the rest.

It is off unless someone turns it on (``osimg host ksm on``) because it is a host-wide choice with
costs: ksmd spends CPU on every scan (``pages_to_scan`` pages every ``sleep_ms``), and merged pages
make cross-guest side channels possible (a guest can time a copy-on-write fault to learn whether
another guest holds a page with given content). osimg never turns it on by itself.

The ``root`` and ``proc`` arguments exist so that the fast tests can point the functions at a fake
folder; the defaults are the real kernel interfaces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import HypervisorError, ValidationError
from ..validate import short

SYSFS_KSM = Path("/sys/kernel/mm/ksm")
PROC = Path("/proc")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# ksmd's own defaults are 100 pages every 20 ms; these bounds only keep a typo from pinning a core
MAX_PAGES_TO_SCAN = 1_000_000
MAX_SLEEP_MS = 60_000
RUN_OFF, RUN_ON, RUN_UNMERGE = 0, 1, 2
STATES = {RUN_OFF: "off", RUN_ON: "on", RUN_UNMERGE: "off (unmerged)"}


@dataclass(frozen=True)
class KsmSettings:
    """What ``enable`` changes, kept so that a caller (the density benchmark) can put it back."""

    run: int
    pages_to_scan: int
    sleep_ms: int


@dataclass(frozen=True)
class KsmStatus:
    """One reading of ksmd's settings and counters (the counters are host-wide, all processes)."""

    run: int
    pages_to_scan: int
    sleep_ms: int
    full_scans: int
    pages_shared: int  # distinct merged pages in use
    pages_sharing: int  # further mappings of them: the pages saved
    pages_unshared: int
    pages_volatile: int

    @property
    def state(self) -> str:
        return STATES.get(self.run, f"run={self.run}")

    @property
    def saved_bytes(self) -> int:
        return self.pages_sharing * PAGE_SIZE

    @property
    def settings(self) -> KsmSettings:
        return KsmSettings(self.run, self.pages_to_scan, self.sleep_ms)


def _root(root: Path | None) -> Path:
    r = root or SYSFS_KSM
    if not (r / "run").exists():
        raise HypervisorError(f"this kernel has no KSM ({r}/run is missing; it needs CONFIG_KSM=y)")
    return r


def _read(root: Path, key: str) -> int:
    path = root / key
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise HypervisorError(f"cannot read {path}: {err.strerror or err}") from None
    if not text.isdigit():
        raise HypervisorError(f"{path}: expected a number, read {short(text)}")
    return int(text)


def _write(root: Path, key: str, value: int) -> None:
    path = root / key
    try:
        path.write_text(f"{value}\n")
    except OSError as err:
        raise HypervisorError(f"cannot write {value} to {path}: {err.strerror or err} "
                              "(changing KSM needs root)") from None


def _bounded(value: object, what: str, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise ValidationError(f"KSM {what} {short(value)} is outside 1..{hi}")
    return value


def status(root: Path | None = None) -> KsmStatus:
    r = _root(root)
    return KsmStatus(run=_read(r, "run"), pages_to_scan=_read(r, "pages_to_scan"),
                     sleep_ms=_read(r, "sleep_millisecs"), full_scans=_read(r, "full_scans"),
                     pages_shared=_read(r, "pages_shared"), pages_sharing=_read(r, "pages_sharing"),
                     pages_unshared=_read(r, "pages_unshared"), pages_volatile=_read(r, "pages_volatile"))


def enable(pages_to_scan: int | None = None, sleep_ms: int | None = None, root: Path | None = None) -> KsmStatus:
    """Start ksmd (host-wide), optionally with another scan rate. Every value is checked before
    anything is written; a value left out keeps the kernel's current one."""
    if pages_to_scan is not None:
        _bounded(pages_to_scan, "pages_to_scan", MAX_PAGES_TO_SCAN)
    if sleep_ms is not None:
        _bounded(sleep_ms, "sleep_ms", MAX_SLEEP_MS)
    r = _root(root)
    if pages_to_scan is not None:
        _write(r, "pages_to_scan", pages_to_scan)
    if sleep_ms is not None:
        _write(r, "sleep_millisecs", sleep_ms)
    _write(r, "run", RUN_ON)
    return status(r)


def disable(unmerge: bool = True, root: Path | None = None) -> KsmStatus:
    """Stop ksmd. ``unmerge`` (the default) also gives every merged page its own copy again
    (``run=2``, then ``run=0``), so nothing stays shared between guests; without it the pages
    merged so far stay merged until they are written."""
    r = _root(root)
    if unmerge:
        _write(r, "run", RUN_UNMERGE)
    _write(r, "run", RUN_OFF)
    return status(r)


def restore(saved: KsmSettings, root: Path | None = None) -> KsmStatus:
    """Put back settings read earlier with ``status().settings``. A ksmd that was not running is
    stopped with its pages unmerged, so the host's memory is as it was, not only the switch."""
    _bounded(saved.pages_to_scan, "pages_to_scan", MAX_PAGES_TO_SCAN)
    _bounded(saved.sleep_ms, "sleep_ms", MAX_SLEEP_MS)
    r = _root(root)
    _write(r, "pages_to_scan", saved.pages_to_scan)
    _write(r, "sleep_millisecs", saved.sleep_ms)
    if saved.run == RUN_ON:
        _write(r, "run", RUN_ON)
    else:
        _write(r, "run", RUN_UNMERGE)
        if saved.run == RUN_OFF:
            _write(r, "run", RUN_OFF)
    return status(r)


# -- what KSM acts on, per process ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessMemory:
    """A process's memory as KSM sees it: ``pss`` counts a page shared by k processes as 1/k of a
    page, so the Pss of all processes adds up to the memory they really take."""

    pid: int
    pss: int  # bytes
    rss: int  # bytes
    mergeable: int  # bytes in areas marked mergeable (MADV_MERGEABLE, VmFlags "mg")
    ksm_merging: int  # bytes of this process's pages that ksmd merged (0 on kernels before 5.19)


def process_memory(pid: int, proc: Path | None = None) -> ProcessMemory:
    base = (proc or PROC) / str(pid)
    try:
        rollup = _kib_fields((base / "smaps_rollup").read_text())
        mergeable = _mergeable_kib((base / "smaps").read_text())
    except OSError as err:
        raise HypervisorError(f"process {pid}: cannot read its memory map: {err.strerror or err}") from None
    try:
        merging = int((base / "ksm_merging_pages").read_text().strip()) * PAGE_SIZE
    except (OSError, ValueError):
        merging = 0
    return ProcessMemory(pid, rollup.get("Pss", 0) << 10, rollup.get("Rss", 0) << 10, mergeable << 10, merging)


def _kib_fields(text: str) -> dict[str, int]:
    """``Key:   123 kB`` lines of smaps_rollup (its first line names the range, not a field)."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def _mergeable_kib(smaps: str) -> int:
    """Sum of ``Size`` over the areas whose ``VmFlags`` carry ``mg``; in smaps each area's fields
    come before its ``VmFlags`` line."""
    total = size = 0
    for line in smaps.splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("VmFlags:") and "mg" in line.split()[1:]:
            total += size
    return total
