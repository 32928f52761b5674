"""Choosing a cluster store backend by URL: the one place that knows every backend.

Its own module so ``store`` (the interface) needs no backend and the backends need only ``store``.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .. import validate
from ..errors import ValidationError
from ..settings import DEFAULT_CACHE
from .etcd import EtcdStore
from .sqlite import SqliteStore
from .store import DEFAULT_TIMEOUT, ClusterStore


def default_pki() -> Path:
    """Where ``etcds://`` finds its certificates unless the URL says ``?pki=DIR``: ``OSIMG_ETCD_PKI``,
    else ``$OSIMG_CACHE/etcd/pki`` (made by ``scripts/etcd.sh pki``)."""
    explicit = os.environ.get("OSIMG_ETCD_PKI")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("OSIMG_CACHE") or DEFAULT_CACHE) / "etcd" / "pki"


def open_store(url: str, timeout: float = DEFAULT_TIMEOUT) -> ClusterStore:
    """Open a cluster store by URL.

    ``sqlite:///abs/path.sqlite``, ``sqlite://relative.sqlite`` or a plain path: SQLite.
    ``etcds://HOST:PORT[/prefix][?pki=DIR]``: etcd v3 (>= 3.4) over TLS, the server verified against
    ``DIR/ca.crt`` and the client authenticated by ``DIR/client.crt`` (default DIR: ``default_pki``).
    ``etcd://HOST:PORT[/prefix]``: the same in plain HTTP, for an etcd without TLS (any local process
    can then write the store: use it only for throw-away tests). Keys live under ``prefix``
    (default ``/osimg``). ``timeout`` bounds each call: SQLite's busy wait for the write lock, etcd's
    HTTP requests.
    """
    if not isinstance(url, str) or not url:
        raise ValidationError(f"invalid cluster store URL {url!r}")
    if "://" not in url or url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path:
            raise ValidationError(f"invalid cluster store URL {url!r}: no database path")
        return SqliteStore(path, timeout)
    if url.startswith(("etcd://", "etcds://")):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ValidationError(f"invalid cluster store URL {url!r}: expected {parts.scheme}://HOST:PORT[/prefix]")
        prefix = parts.path.rstrip("/") or "/osimg"
        for part in prefix.split("/")[1:]:
            validate.name(part, f"key prefix component in {url}")
        pki = None
        if parts.scheme == "etcds":
            given = parse_qs(parts.query).get("pki")
            pki = Path(given[-1]) if given else default_pki()
        elif parts.query:
            raise ValidationError(f"invalid cluster store URL {url!r}: options need etcds://")
        return EtcdStore(parts.hostname, port, prefix, timeout, pki=pki)
    raise ValidationError(f"invalid cluster store URL {url!r}: expected sqlite://PATH, a path, "
                          "etcds://HOST:PORT or etcd://HOST:PORT")
