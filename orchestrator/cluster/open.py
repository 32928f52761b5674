"""Choosing a cluster store backend by URL: the one place that knows every backend.

Its own module so ``store`` (the interface) needs no backend and the backends need only ``store``.
"""

from __future__ import annotations

import ipaddress
import os
import re
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


MAX_MEMBERS = 9
# A DNS name (letters, digits, '-', dots between labels), an IPv4 address, or [IPv6].
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_RE = re.compile(rf"^(?:{LABEL}(?:\.{LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\])$", re.ASCII)
DOTTED_RE = re.compile(r"^[0-9.]+$", re.ASCII)
PORT_RE = re.compile(r"^[0-9]{1,5}$", re.ASCII)


def members(netloc: str, url: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]`` of an etcd URL: (host, port) of each member, checked."""
    cut = validate.short(url)
    found = []
    for member in netloc.split(","):
        host, sep, port = member.rpartition(":")
        if not sep or not host or not member:
            raise ValidationError(f"invalid cluster store URL {cut}: member {validate.short(member, 40)} "
                                  "is not HOST:PORT")
        if len(host) > 253 or not HOST_RE.match(host):
            raise ValidationError(f"invalid cluster store URL {cut}: member host {validate.short(host, 40)} is not "
                                  "a host name, an IPv4 address or an [IPv6] address")
        if host.startswith("[") or DOTTED_RE.match(host):
            try:
                ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                raise ValidationError(f"invalid cluster store URL {cut}: {validate.short(host, 40)} "
                                      "is not an IP address") from None
        if not PORT_RE.match(port) or not 1 <= int(port) <= 65535:
            raise ValidationError(f"invalid cluster store URL {cut}: member port {validate.short(port, 20)} "
                                  "is not a number in 1..65535")
        found.append((host.strip("[]"), int(port)))
    if len(found) > MAX_MEMBERS:
        raise ValidationError(f"invalid cluster store URL {cut}: {len(found)} members, at most {MAX_MEMBERS} "
                              "(etcd recommends 3, 5 or 7)")
    twice = sorted({f"{h}:{p}" for h, p in found if found.count((h, p)) > 1})
    if twice:
        raise ValidationError(f"invalid cluster store URL {cut}: member {validate.short(twice[0], 60)} named twice")
    return found


def open_store(url: str, timeout: float = DEFAULT_TIMEOUT) -> ClusterStore:
    """Open a cluster store by URL.

    ``sqlite:///abs/path.sqlite``, ``sqlite://relative.sqlite`` or a plain path: SQLite.
    ``etcds://HOST:PORT[,HOST:PORT...][/prefix][?pki=DIR]``: etcd v3 (>= 3.4) over TLS, the server
    verified against ``DIR/ca.crt`` and the client authenticated by ``DIR/client.crt`` (default DIR:
    ``default_pki``). Name every member of the cluster (at most ``MAX_MEMBERS``): calls go on while
    any member with a quorum answers (see ``etcd``).
    ``etcd://HOST:PORT[,...][/prefix]``: the same in plain HTTP, for an etcd without TLS (any local
    process can then write the store: use it only for throw-away tests). Keys live under ``prefix``
    (default ``/osimg``). ``timeout`` bounds each call: SQLite's busy wait for the write lock, etcd's
    HTTP requests over every member together.
    """
    if not isinstance(url, str) or not url:
        raise ValidationError(f"invalid cluster store URL {validate.short(url)}")
    if "://" not in url or url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path:
            raise ValidationError(f"invalid cluster store URL {validate.short(url)}: no database path")
        return SqliteStore(path, timeout)
    if url.startswith(("etcd://", "etcds://")):
        try:
            parts = urlsplit(url)
        except ValueError as err:
            raise ValidationError(f"invalid cluster store URL {validate.short(url)}: {err}") from None
        if not parts.netloc or "@" in parts.netloc or parts.fragment:
            raise ValidationError(f"invalid cluster store URL {validate.short(url)}: expected "
                                  f"{parts.scheme}://HOST:PORT[,HOST:PORT...][/prefix]")
        found = members(parts.netloc, url)
        prefix = parts.path.rstrip("/") or "/osimg"
        for part in prefix.split("/")[1:]:
            validate.name(part, f"key prefix component in {validate.short(url)}")
        pki = None
        if parts.scheme == "etcds":
            given = parse_qs(parts.query).get("pki")
            pki = Path(given[-1]) if given else default_pki()
        elif parts.query:
            raise ValidationError(f"invalid cluster store URL {validate.short(url)}: options need etcds://")
        return EtcdStore(found, prefix, timeout, pki=pki)
    raise ValidationError(f"invalid cluster store URL {validate.short(url)}: expected sqlite://PATH, a path, "
                          "etcds://HOST:PORT[,HOST:PORT...] or etcd://HOST:PORT[,...]")
