"""SQLite cluster store: the embedded default for a single host.

Several processes share one database file safely:
- WAL mode, so readers (event polling, status) never block the writer and vice versa;
- every write is one ``BEGIN IMMEDIATE`` transaction: it takes the write lock before reading, so a
  read-check-write (ID allocation, reservation check) cannot interleave with another process's,
  and sequence numbers become visible in the order they were assigned (what event polling needs);
- a busy timeout, so a writer waits its turn instead of failing, and fails with ClusterError when
  the database stays locked longer than the timeout;
- ``synchronous=FULL``: an allocated ID or granted reservation must survive a power cut, or it
  could be handed out twice.

Leases are emulated with wall-clock expiry times checked at read time, so an expired lease is
dead at once even if nobody cleans up; every node's registration gets a new lease number, and
reservations and primacy name the lease they belong to.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from ..errors import ClusterError, ConflictError, LeaseLostError, NotFoundError
from ..settings import PRIVATE_MODE
from .events import Event, EventFilter, Subscription
from .store import (
    ALIVE,
    EXCLUSIVE,
    LEFT,
    LOST,
    Adapter,
    ClusterStore,
    Fence,
    Node,
    Record,
    Reservation,
)

POLL_INTERVAL = 0.02
POLL_BATCH = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL, revision INTEGER NOT NULL,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, address TEXT NOT NULL,
    ttl REAL NOT NULL, state TEXT NOT NULL, lease INTEGER NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS election (
    id INTEGER PRIMARY KEY CHECK (id = 1), node INTEGER NOT NULL, lease INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS clients (id INTEGER PRIMARY KEY AUTOINCREMENT, guest TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS adapters (
    client INTEGER NOT NULL, name TEXT NOT NULL, id INTEGER NOT NULL,
    PRIMARY KEY (client, name), UNIQUE (client, id));
CREATE TABLE IF NOT EXISTS reservations (
    lu TEXT NOT NULL, node INTEGER NOT NULL, client TEXT NOT NULL, mode TEXT NOT NULL,
    lease INTEGER NOT NULL, PRIMARY KEY (lu, node, client));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, type TEXT NOT NULL, obj TEXT NOT NULL,
    data TEXT NOT NULL, time REAL NOT NULL);
-- A reservation or primacy counts only while the registration (lease) it was taken under is alive;
-- julianday() turned into Unix time is the same clock Python writes expiry times with.
CREATE VIEW IF NOT EXISTS live_leases AS
    SELECT id AS node, lease FROM nodes
    WHERE state = 'alive' AND expires > (julianday('now') - 2440587.5) * 86400.0;
"""


