"""Quiesce-swap-resume on real guests: warm and cold, rollback, refusal, crash recovery."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import guests, swap
from orchestrator.context import Context
from orchestrator.customize import Customization
from orchestrator.errors import NotFoundError, OsimgError, SwapError
from orchestrator.images import catalog

from .conftest import GOLD_BAD, GOLD_V1, GOLD_V2, HOME, RUN_ID, gname, osimg

pytestmark = pytest.mark.guest

V1, V2, BAD = GOLD_V1, GOLD_V2, GOLD_BAD  # the session's golden images (conftest); BAD's application never starts
# Health waits for the bad image, whose application never answers (the default is 120 s): a warm swap
# waits this long for the paged-in application, which on a good image answers within a second of the
# customization; a cold swap waits this long for the application's first answer while the new OS boots
# (a good tiny image answers ~6 s after the start under TCG).
BAD_WAIT = 8.0
BAD_WAIT_COLD = 12.0


@pytest.fixture(scope="module")
def golden(gold_v1: str, gold_v2: str, gold_bad: str) -> None:
    """V1, V2 and BAD, captured once per session: no test here changes or removes them."""


def _start(ctx: Context, label: str, custom: Customization | None = None) -> guests.Guest:
    return guests.create(ctx, gname(label), V1, custom=custom, data_size=64 << 20)


def _ready(ctx: Context, g: guests.Guest) -> guests.Guest:
    guests.wait_ready(ctx, g)
    assert guests.wait_app(g.app_port, 30) is not None, "demo app did not start on v1"
    with guests.session(ctx, g) as s:
        s.run(["sh", "-c", "echo precious-$RANDOM > /data/marker && sync && cat /data/marker"], check=True)
    return g


def _guest(ctx: Context, label: str, custom: Customization | None = None) -> guests.Guest:
    return _ready(ctx, _start(ctx, label, custom))


@pytest.fixture(scope="module")
def spare(ctx: Context) -> Iterator[list[guests.Guest]]:
    """Guests ``guest`` started ahead: the next test's fresh guest boots while this one runs."""
    started: list[guests.Guest] = []
    yield started
    for g in started:
        with contextlib.suppress(OsimgError):
            guests.remove(ctx, g.name)


def _label(node: pytest.Item, i: int) -> str:
    return f"{node.name.split('[')[0].removeprefix('test_')[:18].replace('_', '-')}{i}"


@pytest.fixture
def guest(ctx: Context, golden: None, spare: list[guests.Guest],
          request: pytest.FixtureRequest) -> Iterator[guests.Guest]:
    """A fresh v1 guest with a data marker, removed after the test. It was started during the test
    before (its boot overlaps that test), and it starts the next test's guest before this one runs."""
    users = [i for i in request.session.items if i.module is request.module and "guest" in i.fixturenames]
    i = users.index(request.node) if request.node in users else -1
    g = spare.pop(0) if spare else _start(ctx, _label(request.node, i))
    try:
        if 0 <= i < len(users) - 1:
            spare.append(_start(ctx, _label(users[i + 1], i + 1)))
        yield _ready(ctx, g)
    finally:
        guests.remove(ctx, g.name)


@pytest.fixture(scope="module")
def idle(ctx: Context, golden: None) -> Iterator[guests.Guest]:
    """A v1 guest that no test swaps: a refused swap, a dry run and a rollout that stops before it
    share it (one boot instead of three); each checks that it is still on v1, untouched."""
    g = _guest(ctx, "idle")
    try:
        yield g
    finally:
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


def test_swap_to_corrupt_image_is_refused_before_touching_the_guest(ctx: Context, idle: guests.Guest) -> None:
    guest = idle
    bad = f"s{RUN_ID}-corrupt"
    catalog.clone(ctx, V2, bad)
    disk = catalog.image_dir(ctx, bad) / "disk.qcow2"
    disk.chmod(0o644)
    with disk.open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xde\xad\xbe\xef" * 1024)
    verify = osimg("image", "verify", bad)
    problems = json.loads(osimg("image", "verify", bad, "--json").stdout)["problems"]
    assert verify.returncode == 6 and problems
    assert verify.stderr.splitlines() == [f"{bad}: {p}" for p in problems], "one line per problem, unwrapped"
    before = _state(ctx, guest)
    with pytest.raises(SwapError, match="failed verification"):
        swap.plan(ctx, [guest.name], bad, "warm")
    res = osimg("swap", guest.name, "--to", bad)
    assert res.returncode == SwapError.exit_code and "failed verification" in res.stderr
    assert _state(ctx, guest) == before
    assert _inside(ctx, guest.name)[0] == "v1"


