"""KSM, the opt-in page merging (``host/ksm.py``, ``osimg host ksm``), without QEMU and without
touching the host: every function runs against a fake ``/sys/kernel/mm/ksm`` folder (and a fake
``/proc/PID``) in a temporary directory. The real effect (guests restored from one golden state
sharing pages) is measured by ``bench/density.py``."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import cli, doctor
from orchestrator.context import Context
from orchestrator.errors import HypervisorError, ValidationError
from orchestrator.host import ksm
from orchestrator.host.domain import DiskSpec, DomainSpec

KERNEL = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "full_scans": 7, "pages_shared": 10,
          "pages_sharing": 250, "pages_unshared": 3, "pages_volatile": 4, "merge_across_nodes": 1}


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "ksm"
    root.mkdir()
    for key, value in KERNEL.items():
        (root / key).write_text(f"{value}\n")
    return root


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every file write, in order: sysfs files keep only the last value, the order is the point."""
    seen: list[tuple[str, str]] = []
    real = Path.write_text

    def record(self: Path, data: str, *args: object, **kwargs: object) -> int:
        seen.append((self.name, data.strip()))
        return real(self, data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", record)
    return seen


def values(root: Path) -> dict[str, int]:
    return {p.name: int(p.read_text()) for p in root.iterdir()}


def test_status_reads_settings_and_counters(sysfs: Path) -> None:
    st = ksm.status(sysfs)
    assert (st.run, st.pages_to_scan, st.sleep_ms, st.full_scans) == (0, 100, 20, 7)
    assert (st.pages_shared, st.pages_sharing, st.pages_unshared, st.pages_volatile) == (10, 250, 3, 4)
    assert st.state == "off"
    assert st.saved_bytes == 250 * ksm.PAGE_SIZE
    assert st.settings == ksm.KsmSettings(0, 100, 20)


def test_enable_sets_the_rate_then_starts_ksmd(sysfs: Path, writes: list[tuple[str, str]]) -> None:
    st = ksm.enable(pages_to_scan=5000, sleep_ms=10, root=sysfs)
    assert writes == [("pages_to_scan", "5000"), ("sleep_millisecs", "10"), ("run", "1")]
    assert (st.run, st.pages_to_scan, st.sleep_ms, st.state) == (1, 5000, 10, "on")


def test_enable_without_a_rate_keeps_the_kernels(sysfs: Path, writes: list[tuple[str, str]]) -> None:
    ksm.enable(root=sysfs)
    assert writes == [("run", "1")]


def test_disable_unmerges_unless_asked_to_keep_merged_pages(sysfs: Path, writes: list[tuple[str, str]]) -> None:
    (sysfs / "run").write_text("1\n")
    writes.clear()
    assert ksm.disable(root=sysfs).state == "off"
    assert writes == [("run", "2"), ("run", "0")]
    writes.clear()
    ksm.disable(unmerge=False, root=sysfs)
    assert writes == [("run", "0")]


@pytest.mark.parametrize(("saved", "runs"), [(0, ["2", "0"]), (1, ["1"]), (2, ["2"])])
def test_restore_puts_back_what_was_read(sysfs: Path, writes: list[tuple[str, str]], saved: int,
                                         runs: list[str]) -> None:
    before = ksm.KsmSettings(saved, 100, 20)
    ksm.enable(pages_to_scan=20000, sleep_ms=5, root=sysfs)
    writes.clear()
    assert ksm.restore(before, root=sysfs).settings == before
    assert writes == [("pages_to_scan", "100"), ("sleep_millisecs", "20"), *(("run", r) for r in runs)]


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"pages_to_scan": 0}, "pages_to_scan 0 is outside 1..1000000"),
    ({"pages_to_scan": ksm.MAX_PAGES_TO_SCAN + 1}, "outside 1..1000000"),
    ({"pages_to_scan": True}, "pages_to_scan True"),
    ({"pages_to_scan": "5"}, "pages_to_scan '5'"),
    ({"sleep_ms": 0}, "sleep_ms 0 is outside 1..60000"),
    ({"pages_to_scan": 500, "sleep_ms": -1}, "sleep_ms -1"),
])
def test_bad_values_are_refused_before_anything_is_written(sysfs: Path, kwargs: dict[str, object],
                                                           text: str) -> None:
    before = values(sysfs)
    with pytest.raises(ValidationError, match=text):
        ksm.enable(root=sysfs, **kwargs)  # type: ignore[arg-type]
    assert values(sysfs) == before