class SqliteStore(ClusterStore):
    """Cluster store in one SQLite file; one instance per process, safe to share between threads."""

    def __init__(self, path: str | Path, timeout: float) -> None:
        self.path = Path(path).absolute()
        self.url = f"sqlite://{self.path}"
        self._timeout = timeout
        self._mutex = threading.RLock()
        try:
            # root's alone from its first byte: the store holds every record osimg trusts to act on.
            # Only a new file is opened here: closing any descriptor of a database file drops every
            # POSIX lock this process holds on it, so opening an existing store beside another
            # connection of this process (a parallel swap's own context) would break its locking.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_MODE))
        except FileExistsError:
            pass
        except OSError as err:
            raise ClusterError(f"cannot open cluster store {self.url}: {err.strerror}") from None
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as err:
            raise ClusterError(f"cannot open cluster store {self.url}: {err}") from None
        with self._write() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    @contextmanager
    def _tx(self, begin: str) -> Iterator[sqlite3.Connection]:
        try:
            with self._mutex:
                self._db.execute(begin)
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise ClusterError(
                    f"cluster store {self.url} stayed locked by another process for more than {self._timeout:g} s"
                ) from None
            raise ClusterError(f"cluster store {self.url}: {err}") from None
        except sqlite3.Error as err:
            raise ClusterError(f"cluster store {self.url}: {err}") from None

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A transaction holding the write lock from its first statement."""
        return self._tx("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A consistent snapshot for several reads; never blocks writers in WAL mode."""
        return self._tx("BEGIN")

    @staticmethod
    def _next(db: sqlite3.Connection, counter: str) -> int:
        row = db.execute(
            "INSERT INTO counters VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
            (counter,),
        ).fetchone()
        return int(row[0])

    # -- records ---------------------------------------------------------------------------------

    def _get(self, kind: str, name: str) -> tuple[Record | None, int]:
        with self._read() as db:
            row = db.execute("SELECT value, revision FROM records WHERE kind = ? AND name = ?", (kind, name)).fetchone()
        return (None, 0) if row is None else (json.loads(row[0]), int(row[1]))

    def _items(self, kind: str) -> builtins.list[tuple[str, Record]]:
        with self._read() as db:
            rows = db.execute("SELECT name, value FROM records WHERE kind = ? ORDER BY name", (kind,)).fetchall()
        return [(name, json.loads(value)) for name, value in rows]

    def _put(self, kind: str, name: str, text: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)", (kind, name, text, self._next(db, "revision"))
            )

    def _delete(self, kind: str, name: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM records WHERE kind = ? AND name = ?", (kind, name)).rowcount > 0

    def _swap(self, kind: str, name: str, text: str | None, revision: int, fence: Fence | None = None) -> bool:
        with self._write() as db:
            if fence is not None:
                self._check_fence(db, fence)
            row = db.execute("SELECT revision FROM records WHERE kind = ? AND name = ?", (kind, name)).fetchone()
            if (0 if row is None else row[0]) != revision:
                return False
            if text is None:
                db.execute("DELETE FROM records WHERE kind = ? AND name = ?", (kind, name))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)", (kind, name, text, self._next(db, "revision"))
                )
            return True

    # -- locks -----------------------------------------------------------------------------------

    def _try_lock(self, name: str, holder: str, ttl: float) -> str:
        with self._write() as db:
            now = time.time()
            row = db.execute("SELECT holder, expires FROM locks WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > now:
                return str(row[0])
            db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?)", (name, holder, now + ttl))
            return holder

    @staticmethod
    def _check_fence(db: sqlite3.Connection, fence: Fence) -> None:
        row = db.execute("SELECT holder, expires FROM locks WHERE name = ?", (fence.lock,)).fetchone()
        if row is None or row[0] != fence.holder or row[1] <= time.time():
            who = "nobody" if row is None or row[1] <= time.time() else row[0]
            raise LeaseLostError(f"lock {fence.lock} is no longer held by {fence.holder} (now: {who})")

    def _lock_holder(self, name: str) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT holder, expires FROM locks WHERE name = ?", (name,)).fetchone()
        return None if row is None or row[1] <= time.time() else str(row[0])

    def _lock_token(self, name: str, holder: str) -> int:
        with self._read() as db:
            self._check_fence(db, Fence(name, holder, 0))
        return 0

    def _release_lock(self, name: str, holder: str) -> bool:
        with self._write() as db:
            row = db.execute(
                "DELETE FROM locks WHERE name = ? AND holder = ? RETURNING expires", (name, holder)
            ).fetchone()
            return row is not None and row[0] > time.time()

    # -- nodes and election ----------------------------------------------------------------------

    def _register(self, name: str, address: str, ttl: float) -> Node:
        with self._write() as db:
            now = time.time()
            row = db.execute("SELECT id, state, expires, ttl FROM nodes WHERE name = ?", (name,)).fetchone()
            if row is not None and row[1] == ALIVE and row[2] > now:
                raise ConflictError(
                    f"node {name} is already registered as node {row[0]} with a live lease; a restarted node "
                    f"can register again once that lease expires (within {row[3]:g} s)"
                )
            lease = self._next(db, "lease")
            if row is None:
                node_id = db.execute(
                    "INSERT INTO nodes (name, address, ttl, state, lease, expires)"
                    " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                    (name, address, ttl, ALIVE, lease, now + ttl),
                ).fetchone()[0]
            else:
                node_id = row[0]
                db.execute(
                    "UPDATE nodes SET address = ?, ttl = ?, state = ?, lease = ?, expires = ? WHERE id = ?",
                    (address, ttl, ALIVE, lease, now + ttl, node_id),
                )
        return Node(int(node_id), name, address, ttl, ALIVE, lease)

    def heartbeat(self, node_id: int) -> bool:
        with self._write() as db:
            now = time.time()
            return (
                db.execute(
                    "UPDATE nodes SET expires = ? + ttl WHERE id = ? AND state = ? AND expires > ?",
                    (now, node_id, ALIVE, now),
                ).rowcount
                == 1
            )

    def deregister_node(self, node_id: int) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is None:
                raise NotFoundError(f"node {node_id} is not registered")
            db.execute(
                "UPDATE nodes SET state = ?, expires = ? WHERE id = ? AND state = ?",
                (LEFT, time.time(), node_id, ALIVE),
            )
            db.execute("DELETE FROM reservations WHERE node = ?", (node_id,))
            db.execute("DELETE FROM election WHERE node = ?", (node_id,))

    def nodes(self) -> builtins.list[Node]:
        with self._read() as db:
            rows = db.execute("SELECT id, name, address, ttl, state, lease, expires FROM nodes ORDER BY id").fetchall()
        now = time.time()
        return [
            Node(id, name, address, ttl, LOST if state == ALIVE and expires <= now else state, lease)
            for id, name, address, ttl, state, lease, expires in rows
        ]

    def _mark_lost(self) -> builtins.list[Node]:
        with self._write() as db:
            rows = db.execute(
                "UPDATE nodes SET state = ? WHERE state = ? AND expires <= ? RETURNING id, name, address, ttl, lease",
                (LOST, ALIVE, time.time()),
            ).fetchall()
        return [Node(id, name, address, float(ttl), LOST, lease) for id, name, address, ttl, lease in rows]

    def campaign(self, node_id: int) -> bool:
        with self._write() as db:
            now = time.time()
            row = db.execute("SELECT node FROM election JOIN live_leases USING (node, lease)").fetchone()
            if row is not None:
                return bool(row[0] == node_id)
            row = db.execute(
                "SELECT lease FROM nodes WHERE id = ? AND state = ? AND expires > ?", (node_id, ALIVE, now)
            ).fetchone()
            if row is None:
                return False
            db.execute("INSERT OR REPLACE INTO election VALUES (1, ?, ?)", (node_id, row[0]))
            return True

    def primary(self) -> int | None:
        with self._read() as db:
            row = db.execute("SELECT node FROM election JOIN live_leases USING (node, lease)").fetchone()
        return None if row is None else int(row[0])

    # -- IDs -------------------------------------------------------------------------------------

    def _allocate_client_id(self, guest: str) -> int:
        with self._write() as db:
            row = db.execute("SELECT id FROM clients WHERE guest = ?", (guest,)).fetchone()
            if row is None:
                row = db.execute("INSERT INTO clients (guest) VALUES (?) RETURNING id", (guest,)).fetchone()
            return int(row[0])

    def _allocate_adapter_id(self, client_id: int, adapter: str) -> int:
        with self._write() as db:
            if db.execute("SELECT 1 FROM clients WHERE id = ?", (client_id,)).fetchone() is None:
                raise NotFoundError(f"client ID {client_id} is not allocated")
            row = db.execute("SELECT id FROM adapters WHERE client = ? AND name = ?", (client_id, adapter)).fetchone()
            if row is None:
                row = db.execute(
                    "INSERT INTO adapters SELECT ?, ?, COALESCE(MAX(id), 0) + 1 FROM adapters WHERE client = ?"
                    " RETURNING id",
                    (client_id, adapter, client_id),
                ).fetchone()
            return int(row[0])

    def _release_client_id(self, guest: str) -> bool:
        with self._write() as db:
            row = db.execute("DELETE FROM clients WHERE guest = ? RETURNING id", (guest,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM adapters WHERE client = ?", (row[0],))
            return True

    def clients(self) -> dict[str, int]:
        with self._read() as db:
            return dict(db.execute("SELECT guest, id FROM clients ORDER BY id").fetchall())

    def adapters(self) -> builtins.list[Adapter]:
        with self._read() as db:
            rows = db.execute("SELECT client, name, id FROM adapters ORDER BY client, id").fetchall()
        return [Adapter(*row) for row in rows]

    # -- LU reservations -------------------------------------------------------------------------

    def _reserve(self, reservation: Reservation) -> builtins.list[Reservation]:
        lu, node, client, mode = reservation.lu, reservation.node, reservation.client, reservation.mode
        with self._write() as db:
            now = time.time()
            row = db.execute(
                "SELECT lease FROM nodes WHERE id = ? AND state = ? AND expires > ?", (node, ALIVE, now)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"node {node} has no live registration; it cannot reserve LU {lu}")
            db.execute(
                "DELETE FROM reservations WHERE lu = ? AND (node, lease) NOT IN (SELECT node, lease FROM live_leases)",
                (lu,),
            )
            others = [
                Reservation(lu, *other)
                for other in db.execute(
                    "SELECT node, client, mode FROM reservations WHERE lu = ? AND NOT (node = ? AND client = ?)"
                    " ORDER BY node, client",
                    (lu, node, client),
                )
            ]
            conflicts = [o for o in others if EXCLUSIVE in (mode, o.mode)]
            if not conflicts:
                db.execute(
                    "INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?)", (lu, node, client, mode, row[0])
                )
            return conflicts

    def _release(self, lu: str, node: int, client: str | None) -> int:
        match = {"lu": lu, "node": node, "client": client}
        with self._write() as db:
            live = db.execute(
                "SELECT COUNT(*) FROM reservations JOIN live_leases USING (node, lease)"
                " WHERE lu = :lu AND node = :node AND (:client IS NULL OR client = :client)",
                match,
            ).fetchone()[0]
            db.execute(
                "DELETE FROM reservations WHERE lu = :lu AND node = :node AND (:client IS NULL OR client = :client)",
                match,
            )
            return int(live)

    def _reservations(self, lu: str | None) -> builtins.list[Reservation]:
        with self._read() as db:
            rows = db.execute(
                "SELECT lu, node, client, mode FROM reservations JOIN live_leases USING (node, lease)"
                " WHERE :lu IS NULL OR lu = :lu ORDER BY lu, node, client",
                {"lu": lu},
            ).fetchall()
        return [Reservation(*row) for row in rows]

    # -- events ----------------------------------------------------------------------------------

    def _publish(self, event: Event) -> int:
        with self._write() as db:
            row = db.execute(
                "INSERT INTO events (kind, type, obj, data, time) VALUES (?, ?, ?, ?, ?) RETURNING seq",
                (event.kind, event.type, event.obj, json.dumps(event.data, sort_keys=True), event.time),
            ).fetchone()
        return int(row[0])

    def _subscribe(self, event_filter: EventFilter, after: int | None) -> Subscription:
        if after is None:
            with self._read() as db:
                after = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
        return SqliteSubscription(self, event_filter, after)

    def events_after(self, seq: int) -> builtins.list[Event]:
        """The next batch of events with a sequence number above ``seq``, in order."""
        with self._read() as db:
            rows = db.execute(
                "SELECT seq, kind, type, obj, data, time FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, POLL_BATCH),
            ).fetchall()
        return [Event(kind, type_, obj, json.loads(data), seq, t) for seq, kind, type_, obj, data, t in rows]

    def close(self) -> None:
        with self._mutex:
            self._db.close()


class SqliteSubscription(Subscription):
    """Polls the events table on the sequence number: cheap in WAL mode, where reads never block."""

    def __init__(self, store: SqliteStore, event_filter: EventFilter, after: int) -> None:
        super().__init__(event_filter, after)
        self._store = store

    def _fetch(self, timeout: float | None) -> builtins.list[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            events = self._store.events_after(self.last_seq)
            if events:
                return events
            remaining = POLL_INTERVAL if deadline is None else min(POLL_INTERVAL, deadline - time.monotonic())
            if remaining <= 0:
                break
            time.sleep(remaining)
        return []
