"""The cluster store: the shared database of the VIOS cluster (DESIGN.md, "VIOS cluster DB").

One interface, two backends that pass one test suite:

- ``sqlite://PATH`` (or a plain path): embedded default for one host, shared safely by processes.
- ``etcd://HOST:PORT[/prefix]``: several hosts; etcd does consensus and replication, we never do.

Other modules keep their state as JSON-serialisable dicts addressed by ``(kind, name)`` and use
``update()`` for atomic read-modify-write. On top of that the store gives the cluster what must be
safe under concurrency: locks, unique IDs, LU reservations, events and primary election.

Both backends share one lease model: a node's registration, its LU reservations and its primacy
all hang on the node's lease, so a node that stops heartbeating loses all three after its TTL.
This base class holds everything that is the same for both (validation, retry loops, error
messages, alerts); the backends implement the small ``_``-prefixed primitives.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from .. import validate
from ..errors import ClusterError, ConflictError, LeaseLostError, ValidationError
from .events import ALERT, NODE_LOST, RESERVATION_CONFLICT, Event, EventFilter, Subscription, check_event

Record = dict[str, Any]

EXCLUSIVE = "exclusive"
SHARED_READ = "shared-read"
MODES = (EXCLUSIVE, SHARED_READ)

ALIVE = "alive"
LOST = "lost"  # lease expired without a goodbye: alerted once by the primary
LEFT = "left"  # deregistered cleanly

# Cluster-wide settings that every node receives when it registers.
CONFIG_KIND = "config"
CONFIG_NAME = "cluster"
# Records of this kind are listed as the cluster's LUs by status().
LU_KIND = "lu"

DEFAULT_TIMEOUT = 5.0
UPDATE_ATTEMPTS = 100
LOCK_POLL = 0.05


@dataclass(frozen=True)
class Node:
    """A registered node. ``lease`` identifies one registration: a re-registration gets a new one."""

    id: int
    name: str
    address: str
    ttl: float
    state: str
    lease: int


@dataclass(frozen=True)
class Registration:
    """What a node receives when it joins: its identity, cluster configuration and status."""

    node: Node
    nodes: list[Node]
    primary: int | None
    config: Record


@dataclass(frozen=True)
class Reservation:
    """A persistent reserve on an LU by a client through a node; lives as long as the node's lease."""

    lu: str
    node: int
    client: str
    mode: str


@dataclass(frozen=True)
class Adapter:
    """A virtual I/O adapter of a client; (client_id, id) is unique cluster-wide."""

    client_id: int
    name: str
    id: int


@dataclass(frozen=True)
class Fence:
    """Proof that a lock is still ours, checked by the store in the same write as a record.

    ``token`` is what the store can compare atomically: etcd's modification revision of the lock
    key when we took it (a lock re-taken after it expired gets a new one); SQLite compares holder
    and expiry inside its write transaction and keeps 0 here.
    """

    lock: str
    holder: str
    token: int


class Lease:
    """A held lock, as the ``lock()`` block sees it: its fence, and whether the refresher lost it."""

    def __init__(self, fence: Fence, ttl: float) -> None:
        self.fence = fence
        self.ttl = ttl
        self.lost: str | None = None

    def check(self) -> None:
        """Raise LeaseLostError if the refresher found the lock gone (or could not renew it in time)."""
        if self.lost is not None:
            raise LeaseLostError(f"lock {self.fence.lock} is no longer held by {self.fence.holder}: {self.lost}")


