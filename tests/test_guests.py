"""Guests on real libvirt/QEMU: boot, SSH with a pinned key, versions, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator import guests
from orchestrator.context import Context
from orchestrator.errors import ConflictError, HypervisorError, NotFoundError, ValidationError
from orchestrator.settings import Settings

from .conftest import HOME, gname, osimg, osimg_json

ACCEL_CACHE = Settings.from_env(home=str(HOME)).cache / "accel.json"

pytestmark = pytest.mark.guest


def test_v1_guest_boots_and_answers_ssh(ctx: Context, v1_guest: guests.Guest) -> None:
    with guests.session(ctx, v1_guest) as s:
        osr = s.run(["cat", "/etc/os-release"], check=True).out
        assert "VERSION_ID=v1" in osr
        assert s.run(["sh", "-c", "echo $((6*7))"], check=True).out.strip() == "42"
        assert s.run(["cat", "/etc/osimg-version"], check=True).out.strip() == "v1"


def test_cli_ssh_runs_command(v1_guest: guests.Guest) -> None:
    res = osimg("guest", "ssh", v1_guest.name, "--", "uname", "-r")
    assert res.returncode == 0, res.stderr
    assert "cloud-amd64" in res.stdout


def test_guest_list_shows_guest(v1_guest: guests.Guest) -> None:
    rows = osimg_json("guest", "list")
    assert isinstance(rows, list)
    mine = [r for r in rows if r["name"] == v1_guest.name]
    assert mine and mine[0]["state"] == "running" and mine[0]["os_version"] == "v1"


def test_v2_guest_reports_v2_and_is_torn_down(ctx: Context) -> None:
    name = gname("v2")
    t0 = time.monotonic()
    res = osimg("guest", "create", name, "--image", "tiny:v2", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    print(f"\n[measure] tiny v2 guest create+SSH-ready via CLI in {time.monotonic() - t0:.1f}s "
          f"(guest reported {info['ready_seconds']:.1f}s)")
    assert info["ready_seconds"] < 60
    out = osimg("guest", "ssh", name, "--", "cat", "/etc/os-release")
    assert "VERSION_ID=v2" in out.stdout
    assert osimg("guest", "rm", name).returncode == 0
    assert not ctx.hv.exists(name)
    assert not (HOME / "guests" / name).exists()


def test_doctor_reports_the_accelerator_in_use(ctx: Context, v1_guest: guests.Guest) -> None:
    rep = osimg_json("doctor")
    assert isinstance(rep, dict)
    accel = rep["accel"]["accel"]
    assert accel in ("kvm", "qemu")
    assert f"<domain type='{accel}'" in ctx.hv.xml(v1_guest.name) or f'<domain type="{accel}"' in ctx.hv.xml(
        v1_guest.name)
    print(f"\n[measure] accelerator: {rep['accel']['label']} ({rep['accel']['reason']})")


def _doctor(home: Path, *args: str, **env: str) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "osimg"
    proc = subprocess.run([str(exe), "doctor", "--json", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OSIMG_HOME": str(home), **env}, check=False)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _verdict(part: str) -> dict[str, Any]:
    """The latest remembered probe verdict whose key holds ``part`` (the machine's OSIMG_CACHE/accel.json;
    verdicts of earlier libvirt or QEMU versions may be there too)."""
    verdicts = json.loads(ACCEL_CACHE.read_text())["verdicts"]
    hits = [v for k, v in verdicts.items() if part in k]
    assert hits, f"no verdict for {part} in {ACCEL_CACHE}"
    return dict(max(hits, key=lambda v: float(v["probed_at"])))


def test_kvm_probe_and_tcg_fallback_run_for_real() -> None:
    """OSIMG_ACCEL skips the probe; --reprobe boots the probe domain again; a missing KVM device falls
    back. The verdicts are the machine's (one per configuration), shared by every OSIMG_HOME."""
    home = HOME / "doctor-home"
    before = ACCEL_CACHE.read_text() if ACCEL_CACHE.exists() else None
    forced = _doctor(home, OSIMG_ACCEL="tcg")["accel"]
    assert forced["accel"] == "qemu" and forced["reason"] == "forced by OSIMG_ACCEL=tcg"
    assert (ACCEL_CACHE.read_text() if ACCEL_CACHE.exists() else None) == before, "a forced accelerator cached"
    nokvm = _doctor(home, "--reprobe", OSIMG_KVM_DEVICE="/nonexistent/kvm")["accel"]
    assert nokvm["accel"] == "qemu", nokvm
    assert "/nonexistent/kvm does not exist" in nokvm["reason"] and "falling back to TCG" in nokvm["reason"]
    cached = _verdict("|/nonexistent/kvm|False")
    assert cached["accel"] == "qemu"
    # without --reprobe the verdict comes from the cache (another home too); with it the probe runs again
    assert _doctor(HOME / "doctor-home2", OSIMG_KVM_DEVICE="/nonexistent/kvm")["accel"] == nokvm
    assert _verdict("|/nonexistent/kvm|False")["probed_at"] == cached["probed_at"]
    t1 = time.time()
    _doctor(home, "--reprobe", OSIMG_KVM_DEVICE="/nonexistent/kvm")
    assert _verdict("|/nonexistent/kvm|False")["probed_at"] >= t1
    # the real device: the probe boots a throw-away KVM domain (up to 10 s) whatever the cache says,
    # and the test device's verdict does not replace the real one
    t0 = time.time()
    real = _doctor(home, "--reprobe")["accel"]
    cached = _verdict("|/dev/kvm|")
    assert cached["probed_at"] >= t0 and cached["accel"] == real["accel"]
    assert _verdict("|/nonexistent/kvm|False")["accel"] == "qemu"
    if real["accel"] == "kvm":
        assert "reached userspace" in real["reason"]
    else:
        assert "KVM unusable" in real["reason"] and "falling back to TCG" in real["reason"], real
    print(f"\n[measure] real KVM probe: {real['label']} ({real['reason']})")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 200, "has space", "-lead"])