def test_a_kernel_without_ksm_is_one_clear_error(tmp_path: Path) -> None:
    calls: list[Callable[[], object]] = [lambda: ksm.status(tmp_path), lambda: ksm.enable(root=tmp_path),
                                         lambda: ksm.disable(root=tmp_path)]
    for call in calls:
        with pytest.raises(HypervisorError, match=r"this kernel has no KSM .*CONFIG_KSM"):
            call()


def test_a_failed_write_names_the_file(sysfs: Path) -> None:
    (sysfs / "pages_to_scan").unlink()
    (sysfs / "pages_to_scan").mkdir()  # root may write anything a mode allows: a folder refuses even root
    with pytest.raises(HypervisorError, match=r"cannot write 500 to .*/pages_to_scan"):
        ksm.enable(pages_to_scan=500, root=sysfs)
    assert (sysfs / "run").read_text() == "0\n"


def test_a_garbled_counter_is_an_error_not_a_crash(sysfs: Path) -> None:
    (sysfs / "full_scans").write_text("lots\n")
    with pytest.raises(HypervisorError, match="full_scans: expected a number, read 'lots'"):
        ksm.status(sysfs)


# -- per process ----------------------------------------------------------------------------------------------
ROLLUP = """55d0c0000000-7ffd3b7ff000 ---p 00000000 00:00 0                          [rollup]
Rss:              201084 kB
Pss:              182756 kB
Pss_Anon:         170000 kB
Shared_Clean:       1234 kB
"""
SMAPS = """55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123   /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
VmFlags: rd ex mr mw me sd
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              100000 kB
VmFlags: rd wr mr mw me ac sd mg
7f0010000000-7f0010200000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                   4 kB
VmFlags: rd wr mr mw me ac sd mg
"""


def test_process_memory_sums_pss_and_the_mergeable_areas(tmp_path: Path) -> None:
    d = tmp_path / "4242"
    d.mkdir()
    (d / "smaps_rollup").write_text(ROLLUP)
    (d / "smaps").write_text(SMAPS)
    (d / "ksm_merging_pages").write_text("1000\n")
    m = ksm.process_memory(4242, proc=tmp_path)
    assert (m.pss, m.rss) == (182756 << 10, 201084 << 10)
    assert m.mergeable == (262144 + 2048) << 10  # the guest RAM and one more area, not the binary
    assert m.ksm_merging == 1000 * ksm.PAGE_SIZE
    (d / "ksm_merging_pages").unlink()  # kernels before 5.19
    assert ksm.process_memory(4242, proc=tmp_path).ksm_merging == 0


def test_process_memory_of_this_process_and_of_a_gone_one(tmp_path: Path) -> None:
    me = ksm.process_memory(os.getpid())
    assert 0 < me.pss <= me.rss
    with pytest.raises(HypervisorError, match="process 4243: cannot read its memory map"):
        ksm.process_memory(4243, proc=tmp_path)


def test_osimg_domains_let_qemu_mark_guest_ram_mergeable() -> None:
    """QEMU's ``mem-merge`` is on unless libvirt is told ``<nosharepages/>`` (inside ``<memoryBacking>``)."""
    xml = DomainSpec(name="g", kernel="/k", initrd="/i", cmdline="", disks=[DiskSpec("vda", path="/d.qcow2")],
                     serial_log="/c.log").to_xml()
    assert "<memory " in xml
    assert "nosharepages" not in xml and "memoryBacking" not in xml


