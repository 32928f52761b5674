"""Cluster events: lifecycle and alert notifications with a store-wide sequence number.

An event only says *that* an object changed (``obj="lu/data-1"``, ``type="detached"``); subscribers
re-read the store for the current state, so a slow subscriber never acts on stale event data.
Sequence numbers grow monotonically in commit order, which gives every subscriber the same order and
lets one resume exactly where it stopped (``subscribe(after=sub.last_seq)``).
"""

from __future__ import annotations

import abc
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from .. import validate
from ..errors import ValidationError

LIFECYCLE = "lifecycle"
ALERT = "alert"
KINDS = (LIFECYCLE, ALERT)

# The types other modules publish today; a new one needs no change here, only a safe name.
CREATED = "created"
ATTACHED = "attached"
DETACHED = "detached"
DELETED = "deleted"
SWAPPED = "swapped"
NODE_LOST = "node-lost"
EXPORT_FAILED = "export-failed"
RESERVATION_CONFLICT = "reservation-conflict"


@dataclass(frozen=True)
class Event:
    """One notification. ``seq`` and ``time`` are set by the store when it is published."""

    kind: str
    type: str
    obj: str
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "type": self.type, "obj": self.obj, "data": self.data, "time": self.time}

    @classmethod
    def from_json(cls, doc: dict[str, Any], seq: int) -> Event:
        return cls(doc["kind"], doc["type"], doc["obj"], doc.get("data", {}), seq, doc.get("time", 0.0))


def check_event(event: Event) -> Event:
    """Validate a caller's event and stamp its publication time."""
    if event.kind not in KINDS:
        raise ValidationError(f"invalid event kind {event.kind!r}: expected one of {', '.join(KINDS)}")
    validate.name(event.type, "event type")
    parts = event.obj.split("/") if isinstance(event.obj, str) else []
    if len(parts) != 2:
        raise ValidationError(f"invalid event object {event.obj!r}: expected 'KIND/NAME', e.g. 'lu/data-1'")
    validate.name(parts[0], "event object kind")
    validate.name(parts[1], "event object name")
    if not isinstance(event.data, dict):
        raise ValidationError(f"invalid event data for {event.obj}: expected a dict")
    return Event(event.kind, event.type, event.obj, event.data, 0, time.time())


@dataclass(frozen=True)
class EventFilter:
    """Which events a subscriber wants; an empty field matches everything."""

    kinds: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    obj_prefix: str = ""

    def matches(self, event: Event) -> bool:
        return (
            (not self.kinds or event.kind in self.kinds)
            and (not self.types or event.type in self.types)
            and event.obj.startswith(self.obj_prefix)
        )


class Subscription(abc.ABC):
    """Yields each matching event published after ``after`` exactly once, in sequence order.

    Backends only fetch raw batches (SQLite polls, etcd watches); ordering, de-duplication after a
    reconnect and filtering live here so that both behave the same.
    """

    def __init__(self, event_filter: EventFilter, after: int) -> None:
        self.filter = event_filter
        self.last_seq = after
        self.closed = False
        self._pending: deque[Event] = deque()

    @abc.abstractmethod
    def _fetch(self, timeout: float | None) -> list[Event]:
        """Events with ``seq > last_seq`` in order, waiting up to ``timeout`` (None: until closed)."""

    def get(self, timeout: float | None = None) -> Event | None:
        """Next matching event, or None if none arrived within ``timeout`` seconds or on close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            while self._pending:
                event = self._pending.popleft()
                if event.seq <= self.last_seq:
                    continue
                self.last_seq = event.seq
                if self.filter.matches(event):
                    return event
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._pending.extend(self._fetch(remaining))
        return None

    def __iter__(self) -> Iterator[Event]:
        while (event := self.get()) is not None:
            yield event

    def close(self) -> None:
        """Stop the subscription; a get() waiting in another thread returns None."""
        self.closed = True

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