def test_failed_health_check_rolls_back_with_counter_intact(ctx: Context, guest: guests.Guest) -> None:
    marker = _marker(ctx, guest)
    before = guests.app_counter(guest.app_port)
    assert before is not None
    # the bad image's application never answers: a short health wait is enough to see it
    [res] = swap.rollout(ctx, replace(swap.plan(ctx, [guest.name], BAD, "warm"), health_timeout=BAD_WAIT))
    assert not res.ok and res.rolled_back, res
    assert "application" in (res.error or "")
    assert _inside(ctx, guest.name) == ("v1", marker)
    after = guests.app_counter(guest.app_port)
    assert after is not None and after > before
    assert guests.load(ctx, guest.name).image == V1
    assert swap.journal.entries(ctx) == []


def test_rollout_stops_after_max_failures(ctx: Context, guest: guests.Guest, idle: guests.Guest) -> None:
    second = idle  # never attempted, so never touched
    second_marker = _marker(ctx, second)
    results = swap.rollout(ctx, replace(swap.plan(ctx, [guest.name, second.name], BAD, "warm", batch=1,
                                                  max_failures=1), health_timeout=BAD_WAIT))
    assert [r.rolled_back for r in results] == [True, False]
    assert results[1].skipped and "not attempted" in (results[1].error or "")
    for g in (guest, second):
        assert _inside(ctx, g.name)[0] == "v1"
    assert _inside(ctx, second.name)[1] == second_marker
    assert guests.load(ctx, second.name).overlay_file == second.overlay_file


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


LIVE_FILES = {"data.qcow2", "console.log"}  # with the current overlay: written by the running guest and QEMU


