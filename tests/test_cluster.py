"""One test suite for both cluster store backends (SQLite file, real etcd): what the cluster relies on."""

from __future__ import annotations

import json
import multiprocessing
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import swap
from orchestrator.cluster import (
    ALERT,
    EXCLUSIVE,
    LIFECYCLE,
    SHARED_READ,
    ClusterStore,
    Event,
    EventFilter,
    NodeAgent,
    Subscription,
    open_store,
)
from orchestrator.cluster.etcd import EtcdStore
from orchestrator.context import Context
from orchestrator.errors import ClusterError, ConflictError, LeaseLostError, NotFoundError, ValidationError
from orchestrator.swap import journal

# The fixtures (a real etcd per session, a store per backend) live next to this file, not in conftest.py.
pytest_plugins = ["tests.cluster_fixtures"]
# spawn, not fork: a forked worker inherits the locks the parent's threads (event watches, lock
# refreshes; their HTTPS sessions) held at that instant and can hang on one for ever (seen once in a
# full run). A spawned worker imports this module afresh and shares nothing but the store URL.
PROCESSES = multiprocessing.get_context("spawn")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``condition()`` holds; return how long it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


def drain(subscription: Subscription, count: int, timeout: float = 10.0) -> list[Event]:
    deadline = time.monotonic() + timeout
    events: list[Event] = []
    while len(events) < count:
        event = subscription.get(timeout=max(0.0, deadline - time.monotonic()))
        assert event is not None, f"only {len(events)} of {count} events arrived within {timeout} s"
        events.append(event)
    return events


def register(store: ClusterStore, name: str, ttl: float = 30.0) -> int:
    return store.register_node(name, f"127.0.0.1:{10000 + len(name)}", ttl).node.id


# -- records ---------------------------------------------------------------------------------------


