"""Quiesce-swap-resume on real guests: warm and cold, rollback, refusal, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import guests, swap
from orchestrator.context import Context
from orchestrator.errors import SwapError
from orchestrator.images import catalog, lifecycle

from .conftest import HOME, RUN_ID, gname, osimg

pytestmark = pytest.mark.guest

V1, V2, BAD = f"s{RUN_ID}-v1", f"s{RUN_ID}-v2", f"s{RUN_ID}-v2bad"


@pytest.fixture(scope="module")
def golden(ctx: Context) -> Iterator[None]:
    lifecycle.build(ctx, V1, "tiny:v1")
    lifecycle.build(ctx, V2, "tiny:v2")
    # an image whose application never starts: the health check after a swap must fail
    lifecycle.build(ctx, BAD, "tiny:v2", lifecycle.BuildSteps(
        files=[{"path": "/usr/sbin/osimg-app", "content": "#!/bin/sh\nexit 0\n", "mode": "0755"}]))
    yield


def _guest(ctx: Context, label: str) -> guests.Guest:
    g = guests.create(ctx, gname(label), V1, data_size=64 << 20)
    guests.wait_ready(ctx, g)
    assert guests.wait_app(g.app_port, 30) is not None, "demo app did not start on v1"
    with guests.session(ctx, g) as s:
        s.run(["sh", "-c", "echo precious-$RANDOM > /data/marker && sync && cat /data/marker"], check=True)
    return g


@pytest.fixture
def guest(ctx: Context, golden: None, request: pytest.FixtureRequest) -> Iterator[guests.Guest]:
    g = _guest(ctx, request.node.name.split("[")[0].removeprefix("test_")[:20].replace("_", "-"))
    yield g
    guests.remove(ctx, g.name)


def _inside(ctx: Context, name: str) -> tuple[str, str]:
    g = guests.load(ctx, name)
    with guests.session(ctx, g) as s:
        return (s.run(["cat", "/etc/osimg-version"], check=True).out.strip(),
                s.run(["cat", "/data/marker"], check=True).out.strip())


def _marker(ctx: Context, g: guests.Guest) -> str:
    with guests.session(ctx, g) as s:
        return s.run(["cat", "/data/marker"], check=True).out.strip()


@pytest.mark.parametrize("strategy", ["warm", "cold"])
def test_swap_v1_to_v2_keeps_counter_and_data(ctx: Context, guest: guests.Guest, strategy: str) -> None:
    marker = _marker(ctx, guest)
    before = guests.app_counter(guest.app_port)
    assert before is not None
    [res] = swap.rollout(ctx, swap.plan(ctx, [guest.name], V2, strategy))
    print(f"\n[measure] {strategy} swap {guest.name}: downtime {res.downtime}s, steps {res.steps}")
    assert res.ok, res.error
    assert res.counter_after is not None and res.counter_after >= before
    assert _inside(ctx, guest.name) == ("v2", marker)
    g = guests.load(ctx, guest.name)
    assert g.image == V2 and g.os_version == "v2"
    assert ctx.hv.state(g.name) == "running"
    assert [p.name for p in g.dir(ctx).glob("os*.qcow2")] == [g.overlay_file], "old overlay left behind"
    assert swap.journal.entries(ctx) == []


def test_swap_to_corrupt_image_is_refused_before_touching_the_guest(ctx: Context, guest: guests.Guest) -> None:
    bad = f"s{RUN_ID}-corrupt"
    catalog.clone(ctx, V2, bad)
    disk = catalog.image_dir(ctx, bad) / "disk.qcow2"
    disk.chmod(0o644)
    with disk.open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xde\xad\xbe\xef" * 1024)
    uuid_before = ctx.hv.info(guest.name).uuid
    overlay_before = guest.overlay(ctx).stat().st_mtime_ns
    with pytest.raises(SwapError, match="failed verification"):
        swap.plan(ctx, [guest.name], bad, "warm")
    res = osimg("swap", guest.name, "--to", bad)
    assert res.returncode == SwapError.exit_code and "failed verification" in res.stderr
    assert ctx.hv.state(guest.name) == "running" and ctx.hv.info(guest.name).uuid == uuid_before
    assert guest.overlay(ctx).stat().st_mtime_ns >= overlay_before
    assert _inside(ctx, guest.name)[0] == "v1"


def test_failed_health_check_rolls_back_with_counter_intact(ctx: Context, guest: guests.Guest) -> None:
    marker = _marker(ctx, guest)
    before = guests.app_counter(guest.app_port)
    assert before is not None
    [res] = swap.rollout(ctx, swap.plan(ctx, [guest.name], BAD, "warm"))
    assert not res.ok and res.rolled_back, res
    assert "application" in (res.error or "")
    assert _inside(ctx, guest.name) == ("v1", marker)
    after = guests.app_counter(guest.app_port)
    assert after is not None and after > before
    assert guests.load(ctx, guest.name).image == V1
    assert swap.journal.entries(ctx) == []


def test_rollout_stops_after_max_failures(ctx: Context, guest: guests.Guest) -> None:
    second = _guest(ctx, "second")
    try:
        results = swap.rollout(ctx, swap.plan(ctx, [guest.name, second.name], BAD, "warm", batch=1,
                                              max_failures=1))
        assert [r.rolled_back for r in results] == [True, False]
        assert results[1].skipped and "not attempted" in (results[1].error or "")
        for g in (guest, second):
            assert _inside(ctx, g.name)[0] == "v1"
    finally:
        guests.remove(ctx, second.name)


def test_killed_orchestrator_then_resume_leaves_guest_whole(ctx: Context, guest: guests.Guest) -> None:
    marker = _marker(ctx, guest)
    exe = Path(sys.executable).parent / "osimg"
    proc = subprocess.Popen([str(exe), "swap", guest.name, "--to", V2, "--json"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OSIMG_HOME": str(HOME)})
    watcher = Context.from_env(home=str(HOME))
    step = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            rec = watcher.store.get(swap.journal.KIND, guest.name)
            if rec and rec.get("step") in ("paged-out", "paged-in"):
                step = rec["step"]
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        watcher.close()
    assert step is not None, "the swap finished before it could be interrupted"
    res = osimg("swap", "--resume", "--json", timeout=300)
    assert res.returncode in (0, SwapError.exit_code), res.stderr
    out = json.loads(res.stdout)
    assert [r["guest"] for r in out] == [guest.name]
    version, data = _inside(ctx, guest.name)
    print(f"\n[measure] killed at step {step}; resume -> {version} ({'finished' if out[0]['ok'] else 'rolled back'})")
    assert version in ("v1", "v2") and data == marker
    assert ctx.hv.state(guest.name) == "running"
    assert guests.app_counter(guest.app_port) is not None
    assert swap.journal.entries(ctx) == []


def test_dry_run_changes_nothing(ctx: Context, golden: None) -> None:
    res = osimg("swap", "nosuch-guest", "--to", V2, "--dry-run")
    assert res.returncode == 3 and "no guest named" in res.stderr
    res = osimg("swap", "--to", "nosuch-image", "x")
    assert res.returncode == 3