# -- the CLI ----------------------------------------------------------------------------------------------------
def run(argv: list[str], tmp_path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["--home", str(tmp_path / "home"), "--uri", "test:///default", *argv])
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_cli_status_on_and_off(sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ksm, "SYSFS_KSM", sysfs)
    code, out, _ = run(["host", "ksm", "status", "--json"], tmp_path)
    assert code == 0
    assert json.loads(out)["state"] == "off" and json.loads(out)["saved_bytes"] == 250 * ksm.PAGE_SIZE
    code, out, _ = run(["host", "ksm", "on", "--pages-to-scan", "3000", "--sleep-ms", "10"], tmp_path)
    assert code == 0 and "KSM on (host-wide): ksmd scans 3000 pages every 10 ms" in out
    assert values(sysfs)["run"] == 1
    code, out, _ = run(["host", "ksm", "off"], tmp_path)
    assert code == 0 and "KSM off" in out and values(sysfs)["run"] == 0


@pytest.mark.parametrize(("argv", "code", "text"), [
    (["on", "--pages-to-scan", "0"], 2, "KSM pages_to_scan 0 is outside 1..1000000"),
    (["on", "--pages-to-scan", "x"], 2, "invalid int value: 'x'"),
    (["on", "--sleep-ms", "99999999999"], 2, "KSM sleep_ms 99999999999 is outside 1..60000"),
    (["status", "--sleep-ms", "5"], 2, "--pages-to-scan and --sleep-ms go with 'osimg host ksm on'"),
    (["on", "--keep-merged"], 2, "--keep-merged goes with 'osimg host ksm off'"),
    (["sideways"], 2, "invalid choice: 'sideways'"),
])
def test_cli_bad_input_is_one_line_and_changes_nothing(sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       argv: list[str], code: int, text: str) -> None:
    monkeypatch.setattr(ksm, "SYSFS_KSM", sysfs)
    before = values(sysfs)
    got, out, err = run(["host", "ksm", *argv], tmp_path)
    assert (got, out) == (code, "")
    assert text in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert values(sysfs) == before


def test_cli_without_ksm_in_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ksm, "SYSFS_KSM", tmp_path / "nothing")
    code, out, err = run(["host", "ksm", "on"], tmp_path)
    assert (code, out) == (5, "")
    assert err.startswith("osimg: error: this kernel has no KSM") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("run", "text"), [(0, "off: guests restored from one golden state keep their own copies"),
                                           (1, "on: 250 pages merged into 10, 1 MiB saved; ksmd scans 100 pages")])
def test_doctor_says_whether_ksm_is_on(sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: int,
                                       text: str) -> None:
    monkeypatch.setattr(ksm, "SYSFS_KSM", sysfs)
    monkeypatch.setenv("OSIMG_ACCEL", "tcg")  # no KVM probe on the test driver
    (sysfs / "run").write_text(f"{run}\n")
    ctx = Context.from_env(home=str(tmp_path / "home"), uri="test:///default")
    try:
        [check] = [c for c in doctor.run(ctx.settings, ctx.hv).checks if c.name == "KSM"]
    finally:
        ctx.close()
    assert check.ok and check.detail.startswith(text), check.detail


def test_doctor_on_a_kernel_without_ksm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ksm, "SYSFS_KSM", tmp_path / "nothing")
    monkeypatch.setenv("OSIMG_ACCEL", "tcg")
    ctx = Context.from_env(home=str(tmp_path / "home"), uri="test:///default")
    try:
        [check] = [c for c in doctor.run(ctx.settings, ctx.hv).checks if c.name == "KSM"]
    finally:
        ctx.close()
    assert check.ok and check.detail.startswith("this kernel has no KSM")
