"""etcd v3 cluster store: several hosts share one cluster; etcd does consensus and replication.

Client: etcd's HTTP/JSON gateway (``/v3/``), posted to with ``requests``. The gateway offers all we
need: transactions with compares (also over key ranges), leases and watches. Python's etcd clients
do not fit: the gRPC ones fight today's protobuf (``etcd3`` 0.12 does not even import, see the
recipes report §6) and ``etcd3gw`` speaks to one member and drops the response header revision,
which is our event sequence number and our reservation guard.

Several members: a store URL may name every member of the cluster. A call goes to the member that
answered last; a member that refuses, breaks the connection, says it has no leader or does not
answer within its share of the call's timeout is skipped for the next one, until the timeout. A
member without a quorum never answers in time (etcd holds the request for 7 s), so losing a
majority ends each call with one ClusterError after ``timeout`` seconds. A write whose member died
while answering may have been applied and is sent again to the next member. A compare-guarded
record write (``update``, ``compare_and_put``) carries a nonce written in the same transaction, so
its repeat tells "my first attempt landed" from "someone else wrote": ``update``'s function does
not run twice for one write (unless another writer changed the record between the two attempts:
then the nonce is gone and the first attempt counts as lost). An event is created only if absent,
so a repeat finds it instead of publishing it twice. Other writes are harmless to repeat: a put
writes the same value, an ID counter skips an ID, a lock or registration recognises its own lease.

Keys under the prefix (``/osimg`` by default)::

    records/KIND/NAME             JSON record; revision = mod_revision
    writes/KIND/NAME              nonce of the last compare-guarded write of that record (same transaction)
    locks/NAME                    {"holder": ...}, on its own lease of the lock's ttl
    node-seq, node-names/NAME     node ID counter (its version), name -> ID (stable across re-registrations)
    nodes/ID                      node record {id, name, address, ttl, state, lease}
    alive/ID                      on the node's lease: exists while the registration is alive
    primary                       node ID, on the primary's node lease (create-revision election)
    client-seq, clients/GUEST, client-ids/ID, adapter-seq/ID, adapters/ID/NAME  (counters: their version)
    reservations/LU/NODE/CLIENT   {"mode": ...}, on the holder node's lease
    events/UUID                   event JSON; its mod_revision is the event's sequence number

IDs come from counter keys whose version is the counter (see ``_next_id``): allocation needs no
lock and no retry, so it does not collapse when many processes allocate at once. The name -> ID
mapping is then created with a create-revision compare; the loser of a race for the same name takes
the winner's ID, so an ID may be skipped but is never given twice.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
import math
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from .. import validate
from ..errors import ClusterError, ConflictError, LeaseLostError, NotFoundError, ValidationError
from .events import Event, EventFilter, Subscription
from .store import ALIVE, EXCLUSIVE, LEFT, LOST, Adapter, ClusterStore, Fence, Node, Record, Reservation

WATCH_RECONNECT_DELAY = 0.2
# An attempt on one member waits for half its share of the call's timeout (each member can be
# asked twice), but at least this long (a loaded host's fsync). A request that reached a member
# while its cluster elects a leader hangs until etcd's own 7 s timeout even once a leader is
# elected: only a new attempt sees the end of an election (1-2 s with etcd's defaults).
MEMBER_MIN_WAIT = 1.0
# Between two rounds over every member (during a leader election a round may find none ready).
ROUND_PAUSE = 0.1
# etcd's answers that say "not now" rather than "no": another member or a later round may succeed.
TRANSIENT = ("no leader", "leader changed", "timed out", "deadline exceeded", "too many requests", "stopped")
GIVE_UP_FIX = "start the etcd members (a majority must run) or point OSIMG_STORE at a live cluster"


def tls_files(pki: Path) -> tuple[Path, Path, Path]:
    """CA certificate, client certificate and client key in ``pki`` (``scripts/etcd.sh pki`` makes them)."""
    files = (pki / "ca.crt", pki / "client.crt", pki / "client.key")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValidationError(f"etcd TLS: missing {', '.join(missing)} (make them with 'scripts/etcd.sh pki {pki}')")
    return files


def connection_problem(err: requests.RequestException) -> str:
    """What went wrong reaching a member, in a few words (requests' own text is a nested repr)."""
    text = str(err)
    for cause, words in (("refused", "connection refused"), ("reset", "connection reset"),
                         ("aborted", "connection aborted"), ("RemoteDisconnected", "connection closed"),
                         ("Name or service not known", "unknown host"), ("unreachable", "unreachable")):
        if cause in text:
            return words
    return validate.short(text, 120)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    """The end of the key range of a prefix: its last character plus one, as etcd expects."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True)
class KV:
    key: str
    value: str
    mod: int
    lease: int

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> KV:
        return cls(
            base64.b64decode(raw["key"]).decode(),
            base64.b64decode(raw.get("value", "")).decode(),
            int(raw.get("mod_revision", 0)),
            int(raw.get("lease", 0)),
        )

    def json(self) -> Any:
        return json.loads(self.value)

    @property
    def last(self) -> str:
        """The last component of the key: a record's name, a node's ID..."""
        return self.key.rsplit("/", 1)[1]


def _range(key: str, prefix: bool = False) -> dict[str, Any]:
    request = {"key": _b64(key)}
    if prefix:
        request["range_end"] = _b64(_prefix_end(key))
    return {"request_range": request}


def _put(key: str, value: str, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = lease
    return {"request_put": request}


def _delete(key: str, prefix: bool = False) -> dict[str, Any]:
    request = {"key": _b64(key)}
    if prefix:
        request["range_end"] = _b64(_prefix_end(key))
    return {"request_delete_range": request}


def _compare(key: str, target: str, result: str, value: int, prefix: bool = False) -> dict[str, Any]:
    """Compare a key's (or every key in a prefix's) ``MOD`` or ``CREATE`` revision; absent keys count as 0."""
    field = {"MOD": "mod_revision", "CREATE": "create_revision"}[target]
    compare: dict[str, Any] = {"key": _b64(key), "target": target, "result": result, field: value}
    if prefix:
        compare["range_end"] = _b64(_prefix_end(key))
    return compare


class EtcdStore(ClusterStore):
    """Cluster store in etcd >= 3.4; safe to share between threads."""

    def __init__(self, members: Sequence[tuple[str, int]], prefix: str, timeout: float,
                 pki: Path | None = None) -> None:
        """``members``: (host, port) of each member's client URL, any order. ``pki``: a folder with
        ``ca.crt`` (the CA that signed etcd's certificate: the client verifies the server) and
        ``client.crt``/``client.key`` (what etcd's --client-cert-auth asks for)."""
        self.members = tuple(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in members)
        self.url = f"{'etcds' if pki else 'etcd'}://{','.join(self.members)}{prefix}"
        self._base = [f"{'https' if pki else 'http'}://{member}/v3/" for member in self.members]
        self._prefix = prefix
        self._timeout = timeout
        self._tls = tls_files(pki) if pki else None
        # one member: nobody else to ask, so it gets the whole timeout
        self._attempt = timeout if len(members) == 1 else max(timeout / len(members) / 2, MEMBER_MIN_WAIT)
        self._session = self.session()
        # The member that answered last: calls go there first. A plain int: threads may race on it
        # harmlessly, each write is atomic and any value is a valid start.
        self._preferred = 0

    def session(self) -> requests.Session:
        """An HTTP session that verifies etcd's certificate against osimg's CA and presents the client's."""
        s = requests.Session()
        if self._tls is not None:
            # requests lets REQUESTS_CA_BUNDLE (set on many hosts) override a session's CA: not ours
            s.trust_env = False
            ca, cert, key = self._tls
            s.verify = str(ca)
            s.cert = (str(cert), str(key))
        return s

    def _key(self, *parts: object) -> str:
        return "/".join([self._prefix, *map(str, parts)])

    def member_order(self) -> builtins.list[int]:
        """Member indexes to try, the one that answered last first."""
        start = self._preferred
        return [(start + i) % len(self.members) for i in range(len(self.members))]

    def member_url(self, index: int, endpoint: str) -> str:
        return self._base[index] + endpoint

    @property
    def current_member(self) -> str:
        """``HOST:PORT`` of the member calls go to first (the one that answered last)."""
        return self.members[self._preferred]

    def answered(self, index: int) -> None:
        """Member ``index`` just answered: later calls (and watches) start there."""
        self._preferred = index

    def _call(self, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._post(endpoint, payload)[0]

    def _post(self, endpoint: str, payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Post to one member after another until one answers, within the store timeout; returns
        the answer and whether an earlier attempt may have reached etcd (and been applied).

        An etcd refusal (a failed precondition, an unknown lease...) is an answer: ClusterError at
        once. Only "could not ask" (refused, reset, no answer in time, TLS) and etcd's transient
        errors (no leader, request timed out) move on to the next member.
        """
        deadline = time.monotonic() + self._timeout
        maybe_sent = False
        problems: dict[int, str] = {}
        broken: set[int] = set()  # TLS refused: the same again in the next round
        while True:
            for index in self.member_order():
                remaining = deadline - time.monotonic()
                if index in broken or remaining <= 0:
                    continue
                wait = min(remaining, self._attempt)
                try:
                    response = self._session.post(self.member_url(index, endpoint), json=payload, timeout=wait)
                except requests.exceptions.SSLError as err:
                    problems[index] = f"TLS: {validate.short(str(err), 160)}"
                    broken.add(index)
                    continue
                except requests.exceptions.ConnectTimeout:
                    problems[index] = f"no connection within {wait:.1f} s"
                    continue
                except requests.exceptions.Timeout:
                    problems[index] = f"no answer within {wait:.1f} s"
                    maybe_sent = True
                    continue
                except requests.RequestException as err:
                    problems[index] = connection_problem(err)
                    maybe_sent = maybe_sent or problems[index] != "connection refused"
                    continue
                answer, problem = self._answer(endpoint, response)
                if answer is not None:
                    self.answered(index)
                    return answer, maybe_sent
                problems[index] = problem
                maybe_sent = True
            if len(broken) == len(self.members) or time.monotonic() + ROUND_PAUSE >= deadline:
                break
            time.sleep(ROUND_PAUSE)
        tried = "; ".join(f"{self.members[i]}: {problems[i]}" for i in sorted(problems))
        raise ClusterError(f"cluster store {self.url}: no etcd member answered {endpoint} within "
                           f"{self._timeout:g} s ({tried}): {GIVE_UP_FIX}")

    def _answer(self, endpoint: str, response: requests.Response) -> tuple[dict[str, Any] | None, str]:
        """The JSON of a member's answer, or (None, why) if another member should be asked."""
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if response.status_code == 200 and isinstance(doc, dict):
            return doc, ""
        message = str(doc.get("message") or doc.get("error")) if isinstance(doc, dict) else response.text
        detail = validate.short(message.strip() or f"HTTP {response.status_code}", 160)
        if response.status_code in (503, 504) or any(word in message for word in TRANSIENT):
            return None, detail
        raise ClusterError(f"cluster store {self.url}: {endpoint} failed: {detail}")

    def _get_range(self, key: str, prefix: bool = False) -> tuple[builtins.list[KV], int]:
        """Keys and the store revision they were read at."""
        request = _range(key, prefix)["request_range"]
        answer = self._call("kv/range", request)
        return [KV.parse(kv) for kv in answer.get("kvs", [])], int(answer["header"]["revision"])

    def _transact(
        self,
        compare: builtins.list[dict[str, Any]],
        success: builtins.list[dict[str, Any]],
        failure: builtins.list[dict[str, Any]],
    ) -> tuple[bool, builtins.list[builtins.list[KV]], int]:
        answer = self._call("kv/txn", {"compare": compare, "success": success, "failure": failure})
        ranges = [
            [KV.parse(kv) for kv in response["response_range"].get("kvs", [])]
            for response in answer.get("responses", [])
            if "response_range" in response
        ]
        return bool(answer.get("succeeded")), ranges, int(answer["header"]["revision"])

    def _txn(
        self,
        compare: builtins.list[dict[str, Any]],
        success: builtins.list[dict[str, Any]],
        failure: builtins.list[dict[str, Any]] | None = None,
    ) -> tuple[bool, builtins.list[builtins.list[KV]]]:
        """Run a transaction; returns whether the compares held and the keys of its range requests."""
        ok, ranges, _ = self._transact(compare, success, failure or [])
        return ok, ranges

    def _snapshot(self, *ranges: dict[str, Any]) -> tuple[builtins.list[builtins.list[KV]], int]:
        """Several ranges read at one revision, and that revision."""
        _, found, revision = self._transact([], list(ranges), [])
        return found, revision

    def _read(self, *ranges: dict[str, Any]) -> builtins.list[builtins.list[KV]]:
        return self._snapshot(*ranges)[0]

    def _grant(self, ttl: float) -> int:
        # etcd leases have whole seconds, at least 2 with the default heartbeat settings.
        return int(self._call("lease/grant", {"TTL": math.ceil(ttl)})["ID"])

    def _keepalive(self, lease: int) -> bool:
        return int(self._call("lease/keepalive", {"ID": lease}).get("result", {}).get("TTL", -1)) > 0

    def _next_id(self, counter: str) -> int:
        """Atomic fetch-and-increment: every put raises a key's version by exactly one, and the put
        returns the previous version. Unlike a compare-and-swap loop on a value, concurrent
        allocators never retry; an ID drawn by a caller that then loses a race is simply skipped.
        The counter key is never deleted, so its version never restarts.
        """
        previous = self._call("kv/put", {"key": _b64(counter), "value": "", "prev_kv": True}).get("prev_kv")
        return int(previous.get("version", 0)) + 1 if previous else 1

    def _revoke(self, lease: int) -> None:
        try:
            self._call("kv/lease/revoke", {"ID": lease})
        except ClusterError as err:
            if "lease not found" not in str(err):
                raise

    # -- records ---------------------------------------------------------------------------------

    def _get(self, kind: str, name: str) -> tuple[Record | None, int]:
        kvs, _ = self._get_range(self._key("records", kind, name))
        return (kvs[0].json(), kvs[0].mod) if kvs else (None, 0)

    def _items(self, kind: str) -> builtins.list[tuple[str, Record]]:
        kvs, _ = self._get_range(self._key("records", kind, ""), prefix=True)
        return [(kv.last, kv.json()) for kv in kvs]

    def _put(self, kind: str, name: str, text: str) -> None:
        self._call("kv/put", _put(self._key("records", kind, name), text)["request_put"])

    def _delete(self, kind: str, name: str) -> bool:
        answer = self._call("kv/txn", {"success": [_delete(self._key("records", kind, name)),
                                                   _delete(self._key("writes", kind, name))]})
        return int(answer["responses"][0]["response_delete_range"].get("deleted", 0)) > 0

    def _swap(self, kind: str, name: str, text: str | None, revision: int, fence: Fence | None = None) -> bool:
        key, nonce_key = self._key("records", kind, name), self._key("writes", kind, name)
        nonce = uuid.uuid4().hex
        write = [_delete(key), _delete(nonce_key)] if text is None else [_put(key, text), _put(nonce_key, nonce)]
        compare = [_compare(key, "MOD", "EQUAL", revision)]
        # With a fence, the same transaction also requires the lock key as we took it (same
        # modification revision, so neither expired nor re-taken).
        lock = self._key("locks", fence.lock) if fence else None
        if lock is not None and fence is not None:
            compare.append(_compare(lock, "MOD", "EQUAL", fence.token))
        # the failure branch reads the nonce (did an attempt cut off by a dying member land?) and the lock
        failure = [_range(nonce_key)] + ([_range(lock)] if lock is not None else [])
        answer, maybe_sent = self._post("kv/txn", {"compare": compare, "success": write, "failure": failure})
        if answer.get("succeeded"):
            return True
        seen = [[KV.parse(kv) for kv in r["response_range"].get("kvs", [])] for r in answer.get("responses", [])]
        if maybe_sent and text is not None and seen[0] and seen[0][0].value == nonce:
            return True
        if fence is not None and (not seen[1] or seen[1][0].mod != fence.token):
            who = seen[1][0].json().get("holder", "?") if seen[1] else "nobody"
            raise LeaseLostError(f"lock {fence.lock} is no longer held by {fence.holder} (now: {who})")
        return False

    def _lock_holder(self, name: str) -> str | None:
        kvs, _ = self._get_range(self._key("locks", name))
        return str(kvs[0].json().get("holder")) if kvs else None

    def _lock_token(self, name: str, holder: str) -> int:
        kvs, _ = self._get_range(self._key("locks", name))
        if not kvs or kvs[0].json().get("holder") != holder:
            raise LeaseLostError(f"lock {name} is not held by {holder}")
        return kvs[0].mod

    # -- locks -----------------------------------------------------------------------------------

    def _try_lock(self, name: str, holder: str, ttl: float) -> str:
        key = self._key("locks", name)
        kvs, _ = self._get_range(key)
        while True:
            if kvs:
                current = str(kvs[0].json()["holder"])
                if current != holder or self._keepalive(kvs[0].lease):
                    return current
            lease = self._grant(ttl)
            ok, seen = self._txn(
                [_compare(key, "MOD", "EQUAL", kvs[0].mod if kvs else 0)],
                [_put(key, json.dumps({"holder": holder}), lease)],
                [_range(key)],
            )
            # on our own lease: this write landed in an attempt cut off by a dying member
            if ok or (seen[0] and seen[0][0].lease == lease):
                return holder
            self._revoke(lease)
            (kvs,) = seen

    def _release_lock(self, name: str, holder: str) -> bool:
        # Revoking our lease is safe even if the lock expired meanwhile: a new holder has its own lease.
        kvs, _ = self._get_range(self._key("locks", name))
        if not kvs or kvs[0].json()["holder"] != holder:
            return False
        self._revoke(kvs[0].lease)
        return True

    # -- nodes and election ----------------------------------------------------------------------

    def _node(self, kv: KV, state: str | None = None) -> Node:
        doc = kv.json()
        return Node(doc["id"], doc["name"], doc["address"], doc["ttl"], state or doc["state"], doc["lease"])

    def _register(self, name: str, address: str, ttl: float) -> Node:
        name_key = self._key("node-names", name)
        lease = self._grant(ttl)
        try:
            while True:
                names, _ = self._get_range(name_key)
                if names:
                    node_id = int(names[0].value)
                    records, alive = self._read(
                        _range(self._key("nodes", node_id)), _range(self._key("alive", node_id))
                    )
                    if alive and alive[0].lease == lease:  # ours, from an attempt cut off by a dying member
                        return self._node(records[0])
                    if alive:
                        raise ConflictError(
                            f"node {name} is already registered as node {node_id} with a live lease; a restarted "
                            f"node can register again once that lease expires (within {records[0].json()['ttl']:g} s)"
                        )
                    compare = [
                        _compare(self._key("nodes", node_id), "MOD", "EQUAL", records[0].mod if records else 0),
                        _compare(self._key("alive", node_id), "CREATE", "EQUAL", 0),
                    ]
                    claim = []
                else:
                    node_id = self._next_id(self._key("node-seq"))
                    compare = [_compare(name_key, "CREATE", "EQUAL", 0)]
                    claim = [_put(name_key, str(node_id))]
                node = Node(node_id, name, address, ttl, ALIVE, lease)
                written = [
                    _put(self._key("nodes", node_id), json.dumps(asdict(node))),
                    _put(self._key("alive", node_id), str(lease), lease),
                ]
                if self._txn(compare, claim + written)[0]:
                    return node
        except BaseException:
            with contextlib.suppress(ClusterError):
                self._revoke(lease)
            raise

    def heartbeat(self, node_id: int) -> bool:
        kvs, _ = self._get_range(self._key("alive", node_id))
        return bool(kvs) and self._keepalive(kvs[0].lease)

    def deregister_node(self, node_id: int) -> None:
        node_key = self._key("nodes", node_id)
        records, alive = self._read(_range(node_key), _range(self._key("alive", node_id)))
        if not records:
            raise NotFoundError(f"node {node_id} is not registered")
        node = self._node(records[0])
        if node.state == ALIVE:
            # Mark the goodbye before the lease ends, or the primary would alert a lost node.
            left = Node(node.id, node.name, node.address, node.ttl, LEFT, node.lease)
            self._txn([_compare(node_key, "MOD", "EQUAL", records[0].mod)], [_put(node_key, json.dumps(asdict(left)))])
        if alive:
            self._revoke(alive[0].lease)

    def _nodes_with_kv(self) -> builtins.list[tuple[Node, KV]]:
        records, alive = self._read(_range(self._key("nodes", ""), True), _range(self._key("alive", ""), True))
        leases = {int(kv.last): kv.lease for kv in alive}
        nodes = []
        for kv in records:
            node = self._node(kv)
            if node.state == ALIVE and leases.get(node.id) != node.lease:
                node = self._node(kv, LOST)
            nodes.append((node, kv))
        return sorted(nodes, key=lambda pair: pair[0].id)

    def nodes(self) -> builtins.list[Node]:
        return [node for node, _ in self._nodes_with_kv()]

    def _mark_lost(self) -> builtins.list[Node]:
        lost = []
        for node, kv in self._nodes_with_kv():
            flip = [_compare(kv.key, "MOD", "EQUAL", kv.mod)], [_put(kv.key, json.dumps(asdict(node)))]
            if node.state == LOST and kv.json()["state"] == ALIVE and self._txn(*flip)[0]:
                lost.append(node)
        return lost

    def campaign(self, node_id: int) -> bool:
        key, alive_key = self._key("primary"), self._key("alive", node_id)
        primary, alive = self._read(_range(key), _range(alive_key))
        if primary or not alive:
            return bool(primary) and int(primary[0].value) == node_id
        ok, seen = self._txn(
            [_compare(key, "CREATE", "EQUAL", 0), _compare(alive_key, "MOD", "EQUAL", alive[0].mod)],
            [_put(key, str(node_id), alive[0].lease)],
            [_range(key)],
        )
        return ok or (bool(seen[0]) and int(seen[0][0].value) == node_id)

    def primary(self) -> int | None:
        kvs, _ = self._get_range(self._key("primary"))
        return int(kvs[0].value) if kvs else None

    # -- IDs -------------------------------------------------------------------------------------

    def _allocate_client_id(self, guest: str) -> int:
        key = self._key("clients", guest)
        known, _ = self._get_range(key)
        if known:
            return int(known[0].value)
        client_id = self._next_id(self._key("client-seq"))
        ok, seen = self._txn(
            [_compare(key, "CREATE", "EQUAL", 0)],
            [_put(key, str(client_id)), _put(self._key("client-ids", client_id), guest)],
            [_range(key)],
        )
        return client_id if ok else int(seen[0][0].value)

    def _allocate_adapter_id(self, client_id: int, adapter: str) -> int:
        owner_key, key = self._key("client-ids", client_id), self._key("adapters", client_id, adapter)
        owner, known = self._read(_range(owner_key), _range(key))
        if owner and not known:
            adapter_id = self._next_id(self._key("adapter-seq", client_id))
            ok, seen = self._txn(
                [_compare(owner_key, "CREATE", "GREATER", 0), _compare(key, "CREATE", "EQUAL", 0)],
                [_put(key, str(adapter_id))],
                [_range(owner_key), _range(key)],
            )
            if ok:
                return adapter_id
            owner, known = seen
        if not owner:
            raise NotFoundError(f"client ID {client_id} is not allocated")
        return int(known[0].value)

    def _release_client_id(self, guest: str) -> bool:
        key = self._key("clients", guest)
        kvs, _ = self._get_range(key)
        if not kvs:
            return False
        client_id = kvs[0].value
        return self._txn(
            [_compare(key, "MOD", "EQUAL", kvs[0].mod)],
            [
                _delete(key),
                _delete(self._key("client-ids", client_id)),
                _delete(self._key("adapter-seq", client_id)),
                _delete(self._key("adapters", client_id, ""), prefix=True),
            ],
        )[0]

    def clients(self) -> dict[str, int]:
        kvs, _ = self._get_range(self._key("clients", ""), prefix=True)
        return dict(sorted(((kv.last, int(kv.value)) for kv in kvs), key=lambda pair: pair[1]))

    def adapters(self) -> builtins.list[Adapter]:
        kvs, _ = self._get_range(self._key("adapters", ""), prefix=True)
        found = [Adapter(int(kv.key.split("/")[-2]), kv.last, int(kv.value)) for kv in kvs]
        return sorted(found, key=lambda a: (a.client_id, a.id))

    # -- LU reservations -------------------------------------------------------------------------

    @staticmethod
    def _reservation(kv: KV) -> Reservation:
        lu, node, client = kv.key.split("/")[-3:]
        return Reservation(lu, int(node), client, kv.json()["mode"])

    def _reserve(self, reservation: Reservation) -> builtins.list[Reservation]:
        lu, node, client, mode = reservation.lu, reservation.node, reservation.client, reservation.mode
        alive_key, lu_prefix = self._key("alive", node), self._key("reservations", lu, "")
        while True:
            (alive, held), revision = self._snapshot(_range(alive_key), _range(lu_prefix, True))
            if not alive:
                raise NotFoundError(f"node {node} has no live registration; it cannot reserve LU {lu}")
            others = [r for r in map(self._reservation, held) if (r.node, r.client) != (node, client)]
            conflicts = sorted((o for o in others if EXCLUSIVE in (mode, o.mode)), key=lambda r: (r.node, r.client))
            if conflicts:
                return conflicts
            # Nothing under the LU's prefix may have changed since the read: that is the serialisation
            # point between two nodes reserving the same LU at once.
            if self._txn(
                [
                    _compare(alive_key, "MOD", "EQUAL", alive[0].mod),
                    _compare(lu_prefix, "MOD", "LESS", revision + 1, prefix=True),
                ],
                [_put(self._key("reservations", lu, node, client), json.dumps({"mode": mode}), alive[0].lease)],
            )[0]:
                return []

    def _release(self, lu: str, node: int, client: str | None) -> int:
        key = self._key("reservations", lu, node, "" if client is None else client)
        answer = self._call("kv/deleterange", _delete(key, prefix=client is None)["request_delete_range"])
        return int(answer.get("deleted", 0))

    def _reservations(self, lu: str | None) -> builtins.list[Reservation]:
        kvs, _ = self._get_range(self._key("reservations", *([] if lu is None else [lu]), ""), prefix=True)
        return sorted(map(self._reservation, kvs), key=lambda r: (r.lu, r.node, r.client))

    # -- events ----------------------------------------------------------------------------------

    def _publish(self, event: Event) -> int:
        # Create-only: a repeat after a member died before answering finds the event already there
        # (and its sequence number) instead of publishing it a second time.
        key = self._key("events", uuid.uuid4().hex)
        text = json.dumps(event.to_json(), sort_keys=True)
        ok, seen, revision = self._transact([_compare(key, "CREATE", "EQUAL", 0)], [_put(key, text)], [_range(key)])
        return revision if ok else seen[0][0].mod

    def _subscribe(self, event_filter: EventFilter, after: int | None) -> Subscription:
        if after is None:
            _, after = self._get_range(self._key("events", ""))
        return EtcdSubscription(self, event_filter, after)

    def watch_body(self, after: int) -> dict[str, Any]:
        """The body of a watch on the events prefix from the revision after ``after``."""
        prefix = self._key("events", "")
        create = {
            "key": _b64(prefix),
            "range_end": _b64(_prefix_end(prefix)),
            "start_revision": after + 1,
            "filters": ["NODELETE"],
        }
        return {"create_request": create}

    @property
    def timeout(self) -> float:
        return self._timeout

    def close(self) -> None:
        self._session.close()


class EtcdSubscription(Subscription):
    """Events from an etcd watch stream, read by a thread into a queue.

    A dropped stream (its member died or restarted) is re-opened on the next member from the
    revision after the last event received, so nothing is lost or repeated; if no member answers
    for longer than the store timeout, get() raises ClusterError.
    """

    def __init__(self, store: EtcdStore, event_filter: EventFilter, after: int) -> None:
        super().__init__(event_filter, after)
        self._store = store
        self._queue: queue.Queue[builtins.list[Event]] = queue.Queue()
        self._error: ClusterError | None = None
        self._session = store.session()
        self._mutex = threading.Lock()
        self._response: requests.Response | None = None
        self._thread = threading.Thread(target=self._watch, args=(after,), name="etcd-watch", daemon=True)
        self._thread.start()

    def _watch(self, after: int) -> None:
        failing_since: float | None = None
        order = self._store.member_order()
        member = order[0]
        while not self.closed:
            body = self._store.watch_body(after)
            try:
                url = self._store.member_url(member, "watch")
                with self._session.post(url, json=body, stream=True, timeout=(self._store.timeout, None)) as response:
                    with self._mutex:
                        if self.closed:
                            return
                        self._response = response
                    response.raise_for_status()
                    for line in response.iter_lines(chunk_size=None):
                        if line:
                            after = self._deliver(json.loads(line), after)
                            failing_since = None
                            self._store.answered(member)
                problem = "the watch stream ended"
            except (requests.RequestException, ValueError) as err:
                problem = connection_problem(err) if isinstance(err, requests.RequestException) else str(err)
            except ClusterError as err:
                self._fail(err)
                return
            if self.closed:
                return
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > self._store.timeout:
                self._fail(ClusterError(
                    f"cluster store {self._store.url}: event watch lost: no etcd member answered for "
                    f"{self._store.timeout:g} s (last: {self._store.members[member]}: {problem}): {GIVE_UP_FIX}"
                ))
                return
            # Resume from the next member: the stream broke because this one died, or it will tell.
            member = order[(order.index(member) + 1) % len(order)]
            time.sleep(WATCH_RECONNECT_DELAY)

    def _deliver(self, message: dict[str, Any], after: int) -> int:
        """Queue the events of one watch response; returns the last revision delivered."""
        result = message.get("result")
        if result is None:
            raise ClusterError(f"cluster store {self._store.url}: event watch refused: {message.get('error')}")
        if "compact_revision" in result:
            raise ClusterError(
                f"cluster store {self._store.url}: events after {after} were compacted away; "
                "subscribe again without a starting point and re-read the store"
            )
        events = []
        for raw in result.get("events", []):
            kv = KV.parse(raw["kv"])
            events.append(Event.from_json(kv.json(), kv.mod))
        if events:
            self._queue.put(events)
            return events[-1].seq
        return after

    def _fail(self, error: ClusterError) -> None:
        self._error = error
        self._queue.put([])

    def _fetch(self, timeout: float | None) -> builtins.list[Event]:
        if self._error is not None:
            raise self._error
        try:
            events = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        if self._error is not None:
            raise self._error
        return events

    def close(self) -> None:
        super().close()
        with self._mutex:
            response = self._response
        if response is not None:
            # Closing a streaming response does not wake a thread blocked reading it; shutting the
            # socket down does (through a duplicate descriptor, the response keeps its own).
            try:
                with socket.socket(fileno=os.dup(response.raw.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError, AttributeError):  # the response may be closed already
                pass
        self._queue.put([])
        self._thread.join(timeout=self._store.timeout)
        self._session.close()
