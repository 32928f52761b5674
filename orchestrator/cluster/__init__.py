"""Cluster store: the VIOS cluster database, node membership, IDs, reservations, events, election.

``open_store(url)`` gives a ``ClusterStore`` (SQLite on one host, etcd across hosts);
``NodeAgent`` keeps a node registered, primary-elected and reconciled with the store.
"""

from .election import NodeAgent
from .events import ALERT, LIFECYCLE, Event, EventFilter, Subscription
from .open import open_store
from .store import (
    EXCLUSIVE,
    SHARED_READ,
    Adapter,
    ClusterStore,
    Node,
    Record,
    Registration,
    Reservation,
)

__all__ = [
    "ALERT",
    "EXCLUSIVE",
    "LIFECYCLE",
    "SHARED_READ",
    "Adapter",
    "ClusterStore",
    "Event",
    "EventFilter",
    "Node",
    "NodeAgent",
    "Record",
    "Registration",
    "Reservation",
    "Subscription",
    "open_store",
]
