"""Fixtures for test_cluster.py: one real etcd per session, a fresh store per test on each backend.

Kept out of conftest.py (which belongs to the whole test suite) and imported by test_cluster.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cluster import ClusterStore, open_store

ETCD_SH = Path(__file__).resolve().parent.parent / "scripts" / "etcd.sh"
BACKENDS = ["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)]


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now, all different (held open together while picking)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real etcd on 127.0.0.1 for the session, with TLS and client certificates (as osimg's set-up
    makes it), stopped by its PID at the end, even after failures. ``OSIMG_ETCD_PKI`` points every
    ``etcds://`` client of the session, subprocesses too, at its certificates."""
    installed = subprocess.run([ETCD_SH, "install"], capture_output=True, text=True, timeout=600)
    if installed.returncode != 0:
        pytest.skip(f"etcd could not be installed from Debian packages: {installed.stderr.strip()}")
    port, peer_port = free_ports(2)
    pki = tmp_path_factory.mktemp("etcd-pki") / "pki"
    subprocess.run([ETCD_SH, "pki", str(pki)], check=True, capture_output=True, timeout=60)
    started = subprocess.run(
        [ETCD_SH, "start", str(port), str(tmp_path_factory.mktemp("etcd")), str(peer_port), str(pki)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if started.returncode != 0:
        pytest.fail(f"etcd did not start: {started.stderr.strip()}")
    pid = started.stdout.strip()
    before = os.environ.get("OSIMG_ETCD_PKI")
    os.environ["OSIMG_ETCD_PKI"] = str(pki)
    try:
        yield f"etcds://127.0.0.1:{port}"
    finally:
        if before is None:
            os.environ.pop("OSIMG_ETCD_PKI", None)
        else:
            os.environ["OSIMG_ETCD_PKI"] = before
        subprocess.run([ETCD_SH, "stop", pid], check=True, timeout=30)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty store: a new SQLite file, or a new key prefix in the session's etcd."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'cluster.sqlite'}"
    return f"{request.getfixturevalue('etcd_url')}/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(store_url: str) -> Iterator[ClusterStore]:
    with open_store(store_url) as opened:
        yield opened