def test_invalid_names_are_refused_and_nothing_is_created(ctx: Context, bad: str) -> None:
    before = set((HOME / "guests").iterdir()) if (HOME / "guests").exists() else set()
    with pytest.raises(ValidationError):
        guests.create(ctx, bad, "tiny:v1")
    res = osimg("guest", "create", "--image", "tiny:v1", "--", bad)
    assert res.returncode == 2
    assert "invalid guest name" in res.stderr and "Traceback" not in res.stderr
    after = set((HOME / "guests").iterdir()) if (HOME / "guests").exists() else set()
    assert before == after


@pytest.mark.parametrize("image", ["nosuch:v1", "tiny"])
def test_unknown_image_is_refused(ctx: Context, image: str) -> None:
    name = gname("noimg")
    res = osimg("guest", "create", name, "--image", image)
    assert res.returncode == NotFoundError.exit_code and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert image.split(":")[0] in res.stderr
    assert not (HOME / "guests" / name).exists() and not ctx.hv.exists(name)


def test_duplicate_name_is_refused(ctx: Context, v1_guest: guests.Guest) -> None:
    # the running guest writes its overlay, data volume and console log, so their mtimes move on their
    # own: those keep their inode (not replaced); every other file (guest.json, cidata.iso) is unchanged
    gdir = v1_guest.dir(ctx)
    files_before = _tree(gdir)
    xml_before = ctx.hv.xml(v1_guest.name)
    with pytest.raises(ConflictError, match="already exists"):
        guests.create(ctx, v1_guest.name, "tiny:v1")
    res = osimg("guest", "create", v1_guest.name, "--image", "tiny:v1")
    assert res.returncode == ConflictError.exit_code and "already exists" in res.stderr
    assert ctx.hv.state(v1_guest.name) == "running"
    assert _tree(gdir) == files_before
    assert ctx.hv.xml(v1_guest.name) == xml_before


LIVE_FILES = {"os.qcow2", "data.qcow2", "console.log"}  # written by the running guest and its QEMU


def _tree(root: Path) -> dict[str, tuple[int, ...]]:
    """Every file under a guest's folder: (inode,) for files a running guest writes, else (inode, size, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_ino,) if p.name in LIVE_FILES else
            (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_unreachable_libvirtd_gives_clear_error(tmp_path: object) -> None:
    name = gname("nolv")
    res = osimg("--uri", "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "guest", "create", name,
                "--image", "tiny:v1")
    assert res.returncode == HypervisorError.exit_code
    assert "cannot reach libvirtd" in res.stderr and "Traceback" not in res.stderr
    assert not (HOME / "guests" / name).exists()


def test_rm_unknown_guest() -> None:
    res = osimg("guest", "rm", gname("ghost"))
    assert res.returncode == NotFoundError.exit_code and "no guest named" in res.stderr
