"""Kill the orchestrator (SIGKILL) at every failpoint of a swap, warm and cold, then resume.

The list of points is read from the source (every ``failpoint("...")`` call), so a new point is
tested without editing this file, and a fast test fails if a journaled step (``mark``) has no
failpoint right after it. Each case runs the real CLI with ``OSIMG_FAILPOINT`` set, expects it to
die by SIGKILL, runs ``osimg swap --resume``, then checks what a user relies on: the guest runs
exactly one OS and its record names it, the data written before the swap is intact, no orphan
overlay, page-in file, snapshot or domain is left, and a second resume changes nothing.

Two tiny guests (one per strategy) are reused: each case swaps its guest to the other image
(v1 <-> v2), so whether the previous case finished or rolled back does not matter.
"""

from __future__ import annotations

import ast
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
from orchestrator.cluster import open_store
from orchestrator.context import Context
from orchestrator.failpoints import ENV
from orchestrator.images import catalog
from orchestrator.process import dead_local_holder, holder_id
from orchestrator.settings import SOURCE_ROOT
from orchestrator.swap.steps import PAGEIN_FILE, ROLLBACK_SNAPSHOT, guest_sh

from .cluster_fixtures import ETCD_SH, EtcdCluster, free_ports
from .conftest import GOLD_V1, GOLD_V2, HOME, RUN_ID, gname, osimg
from .writer import RECORDS, ConsoleWatch, Writer, checksum, read_records

pytest_plugins = ["tests.cluster_fixtures"]  # etcd_cluster

V1, V2 = GOLD_V1, GOLD_V2  # the session's golden images (conftest), captured from tiny:v1 and tiny:v2
PACKAGE = SOURCE_ROOT / "orchestrator"


def _calls(tree: ast.AST, fn: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == fn]


