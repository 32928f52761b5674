"""A VIOS node: a daemon process that keeps the node in the cluster and serves its exports.

``osimg vios start NAME`` runs ``python -m orchestrator.vios.node NAME`` in the background. The
daemon

1. registers through ``NodeAgent`` (unique node ID, cluster config and status, a local copy in
   ``OSIMG_HOME/vios/NAME/node.json``; retries until a timeout when the store does not answer),
2. rejoins: exports deleted from the store while it was down are dropped from the local copy
   (``removed_on_rejoin``) and not served again,
3. starts its backend (a ``qemu-storage-daemon``, or a VIOS guest with ``--as-guest``) and serves
   the exports the store gives it, re-reading the store on every lifecycle event,
4. heartbeats; while it is the primary it also reaps lost nodes and fails clients over
   (``failover.check``) when a node serving them dies,
5. on SIGTERM unserves everything, stops the backend and leaves the cluster cleanly.

If its backend dies the daemon reports its exports failed (alerts) and exits without a goodbye,
so the rest of the cluster sees the node lost. Processes are started and stopped by PID only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from ..cluster.election import NodeAgent
from ..cluster.events import LIFECYCLE, EventFilter
from ..cluster.store import LU_KIND
from ..context import Context
from ..errors import ConflictError, NotFoundError, OsimgError, StorageError
from ..settings import private_dir
from ..validate import name as valid_name
from . import lus
from .backends import GuestBackend, QsdBackend
from .failover import check as check_failover
from .lus import EXPORT_KIND, FAILED, LU, NODE_KIND, SERVING, STANDBY, Export

log = logging.getLogger("osimg.vios")

DEFAULT_TTL = 5.0
RESYNC_EVERY = 2.0


class Backend(Protocol):
    kind: str

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def alive(self) -> str | None: ...

    def serving(self) -> set[str]: ...

    def serve(self, exp: Export, lu: LU) -> dict[str, Any]: ...

    def unserve(self, export: str) -> None: ...

    def stop(self) -> None: ...


@dataclass
class NodeInfo:
    """The node's own record (kind ``vios``): how to find and stop its processes."""

    name: str
    kind: str  # service | guest
    state: str  # starting | ready | stopped | failed
    pid: int
    backend_pid: int | None
    folder: str
    node_id: int | None = None
    domain: str | None = None
    error: str = ""
    removed_on_rejoin: list[str] | None = None
    started: float = 0.0


def folder(ctx: Context, name: str) -> Path:
    return ctx.settings.home / "vios" / name


