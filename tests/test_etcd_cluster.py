"""The cluster store on a real 3-member etcd cluster whose members are killed with SIGKILL.

Losing one member of three must change nothing: every kind of call osimg makes (records, fenced
updates, locks and their refresh thread, events and their watch, node registration and its
heartbeats) goes on through the two others, and the lost member catches up once restarted. Losing
two must stop every call within the store timeout with one line that names the members and the fix,
write nothing, and the CLI must say so in one line with the cluster store's exit code. A write
whose answer is lost (its member died after the cluster applied it) and which is sent again to the
next member must count once.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cluster import LIFECYCLE, Event, NodeAgent, open_store
from orchestrator.errors import ClusterError, LeaseLostError, OsimgError

from .cluster_fixtures import ETCD_SH, EtcdCluster, install_etcd, lasting_ports

pytest_plugins = ["tests.cluster_fixtures"]

pytestmark = pytest.mark.etcd

# A leader's loss costs an election (1-2 s with etcd's defaults) plus a member's share of the timeout.
ONE_LOST_BOUND = 5.0
# Lock and node ttl: a refresh runs every ttl/3 and may take ~2 s during an election, so a 2 s ttl
# leaves no margin (the refresher then rightly calls the lock lost); the swap lock's is 10 s.
TTL = 5.0


def _timed(calls: dict[str, float], what: str, fn: Callable[..., Any], *args: object) -> Any:
    t0 = time.monotonic()
    result = fn(*args)
    calls[what] = time.monotonic() - t0
    return result


def _osimg(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a user runs it, with a home of its own."""
    return subprocess.run([str(Path(sys.executable).parent / "osimg"), "--home", str(tmp_path / "home"), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("lost", ["in-use", "leader"])
def test_losing_one_member_of_three_changes_nothing(etcd_cluster: EtcdCluster, lost: str, tmp_path: Path) -> None:
    """SIGKILL the member this client talks to (its watch too), or the cluster's leader, while a
    lock is held and a node is registered: every call still works, the lock's refresh and the node's
    heartbeats keep both alive past their ttl, the event is delivered once, and the restarted member
    serves what was written while it was dead."""
    prefix = f"one-{uuid.uuid4().hex[:8]}"
    calls: dict[str, float] = {}
    # the watch on its own connection, as another process would have: its failover must not help the calls'
    with open_store(etcd_cluster.store_url(prefix)) as store, open_store(etcd_cluster.store_url(prefix)) as watcher:
        store.put("rec", "a", {"n": 0})
        sub = watcher.subscribe()
        assert watcher.current_member == store.current_member
        agent = NodeAgent(store, "vios-a", "127.0.0.1:10809", tmp_path / "node.json", ttl=TTL)
        agent.start()
        try:
            with store.lock("swap-g1", "rollout-a", ttl=TTL) as lease:
                in_use = etcd_cluster.member(store.current_member)
                victim = in_use if lost == "in-use" else etcd_cluster.leader()
                etcd_cluster.kill(victim)
                _timed(calls, "put", store.put, "rec", "b", {"n": 1})
                assert _timed(calls, "get", store.get, "rec", "b") == {"n": 1}
                _, revision = store.get_with_revision("rec", "a")
                assert _timed(calls, "compare_and_put", store.compare_and_put, "rec", "a", {"n": 2}, revision)
                fenced = _timed(calls, "update", store.update, "rec", "a",
                                lambda r: {"n": r["n"] + 1} if r else None, lease.fence)
                assert fenced == {"n": 3}
                assert [name for name, _ in store.items("rec")] == ["a", "b"]
                assert store.allocate_client_id("guest-1") == 1
                published = _timed(calls, "publish", store.publish, Event(LIFECYCLE, "swapped", "guest/g1"))
                got = sub.get(timeout=ONE_LOST_BOUND)
                assert got is not None and (got.seq, got.obj) == (published.seq, "guest/g1")
                assert sub.get(timeout=0.5) is None, "an event was delivered twice after the watch moved"
                time.sleep(TTL + 0.5)  # longer than both ttls: refreshes and heartbeats reached the living members
                lease.check()
                assert store.lock_holder("swap-g1") == "rollout-a"
                assert [(n.name, n.state) for n in store.nodes()] == [("vios-a", "alive")]
                assert store.heartbeat(agent.node_id)
                cli = _osimg(tmp_path, "--store", etcd_cluster.store_url(prefix), "image", "list", "--json")
                assert cli.returncode == 0 and cli.stdout.strip() == "[]", cli.stderr
        finally:
            sub.close()
            agent.stop()
        assert store.lock_holder("swap-g1") is None  # released on leaving the block, no LeaseLostError
    slowest = max(calls, key=lambda k: calls[k])
    print(f"\n[measure] {lost} member {victim} of 3 killed: slowest call {slowest} {calls[slowest]:.2f}s, "
          + ", ".join(f"{k} {v:.2f}s" for k, v in calls.items()))
    assert calls[slowest] < ONE_LOST_BOUND
    etcd_cluster.start(victim)
    t0 = time.monotonic()
    with open_store(f"etcds://{etcd_cluster.address(victim)}/{prefix}") as alone:
        assert alone.get("rec", "b") == {"n": 1} and alone.get("rec", "a") == {"n": 3}
    print(f"[measure] member {victim} restarted and served the writes it missed after {time.monotonic() - t0:.2f}s")


def test_killing_members_while_calls_run_loses_no_call(etcd_cluster: EtcdCluster) -> None:
    """Two writers count, each in its own record, a third registers a node and takes a lock over and
    over, and one member after another is SIGKILLed and restarted (one down at a time, the leader
    first): no call fails and the counts are exact. An update cut off by its dying member may have
    landed and is sent again to the next one: its nonce tells, so no increment is lost or doubled."""
    with open_store(etcd_cluster.store_url(f"churn-{uuid.uuid4().hex[:8]}")) as store:
        stop = threading.Event()
        errors: list[str] = []
        done = [0, 0]

        def write(slot: int) -> None:
            store.put("counter", f"c{slot}", {"n": 0})
            while not stop.is_set():
                try:
                    store.update("counter", f"c{slot}", lambda r: {"n": r["n"] + 1} if r else None)
                except OsimgError as err:
                    errors.append(str(err))
                    return
                done[slot] += 1

        def join_and_lock() -> None:
            # a registration or a lock cut off by a dying member and sent again must not refuse itself
            while not stop.is_set():
                try:
                    node = store.register_node("vios-churn", "127.0.0.1:10809", 5).node
                    store.acquire_lock("churn", "rollout-a", 5)
                    store.release_lock("churn", "rollout-a")
                    store.deregister_node(node.id)
                except OsimgError as err:
                    errors.append(str(err))
                    return
                cycles[0] += 1

        cycles = [0]
        writers = [threading.Thread(target=write, args=(slot,)) for slot in (0, 1)]
        writers.append(threading.Thread(target=join_and_lock))
        for w in writers:
            w.start()
        try:
            for victim in [etcd_cluster.leader(), *etcd_cluster.numbers]:
                time.sleep(0.5)
                etcd_cluster.kill(victim)
                time.sleep(1.0)
                etcd_cluster.start(victim)
        finally:
            stop.set()
            for w in writers:
                w.join()
        assert not errors, errors[0]
        counts = [store.get("counter", f"c{slot}") for slot in (0, 1)]
        assert counts == [{"n": done[0]}, {"n": done[1]}], (counts, done)
        print(f"\n[measure] {sum(done)} updates from 2 threads and {cycles[0]} register+lock cycles while 4 "
              "members were killed and restarted in turn")


def test_losing_two_members_of_three_stops_calls_with_one_line(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """With a majority gone no call can succeed: each fails within the store timeout with one line
    naming every member and the fix, nothing is written (not even once the members are back), a
    held lock is reported lost, and the CLI prints one line and exits 9 without a traceback."""
    url = etcd_cluster.store_url(f"two-{uuid.uuid4().hex[:8]}")
    with open_store(url, timeout=3) as store:
        store.put("rec", "a", {"n": 0})
        with pytest.raises(LeaseLostError), store.lock("swap-g1", "rollout-a", ttl=2) as lease:
            in_use = etcd_cluster.member(store.current_member)
            lost = [in_use, next(m for m in etcd_cluster.numbers if m != in_use)]
            for member in lost:
                etcd_cluster.kill(member)
            for call, args in [(store.update, ("rec", "a", lambda r: {"n": 1})), (store.get, ("rec", "a")),
                               (store.acquire_lock, ("other", "rollout-b", 5))]:
                t0 = time.monotonic()
                with pytest.raises(ClusterError) as raised:
                    call(*args)  # type: ignore[operator]
                took = time.monotonic() - t0
                message = str(raised.value)
                assert "\n" not in message and 2.5 < took < 4.5, (took, message)
                assert f"cluster store {store.url}: no etcd member answered" in message
                for member in lost:
                    assert f"{etcd_cluster.address(member)}: connection refused" in message
                assert "start the etcd members (a majority must run)" in message
            t0 = time.monotonic()
            cli = _osimg(tmp_path, "--store", url, "image", "list")
            cli_took = time.monotonic() - t0
            assert cli.returncode == 9, (cli.returncode, cli.stderr)
            assert "Traceback" not in cli.stdout + cli.stderr
            lines = cli.stderr.strip().splitlines()
            assert len(lines) == 1 and "no etcd member answered" in lines[0], cli.stderr
            assert cli_took < 15
            time.sleep(0.5)  # the lock's ttl is over by now: its refresh could reach no one
            with pytest.raises(LeaseLostError):
                lease.check()
    print(f"\n[measure] 2 of 3 members killed: calls fail after {took:.1f}s (timeout 3 s), "
          f"the CLI after {cli_took:.1f}s")
    for member in lost:
        etcd_cluster.start(member)
    with open_store(url) as store:
        assert store.get("rec", "a") == {"n": 0}, "a write refused without quorum landed later"
        assert store.lock_holder("other") is None


# -- a write whose answer is lost ---------------------------------------------------------------------------
class AnswerDropper:
    """A TCP proxy in front of a plain-HTTP etcd that passes every request on and, once armed, drops
    etcd's answer to the next transaction (closes the client's connection as the answer comes): a
    member that dies after its cluster applied a write and before it answered. Real etcd, real
    sockets; only the answer is lost."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        self.armed = threading.Event()
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        drop_answer = threading.Event()

        def requests_in() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    if data.startswith(b"POST /v3/kv/txn ") and self.armed.is_set():
                        self.armed.clear()
                        drop_answer.set()
                    upstream.sendall(data)
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=requests_in, daemon=True).start()
        with client, upstream, contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if drop_answer.is_set():
                    self.dropped += 1
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    return
                client.sendall(data)

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def plain_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A plain-HTTP etcd of its own (the proxy must read the requests), stopped by its PID."""
    install_etcd()
    port, peer = lasting_ports(2)
    started = subprocess.run([ETCD_SH, "start", str(port), str(tmp_path_factory.mktemp("plain-etcd")), str(peer)],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    try:
        yield port
    finally:
        subprocess.run([ETCD_SH, "stop", started.stdout.strip()], check=True, timeout=30)


@pytest.fixture
def dropper(plain_etcd: int) -> Iterator[tuple[AnswerDropper, str]]:
    """The proxy, and a store URL whose first member is the proxy and second the etcd itself."""
    proxy = AnswerDropper(plain_etcd)
    yield proxy, f"etcd://127.0.0.1:{proxy.port},127.0.0.1:{plain_etcd}/lost-{uuid.uuid4().hex[:8]}"
    proxy.close()


def test_an_update_whose_answer_was_lost_is_applied_once(dropper: tuple[AnswerDropper, str]) -> None:
    """The transaction lands, its answer is lost, the client asks the next member: the nonce tells
    the repeat that the first attempt landed, so the increment counts once and compare_and_put
    reports its own write as done; an event is published once."""
    proxy, url = dropper
    with open_store(url) as store:
        store.put("counter", "c", {"n": 0})
    with open_store(url) as store:  # a fresh client: it asks the proxy first
        proxy.armed.set()
        assert store.update("counter", "c", lambda r: {"n": r["n"] + 1} if r else None) == {"n": 1}
        assert proxy.dropped == 1, "the proxy dropped no answer: the test proves nothing"
        assert store.get("counter", "c") == {"n": 1}, "the increment was applied twice"
        _, revision = store.get_with_revision("counter", "c")
    with open_store(url) as store:
        proxy.armed.set()
        assert store.compare_and_put("counter", "c", {"n": 5}, revision), "its own write counted as someone else's"
        assert proxy.dropped == 2 and store.get("counter", "c") == {"n": 5}
    with open_store(url) as store, store.subscribe() as sub:
        proxy.armed.set()
        published = store.publish(Event(LIFECYCLE, "swapped", "guest/g1"))
        assert proxy.dropped == 3
        got = sub.get(timeout=5)
        assert got is not None and got.seq == published.seq
        assert sub.get(timeout=0.5) is None, "the event was published twice"


def test_a_registration_or_lock_whose_answer_was_lost_is_ours(dropper: tuple[AnswerDropper, str]) -> None:
    """A node registration or lock whose transaction landed but whose answer was lost is recognised
    by its own lease on the repeat, instead of 'already registered' / a needless revoke."""
    proxy, url = dropper
    with open_store(url) as store:
        proxy.armed.set()
        node = store.register_node("vios-a", "127.0.0.1:10809", 10).node
        assert proxy.dropped == 1
        assert [(n.id, n.state) for n in store.nodes()] == [(node.id, "alive")] and store.heartbeat(node.id)
    with open_store(url) as store:
        before = store.publish(Event(LIFECYCLE, "probe", "guest/g1")).seq  # the store's revision now
        proxy.armed.set()
        store.acquire_lock("swap-g1", "rollout-a", 10)
        assert proxy.dropped == 2 and store.lock_holder("swap-g1") == "rollout-a"
        # written once, by the attempt whose answer was lost: not revoked and taken again
        assert store.fence("swap-g1", "rollout-a").token == before + 1