def failpoints() -> list[str]:
    """Every failpoint name in the orchestrator's source, in source order."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _calls(ast.parse(path.read_text()), "failpoint"):
            arg = call.args[0] if call.args else None
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), \
                f"{path.name}:{call.lineno}: a failpoint's name must be a string literal (this test finds it)"
            names.append(arg.value)
    return names


POINTS = failpoints()
# A point in the rollback is reached by failing the swap in its window first (an injected OSError,
# which also proves that any exception there rolls back); one before the window, by failing prepare.
FAIL_WINDOW = {"warm": "warm-paged-in=error", "cold": "cold-booted=error"}
FAIL_PREPARE = {"warm": "warm-pagein-written=error", "cold": "cold-overlay-created=error"}
# Rollback branches a strategy cannot take: a cold swap has no snapshot to revert; a warm swap
# failing after page-out always has one.
UNREACHABLE = {
    ("cold", "rollback-new-destroyed"), ("cold", "rollback-reverted"), ("cold", "rollback-snapshot-removed"),
    ("warm", "rollback-old-booted"),
}
# Kills that would leave exactly the state of the kill at the point before, because the step between is
# a no-op for that strategy: a cold swap takes no rollback snapshot and writes no page-in file, so
# dropping the one and removing the other change nothing. Those cases repeat the earlier one (~10 s
# each), so they are left out; the earlier point's case checks right after its kill that there is
# nothing for the skipped step to do, and the warm cases still kill at these points.
SAME_STATE = {("cold", "commit-snapshot-dropped"): "commit-defined",
              ("cold", "commit-pagein-removed"): "commit-record-saved"}


def cases() -> list[tuple[str, str, str]]:
    """(strategy, point, OSIMG_FAILPOINT value) for every point and every strategy that reaches it."""
    out = []
    for point in POINTS:
        family = point.split("-", 1)[0]
        for strategy in ("warm", "cold"):
            if (family in ("warm", "cold") and family != strategy) or \
                    (strategy, point) in UNREACHABLE or (strategy, point) in SAME_STATE:
                continue
            spec = {"rollback": f"{FAIL_WINDOW[strategy]},{point}",
                    "discard": f"{FAIL_PREPARE[strategy]},{point}"}.get(family, point)
            out.append((strategy, point, spec))
    return out


CASES = cases()


# -- fast: the list of points is complete and every case names a real point -------------------------------------


def test_every_journaled_step_has_a_failpoint_right_after_it() -> None:
    for path in sorted((PACKAGE / "swap").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if not isinstance(body, list):
                continue
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and \
                        isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "mark":
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    ok = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Call) and \
                        isinstance(nxt.value.func, ast.Name) and nxt.value.func.id == "failpoint"
                    assert ok, f"{path.name}:{stmt.lineno}: a journaled step without failpoint(...) right after it"


def test_every_failpoint_is_a_crash_case() -> None:
    assert len(POINTS) == len(set(POINTS)), f"names repeat: {sorted(p for p in POINTS if POINTS.count(p) > 1)}"
    assert {p.split("-", 1)[0] for p in POINTS} <= {"warm", "cold", "commit", "rollback", "discard"}, POINTS
    covered = {p for _, p, _ in CASES}
    assert covered == set(POINTS), f"failpoints no case reaches: {sorted(set(POINTS) - covered)}"
    for point in ("warm-preparing", "warm-paged-out", "cold-stopped", "commit-committing", "rollback-reverted"):
        assert point in POINTS
    for _, _, spec in CASES:
        for item in spec.split(","):
            assert item.split("=")[0] in POINTS, spec
    for (strategy, point), before in SAME_STATE.items():  # still the point right before it
        assert POINTS.index(point) == POINTS.index(before) + 1, (point, before)
        assert (strategy, before, before) in CASES


def test_failpoint_kills_or_fails_only_when_named() -> None:
    code = ("from orchestrator.failpoints import failpoint\n"
            "failpoint('a')\nprint('passed a', flush=True)\n"
            "try:\n    failpoint('b')\nexcept OSError as e:\n    print(e, flush=True)\n"
            "failpoint('c')\nprint('not reached')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={**os.environ, ENV: "b=error, c"})
    assert run.returncode == -signal.SIGKILL, run
    assert run.stdout.splitlines() == ["passed a", "failpoint b: injected failure"]


def test_a_dead_local_lock_holder_is_recognised() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert dead_local_holder(holder_id(child.pid))
    assert not dead_local_holder(holder_id())  # this process
    assert not dead_local_holder(holder_id(1))  # alive
    assert not dead_local_holder(f"otherhost-{child.pid}")  # another host's process: only its lease tells


def test_resume_refuses_arguments_and_dry_run_changes_nothing() -> None:
    for args in (["somename"], ["--to", "img"], ["x", "--to", "y", "--strategy", "cold"]):
        res = osimg("swap", "--resume", *args)
        assert res.returncode == 2 and "--resume" in res.stderr and len(res.stderr.splitlines()) == 1, res
    res = osimg("swap", "--resume", "--dry-run", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == [], res


def test_a_broken_journal_entry_is_reported_and_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "guests" / "g1").mkdir(parents=True)  # an entry of a removed guest would only be dropped
    c = Context.from_env(home=str(home), uri="test:///default")
    try:
        c.store.put(swap.journal.KIND, "g1", {"guest": "g1", "step": "paged-out"})
    finally:
        c.close()
    res = osimg("--home", str(home), "--uri", "test:///default", "swap", "--resume", "--json")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res  # refused: bad input, nothing done
    [r] = json.loads(res.stdout)
    assert "swap journal record of g1" in r["error"] and "nothing was done" in r["error"], r
    assert "g1: not resumed" in res.stderr
    res = osimg("--home", str(home), "--uri", "test:///default", "swap", "--resume", "--dry-run")
    assert res.returncode == 0 and "g1" in res.stdout, res


# -- real guests ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_guests(ctx: Context, gold_v1: str, gold_v2: str) -> Iterator[dict[str, guests.Guest]]:
    made: dict[str, guests.Guest] = {}
    try:
        for strategy in ("warm", "cold"):  # start both, then wait: the boots overlap
            made[strategy] = guests.create(ctx, gname(f"crash-{strategy}"), V1, data_size=32 << 20)
        for g in made.values():
            guests.wait_ready(ctx, g)
            assert guests.wait_app(g.app_port, 30) is not None
        yield made
    finally:
        for g in made.values():
            guests.remove(ctx, g.name)


def _history(ctx: Context, g: guests.Guest, add: str | None = None) -> str:
    """/data/history (after appending ``add`` and syncing), through the agent."""
    cmd = "cat /data/history" if add is None else f"echo {add} >> /data/history && sync && cat /data/history"
    return guest_sh(ctx, g, cmd + "\n", "reading the history")


def _state(ctx: Context, name: str) -> tuple[str, str, list[str]]:
    """(record's OS version, overlay file, the guest folder's listing): what a resume may change."""
    g = guests.load(ctx, name)
    return g.os_version, g.overlay_file, sorted(p.name for p in g.dir(ctx).iterdir())


def _check_whole(ctx: Context, g0: guests.Guest, history: str, others: set[str]) -> str:
    g = guests.load(ctx, g0.name)
    assert g.image in (V1, V2)
    assert swap.journal.entries(ctx) == [], "the journal still holds an entry"
    assert ctx.hv.state(g.name) == "running"
    with guests.session(ctx, g) as s:  # over SSH: the guest is reachable with its own host key
        inside, _, data = s.run(["sh", "-c", "cat /etc/osimg-version; echo =osimg=; cat /data/history"],
                                check=True).out.partition("=osimg=\n")
    assert inside.strip() == g.os_version, f"the guest runs {inside.strip()}, its record says {g.os_version}"
    assert data == history, "data written before the swap changed"
    assert guests.app_counter(g.app_port) is not None, "the application does not answer"
    files = {p.name for p in g.dir(ctx).iterdir()}
    assert {f for f in files if f.startswith("os")} == {g.overlay_file}, f"orphan overlay: {sorted(files)}"
    assert PAGEIN_FILE not in files and not any(f.endswith(".tmp") for f in files), sorted(files)
    assert not ctx.hv.has_snapshot(g.name, ROLLBACK_SNAPSHOT), "the rollback snapshot was left"
    mine = {d.name for d in ctx.hv.list_domains() if d.metadata.get("home") == str(HOME)}
    assert mine == others, f"domains: {sorted(mine)}, expected {sorted(others)}"
    return g.os_version


def check_from(text: str, synced: list[int], first: int) -> str:
    """tests/writer.py's ``check`` for a file that starts at record ``first``: consecutive, in order,
    uncorrupted, and every number the writer reported synced (from ``first`` on) is there, once."""
    lines = text.splitlines()
    assert lines and text.endswith("\n"), f"records file empty or cut short: {text[-80:]!r}"
    for i, line in enumerate(lines):
        want = f"{first + i} {checksum(first + i)}"
        assert line == want, f"record {i + 1} is {line!r}, expected {want!r} (gap, reorder or corruption)"
    last = first + len(lines) - 1
    mine = [n for n in synced if n > first]
    dupes = sorted({n for n in mine if mine.count(n) > 1})
    assert not dupes, f"records reported synced twice (lost, then written again): {dupes[:10]}"
    missing = [n for n in mine if n > last]
    assert not missing, f"records reported synced but missing from the file (it ends at {last}): {missing[:10]}"
    return f"{len(lines) - 1} records, {len(mine)} reported synced"


def test_check_from_catches_a_lost_synced_record() -> None:
    text = "".join(f"{n} {checksum(n)}\n" for n in range(100, 106))
    assert check_from(text, [99, 101, 102, 105], 100) == "5 records, 3 reported synced"
    for bad_text, synced in [(text, [106]), (text, [101, 101]), (text.replace("103", "104", 1), []), (text[:-2], [])]:
        with pytest.raises(AssertionError):
            check_from(bad_text, synced, 100)


@pytest.mark.guest
@pytest.mark.parametrize(("strategy", "point", "spec"), CASES, ids=[f"{s}-{p}" for s, p, _ in CASES])
def test_kill_at_failpoint_then_resume(ctx: Context, crash_guests: dict[str, guests.Guest], strategy: str,
                                       point: str, spec: str) -> None:
    g = guests.load(ctx, crash_guests[strategy].name)
    others = {x.name for x in crash_guests.values()}
    history = _history(ctx, g, add=f"before-{strategy}-{point}")
    target = V2 if g.image == V1 else V1
    with ConsoleWatch(g.console(ctx)) as watch:
        # a workload the image does not know appends and syncs records to /data throughout; a fresh
        # file per case (so one case's loss does not fail the cases after it), numbered from a
        # number no earlier case reached (the console still holds the earlier cases' reports)
        first = int(time.time() * 1000)
        Writer.stop(ctx, g)
        guest_sh(ctx, g, f"echo '{first} {checksum(first)}' >{RECORDS} && sync {RECORDS}\n", "seeding the records")
        Writer().start(ctx, g)
        t0 = time.monotonic()
        exe = Path(sys.executable).parent / "osimg"
        run = subprocess.run([str(exe), "swap", g.name, "--to", target, "--strategy", strategy, "--json"],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OSIMG_HOME": str(HOME), ENV: spec})
        killed = time.monotonic() - t0
        assert run.returncode == -signal.SIGKILL, \
            f"{spec}: not killed there (exit {run.returncode}): {run.stderr[-500:]}"
        entry = swap.journal.get(ctx, g.name)
        assert entry is not None, "killed mid-swap, yet no journal entry"
        if (strategy, point) in {(s, p) for (s, _), p in SAME_STATE.items()}:
            # the next point's step (drop the snapshot, remove the page-in file) has nothing to do
            # here, so a kill there would leave this very state (SAME_STATE)
            assert not ctx.hv.has_snapshot(g.name, ROLLBACK_SNAPSHOT), "a cold swap took a snapshot"
            assert not (g.dir(ctx) / PAGEIN_FILE).exists(), "a cold swap wrote a page-in file"
        res = osimg("swap", "--resume", "--json", timeout=600)
        assert "Traceback" not in res.stderr, res.stderr
        assert res.returncode in (0, 8), res.stderr
        [out] = json.loads(res.stdout)
        assert out["ok"] or out["rolled_back"], out
        if out["rolled_back"]:
            assert g.name in res.stderr and "rolled back" in res.stderr, res.stderr
        if entry["step"] == "committing":
            assert out["ok"], "a swap that reached committing was not finished"
        version = _check_whole(ctx, g, history, others)
        now = guests.load(ctx, g.name)
        Writer.stop(ctx, now)
        synced = watch.stop()
    verdict = check_from(read_records(ctx, now), synced, first)
    before = _state(ctx, g.name)
    again = osimg("swap", "--resume", "--json")
    assert again.returncode == 0 and json.loads(again.stdout) == [], again
    assert _state(ctx, g.name) == before
    print(f"\n[measure] {strategy} killed at {point} (step {entry['step']}) after {killed:.1f}s; resume "
          f"{'finished' if out['ok'] else 'rolled back'} -> {version} in {time.monotonic() - t0 - killed:.1f}s; "
          f"writer: {verdict}")


def _swap_cli(g: guests.Guest, target: str, strategy: str, spec: str | None = None,
             store: list[str] | None = None) -> subprocess.Popen[str]:
    exe = Path(sys.executable).parent / "osimg"
    env = {**os.environ, "OSIMG_HOME": str(HOME)}
    if spec:
        env[ENV] = spec
    args = [str(exe), *(store or []), "swap", g.name, "--to", target, "--strategy", strategy, "--json"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _warm_swap_in_store(ctx: Context, g: guests.Guest, url: str, step: str) -> subprocess.Popen[str]:
    """A warm swap of ``g`` by the CLI with the cluster store at ``url`` (the image catalog, which lives
    in the store too, copied there first), returned once its journal there shows ``step`` or it ended."""
    with open_store(url) as store:
        for name, rec in ctx.store.items(catalog.KIND):
            store.put(catalog.KIND, name, rec)
        proc = _swap_cli(g, V2 if g.image == V1 else V1, "warm", store=["--store", url])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            rec = store.get(swap.journal.KIND, g.name)
            if rec and rec.get("step") == step:
                break
            time.sleep(0.02)
    return proc


@pytest.mark.guest
@pytest.mark.parametrize(("strategy", "sig", "at"), [("warm", signal.SIGTERM, "paged-out"),
                                                     ("cold", signal.SIGINT, "stopping")])
def test_signal_mid_swap_finishes_the_step_then_rolls_back(ctx: Context, crash_guests: dict[str, guests.Guest],
                                                           strategy: str, sig: signal.Signals, at: str) -> None:
    g = guests.load(ctx, crash_guests[strategy].name)
    history = _history(ctx, g, add=f"before-{sig.name}")
    proc = _swap_cli(g, V2 if g.image == V1 else V1, strategy)
    seen = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and seen is None:
        rec = swap.journal.get(ctx, g.name)
        if rec and rec.get("step") == at:
            seen = rec["step"]
            proc.send_signal(sig)
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert seen == at, f"the swap never reached {at}: {err}"
    assert proc.returncode == 8, (proc.returncode, err)
    assert "Traceback" not in err
    [r] = json.loads(out)
    assert r["rolled_back"] and f"interrupted by {sig.name}" in r["error"], r
    assert "osimg swap --resume" in err.strip().splitlines()[-1], err
    assert guests.load(ctx, g.name).image == g.image
    _check_whole(ctx, g, history, {x.name for x in crash_guests.values()})


@pytest.mark.guest
def test_error_in_the_window_rolls_back_and_a_failed_rollback_reports_both(
        ctx: Context, crash_guests: dict[str, guests.Guest]) -> None:
    g = guests.load(ctx, crash_guests["warm"].name)
    others = {x.name for x in crash_guests.values()}
    history = _history(ctx, g, add="before-oserror")
    target = V2 if g.image == V1 else V1
    proc = _swap_cli(g, target, "warm", "warm-paged-in=error")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 8 and "Traceback" not in err, err
    [r] = json.loads(out)
    assert r["rolled_back"] and "failpoint warm-paged-in: injected failure" in r["error"], r
    _check_whole(ctx, g, history, others)
    # the rollback fails too (disk full again): both errors are reported and the journal stays for resume
    proc = _swap_cli(g, target, "warm", "warm-paged-in=error,rollback-data-attached=error")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 8 and "Traceback" not in err, err
    [r] = json.loads(out)
    assert not r["rolled_back"] and not r["ok"], r
    assert "failpoint warm-paged-in" in r["error"] and "the rollback failed too" in r["error"], r
    assert "failpoint rollback-data-attached" in r["error"], r
    assert "osimg swap --resume" in err.strip().splitlines()[-1], err
    assert swap.journal.get(ctx, g.name) is not None
    res = osimg("swap", "--resume", "--json")
    assert res.returncode == 8 and "rolled back" in res.stderr, res
    _check_whole(ctx, g, history, others)


@pytest.mark.guest
@pytest.mark.etcd
@pytest.mark.parametrize("lost", ["first", "leader"])
def test_killing_one_etcd_member_mid_swap_does_not_fail_it(
        ctx: Context, crash_guests: dict[str, guests.Guest], etcd_cluster: EtcdCluster, lost: str) -> None:
    """A warm swap keeps its journal and lock in a 3-member etcd cluster; the member it talks to
    (the URL's first) or the cluster's leader is killed (SIGKILL) once the guest is paged out: the
    swap goes on through the two others and finishes, the journal entry is gone, the guest is whole."""
    url = etcd_cluster.store_url(f"crash-{RUN_ID}-member-{lost}")
    g = guests.load(ctx, crash_guests["warm"].name)
    history = _history(ctx, g, add="before-member-killed")
    proc = _warm_swap_in_store(ctx, g, url, "paged-out")
    assert proc.poll() is None, "the swap ended before the member could be killed"
    leader = etcd_cluster.leader()
    victim = 1 if lost == "first" else leader
    etcd_cluster.kill(victim)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, (proc.returncode, err)
    [r] = json.loads(out)
    assert r["ok"], r
    with open_store(url) as store:
        assert store.get(swap.journal.KIND, g.name) is None, "the journal entry was left"
    print(f"\n[measure] member {victim} ({'the leader' if leader == victim else 'a follower'}) killed at paged-out: "
          f"the swap finished, downtime {r.get('downtime_s', r.get('downtime', '?'))}")
    _check_whole(ctx, g, history, {x.name for x in crash_guests.values()})


@pytest.mark.guest
@pytest.mark.etcd
def test_store_down_longer_than_the_lease_stops_the_swap_where_it_stands(
        ctx: Context, crash_guests: dict[str, guests.Guest], tmp_path: Path) -> None:
    """etcd hangs (SIGSTOP) for longer than the swap's lock lease in the middle of a warm swap: the
    swap must stop where it stands (no step without its journal entry, no rollback it cannot fence),
    say so, keep the journal, and a resume once etcd is back must bring the guest back whole."""
    if subprocess.run([ETCD_SH, "install"], capture_output=True, timeout=600).returncode != 0:
        pytest.skip("etcd could not be installed from Debian packages")
    port, peer = free_ports(2)
    started = subprocess.run([ETCD_SH, "start", str(port), str(tmp_path / "etcd"), str(peer)],
                             capture_output=True, text=True, timeout=60, check=True)
    etcd_pid = int(started.stdout.strip())
    url = f"etcd://127.0.0.1:{port}/crash-{RUN_ID}"
    g = guests.load(ctx, crash_guests["warm"].name)
    history = _history(ctx, g, add="before-etcd-down")
    try:
        proc = _warm_swap_in_store(ctx, g, url, "paged-out")
        os.kill(etcd_pid, signal.SIGSTOP)
        time.sleep(swap.journal.LOCK_TTL + 3)
        os.kill(etcd_pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 8 and "Traceback" not in err, (proc.returncode, err)
        [r] = json.loads(out)
        assert not r["ok"] and not r["rolled_back"] and "stopped where it stood" in r["error"], r
        assert "osimg swap --resume" in err.strip().splitlines()[-1], err
        etcd_ctx = Context.from_env(home=str(HOME), store=url)
        try:
            assert swap.journal.get(etcd_ctx, g.name) is not None, "the journal was not kept"
            res = osimg("--store", url, "swap", "--resume", "--json")
            assert res.returncode in (0, 8) and "Traceback" not in res.stderr, res
            assert swap.journal.entries(etcd_ctx) == []
        finally:
            etcd_ctx.close()
        _check_whole(ctx, g, history, {x.name for x in crash_guests.values()})
    finally:
        os.kill(etcd_pid, signal.SIGCONT)
        subprocess.run([ETCD_SH, "stop", str(etcd_pid)], timeout=30, check=False)


def _wait_stopped(pid: int, timeout: float = 300) -> None:
    """Until process ``pid`` stands still (a ``NAME=stop`` failpoint), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never reached its failpoint")


def _restart_libvirtd(ctx: Context) -> None:
    """Stop libvirtd and start it again the way scripts/run.sh does (its guests keep running)."""
    pidfile = ctx.settings.cache / "daemons" / "libvirtd.pid"
    old = int(pidfile.read_text().strip())
    os.kill(old, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{old}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{old}"), "libvirtd did not stop"
    with open(pidfile.parent / "libvirtd.log", "ab") as log:
        subprocess.Popen(["tini", "-s", "--", "libvirtd", "-p", str(pidfile)], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                          timeout=10).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("libvirtd did not come back")


@pytest.mark.guest
def test_libvirtd_restarted_mid_swap(ctx: Context, crash_guests: dict[str, guests.Guest]) -> None:
    """libvirtd restarts while a warm swap stands in its downtime window (old OS paged out, new one
    not yet in): the orchestrator's connection dies under it. It must carry on or roll back over a
    new connection (or leave a journal that a resume finishes), and the guest must come back whole
    on exactly one OS with its data."""
    pidfile = ctx.settings.cache / "daemons" / "libvirtd.pid"
    if not pidfile.exists():
        pytest.skip("libvirtd was not started by scripts/run.sh (no pid file to restart it by)")
    g = guests.load(ctx, crash_guests["warm"].name)
    history = _history(ctx, g, add="before-libvirtd-restart")
    proc = _swap_cli(g, V2 if g.image == V1 else V1, "warm", spec="warm-paged-out=stop")
    try:
        _wait_stopped(proc.pid)
        _restart_libvirtd(ctx)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in err, err
    [r] = json.loads(out)
    if r["ok"]:  # carried on over a new connection
        assert proc.returncode == 0, (r, err)
    elif r["rolled_back"]:
        assert proc.returncode == 8, (r, err)
    else:  # the rollback could not finish: the journal must say what to do
        assert proc.returncode == 8 and "osimg swap --resume" in err.strip().splitlines()[-1], (r, err)
        res = osimg("swap", "--resume", "--json")
        assert res.returncode in (0, 8) and "Traceback" not in res.stderr, res
    print(f"\n[measure] libvirtd restarted at warm-paged-out: ok={r['ok']} rolled_back={r['rolled_back']}")
    _check_whole(ctx, g, history, {x.name for x in crash_guests.values()})