def encode(value: object, what: str) -> str:
    """JSON text of a record, refusing anything other modules could not read back as a dict."""
    if not isinstance(value, dict):
        raise ValidationError(f"invalid value for {what}: expected a dict, got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValidationError(f"invalid value for {what}: not JSON-serialisable ({err})") from None


def check_ttl(ttl: float, what: str) -> float:
    if not isinstance(ttl, int | float) or not 0 < ttl <= 86400:
        raise ValidationError(f"invalid ttl {ttl!r} for {what}: expected seconds, 0 < ttl <= 86400")
    return float(ttl)


def check_node_id(node_id: object) -> int:
    if not isinstance(node_id, int) or isinstance(node_id, bool) or node_id <= 0:
        raise ValidationError(f"invalid node ID {node_id!r}: expected a positive integer")
    return node_id


class ClusterStore(abc.ABC):
    """Interface of the cluster database; open one with ``open_store(url)``.

    Every method may raise ClusterError when the store cannot be reached or refuses an update.
    """

    url: str

    # -- records ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def _get(self, kind: str, name: str) -> tuple[Record | None, int]: ...

    @abc.abstractmethod
    def _items(self, kind: str) -> builtins.list[tuple[str, Record]]: ...

    @abc.abstractmethod
    def _put(self, kind: str, name: str, text: str) -> None: ...

    @abc.abstractmethod
    def _delete(self, kind: str, name: str) -> bool: ...

    @abc.abstractmethod
    def _swap(self, kind: str, name: str, text: str | None, revision: int, fence: Fence | None = None) -> bool:
        """Write ``text`` (None: delete) if the record's revision is still ``revision`` (0: absent).

        With a ``fence``, the write also requires that lock to be still held as the fence says, in
        the same transaction; if it is not, raise LeaseLostError (nothing written).
        """

    def get_with_revision(self, kind: str, name: str) -> tuple[Record | None, int]:
        """The record and its revision, ``(None, 0)`` if absent; pass the revision to compare_and_put."""
        return self._get(validate.name(kind, "kind"), validate.name(name))

    def get(self, kind: str, name: str) -> Record | None:
        return self.get_with_revision(kind, name)[0]

    def items(self, kind: str) -> builtins.list[tuple[str, Record]]:
        """``(name, record)`` pairs of one kind, sorted by name."""
        return self._items(validate.name(kind, "kind"))

    def list(self, kind: str) -> builtins.list[Record]:
        """Records of one kind, sorted by name."""
        return [record for _, record in self.items(kind)]

    def put(self, kind: str, name: str, value: Record) -> None:
        validate.name(kind, "kind")
        validate.name(name)
        self._put(kind, name, encode(value, f"{kind}/{name}"))

    def delete(self, kind: str, name: str) -> bool:
        """Delete a record; False if it did not exist."""
        return self._delete(validate.name(kind, "kind"), validate.name(name))

    def compare_and_put(self, kind: str, name: str, value: Record, revision: int) -> bool:
        """Write only if nobody changed the record since ``revision`` was read (0: create only)."""
        validate.name(kind, "kind")
        validate.name(name)
        return self._swap(kind, name, encode(value, f"{kind}/{name}"), revision)

    def compare_and_delete(self, kind: str, name: str, revision: int) -> bool:
        return self._swap(validate.name(kind, "kind"), validate.name(name), None, revision)

    def update(self, kind: str, name: str, fn: Callable[[Record | None], Record | None],
               fence: Fence | None = None) -> Record | None:
        """Atomic read-modify-write: ``fn(current or None)`` returns the new record, or None to delete.

        Optimistic: ``fn`` runs again on a fresh copy if another writer got in first, so it must not
        have side effects. Raising from ``fn`` aborts without writing. With a ``fence`` the write
        happens only while that lock is still held (LeaseLostError otherwise): a process that lost
        its lock cannot record a step it is no longer entitled to take.
        """
        validate.name(kind, "kind")
        validate.name(name)
        for _ in range(UPDATE_ATTEMPTS):
            current, revision = self._get(kind, name)
            new = fn(copy.deepcopy(current))
            if new == current and fence is None:
                return new
            text = None if new is None else encode(new, f"{kind}/{name}")
            if self._swap(kind, name, text, revision, fence):
                return new
        raise ConflictError(f"{kind}/{name} changed under {UPDATE_ATTEMPTS} concurrent updates in a row; try again")

    # -- locks -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def _try_lock(self, name: str, holder: str, ttl: float) -> str:
        """Take or refresh the lock for ``holder``; return whoever holds it afterwards."""

    @abc.abstractmethod
    def _release_lock(self, name: str, holder: str) -> bool: ...

    def acquire_lock(self, name: str, holder: str, ttl: float, wait: float = 0.0) -> None:
        """Take an exclusive lock for ``ttl`` seconds, waiting up to ``wait`` seconds for it.

        Taking a lock one already holds refreshes it. A holder that dies loses the lock after ttl.
        Raises ConflictError naming the holder if the lock stays taken.
        """
        validate.name(name, "lock name")
        validate.name(holder, "lock holder")
        check_ttl(ttl, f"lock {name}")
        deadline = time.monotonic() + wait
        while (current := self._try_lock(name, holder, ttl)) != holder:
            if time.monotonic() >= deadline:
                raise ConflictError(f"lock {name} is held by {current}")
            time.sleep(LOCK_POLL)

    @abc.abstractmethod
    def _lock_holder(self, name: str) -> str | None: ...

    def lock_holder(self, name: str) -> str | None:
        """Who holds a lock now (None: nobody)."""
        return self._lock_holder(validate.name(name, "lock name"))

    def release_lock(self, name: str, holder: str) -> bool:
        """Release a lock held by ``holder``; False if it did not hold it (any more)."""
        return self._release_lock(validate.name(name, "lock name"), validate.name(holder, "lock holder"))

    @abc.abstractmethod
    def _lock_token(self, name: str, holder: str) -> int:
        """The fence token of a lock ``holder`` holds now (see Fence); LeaseLostError if it does not."""

    def fence(self, name: str, holder: str) -> Fence:
        """The fence of a lock just acquired, for fenced writes (``update(..., fence=)``)."""
        return Fence(name, holder, self._lock_token(name, holder))

    @contextmanager
    def lock(self, name: str, holder: str, ttl: float, wait: float = 0.0) -> Iterator[Lease]:
        """Hold a lock for the duration of a block, refreshing it every ttl/3 from a thread.

        The refresh keeps long operations (a swap takes longer than any sensible ttl) safe while a
        crashed holder still frees the lock after ttl. If a refresh finds the lock taken by someone
        else, or cannot reach the store for longer than ttl (someone else may have taken it
        meanwhile), the block's exclusivity is broken: ``Lease.check()`` says so at once, fenced
        writes fail in the store, and leaving the block raises LeaseLostError so the caller does
        not report success.
        """
        self.acquire_lock(name, holder, ttl, wait)
        lease = Lease(self.fence(name, holder), ttl)
        done = threading.Event()

        def refresh() -> None:
            renewed = time.monotonic()
            while not done.wait(ttl / 3):
                try:
                    current = self._try_lock(name, holder, ttl)
                except ClusterError as err:
                    if time.monotonic() - renewed >= ttl:
                        lease.lost = f"not renewed for {time.monotonic() - renewed:.0f} s ({err})"
                        return
                    continue
                if time.monotonic() - renewed >= ttl:
                    lease.lost = f"not renewed for {time.monotonic() - renewed:.0f} s (it expired meanwhile)"
                    return
                if current != holder:
                    lease.lost = f"{current} took it over"
                    return
                renewed = time.monotonic()

        refresher = threading.Thread(target=refresh, name=f"lock-{name}", daemon=True)
        refresher.start()
        try:
            yield lease
        finally:
            done.set()
            refresher.join()
            if lease.lost is None:
                # the lock expires by itself if the store cannot be reached now
                with contextlib.suppress(ClusterError):
                    self.release_lock(name, holder)
        lease.check()

    # -- nodes and election ----------------------------------------------------------------------

    @abc.abstractmethod
    def _register(self, name: str, address: str, ttl: float) -> Node: ...

    @abc.abstractmethod
    def heartbeat(self, node_id: int) -> bool:
        """Renew the node's lease; False if it already expired (the node must register again)."""

    @abc.abstractmethod
    def deregister_node(self, node_id: int) -> None:
        """Leave cleanly: the lease ends now, with the node's reservations and primacy; no alert."""

    @abc.abstractmethod
    def nodes(self) -> builtins.list[Node]:
        """All nodes ever registered, by ID; ``state`` is computed from the lease at read time."""

    @abc.abstractmethod
    def _mark_lost(self) -> builtins.list[Node]:
        """Atomically flip nodes whose lease expired to LOST; return those this call flipped."""

    @abc.abstractmethod
    def campaign(self, node_id: int) -> bool:
        """Become primary if there is none alive; True if ``node_id`` is primary afterwards.

        The primacy rides on the node's own lease, so a primary that stops heartbeating or
        deregisters is replaced by the next campaigner within its ttl.
        """

    @abc.abstractmethod
    def primary(self) -> int | None:
        """Node ID of the current primary, None while there is none."""

    def register_node(self, name: str, address: str, ttl: float) -> Registration:
        """Join the cluster: a node ID (stable per node name, new names get the next integer), a
        lease of ``ttl`` seconds to keep alive with heartbeat(), and the cluster's config and status.

        Raises ConflictError while another registration of the same name is still alive.
        """
        validate.name(name, "node name")
        if not isinstance(address, str) or not address:
            raise ValidationError(f"invalid address {address!r} for node {name}: expected a non-empty string")
        node = self._register(name, address, check_ttl(ttl, f"node {name}"))
        return Registration(node, self.nodes(), self.primary(), self.get(CONFIG_KIND, CONFIG_NAME) or {})

    def reap_lost_nodes(self) -> builtins.list[Node]:
        """Mark nodes whose lease expired as lost and publish one ``node-lost`` alert for each.

        The primary calls this after its heartbeats: the flip is atomic, so each loss is alerted
        exactly once however many nodes call it.
        """
        lost = self._mark_lost()
        for node in lost:
            self.publish(Event(ALERT, NODE_LOST, f"node/{node.name}", {"id": node.id, "address": node.address}))
        return lost

    # -- IDs -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _allocate_client_id(self, guest: str) -> int: ...

    @abc.abstractmethod
    def _allocate_adapter_id(self, client_id: int, adapter: str) -> int: ...

    @abc.abstractmethod
    def _release_client_id(self, guest: str) -> bool: ...

    @abc.abstractmethod
    def clients(self) -> dict[str, int]:
        """Guest name -> client ID."""

    @abc.abstractmethod
    def adapters(self) -> builtins.list[Adapter]:
        """All adapters, by client ID then adapter ID."""

    def allocate_client_id(self, guest: str) -> int:
        """The guest's cluster-wide client ID, allocated on first call; idempotent.

        IDs grow from 1 and are never reused; etcd may skip one when processes race for one guest.
        """
        return self._allocate_client_id(validate.name(guest, "guest name"))

    def allocate_adapter_id(self, client_id: int, adapter_name: str) -> int:
        """The ID of a client's named adapter, unique within the client (1, 2, ...); idempotent.

        etcd may skip an ID when processes race for the same adapter, never repeat one.

        Raises NotFoundError if ``client_id`` was not allocated.
        """
        if not isinstance(client_id, int) or client_id <= 0:
            raise ValidationError(f"invalid client ID {client_id!r}: expected a positive integer")
        return self._allocate_adapter_id(client_id, validate.name(adapter_name, "adapter name"))

    def release_client_id(self, guest: str) -> bool:
        """Forget a deleted guest's client ID and its adapters; False if it had none."""
        return self._release_client_id(validate.name(guest, "guest name"))

    # -- LU reservations -------------------------------------------------------------------------

    @abc.abstractmethod
    def _reserve(self, reservation: Reservation) -> builtins.list[Reservation]:
        """Record the reservation unless it conflicts; return the conflicting ones (empty: done).

        Raises NotFoundError if the node has no live lease.
        """

    @abc.abstractmethod
    def _release(self, lu: str, node: int, client: str | None) -> int: ...

    @abc.abstractmethod
    def _reservations(self, lu: str | None) -> builtins.list[Reservation]: ...

    def reserve(self, lu: str, holder_node: int, client: str, mode: str = EXCLUSIVE) -> Reservation:
        """Reserve an LU for ``client`` through ``holder_node``: one ``exclusive`` writer, or any
        number of ``shared-read`` readers. Reserving again (also to change mode) is idempotent.

        A conflict publishes a ``reservation-conflict`` alert and raises ConflictError naming the
        holder. The reservation ends with release() or when the holder node's lease expires.
        """
        validate.name(lu, "LU name")
        check_node_id(holder_node)
        validate.name(client, "client name")
        if mode not in MODES:
            raise ValidationError(f"invalid reservation mode {mode!r}: expected one of {', '.join(MODES)}")
        wanted = Reservation(lu, holder_node, client, mode)
        conflicts = self._reserve(wanted)
        if not conflicts:
            return wanted
        names = {n.id: n.name for n in self.nodes()}
        holders = ", ".join(
            f"{c.mode} by node {c.node} ({names.get(c.node, '?')}) for client {c.client}" for c in conflicts
        )
        self.publish(
            Event(
                ALERT,
                RESERVATION_CONFLICT,
                f"lu/{lu}",
                {"requested": asdict(wanted), "holders": [asdict(c) for c in conflicts]},
            )
        )
        raise ConflictError(f"LU {lu} is reserved {holders}; refused {mode} for client {client}")

    def release(self, lu: str, holder_node: int, client: str | None = None) -> int:
        """End the node's reservations of the LU (only ``client``'s if given); returns how many."""
        validate.name(lu, "LU name")
        check_node_id(holder_node)
        if client is not None:
            validate.name(client, "client name")
        return self._release(lu, holder_node, client)

    def reservations(self, lu: str | None = None) -> builtins.list[Reservation]:
        """Live reservations (of one LU if given), sorted by LU, node, client."""
        return self._reservations(None if lu is None else validate.name(lu, "LU name"))

    # -- events ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def _publish(self, event: Event) -> int: ...

    @abc.abstractmethod
    def _subscribe(self, event_filter: EventFilter, after: int | None) -> Subscription: ...

    def publish(self, event: Event) -> Event:
        """Append an event; returns it with its sequence number and time."""
        stamped = check_event(event)
        seq = self._publish(stamped)
        return Event(stamped.kind, stamped.type, stamped.obj, stamped.data, seq, stamped.time)

    def subscribe(self, event_filter: EventFilter | None = None, after: int | None = None) -> Subscription:
        """Matching events published after sequence number ``after`` (default: from now on)."""
        if after is not None and (not isinstance(after, int) or after < 0):
            raise ValidationError(f"invalid event sequence number {after!r}: expected an integer >= 0")
        return self._subscribe(event_filter or EventFilter(), after)

    # -- status and lifetime ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything ``osimg cluster status`` shows, as JSON-ready data."""
        return {
            "store": self.url,
            "nodes": [asdict(n) for n in self.nodes()],
            "primary": self.primary(),
            "clients": self.clients(),
            "adapters": [asdict(a) for a in self.adapters()],
            "lus": [name for name, _ in self.items(LU_KIND)],
            "reservations": [asdict(r) for r in self.reservations()],
        }

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ClusterStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