def _state(ctx: Context, g: guests.Guest) -> dict[str, object]:
    """What a swap would change: domain XML, every file of the guest and the repository, every store row."""
    live = LIVE_FILES | {guests.load(ctx, g.name).overlay_file}

    def tree(root: Path) -> dict[str, tuple[int, ...]]:
        return {str(p.relative_to(root)): (p.stat().st_ino,) if p.name in live else
                (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(root.rglob("*")) if p.is_file()}

    url = ctx.settings.store_url
    if url.startswith("sqlite://"):
        with sqlite3.connect(f"file:{url.removeprefix('sqlite://')}?mode=ro", uri=True) as db:
            rows: list[object] = list(db.iterdump())
    else:
        rows = [ctx.store.items(kind) for kind in (swap.journal.KIND, catalog.KIND)]
    return {"xml": ctx.hv.xml(g.name), "state": ctx.hv.state(g.name), "guest": tree(g.dir(ctx)),
            "images": tree(HOME / "images"), "store": rows,
            "domains": sorted(d.name for d in ctx.hv.list_domains())}


def test_dry_run_changes_nothing(ctx: Context, idle: guests.Guest) -> None:
    guest = idle
    before = _state(ctx, guest)
    res = osimg("swap", guest.name, "--to", V2, "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown["guests"] == [guest.name] and shown["to_image"] == V2 and shown["strategy"] == "warm"
    text = osimg("swap", guest.name, "--to", V2, "--strategy", "cold", "--dry-run")
    assert text.returncode == 0 and f"swap 1 guest(s) to {V2} (cold)" in text.stdout, text.stderr
    assert _state(ctx, guest) == before
    assert _inside(ctx, guest.name)[0] == "v1"
    res = osimg("swap", "nosuch-guest", "--to", V2, "--dry-run")
    assert res.returncode == NotFoundError.exit_code and "no guest named" in res.stderr
    res = osimg("swap", guest.name, "--to", "nosuch-image", "--dry-run")
    assert res.returncode == NotFoundError.exit_code and "nosuch-image" in res.stderr


def test_failed_cold_swap_rolls_back_with_data(ctx: Context, guest: guests.Guest) -> None:
    marker = _marker(ctx, guest)
    old_overlay = guest.overlay(ctx)
    inode = old_overlay.stat().st_ino
    before = guests.app_counter(guest.app_port)
    assert before is not None
    res = swap.swap_guest(ctx, guest.name, BAD, "cold", health_timeout=BAD_WAIT_COLD)
    assert not res.ok and res.rolled_back, res
    assert "cold swap failed" in (res.error or "") and "application" in (res.error or "")
    assert _inside(ctx, guest.name) == ("v1", marker)
    g = guests.load(ctx, guest.name)
    assert g.image == V1 and g.overlay(ctx) == old_overlay and old_overlay.stat().st_ino == inode
    assert [p.name for p in g.dir(ctx).glob("os*.qcow2")] == [g.overlay_file], "the failed overlay was left behind"
    assert str(old_overlay) in ctx.hv.xml(g.name) and g.kernel in ctx.hv.xml(g.name)
    assert guests.wait_app(g.app_port, 30) is not None
    after = guests.app_counter(g.app_port)
    assert after is not None and after >= before
    assert swap.journal.entries(ctx) == []


def test_second_swap_of_one_guest_is_refused(ctx: Context, guest: guests.Guest) -> None:
    marker = _marker(ctx, guest)
    first: list[swap.SwapResult] = []
    runner = threading.Thread(target=lambda: first.extend(swap.rollout(ctx, swap.plan(ctx, [guest.name], V2))))
    runner.start()
    other = Context.from_env(home=str(HOME))
    try:
        deadline = time.monotonic() + 60
        while swap.journal.get(other, guest.name) is None and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.is_alive(), "the first swap ended before a second could be tried"
        # another process: the per-guest lock refuses it (another holder)
        cli = osimg("swap", guest.name, "--to", V2, "--json")
        assert runner.is_alive(), "the first swap ended before the second process asked"
        # another swap in this process: its own holder id, so the lock refuses it too
        second = swap.swap_guest(other, guest.name, V2)
    finally:
        runner.join()
        other.close()
    assert cli.returncode == SwapError.exit_code, cli.stderr
    [refused] = json.loads(cli.stdout)
    assert not refused["ok"] and f"lock swap-{guest.name} is held by" in refused["error"], refused
    assert not second.ok and not second.rolled_back
    assert f"lock swap-{guest.name} is held by" in (second.error or ""), second
    assert [r.ok for r in first] == [True], first
    assert _inside(ctx, guest.name) == ("v2", marker)
    # a journal entry nobody holds a lock for (an orchestrator killed mid-swap) blocks new swaps
    ctx.store.update(swap.journal.KIND, guest.name, lambda _old: {"guest": guest.name, "step": "prepared"})
    try:
        res = osimg("swap", guest.name, "--to", V1, "--json")
        assert res.returncode == SwapError.exit_code, res.stderr
        [out] = json.loads(res.stdout)
        assert not out["ok"] and "has an unfinished swap; run 'osimg swap --resume' first" in out["error"]
        assert _inside(ctx, guest.name) == ("v2", marker)
    finally:
        swap.journal.drop_unlocked(ctx, guest.name)


def test_batch_of_two_swaps_in_parallel(ctx: Context, guest: guests.Guest) -> None:
    second = _guest(ctx, "par")
    seen: dict[str, list[float]] = {}
    lock = threading.Lock()

    def progress(msg: str) -> None:
        name = msg.split(":")[0]
        with lock:
            seen.setdefault(name, []).append(time.monotonic())

    try:
        p = swap.plan(ctx, [guest.name, second.name], V2, "warm", batch=2)
        assert p.batches == [[guest.name, second.name]]
        results = swap.rollout(ctx, p, progress=progress)
        assert [r.ok for r in results] == [True, True], results
        spans = [(min(seen[g.name]), max(seen[g.name])) for g in (guest, second)]
        (a0, a1), (b0, b1) = spans
        assert a0 < b1 and b0 < a1, f"the two swaps did not overlap: {spans}"
        for g in (guest, second):
            assert _inside(ctx, g.name)[0] == "v2"
        assert swap.journal.entries(ctx) == []
    finally:
        guests.remove(ctx, second.name)


def test_warm_swap_says_kernel_params_wait_for_the_next_boot(ctx: Context, golden: None) -> None:
    g = _guest(ctx, "kparams", Customization(kernel_params=["osimg.kp=1"]))
    try:
        with guests.session(ctx, g) as s:
            assert "osimg.kp=1" in s.run(["cat", "/proc/cmdline"], check=True).out
        res = osimg("swap", g.name, "--to", V2, "--json")
        assert res.returncode == 0, res.stderr
        [out] = json.loads(res.stdout)
        assert out["ok"] and "kernel_params osimg.kp=1 take effect at next boot" in out["note"]
        with guests.session(ctx, guests.load(ctx, g.name)) as s:  # true: the paged-in kernel runs without them
            assert "osimg.kp=1" not in s.run(["cat", "/proc/cmdline"], check=True).out
        assert "osimg.kp=1" in ctx.hv.xml(g.name, inactive=True)  # the next boot has them
    finally:
        guests.remove(ctx, g.name)
