"""Choosing a cluster store backend by URL: the one place that knows every backend.

Its own module so ``store`` (the interface) needs no backend and the backends need only ``store``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .. import validate
from ..errors import ValidationError
from .etcd import EtcdStore
from .sqlite import SqliteStore
from .store import DEFAULT_TIMEOUT, ClusterStore


def open_store(url: str, timeout: float = DEFAULT_TIMEOUT) -> ClusterStore:
    """Open a cluster store by URL.

    ``sqlite:///abs/path.sqlite``, ``sqlite://relative.sqlite`` or a plain path: SQLite.
    ``etcd://HOST:PORT[/prefix]``: etcd v3 (>= 3.4), keys under ``prefix`` (default ``/osimg``).
    ``timeout`` bounds each call: SQLite's busy wait for the write lock, etcd's HTTP requests.
    """
    if not isinstance(url, str) or not url:
        raise ValidationError(f"invalid cluster store URL {url!r}")
    if "://" not in url or url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path:
            raise ValidationError(f"invalid cluster store URL {url!r}: no database path")
        return SqliteStore(path, timeout)
    if url.startswith("etcd://"):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ValidationError(f"invalid cluster store URL {url!r}: expected etcd://HOST:PORT[/prefix]")
        prefix = parts.path.rstrip("/") or "/osimg"
        for part in prefix.split("/")[1:]:
            validate.name(part, f"key prefix component in {url}")
        return EtcdStore(parts.hostname, port, prefix, timeout)
    raise ValidationError(f"invalid cluster store URL {url!r}: expected sqlite://PATH, a path, or etcd://HOST:PORT")