class ViosNode:
    def __init__(self, ctx: Context, name: str, backend: Backend, ttl: float = DEFAULT_TTL,
                 join_timeout: float = 30.0) -> None:
        self.ctx = ctx
        self.name = valid_name(name, "VIOS node name")
        self.backend = backend
        self.folder = folder(ctx, name)
        self.agent = NodeAgent(ctx.store, name, f"unix:{self.folder}", self.folder / "node.json", ttl=ttl,
                               timeout=join_timeout, device_kinds=(EXPORT_KIND,))
        self.stopping = threading.Event()
        self._duty: threading.Thread | None = None
        self.info = NodeInfo(name, backend.kind, "starting", os.getpid(), None, str(self.folder), started=time.time())

    def _publish_info(self) -> None:
        self.ctx.store.put(NODE_KIND, self.name, asdict(self.info))

    def run(self) -> int:
        private_dir(self.folder)
        self._publish_info()
        reg = self.agent.start()
        self.info.node_id = reg.node.id
        self.info.removed_on_rejoin = list(self.agent.removed_on_rejoin)
        for dev in self.agent.removed_on_rejoin:
            log.info("%s: %s was deleted while this node was down; not serving it", self.name, dev)
        try:
            self.backend.start()
        except OsimgError as err:
            self.info.state, self.info.error = "failed", str(err)
            self._publish_info()
            self.agent.stop()
            raise
        self.info.backend_pid = self.backend.pid
        self.info.domain = getattr(self.backend, "domain", None)
        self.reconcile()
        self.info.state = "ready"
        self._publish_info()
        log.info("%s: node %d ready (%s, pid %s)", self.name, reg.node.id, self.backend.kind, self.backend.pid)
        code = self._loop()
        self._shutdown(clean=code == 0)
        return code

    def _loop(self) -> int:
        sub = self.ctx.store.subscribe(EventFilter(kinds=(LIFECYCLE,)))
        last = time.monotonic()
        try:
            while not self.stopping.is_set():
                ev = sub.get(timeout=0.25)
                dead = self.backend.alive()
                if dead is not None:
                    log.error("%s: backend died: %s", self.name, dead)
                    for name in self._mine():
                        lus.set_status(self.ctx, name, FAILED, dead)
                    self.info.state, self.info.error = "failed", dead
                    self._publish_info()
                    return 1
                changed = ev is not None and ev.obj.split("/")[0] in ("export", "lu")
                if changed or time.monotonic() - last > RESYNC_EVERY:
                    self.reconcile()
                    last = time.monotonic()
                if self.agent.is_primary and (self._duty is None or not self._duty.is_alive()):
                    # in a thread: a failover may wait for this very loop to open a standby export
                    self._duty = threading.Thread(target=self._failover_duty, name="failover", daemon=True)
                    self._duty.start()
        finally:
            sub.close()
        return 0

    def _failover_duty(self) -> None:
        try:
            check_failover(self.ctx)
        except OsimgError as err:
            log.warning("%s: failover check: %s", self.name, err)

    def _mine(self) -> list[str]:
        return sorted(self.agent.devices().get(EXPORT_KIND, {}))

    def reconcile(self) -> None:
        """Make the backend serve exactly this node's active exports, as the store says."""
        self.agent.rejoin()
        wanted = {name: lus.export_from_record(rec) for name, rec in self.agent.devices().get(EXPORT_KIND, {}).items()}
        for name in sorted(self.backend.serving() - {n for n, e in wanted.items() if e.active}):
            log.info("%s: no longer serving %s", self.name, name)
            self.backend.unserve(name)
        for name, exp in sorted(wanted.items()):
            if not exp.active:
                if exp.status != STANDBY:
                    lus.set_status(self.ctx, name, STANDBY)
                continue
            if name in self.backend.serving():
                continue
            if exp.status == FAILED:
                continue  # needs a new request (activate) to be tried again
            rec = self.ctx.store.get(LU_KIND, exp.lu)
            if rec is None:
                lus.set_status(self.ctx, name, FAILED, f"LU {exp.lu} no longer exists")
                continue
            try:
                where = self.backend.serve(exp, lus.checked_lu(self.ctx, rec))
            except OsimgError as err:
                log.error("%s: cannot serve %s: %s", self.name, name, err)
                lus.set_status(self.ctx, name, FAILED, str(err))
                continue
            log.info("%s: serving %s at %s", self.name, name, where)
            lus.set_status(self.ctx, name, SERVING, **where)

    def _shutdown(self, clean: bool) -> None:
        for name in sorted(self.backend.serving()):
            with contextlib.suppress(OsimgError):
                self.backend.unserve(name)
        self.backend.stop()
        if clean:
            for name in self._mine():
                with contextlib.suppress(OsimgError):
                    lus.set_status(self.ctx, name, lus.PENDING, "node stopped", socket=None, port=None)
            self.info.state = "stopped"
            self._publish_info()
            self.agent.stop()
        else:
            # leave at once rather than after the lease: the failover need not wait for the ttl
            with contextlib.suppress(OsimgError):
                self.agent.stop()


# -- process management (used by the CLI and tests) --------------------------------------------------
def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_our_daemon(pid: int | None, name: str) -> bool:
    """True if ``pid`` is this node's daemon (never signal a PID that was reused by something else)."""
    if not pid:
        return False
    cmd = _cmdline(pid)
    return "orchestrator.vios.node" in cmd and name in cmd


def get_info(ctx: Context, name: str) -> NodeInfo | None:
    rec = ctx.store.get(NODE_KIND, valid_name(name, "VIOS node name"))
    return None if rec is None else NodeInfo(**rec)


