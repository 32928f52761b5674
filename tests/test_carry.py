"""A warm swap carries the application's processes (CRIU) on the Debian family: the demo server keeps
its in-memory state (start time, requests served, PID 1 of its namespace) across v1 -> v2; a file it
runs that differs on the new OS makes it restart instead, with the reason; a restore that fails
rolls back to the old OS with the very processes continued there. Real Debian guests, real CRIU."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import guests, swap
from orchestrator.context import Context
from orchestrator.swap.steps import guest_sh

from .conftest import GOLD_DEBIAN_V2, HOME, gname

pytestmark = pytest.mark.guest

V2 = GOLD_DEBIAN_V2
ANSWER = re.compile(r"^(\d+) (\S+) pid=(\d+) started=([\d.]+) served=(\d+)$")


def ask(g: guests.Guest) -> tuple[int, str, int, str, int]:
    """One request to the demo server: (counter on /data, OS version, PID, start time, served)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{g.app_port}/cgi-bin/counter", timeout=10) as r:
        text = r.read().decode().strip()
    m = ANSWER.match(text)
    assert m, f"unexpected answer {text!r}"
    return int(m[1]), m[2], int(m[3]), m[4], int(m[5])


def stopped_swap(g: guests.Guest, target: str, failpoint: str) -> subprocess.Popen[str]:
    """The real CLI swapping ``g``, stopped (SIGSTOP) at ``failpoint``; the caller sends SIGCONT."""
    exe = Path(sys.executable).parent / "osimg"
    env = {**os.environ, "OSIMG_HOME": str(HOME), "OSIMG_FAILPOINT": f"{failpoint}=stop"}
    proc = subprocess.Popen([str(exe), "swap", g.name, "--to", target, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return proc
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGCONT)
    raise AssertionError(f"the swap never reached {failpoint}: {proc.communicate(timeout=300)}")


@pytest.fixture(scope="module")
def deb_guest(ctx: Context, request: pytest.FixtureRequest) -> Iterator[guests.Guest]:
    """A Debian v1 guest with a data volume running the demo server; the session's Debian v2 is the
    target. The guest boots while that golden image is captured (if it is not yet): ~30 s less."""
    g = guests.create(ctx, gname("carry"), "debian:v1", data_size=64 << 20)
    try:
        request.getfixturevalue("gold_debian_v2")
        guests.wait_ready(ctx, g, timeout=600)
        yield g
    finally:
        guests.remove(ctx, g.name)


def test_warm_swap_resumes_the_application_on_the_new_os(ctx: Context, deb_guest: guests.Guest) -> None:
    g = guests.load(ctx, deb_guest.name)
    answers = [ask(g) for _ in range(3)]
    count, version, pid, started, served = answers[-1]
    assert version == "v1" and pid == 1, answers  # PID 1 of its own namespace
    [res] = swap.rollout(ctx, swap.plan(ctx, [g.name], V2, "warm"))
    assert res.ok, res.error
    print(f"\n[measure] carry v1 -> v2: downtime {res.downtime}s, steps {res.steps}, processes {res.processes}")
    [tree] = res.processes
    assert tree["name"] == "app" and tree["outcome"] == "resumed", tree
    assert tree["checkpoint_kib"] > 1000 and tree["dump_seconds"] > 0, tree
    g = guests.load(ctx, g.name)
    count2, version2, pid2, started2, served2 = ask(g)
    # the same process, answering on the new OS: its memory came along, its counter on /data too
    assert (version2, pid2, started2) == ("v2", 1, started), (version2, pid2, started2)
    assert served2 > served and count2 > count, (served, served2, count, count2)
    with guests.session(ctx, g) as s:
        r = s.run(["sh", "-c", "grep VERSION_ID /etc/os-release; systemctl is-active osimg-carry-app.scope;"
                               " ls /data/.osimg-carry 2>&1"])
    assert "VERSION_ID=v2" in r.out and "\nactive\n" in r.out, r.out
    assert "No such file" in r.out, "the checkpoints were not removed after the commit"


def test_a_file_that_differs_on_the_new_os_restarts_the_tree(ctx: Context, deb_guest: guests.Guest) -> None:
    """The running OS's server script is not the target's (a local change): CRIU would resume the
    old code on the new OS, so the swap restarts the tree and says which file made it. (The same
    check runs again in the new OS right before the restore, for what the host cannot read.)"""
    g = guests.load(ctx, deb_guest.name)
    with guests.session(ctx, g) as s:
        s.run(["sh", "-c", "echo '# a local change' >>/usr/lib/osimg/app.py"], check=True)
    count, _, _, started, _ = ask(g)
    [res] = swap.rollout(ctx, swap.plan(ctx, [g.name], V2, "warm"))
    assert res.ok, res.error
    print(f"\n[measure] restart on a changed file: downtime {res.downtime}s, processes {res.processes}")
    [tree] = res.processes
    assert tree["outcome"] == "restarted", tree
    if tree["dump_seconds"] is None:  # found before the downtime, from the target's disk read on the host
        assert tree["reason"] == "the target image's /usr/lib/osimg/app.py differs", tree
    else:  # the host could not read the image (no FUSE): found by the new OS before the restore
        assert tree["reason"] == "/usr/lib/osimg/app.py differs on the new OS", tree
    g = guests.load(ctx, g.name)
    count2, version2, pid2, started2, served2 = ask(g)
    assert version2 == "v2" and started2 != started and pid2 == 1 and served2 <= 5, (version2, started2, served2)
    assert count2 > count, "the counter on /data went back"


def _corrupt_checkpoint(volume: Path) -> str:
    """Remove the memory pages of the checkpoint from a detached data volume (qcow2 with ext4),
    with e2fsprogs' debugfs on a raw copy, written back in place. Returns what was removed."""
    with tempfile.TemporaryDirectory(dir=volume.parent) as tmp:
        raw = Path(tmp) / "vol.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(volume), str(raw)], check=True)
        ls = subprocess.run(["debugfs", "-R", "ls -p /.osimg-carry", str(raw)], capture_output=True, text=True,
                            check=True).stdout
        token = next(f.split("/")[5] for f in ls.splitlines() if f.count("/") >= 6 and f.split("/")[5]
                     not in (".", ".."))
        victim = f"/.osimg-carry/{token}/app/pages-1.img"
        subprocess.run(["debugfs", "-w", "-R", f"rm {victim}", str(raw)], check=True, capture_output=True)
        new = Path(tmp) / "vol.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(new)], check=True)
        st = volume.stat()
        os.chown(new, st.st_uid, st.st_gid)
        shutil.copymode(volume, new)
        os.replace(new, volume)
    return victim


def test_a_failed_restore_rolls_back_with_the_processes_continued(ctx: Context, deb_guest: guests.Guest) -> None:
    """The checkpoint loses its memory pages while the data volume is detached (the orchestrator
    stopped at a failpoint): CRIU cannot restore on the new OS, the swap rolls back, and the old OS
    continues the very processes the checkpoint had stopped (same start time, same served count).

    The swap asks the server while its release begins; a checkpoint that catches a request with the
    counter file open on /data cannot leave the stopped original behind (the unmount needs the file
    closed): the release ends it, and the rollback would restore it from the checkpoint, which this
    test broke. That attempt restarts the server on the old OS (with its counter) and says why; the
    test then tries again (a request is in flight for a small part of the time: three attempts)."""
    g = guests.load(ctx, deb_guest.name)
    for attempt in range(1, 4):
        before = [ask(g) for _ in range(2)][-1]
        proc = stopped_swap(g, V2, "warm-released")
        try:
            volume = g.data_volume(ctx)
            assert volume is not None
            victim = _corrupt_checkpoint(volume)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=600)
        assert "Traceback" not in err, err
        [r] = json.loads(out)
        print(f"\n[measure] attempt {attempt}: restore without {victim}: {r['error']}; killed {r['killed']};"
              f" processes {r['processes']}")
        assert not r["ok"] and r["rolled_back"] and proc.returncode == 8, (r, err)
        assert "CRIU could not restore app" in r["error"], r["error"]
        [tree] = r["processes"]
        g = guests.load(ctx, g.name)
        # a restarted server comes up after the rollback returns; a continued one answers at once
        assert guests.wait_app(g.app_port, timeout=60) is not None, "the server does not answer on the old OS"
        count, version, pid, started, served = ask(g)
        assert count > before[0], "the counter on /data went back"
        if r["killed"]:  # caught mid-request: ended at the release, and its checkpoint is broken
            assert all(k.split()[-1].startswith("python3") for k in r["killed"]), r["killed"]
            assert tree["outcome"] == "restarted", tree
            assert tree["reason"] == "CRIU could not restore it on the old OS either", tree
            assert version == before[1] and started != before[3], (version, started, before)
            continue
        assert tree["outcome"] == "resumed", tree  # continued on the old OS
        assert (version, pid, started) == (before[1], 1, before[3]), (version, pid, started, before)
        # not restarted (same start time above): it counts on from where it was (the swap asked it
        # while its release began, until the checkpoint froze it)
        assert served > before[4], (served, before)
        return
    pytest.fail("each of three checkpoints caught the server with a file open on /data")


