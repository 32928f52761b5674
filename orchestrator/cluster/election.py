"""NodeAgent: keeps one node in the cluster and drives the primary election.

The store gives the primitives (registration, lease, campaign); a node needs someone to use them
all the time. The agent registers (retrying until a timeout, so a node that boots before the store
answers still joins, and one that never reaches it fails with a clear message), heartbeats every
ttl/3 from a thread, campaigns on every beat so that a primary that dies is replaced within its
ttl, and, while primary, reaps lost nodes (one ``node-lost`` alert each).

It keeps a local JSON copy of its registration and of the devices it owns (records of the device
kinds whose ``node`` field is this node's name). On start it rejoins: the store is the truth, so
devices deleted from the store while the node was away are dropped from the local copy and
reported in ``removed_on_rejoin``, for the caller to tear down what still serves them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import validate
from ..errors import ClusterError, ConflictError, OsimgError, ValidationError
from .store import ClusterStore, Record, Registration, check_ttl

log = logging.getLogger(__name__)

DEVICE_KINDS = ("lu", "export")
OWNER_FIELD = "node"
RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 1.0


class NodeAgent:
    """One node's membership: ``with NodeAgent(store, "vios-a", "127.0.0.1:10809", path) as agent:``."""

    def __init__(
        self,
        store: ClusterStore,
        name: str,
        address: str,
        state_path: str | Path,
        ttl: float = 10.0,
        timeout: float = 30.0,
        device_kinds: tuple[str, ...] = DEVICE_KINDS,
    ) -> None:
        self.store = store
        self.name = validate.name(name, "node name")
        self.address = address
        self.state_path = Path(state_path)
        self.ttl = check_ttl(ttl, f"node {name}")
        self.timeout = timeout
        self.device_kinds = tuple(validate.name(kind, "device kind") for kind in device_kinds)
        self.registration: Registration | None = None
        self.removed_on_rejoin: list[str] = []
        self.is_primary = False
        self._devices: dict[str, dict[str, Record]] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    @property
    def node_id(self) -> int:
        if self.registration is None:
            raise ClusterError(f"node {self.name} has not joined the cluster; start() it first")
        return self.registration.node.id

    def start(self) -> Registration:
        """Register, rejoin, then keep the lease alive from a thread until stop()."""
        self.registration = self._register()
        self.removed_on_rejoin = self.rejoin()
        self.is_primary = self.store.campaign(self.node_id)
        self._stop.clear()
        self._beater = threading.Thread(target=self._beat, name=f"heartbeat-{self.name}", daemon=True)
        self._beater.start()
        return self.registration

    def stop(self) -> None:
        """Stop heartbeating and leave the cluster cleanly (no node-lost alert)."""
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
            self._beater = None
        if self.registration is not None:
            self.store.deregister_node(self.node_id)
            self.is_primary = False

    def _register(self) -> Registration:
        deadline = time.monotonic() + self.timeout
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                return self.store.register_node(self.name, self.address, self.ttl)
            except (ClusterError, ConflictError) as err:
                last = err
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)
        if isinstance(last, ConflictError):
            raise ConflictError(f"node {self.name} could not join within {self.timeout:g} s: {last}")
        raise ClusterError(
            f"node {self.name} could not join: cluster store {self.store.url} did not answer within "
            f"{self.timeout:g} s ({last})"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.store.heartbeat(self.node_id):
                    # The lease ran out (store unreachable for longer than ttl): the store already
                    # dropped our reservations and primacy, so join again as after a restart.
                    log.warning("node %s: lease expired, registering again", self.name)
                    self.registration = self.store.register_node(self.name, self.address, self.ttl)
                    self.removed_on_rejoin += self.rejoin()
                self.is_primary = self.store.campaign(self.node_id)
                if self.is_primary:
                    self.store.reap_lost_nodes()
            except OsimgError as err:
                log.warning("node %s: heartbeat failed: %s", self.name, err)

    # -- devices and the local copy --------------------------------------------------------------

    def rejoin(self) -> list[str]:
        """Reconcile the local copy with the store; return ``kind/name`` of devices dropped locally."""
        with self._mutex:
            local = self._load().get("devices", {})
            fresh: dict[str, dict[str, Record]] = {}
            removed = []
            for kind in self.device_kinds:
                fresh[kind] = {
                    name: record for name, record in self.store.items(kind) if record.get(OWNER_FIELD) == self.name
                }
                removed += [f"{kind}/{name}" for name in sorted(local.get(kind, {})) if name not in fresh[kind]]
            self._devices = fresh
            self._save()
        for device in removed:
            log.info("node %s: %s was deleted while the node was away, dropped locally", self.name, device)
        return removed

    def track(self, kind: str, name: str, record: Record) -> Record:
        """Record a device this node owns, in the store and in the local copy."""
        if kind not in self.device_kinds:
            raise ValidationError(f"invalid device kind {kind!r}: expected one of {', '.join(self.device_kinds)}")
        owned = {**record, OWNER_FIELD: self.name}
        with self._mutex:
            self.store.put(kind, name, owned)
            self._devices.setdefault(kind, {})[name] = owned
            self._save()
        return owned

    def forget(self, kind: str, name: str) -> None:
        """Remove a device from the store and the local copy."""
        with self._mutex:
            self.store.delete(kind, name)
            self._devices.get(kind, {}).pop(name, None)
            self._save()

    def devices(self) -> dict[str, dict[str, Record]]:
        """The local copy of this node's devices, by kind and name."""
        with self._mutex:
            return copy.deepcopy(self._devices)

    def _load(self) -> dict[str, Any]:
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise ClusterError(f"cannot read local cluster state {self.state_path}: {err}") from None
        try:
            doc = json.loads(text)
        except ValueError as err:
            raise ValidationError(f"local cluster state {self.state_path} is not valid JSON: {err}") from None
        if not isinstance(doc, dict):
            raise ValidationError(f"local cluster state {self.state_path}: expected a JSON object")
        return doc

    def _save(self) -> None:
        """Write the local copy atomically: a crash leaves the old or the new file, never half of one."""
        registration = asdict(self.registration) if self.registration is not None else None
        doc = {"registration": registration, "devices": self._devices}
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
            os.replace(tmp, self.state_path)
        except OSError as err:
            raise ClusterError(f"cannot write local cluster state {self.state_path}: {err}") from None

    def __enter__(self) -> NodeAgent:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
