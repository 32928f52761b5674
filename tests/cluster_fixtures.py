"""Fixtures for the cluster store's tests: one real etcd per session, a 3-member etcd cluster whose
members a test can kill and restart, a fresh store per test on each backend.

Kept out of conftest.py (which belongs to the whole test suite) and imported by test_cluster.py.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from orchestrator.cluster import ClusterStore, open_store

ETCD_SH = Path(__file__).resolve().parent.parent / "scripts" / "etcd.sh"
# "etcd-cluster": the same store suite through a URL naming all three members of a cluster.
BACKENDS = ["sqlite", pytest.param("etcd", marks=pytest.mark.etcd),
            pytest.param("etcd-cluster", marks=pytest.mark.etcd)]


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


def install_etcd() -> None:
    """etcd's binaries from Debian's packages (once per machine); skip if they cannot be had."""
    installed = subprocess.run([ETCD_SH, "install"], capture_output=True, text=True, timeout=600)
    if installed.returncode != 0:
        pytest.skip(f"etcd could not be installed from Debian packages: {installed.stderr.strip()}")


def lasting_ports(count: int) -> list[int]:
    """Free ports outside the kernel's ephemeral range: a killed etcd member must get its ports back
    when it restarts, and a port from that range may meanwhile be any outgoing connection's."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = [p for p in range(20000, 32768) if not low <= p <= high] or list(range(high + 1, 65536))
    found: list[int] = []
    for port in random.sample(candidates, len(candidates)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise AssertionError(f"no {count} free ports outside the ephemeral range {low}-{high}")


@pytest.fixture(scope="session")
def etcd_pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One CA, server and client certificate for every etcd of the session. ``OSIMG_ETCD_PKI``
    points every ``etcds://`` client of the session, subprocesses too, at them."""
    install_etcd()
    pki = tmp_path_factory.mktemp("etcd-pki") / "pki"
    subprocess.run([ETCD_SH, "pki", str(pki)], check=True, capture_output=True, timeout=60)
    before = os.environ.get("OSIMG_ETCD_PKI")
    os.environ["OSIMG_ETCD_PKI"] = str(pki)
    try:
        yield pki
    finally:
        if before is None:
            os.environ.pop("OSIMG_ETCD_PKI", None)
        else:
            os.environ["OSIMG_ETCD_PKI"] = before


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory, etcd_pki: Path) -> Iterator[str]:
    """A real etcd on 127.0.0.1 for the session, with TLS and client certificates (as osimg's set-up
    makes it), stopped by its PID at the end, even after failures."""
    port, peer_port = free_ports(2)
    started = subprocess.run(
        [ETCD_SH, "start", str(port), str(tmp_path_factory.mktemp("etcd")), str(peer_port), str(etcd_pki)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if started.returncode != 0:
        pytest.fail(f"etcd did not start: {started.stderr.strip()}")
    pid = started.stdout.strip()
    try:
        yield f"etcds://127.0.0.1:{port}"
    finally:
        subprocess.run([ETCD_SH, "stop", pid], check=True, timeout=30)


def alive(pid: int) -> bool:
    """The process runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class EtcdCluster:
    """A real 3-member etcd cluster on loopback (TLS for clients and peers, certificates in
    ``OSIMG_ETCD_PKI``), started by ``scripts/etcd.sh cluster-start``. Members are numbered 1..3;
    each has a PID file, so a test can kill one (SIGKILL, no goodbye) and start it again."""

    dir: Path
    ports: list[int]
    pki: Path

    @property
    def url(self) -> str:
        """``etcds://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3``: every member, no key prefix."""
        return "etcds://" + ",".join(self.address(i) for i in self.numbers)

    def store_url(self, prefix: str) -> str:
        """The cluster's URL with its own key prefix (one per test keeps tests apart)."""
        return f"{self.url}/{prefix}"

    @property
    def numbers(self) -> list[int]:
        return list(range(1, len(self.ports) + 1))

    def address(self, member: int) -> str:
        return f"127.0.0.1:{self.ports[member - 1]}"

    def member(self, address: str) -> int:
        """The number of the member serving clients at ``HOST:PORT``."""
        return self.numbers[[self.address(i) for i in self.numbers].index(address)]

    def pid(self, member: int) -> int | None:
        try:
            return int((self.dir / f"m{member}" / "etcd.pid").read_text())
        except (OSError, ValueError):
            return None

    def running(self, member: int) -> bool:
        pid = self.pid(member)
        return pid is not None and alive(pid)

    def kill(self, member: int) -> None:
        """SIGKILL the member (by its PID file), as a crashed host would lose it."""
        subprocess.run([ETCD_SH, "member-stop", str(self.dir), str(member), "KILL"], check=True, timeout=30)
        assert not self.running(member)

    def start(self, member: int) -> None:
        """Start a stopped member again; returns once it serves (it rejoins from its data folder)."""
        started = subprocess.run([ETCD_SH, "member-start", str(self.dir), str(member)], capture_output=True,
                                 text=True, timeout=60)
        assert started.returncode == 0, f"etcd member {member} did not start again: {started.stderr.strip()}"

    def revive(self) -> None:
        """Start every member that is not running (after a test killed some)."""
        for member in self.numbers:
            if not self.running(member):
                self.start(member)

    def leader(self, wait: float = 10.0) -> int:
        """The number of the member that leads the cluster now (asked of each running member),
        waiting up to ``wait`` seconds while an election is under way."""
        deadline = time.monotonic() + wait
        with requests.Session() as s:
            s.trust_env = False
            s.verify = str(self.pki / "ca.crt")
            s.cert = (str(self.pki / "client.crt"), str(self.pki / "client.key"))
            while True:
                ids: dict[str, int] = {}
                leaders = set()
                for member in self.numbers:
                    if not self.running(member):
                        continue
                    try:
                        status = s.post(f"https://{self.address(member)}/v3/maintenance/status", json={},
                                        timeout=2).json()
                    except requests.RequestException:
                        continue
                    ids[status["header"]["member_id"]] = member
                    leaders.add(status.get("leader", "0"))
                if len(leaders) == 1 and (leader := leaders.pop()) in ids:
                    return ids[leader]
                if time.monotonic() > deadline:
                    raise AssertionError(f"no leader agreed on by the etcd members within {wait:g} s")
                time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run([ETCD_SH, "cluster-stop", str(self.dir)], check=True, timeout=60)
        still = [member for member in self.numbers if self.running(member)]
        assert not still, f"etcd members {still} still run after cluster-stop"


@pytest.fixture(scope="session")
def etcd_cluster_session(tmp_path_factory: pytest.TempPathFactory, etcd_pki: Path) -> Iterator[EtcdCluster]:
    """The session's 3-member cluster; tests use ``etcd_cluster``, which revives killed members."""
    ports = lasting_ports(6)
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-cluster"), ports[:3], etcd_pki)
    started = subprocess.run([ETCD_SH, "cluster-start", str(cluster.dir), str(etcd_pki), *map(str, ports)],
                             capture_output=True, text=True, timeout=120)
    try:
        if started.returncode != 0:
            pytest.fail(f"the etcd cluster did not start: {started.stderr.strip()}")
        yield cluster
    finally:
        cluster.stop()  # by the PID files, also after a failed start or a failed test


@pytest.fixture
def etcd_cluster(etcd_cluster_session: EtcdCluster) -> Iterator[EtcdCluster]:
    """A real 3-member etcd cluster, every member running when the test starts: ``.url`` names all
    three, ``.kill(n)`` / ``.start(n)`` lose and bring back member n (1..3), ``.member(address)``
    and ``.leader()`` tell which member to lose. Members a test killed are started again after it."""
    etcd_cluster_session.revive()
    yield etcd_cluster_session
    etcd_cluster_session.revive()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty store: a new SQLite file, or a new key prefix in the session's etcd or etcd cluster."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'cluster.sqlite'}"
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    if request.param == "etcd-cluster":
        cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
        return cluster.store_url(prefix)
    return f"{request.getfixturevalue('etcd_url')}/{prefix}"


@pytest.fixture
def store(store_url: str) -> Iterator[ClusterStore]:
    with open_store(store_url) as opened:
        yield opened
