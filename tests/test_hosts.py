"""Fleets over two libvirt hosts and a 3-member etcd cluster (real daemons, real guests).

The second host is the recipe's (../shared/recipes/second_host.sh): a system libvirtd and virtlogd
in their own mount namespace, so its /var/lib/libvirt is a folder this test's namespace cannot see
under that path; osimg reaches its files only through libvirt. The cluster store is a real etcd
cluster of three members on loopback (tests/cluster_fixtures.py).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from orchestrator import guests, hosts, swap
from orchestrator.context import Context
from orchestrator.fleet import reconcile
from orchestrator.fleet import spec as fleetspec
from orchestrator.host.libvirt import Hypervisor
from orchestrator.images import catalog
from orchestrator.settings import SOURCE_ROOT

from .conftest import HOME, RUN_ID, gname

if TYPE_CHECKING:  # loaded by pytest as a plugin (below); importing it here too would bypass pytest's assertions
    from .cluster_fixtures import EtcdCluster

pytest_plugins = ["tests.cluster_fixtures"]
pytestmark = [pytest.mark.guest, pytest.mark.etcd]

SECOND_HOST = SOURCE_ROOT / "scripts" / "second_host.sh"


@dataclass
class SecondHost:
    """The recipe's second libvirtd: ``kill`` stops it as a crashed daemon would (its guests run
    on), ``restart`` starts it again in the same mount namespace (it finds its guests again)."""

    dir: Path
    uri: str

    def pid(self, name: str) -> int:
        return int((self.dir / "run" / f"{name}.pid").read_text())

    def kill(self) -> None:
        os.kill(self.pid("libvirtd"), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{self.pid('libvirtd')}").exists():
            time.sleep(0.05)

    def restart(self) -> None:
        # the namespace lives on in virtlogd (and the guests' QEMU): enter it through virtlogd's
        ns = f"/proc/{self.pid('virtlogd')}/ns/mnt"
        subprocess.run(["nsenter", f"--mount={ns}", "--", "libvirtd", "-d", "-p", "/run/libvirt/libvirtd.pid"],
                       check=True, timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("the second libvirtd did not come back")


@pytest.fixture(scope="module")
def second_host() -> Iterator[SecondHost]:
    d = SOURCE_ROOT / ".cache" / f"host-b-{RUN_ID}"
    started = subprocess.run(["bash", str(SECOND_HOST), "start", str(d)], capture_output=True, text=True,
                             timeout=60, check=False)
    if started.returncode != 0:
        pytest.fail(f"the second libvirt host did not start: {started.stderr.strip()[-300:]}")
    host = SecondHost(d, started.stdout.strip().splitlines()[-1])
    try:
        yield host
    finally:
        hv = Hypervisor(host.uri, home=str(HOME))
        try:
            for dom in hv.list_domains():
                if dom.metadata.get("home") == str(HOME):
                    hv.undefine(dom.name)
        except Exception as err:  # best effort: the daemons are stopped below either way
            print(f"cleanup of the second host: {err}")
        finally:
            hv.close()
        subprocess.run(["bash", str(SECOND_HOST), "stop", str(d)], check=False, timeout=60)
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False, timeout=60)


@dataclass
class Fleet:
    ctx: Context
    cluster: EtcdCluster
    b: SecondHost
    spec: fleetspec.FleetSpec
    v1: str
    v2: str
    markers: dict[str, str]


def _on_host(ctx: Context, f: Fleet, name: str) -> str:
    return guests.load(ctx, name).host or "local"


def _inside(ctx: Context, name: str) -> tuple[str, str]:
    g = guests.load(ctx, name)
    with guests.session(ctx, g, timeout=60) as s:
        osr = s.run(["cat", "/etc/os-release"], check=True).out
        marker = s.run(["cat", "/data/marker"], check=True).out.strip()
    version = next(line.split("=", 1)[1].strip('"') for line in osr.splitlines() if line.startswith("VERSION_ID="))
    return version, marker


@pytest.fixture(scope="module")
def fleet(ctx: Context, second_host: SecondHost, etcd_cluster_session: EtcdCluster, gold_v1: str,
          gold_v2: str) -> Iterator[Fleet]:
    """Four tiny guests from one spec over two hosts (placed by osimg), the session's golden v1 and
    v2, the store on the 3-member etcd cluster."""
    etcd_cluster_session.revive()
    session_ctx = ctx
    ctx = Context.from_env(home=str(HOME), store=etcd_cluster_session.store_url(f"hosts-{RUN_ID}"))
    v1, v2 = gold_v1, gold_v2
    for img in (v1, v2):  # the session's images, in this store's catalog too (their files are shared)
        rec = session_ctx.store.get(catalog.KIND, img)
        assert rec is not None
        ctx.store.put(catalog.KIND, img, rec)
    names = [gname(f"h{i}") for i in range(1, 5)]
    path = HOME / f"hosts-{RUN_ID}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"hosts-{RUN_ID}",
        "hosts": {"a": {"uri": "qemu:///system", "root": str(HOME / "host-a")}, "b": {"uri": second_host.uri}},
        "defaults": {"image": v1, "data": {"size": "64M"}},
        "guests": [{"name": n, "hostname": f"h{i}"} for i, n in enumerate(names, 1)],
    }))
    try:
        spec = fleetspec.load(path, ctx)
        reconcile.up(ctx, spec)
        markers = {}
        for n in names:
            g = guests.load(ctx, n)
            with guests.session(ctx, g) as s:
                markers[n] = s.run(["sh", "-c", f"echo {n}-$RANDOM > /data/marker && sync && cat /data/marker"],
                                   check=True).out.strip()
        yield Fleet(ctx, etcd_cluster_session, second_host, spec, v1, v2, markers)
    finally:
        etcd_cluster_session.revive()
        for n in names:
            try:
                guests.remove(ctx, n)
            except Exception as err:  # the others still go
                print(f"cleanup of {n}: {err}")
        for h in ("a", "b"):  # with the images' pools there (the session's images stay)
            try:
                hosts.remove(ctx, h, [])
            except Exception as err:
                print(f"cleanup of host {h}: {err}")
        ctx.close()


def _rollout_in_thread(ctx: Context, names: list[str], to: str, on_progress: dict[str, threading.Event],
                       **kw: int) -> tuple[threading.Thread, list[swap.SwapResult]]:
    results: list[swap.SwapResult] = []

    def progress(msg: str) -> None:
        for key, ev in on_progress.items():
            if key in msg:
                ev.set()

    def run() -> None:
        own = Context(ctx.settings)
        try:
            p = swap.plan(own, names, to, "warm", **kw)
            results.extend(swap.rollout(own, p, progress))
        finally:
            own.close()

    t = threading.Thread(target=run)
    t.start()
    return t, results


def test_a_fleet_spread_over_two_hosts_rolls_over_warm_per_host_and_survives_losing_an_etcd_member(
        fleet: Fleet) -> None:
    ctx, names = fleet.ctx, list(fleet.markers)
    on = {n: _on_host(ctx, fleet, n) for n in names}
    assert sorted(on.values()) == ["a", "a", "b", "b"], on  # placed: fewest guests first
    hb = hosts.context(ctx, "b").hv
    ha = hosts.context(ctx, "a").hv
    for n in names:  # each guest's domain lives on its own host only
        assert hb.exists(n) == (on[n] == "b") and ha.exists(n) == (on[n] == "a")
    # v1 reached host b's pool through libvirt: its folder there is not a path this namespace sees
    h = hosts.get(ctx, "b")
    folder = hosts.folder(ctx, h, "i", fleet.v1)
    assert not Path(folder).exists()
    assert hosts.shipped(ctx, "b") == [fleet.v1]
    # verified there: the host's own copy hashes to the catalog's sha256
    img = catalog.get(ctx, fleet.v1)
    digest = hashlib.sha256()
    hb.vol_download(hosts.pool_name(ctx, "i", fleet.v1), catalog.DISK, digest.update)
    assert digest.hexdigest() == img.files[catalog.DISK]

    order = [n for n in names if on[n] == "a"][:1] + [n for n in names if on[n] == "b"][:1]
    order += [n for n in names if n not in order]
    started = {"batch 1": threading.Event()}
    t, results = _rollout_in_thread(ctx, order, fleet.v2, started, batch=2, per_host=1, max_failures=1)
    assert started["batch 1"].wait(120)
    # the member the orchestrator most likely talks to: the first of the URL (and not a quorum)
    fleet.cluster.kill(1)
    assert t.is_alive(), "the rollout ended before the etcd member was killed"
    t.join(600)
    assert not t.is_alive()
    fleet.cluster.start(1)
    assert [r.guest for r in results] == order
    assert all(r.ok for r in results), [r.error for r in results]
    p = swap.plan(ctx, order, fleet.v2, "warm", batch=2, per_host=1)
    assert all(len({on[g] for g in b}) == len(b) for b in p.batches)  # never two of one host at once
    for n in names:
        assert _inside(ctx, n) == ("v2", fleet.markers[n])
    assert fleet.v2 in hosts.shipped(ctx, "b")  # the swap shipped v2 (and its memory state) first
    # the page-in file was made on host b and is gone after the commit; the guest's pool holds its disks
    b1 = next(n for n in names if on[n] == "b")
    assert not guests.load(ctx, b1).files(ctx).exists("pagein.sav")


def test_losing_a_host_mid_rollout_skips_it_and_resume_finishes_after_it_returns(fleet: Fleet) -> None:
    ctx, names = fleet.ctx, list(fleet.markers)
    on = {n: _on_host(ctx, fleet, n) for n in names}
    a_names = [n for n in names if on[n] == "a"]
    b_names = [n for n in names if on[n] == "b"]
    order = [a_names[0], b_names[0], a_names[1], b_names[1]]
    # back to v1 (the guests run v2 after the test above; on their own they start from v1)
    to = fleet.v1 if guests.load(ctx, order[0]).image == fleet.v2 else fleet.v2
    seen = {f"{b_names[0]}: quiesce": threading.Event()}
    t, results = _rollout_in_thread(ctx, order, to, seen, batch=2, per_host=1, max_failures=2)
    assert seen[f"{b_names[0]}: quiesce"].wait(180)
    fleet.b.kill()
    assert t.is_alive(), "the rollout ended before the second host's libvirtd was killed"
    t.join(600)
    assert not t.is_alive()
    by = {r.guest: r for r in results}
    journaled = swap.journal.get(ctx, b_names[0])
    print(f"\n[measure] host b lost during {b_names[0]}'s swap: {by[b_names[0]].error}; journal step "
          f"{journaled.get('step') if journaled else None}")
    # nothing half-done: the swap in flight was rolled back, or its journal holds it for --resume
    assert by[b_names[0]].rolled_back or journaled is not None
    assert by[a_names[0]].ok and by[a_names[1]].ok, [r.error for r in results]
    assert not by[b_names[0]].ok
    assert by[b_names[1]].skipped and "host b does not answer" in (by[b_names[1]].error or "")
    pending = swap.pending_rollouts(ctx)
    assert pending and set(pending[0][1]["pending"]) == set(b_names)
    # guests of host a are on the target; host b's are not half-done: journaled or rolled back
    want = "v1" if to == fleet.v1 else "v2"
    for n in a_names:
        assert _inside(ctx, n) == (want, fleet.markers[n])

    fleet.b.restart()
    done = swap.resume(ctx)
    print(f"[measure] resume: {[(r.guest, r.ok, r.rolled_back, r.error) for r in done]}")
    assert done and all(r.ok or r.rolled_back for r in done), [r.error for r in done]
    assert not swap.pending_rollouts(ctx)
    for n in names:
        assert guests.load(ctx, n).image == to
        assert _inside(ctx, n) == (want, fleet.markers[n])