def test_records_crud(store: ClusterStore) -> None:
    assert store.get("image", "v1") is None
    store.put("image", "v1", {"version": 1, "layers": ["base"]})
    store.put("image", "v2", {"version": 2})
    store.put("guest", "g1", {"image": "v1"})
    assert store.get("image", "v1") == {"version": 1, "layers": ["base"]}
    assert store.list("image") == [{"version": 1, "layers": ["base"]}, {"version": 2}]
    assert [name for name, _ in store.items("image")] == ["v1", "v2"]
    assert store.list("swap") == []
    store.put("image", "v1", {"version": 3})
    assert store.get("image", "v1") == {"version": 3}
    assert store.delete("image", "v1")
    assert not store.delete("image", "v1")
    assert store.list("image") == [{"version": 2}]
    with pytest.raises(ValidationError, match="must not contain"):
        store.put("image", "../etc", {})
    with pytest.raises(ValidationError, match="not JSON-serialisable"):
        store.put("image", "v3", {"when": object()})
    with pytest.raises(ValidationError, match="expected a dict"):
        store.put("image", "v3", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_compare_and_put_refuses_a_stale_revision(store: ClusterStore) -> None:
    assert store.get_with_revision("journal", "swap-1") == (None, 0)
    assert store.compare_and_put("journal", "swap-1", {"step": 1}, 0)
    assert not store.compare_and_put("journal", "swap-1", {"step": 9}, 0), "create-only must refuse an existing record"
    _, seen = store.get_with_revision("journal", "swap-1")
    store.put("journal", "swap-1", {"step": 2})  # another writer gets in between
    assert not store.compare_and_put("journal", "swap-1", {"step": 3}, seen)
    assert not store.compare_and_delete("journal", "swap-1", seen)
    record, current = store.get_with_revision("journal", "swap-1")
    assert record == {"step": 2}
    assert store.compare_and_put("journal", "swap-1", {"step": 3}, current)
    assert store.compare_and_delete("journal", "swap-1", store.get_with_revision("journal", "swap-1")[1])
    assert store.get("journal", "swap-1") is None


def _increment(url: str, times: int) -> None:
    with open_store(url) as own:
        for _ in range(times):
            own.update("counter", "c", lambda record: {"n": (record or {"n": 0})["n"] + 1})


def test_update_is_atomic_across_processes(store: ClusterStore, store_url: str) -> None:
    with PROCESSES.Pool(4) as pool:
        pool.starmap(_increment, [(store_url, 25)] * 4)
    assert store.get("counter", "c") == {"n": 100}
    assert store.update("counter", "c", lambda record: None) is None
    assert store.get("counter", "c") is None


# -- IDs -------------------------------------------------------------------------------------------


def _allocate(url: str, guests: list[str]) -> list[tuple[str, int, list[int]]]:
    with open_store(url) as own:
        allocated = []
        for guest in guests:
            client_id = own.allocate_client_id(guest)
            adapters = [own.allocate_adapter_id(client_id, f"vio{i}") for i in range(3)]
            allocated.append((guest, client_id, adapters))
        return allocated


def test_ids_are_unique_under_concurrent_allocation(store: ClusterStore, store_url: str) -> None:
    workers, own, shared = 4, 10, 10
    # Every worker allocates its own guests and the same shared ones (half of them in reverse order),
    # so allocations of new IDs and of one guest's ID race at the same time.
    jobs = [
        [f"g{w}-{i}" for i in range(own)] + [f"shared-{i}" for i in range(shared)][:: 1 if w % 2 else -1]
        for w in range(workers)
    ]
    with PROCESSES.Pool(workers) as pool:
        results = pool.starmap(_allocate, [(store_url, job) for job in jobs])
    answers: dict[str, set[tuple[int, tuple[int, ...]]]] = {}
    for result in results:
        for guest, client_id, adapters in result:
            answers.setdefault(guest, set()).add((client_id, tuple(adapters)))
    assert all(len(seen) == 1 for seen in answers.values()), "a guest got different IDs from different processes"
    client_ids = {guest: next(iter(seen))[0] for guest, seen in answers.items()}
    assert len(client_ids) == workers * own + shared
    assert len(set(client_ids.values())) == len(client_ids), "duplicate client IDs"
    adapter_ids = {guest: next(iter(seen))[1] for guest, seen in answers.items()}
    assert all(len(set(ids)) == 3 for ids in adapter_ids.values()), "duplicate adapter IDs within a client"
    # Without a race for the same adapter, IDs are dense (a race may skip one, never repeat one).
    assert all(ids == (1, 2, 3) for guest, ids in adapter_ids.items() if not guest.startswith("shared-"))
    assert store.clients() == dict(sorted(client_ids.items(), key=lambda item: item[1]))
    pairs = [(a.client_id, a.id) for a in store.adapters()]
    assert len(pairs) == len(set(pairs)) == 3 * len(client_ids)
    # Idempotent afterwards too; a released ID is never handed out again.
    assert store.allocate_client_id("shared-0") == client_ids["shared-0"]
    assert store.release_client_id("shared-0")
    assert not store.release_client_id("shared-0")
    assert store.allocate_client_id("shared-0") > max(client_ids.values())
    with pytest.raises(NotFoundError, match="client ID 99999"):
        store.allocate_adapter_id(99999, "vio0")


# -- locks -----------------------------------------------------------------------------------------


def test_lock_is_exclusive_kept_while_held_and_expires_with_a_dead_holder(store: ClusterStore) -> None:
    with store.lock("swap-guest-1", "swapper-a", ttl=2):
        with pytest.raises(ConflictError, match="held by swapper-a"):
            store.acquire_lock("swap-guest-1", "swapper-b", ttl=2)
        time.sleep(2.5)  # longer than the ttl: the context manager refreshes it
        with pytest.raises(ConflictError, match="held by swapper-a"):
            store.acquire_lock("swap-guest-1", "swapper-b", ttl=2)
    store.acquire_lock("swap-guest-1", "swapper-b", ttl=2)
    # swapper-b dies holding it: it neither refreshes nor releases.
    start = time.monotonic()
    store.acquire_lock("swap-guest-1", "swapper-c", ttl=2, wait=6)
    assert time.monotonic() - start < 4.5
    assert not store.release_lock("swap-guest-1", "swapper-b")
    assert store.release_lock("swap-guest-1", "swapper-c")


def test_fenced_writes_stop_once_the_lock_is_lost(store: ClusterStore) -> None:
    """A swap writes its journal fenced by its lock: another holder's lock makes those writes fail."""
    lost = pytest.raises(LeaseLostError, match="swapper-b took it over")
    with lost, store.lock("swap-g", "swapper-a", ttl=2) as lease:
        store.update("swap", "g", lambda _: {"step": "prepared"}, fence=lease.fence)
        assert store.get("swap", "g") == {"step": "prepared"}
        # swapper-a's lease runs out (the store was out of reach) and swapper-b takes the lock
        store.release_lock("swap-g", "swapper-a")
        store.acquire_lock("swap-g", "swapper-b", ttl=5)
        with pytest.raises(LeaseLostError, match="no longer held by swapper-a"):
            store.update("swap", "g", lambda _: {"step": "paged-out"}, fence=lease.fence)
        assert store.get("swap", "g") == {"step": "prepared"}
        time.sleep(1.2)  # the refresher (every ttl/3) notices
        with pytest.raises(LeaseLostError):
            lease.check()
    assert store.release_lock("swap-g", "swapper-b"), "leaving the block released the new holder's lock"


# -- LU reservations -------------------------------------------------------------------------------


def test_two_writers_on_one_lu_exactly_one_wins(store: ClusterStore, store_url: str) -> None:
    nodes = {"guest-a": register(store, "vios-a"), "guest-b": register(store, "vios-b")}
    conflicts = store.subscribe(EventFilter(kinds=(ALERT,), types=("reservation-conflict",)))
    barrier = threading.Barrier(len(nodes))
    outcome: dict[str, str] = {}

    def writer(client: str) -> None:
        with open_store(store_url) as own:  # its own connection, as another process would have
            barrier.wait()
            try:
                own.reserve("lu-data", nodes[client], client, EXCLUSIVE)
                outcome[client] = "won"
            except ConflictError as err:
                outcome[client] = str(err)

    threads = [threading.Thread(target=writer, args=(client,)) for client in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [winner] = [client for client, result in outcome.items() if result == "won"]
    [loser] = [client for client in nodes if client != winner]
    holder = f"exclusive by node {nodes[winner]} (vios-{winner[-1]}) for client {winner}"
    assert holder in outcome[loser]
    assert [(r.node, r.client, r.mode) for r in store.reservations("lu-data")] == [(nodes[winner], winner, EXCLUSIVE)]
    alert = conflicts.get(timeout=5)
    assert alert is not None and alert.obj == "lu/lu-data"
    assert alert.data["holders"][0]["client"] == winner
    conflicts.close()


def test_shared_readers_exclude_a_writer(store: ClusterStore) -> None:
    a, b, c = register(store, "vios-a"), register(store, "vios-b"), register(store, "vios-c")
    store.reserve("base-os", a, "g1", SHARED_READ)
    store.reserve("base-os", b, "g2", SHARED_READ)
    store.reserve("base-os", b, "g2", SHARED_READ)  # idempotent
    with pytest.raises(ConflictError, match=r"shared-read by node \d+ \(vios-a\) for client g1, shared-read by node"):
        store.reserve("base-os", c, "g3", EXCLUSIVE)
    assert store.release("base-os", a) == 1
    assert store.release("base-os", b, "g2") == 1
    assert store.release("base-os", b, "g2") == 0
    store.reserve("base-os", c, "g3", EXCLUSIVE)
    with pytest.raises(ConflictError, match=r"exclusive by node \d+ \(vios-c\) for client g3"):
        store.reserve("base-os", a, "g1", SHARED_READ)
    with pytest.raises(ValidationError, match="reservation mode"):
        store.reserve("base-os", a, "g1", "read-write")
    assert [r.client for r in store.reservations()] == ["g3"]


def test_dead_nodes_reservation_expires_with_its_lease(store: ClusterStore) -> None:
    dead, live = register(store, "vios-dead", ttl=2), register(store, "vios-live")
    lost = store.subscribe(EventFilter(types=("node-lost",)))
    store.reserve("lu-x", dead, "g1")
    with pytest.raises(ConflictError, match=r"\(vios-dead\)"):
        store.reserve("lu-x", live, "g2")
    # vios-dead never heartbeats again.
    took = wait_for(lambda: not store.reservations("lu-x"), 5, "expiry of the dead node's reservation")
    assert took < 3.5
    store.reserve("lu-x", live, "g2")
    assert [(r.node, r.client) for r in store.reservations("lu-x")] == [(live, "g2")]
    with pytest.raises(NotFoundError, match="no live registration"):
        store.reserve("lu-y", dead, "g1")
    assert {n.name: n.state for n in store.nodes()} == {"vios-dead": "lost", "vios-live": "alive"}
    assert [n.name for n in store.reap_lost_nodes()] == ["vios-dead"]
    assert store.reap_lost_nodes() == [], "a loss is alerted once"
    alert = lost.get(timeout=5)
    assert alert is not None and (alert.kind, alert.obj) == (ALERT, "node/vios-dead")
    assert lost.get(timeout=0.3) is None
    lost.close()


# -- events ----------------------------------------------------------------------------------------


def _publish(url: str, worker: int, count: int) -> None:
    with open_store(url) as own:
        for i in range(count):
            kind = ALERT if i % 3 == 0 else LIFECYCLE
            own.publish(Event(kind, "created", f"lu/w{worker}-{i}", {"worker": worker, "i": i}))


def test_events_are_delivered_once_in_order_with_filters(store: ClusterStore, store_url: str) -> None:
    everything = store.subscribe()
    alerts = store.subscribe(EventFilter(kinds=(ALERT,)))
    worker_1 = store.subscribe(EventFilter(obj_prefix="lu/w1-"))
    with PROCESSES.Pool(3) as pool:
        pool.starmap(_publish, [(store_url, worker, 20) for worker in range(3)])
    got = drain(everything, 60)
    assert [e.seq for e in got] == sorted({e.seq for e in got}), "sequence numbers must strictly increase"
    assert sorted(e.obj for e in got) == sorted(f"lu/w{w}-{i}" for w in range(3) for i in range(20))
    for worker in range(3):
        assert [e.data["i"] for e in got if e.data["worker"] == worker] == list(range(20))
    assert everything.get(timeout=0.3) is None, "an event was delivered twice"
    assert drain(alerts, 21) == [e for e in got if e.kind == ALERT]
    assert drain(worker_1, 20) == [e for e in got if e.obj.startswith("lu/w1-")]
    # A subscriber that stopped resumes from its last sequence number: nothing lost, nothing repeated.
    with store.subscribe(after=got[29].seq) as resumed:
        assert drain(resumed, 30) == got[30:]
        assert resumed.get(timeout=0.2) is None
    for subscription in (everything, alerts, worker_1):
        subscription.close()
    with pytest.raises(ValidationError, match="event kind"):
        store.publish(Event("debug", "created", "lu/x"))
    with pytest.raises(ValidationError, match="event object"):
        store.publish(Event(LIFECYCLE, "created", "lu-x"))


# -- election and membership -----------------------------------------------------------------------


def test_election_fails_over_within_the_lease(store: ClusterStore) -> None:
    first, second = register(store, "vios-1", ttl=2), register(store, "vios-2", ttl=2)
    assert store.campaign(first)
    assert not store.campaign(second)
    assert store.primary() == first

    def second_takes_over() -> bool:
        assert store.heartbeat(second)
        return store.campaign(second)

    # vios-1 stops heartbeating; vios-2 keeps its lease and campaigns.
    took = wait_for(second_takes_over, 5, "failover")
    assert took < 3.5
    assert store.primary() == second
    assert not store.heartbeat(first), "an expired lease cannot be revived"
    third = register(store, "vios-3")
    assert not store.campaign(third)
    store.deregister_node(second)  # a clean leave hands over at once
    assert store.campaign(third)
    assert store.primary() == third


def test_rejoin_drops_devices_deleted_while_the_node_was_away(store: ClusterStore, tmp_path: Path) -> None:
    state = tmp_path / "vios-a.json"
    agent = NodeAgent(store, "vios-a", "127.0.0.1:10809", state, ttl=2, timeout=5)
    first = agent.start()
    agent.track("lu", "lu-a", {"size": 1})
    agent.track("lu", "lu-b", {"size": 2})
    agent.track("export", "exp-a", {"lu": "lu-a"})
    store.put("lu", "lu-c", {"node": "vios-b"})  # another node's device
    agent.stop()
    assert set(json.loads(state.read_text())["devices"]["lu"]) == {"lu-a", "lu-b"}

    assert store.delete("lu", "lu-b")  # deleted while vios-a was away
    again = NodeAgent(store, "vios-a", "127.0.0.1:10809", state, ttl=2, timeout=5)
    second = again.start()
    try:
        assert second.node.id == first.node.id
        assert again.removed_on_rejoin == ["lu/lu-b"]
        assert {kind: set(names) for kind, names in again.devices().items()} == {"lu": {"lu-a"}, "export": {"exp-a"}}
        assert set(json.loads(state.read_text())["devices"]["lu"]) == {"lu-a"}
        assert again.is_primary
        time.sleep(2.5)  # longer than the ttl: the agent's heartbeats keep the node alive
        assert [n.state for n in store.nodes()] == ["alive"]
    finally:
        again.stop()
    assert [n.state for n in store.nodes()] == ["left"]
    assert store.primary() is None


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
def test_unreachable_store_fails_clearly_within_the_timeout(backend: str, tmp_path: Path) -> None:
    if backend == "etcd":
        # Accepts connections (the kernel does) but never answers: a hung etcd.
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        unreachable = open_store(f"etcd://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        blocker: socket.socket | sqlite3.Connection = silent
    else:
        unreachable = open_store(str(tmp_path / "cluster.sqlite"), timeout=0.5)
        # Another process holds the write lock and never lets go.
        blocker = sqlite3.connect(tmp_path / "cluster.sqlite", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
    agent = NodeAgent(unreachable, "vios-a", "127.0.0.1:10809", tmp_path / "state.json", ttl=2, timeout=1.5)
    start = time.monotonic()
    try:
        with pytest.raises(ClusterError) as raised:
            agent.start()
    finally:
        blocker.close()
        unreachable.close()
    took = time.monotonic() - start
    message = f"node vios-a could not join: cluster store {unreachable.url} did not answer within 1.5 s"
    assert message in str(raised.value)
    assert 1.0 < took < 2.5


def test_status_shows_the_cluster(store: ClusterStore) -> None:
    store.put("config", "cluster", {"images": "/srv/osimg/images"})
    registration = store.register_node("vios-a", "127.0.0.1:10809", 30)
    assert registration.config == {"images": "/srv/osimg/images"}
    assert [n.name for n in registration.nodes] == ["vios-a"]
    node = registration.node.id
    assert store.campaign(node)
    client = store.allocate_client_id("guest-1")
    store.allocate_adapter_id(client, "vio0")
    store.put("lu", "lu-a", {"node": "vios-a"})
    store.reserve("lu-a", node, "guest-1")
    status = store.status()
    assert status["store"] == store.url
    assert [(n["name"], n["state"]) for n in status["nodes"]] == [("vios-a", "alive")]
    assert status["primary"] == node
    assert status["clients"] == {"guest-1": client}
    assert status["adapters"] == [{"client_id": client, "name": "vio0", "id": 1}]
    assert status["lus"] == ["lu-a"]
    assert status["reservations"] == [{"lu": "lu-a", "node": node, "client": "guest-1", "mode": EXCLUSIVE}]
    json.dumps(status)


def test_open_store_urls(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "a.sqlite")) as plain, open_store(f"sqlite://{tmp_path}/b.sqlite") as url:
        assert (plain.url, url.url) == (f"sqlite://{tmp_path}/a.sqlite", f"sqlite://{tmp_path}/b.sqlite")
    with open_store("etcd://127.0.0.1:2379") as default, open_store("etcd://127.0.0.1:2379/site-a/") as prefixed:
        assert (default.url, prefixed.url) == ("etcd://127.0.0.1:2379/osimg", "etcd://127.0.0.1:2379/site-a")
    for bad in ["", "sqlite://", "mysql://db/x", "etcd://127.0.0.1", "etcd://127.0.0.1:2379/../x"]:
        with pytest.raises(ValidationError):
            open_store(bad)


def test_etcd_urls_name_several_members() -> None:
    url = "etcd://127.0.0.1:2379,etcd-b.example:2380,[::1]:2381/site-a"
    with open_store(url) as cluster:
        assert cluster.url == url
        assert isinstance(cluster, EtcdStore) and cluster.members == ("127.0.0.1:2379", "etcd-b.example:2380",
                                                                       "[::1]:2381")
        assert cluster.current_member == "127.0.0.1:2379"


@pytest.mark.parametrize(("url", "says"), [
    ("etcd://127.0.0.1:2379,127.0.0.1", "member '127.0.0.1' is not HOST:PORT"),
    ("etcd://127.0.0.1:2379,,127.0.0.1:2380", "member '' is not HOST:PORT"),
    ("etcd://127.0.0.1:0", "port '0' is not a number in 1..65535"),
    ("etcd://127.0.0.1:65536", "port '65536' is not a number in 1..65535"),
    ("etcd://127.0.0.1:-1", "port '-1' is not a number in 1..65535"),
    ("etcd://127.0.0.1:" + "9" * 5000, "is not a number in 1..65535"),
    ("etcd://a:1,b:2,a:1", "member 'a:1' named twice"),
    ("etcd://" + ",".join(f"h{i}:2379" for i in range(10)), "10 members, at most 9"),
    ("etcd://300.1.1.1:2379", "'300.1.1.1' is not an IP address"),
    ("etcd://bad_host:2379", "'bad_host' is not a host name"),
    ("etcd://" + "h" * 5000 + ":2379", "is not a host name"),
    ("etcd://user@127.0.0.1:2379", "expected etcd://HOST:PORT[,HOST:PORT...][/prefix]"),
    ("etcd://127.0.0.1:2379?pki=/x", "options need etcds://"),
])
def test_bad_etcd_member_lists_are_refused_in_one_short_line(url: str, says: str) -> None:
    with pytest.raises(ValidationError) as raised:
        open_store(url)
    message = str(raised.value)
    assert says in message and "\n" not in message and len(message) < 300, message


# -- the swap journal and lock on each backend -----------------------------------------------------------


def test_swap_journal_and_lock_on_each_backend(store_url: str, tmp_path: Path) -> None:
    """What swap.swap_guest and swap.resume rely on, on SQLite and on etcd: merged journal steps,
    one lock per guest across processes, and resume dropping the entry of a guest that is gone."""
    ctx = Context.from_env(home=str(tmp_path / "home"), store=store_url)
    try:
        with ctx.store.lock(journal.lock_name("g1"), "swapper-a", journal.LOCK_TTL) as lease:
            journal.begin(ctx, lease, "g1", strategy="warm", old={"a": 1})
            journal.write(ctx, lease, "g1", step="paged-out")
            rec = journal.get(ctx, "g1")
            assert rec is not None and rec["step"] == "paged-out" and rec["old"] == {"a": 1} and rec["updated"] > 0
            assert [r["guest"] for r in journal.entries(ctx)] == ["g1"]
            with PROCESSES.Pool(1) as pool:
                other = pool.apply(_try_swap_lock, (store_url, "g1"))
            assert other == "lock swap-g1 is held by swapper-a"
        with PROCESSES.Pool(1) as pool:
            assert pool.apply(_try_swap_lock, (store_url, "g1")) == "acquired"
        # the guest's folder does not exist: resume drops its journal entry and reports nothing
        assert swap.resume(ctx) == [] and journal.entries(ctx) == []
    finally:
        ctx.close()


def _try_swap_lock(url: str, guest: str) -> str:
    with open_store(url) as own:
        try:
            own.acquire_lock(journal.lock_name(guest), "swapper-b", ttl=2)
        except ConflictError as err:
            return str(err)
        own.release_lock(journal.lock_name(guest), "swapper-b")
        return "acquired"