def start(ctx: Context, name: str, as_guest: bool = False, ttl: float = DEFAULT_TTL,
          timeout: float = 180.0, slots: int = 4) -> NodeInfo:
    """Start a node daemon in the background; returns once it serves (or raises with its log)."""
    valid_name(name, "VIOS node name")
    old = get_info(ctx, name)
    if old is not None and is_our_daemon(old.pid, name) and old.state in ("starting", "ready"):
        raise ConflictError(f"VIOS node {name} is already running (pid {old.pid}); "
                            f"stop it with 'osimg vios stop {name}'")
    d = folder(ctx, name)
    ctx.settings.ensure_dirs()
    private_dir(d.parent)
    private_dir(d)
    logf = d / "daemon.log"
    args = [sys.executable, "-m", "orchestrator.vios.node", name, "--home", str(ctx.settings.home),
            "--uri", ctx.settings.uri, "--store", ctx.settings.store_url, "--ttl", str(ttl), "--slots", str(slots)]
    if as_guest:
        args.append("--as-guest")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with open(logf, "ab") as lf:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    deadline = time.monotonic() + timeout
    while True:
        info = get_info(ctx, name)
        if info is not None and info.pid == proc.pid and info.state == "ready":
            return info
        code = proc.poll()
        if code is not None or (info is not None and info.pid == proc.pid and info.state == "failed"):
            if code is None:
                proc.wait(10)
            tail = " | ".join(logf.read_text(errors="replace").strip().splitlines()[-3:])
            raise StorageError(f"VIOS node {name} failed to start: {tail} (log {logf})")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise StorageError(f"VIOS node {name} was not ready within {timeout:.0f}s (log {logf})")
        time.sleep(0.05)


def stop(ctx: Context, name: str, timeout: float = 30.0) -> bool:
    """SIGTERM the node's daemon (by its recorded PID) and wait; False if it was not running."""
    info = get_info(ctx, name)
    if info is None:
        raise NotFoundError(f"no VIOS node named {name!r} (see 'osimg vios list')")
    if not is_our_daemon(info.pid, name):
        return False
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_our_daemon(info.pid, name) and not _reaped(info.pid):
        if time.monotonic() > deadline:
            os.kill(info.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    return True


def _reaped(pid: int) -> bool:
    """Collect the daemon if this process started it (otherwise it stays a zombie and looks alive)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    return not Path(f"/proc/{pid}").exists()


def list_nodes(ctx: Context) -> list[dict[str, Any]]:
    cluster = {n.name: n for n in ctx.store.nodes()}
    primary = ctx.store.primary()
    rows = []
    for rec in ctx.store.list(NODE_KIND):
        info = NodeInfo(**rec)
        node = cluster.get(info.name)
        exps = lus.exports_of(ctx, node=info.name)
        rows.append({
            "name": info.name, "kind": info.kind, "node_id": node.id if node else None,
            "cluster_state": node.state if node else "unregistered",
            "state": info.state if is_our_daemon(info.pid, info.name) or info.state != "ready" else "dead",
            "primary": node is not None and node.id == primary, "pid": info.pid, "backend_pid": info.backend_pid,
            "domain": info.domain, "exports": [f"{e.lu}:{e.status}" for e in exps], "error": info.error,
        })
    return rows


def remove(ctx: Context, name: str) -> None:
    """Forget a stopped node's record and local copy (its exports must be gone)."""
    info = get_info(ctx, name)
    if info is None:
        raise NotFoundError(f"no VIOS node named {name!r}")
    if is_our_daemon(info.pid, name):
        raise ConflictError(f"VIOS node {name} is running; stop it first")
    left = lus.exports_of(ctx, node=name)
    if left:
        raise ConflictError(f"VIOS node {name} still has exports {', '.join(e.lu for e in left)}; unexport them first")
    ctx.store.delete(NODE_KIND, name)


# -- daemon entry point ----------------------------------------------------------------------------
def _backend(ctx: Context, name: str, as_guest: bool, slots: int) -> Backend:
    if as_guest:
        return GuestBackend(ctx, name, folder(ctx, name), slots=slots)
    return QsdBackend(folder(ctx, name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osimg-vios-node")
    p.add_argument("name")
    p.add_argument("--home")
    p.add_argument("--uri")
    p.add_argument("--store")
    p.add_argument("--ttl", type=float, default=DEFAULT_TTL)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--as-guest", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = Context.from_env(home=a.home, uri=a.uri, store=a.store)
    node = ViosNode(ctx, a.name, _backend(ctx, a.name, a.as_guest, a.slots), ttl=a.ttl)
    signal.signal(signal.SIGTERM, lambda *_: node.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: node.stopping.set())
    try:
        return node.run()
    except OsimgError as err:
        log.error("%s: %s", a.name, err)
        return 1
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