HOLDER = ("unshare --pid --fork setsid sh -c 'exec 3>>/data/held; while :; do sleep 1; done'"
          " </dev/null >/dev/null 2>&1 &"
          ' U=$!; n=0; C=; while [ -z "$C" ] && [ $n -lt 250 ]; do C=$(cat /proc/$U/task/$U/children 2>/dev/null);'
          ' [ -n "$C" ] || sleep 0.02; n=$((n + 1)); done; echo "${C%% *}" >/run/holder.pid\n')


def test_a_carried_tree_with_a_file_open_on_data_does_not_hold_up_the_release(
        ctx: Context, deb_guest: guests.Guest) -> None:
    """A carried tree that has a file under /data open at its checkpoint (a request in flight, a
    log) keeps /data busy while its stopped original lives: the checkpoint holds the file, so the
    original is ended at once (not after the quiesce's 10 s grace) and the tree resumes on the new
    OS with the file open again."""
    g = guests.load(ctx, deb_guest.name)
    g.customization = {**g.customization, "carry": [
        {"name": "app", "pidfile": "/run/osimg-app.pid", "files": ["/usr/lib/osimg/app.py"]},
        {"name": "holder", "pidfile": "/run/holder.pid"}]}
    g.save(ctx)
    guest_sh(ctx, g, HOLDER, "starting a process that holds /data/held")
    [res] = swap.rollout(ctx, swap.plan(ctx, [g.name], V2, "warm"))
    print(f"\n[measure] a carried tree holding /data: downtime {res.downtime}s, steps {res.steps}, "
          f"killed {res.killed}, processes {res.processes}")
    assert res.ok, res.error
    trees = {t["name"]: t for t in res.processes}
    assert trees["holder"]["outcome"] == "resumed" and trees["app"]["outcome"] == "resumed", trees
    assert any(k.endswith(" sh") for k in res.killed), res.killed  # the stopped original, ended
    release = res.steps["release"] - res.steps["prepare"]
    assert release < 10, f"the release waited out the grace: {release:.1f}s"
    out = guest_sh(ctx, guests.load(ctx, g.name), 'P=$(cat /run/holder.pid); ls -l /proc/$P/fd/3\n', "holder fd")
    assert "/data/held" in out, out
