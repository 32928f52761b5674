"""The only module that imports libvirt: one host reached by URI, its domains, save/restore, agent.

Everything above this layer speaks in guest names and dataclasses and never sees a ``virDomain``;
the documents handed to libvirtd come from ``host.domain``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import libvirt
import libvirt_qemu

from ..errors import ConflictError, GuestError, HostUnreachableError, HypervisorError, NotFoundError
from ..validate import short
from .domain import DiskSpec, DomainSpec, disk_xml, domain_xml, metadata_of, snapshot_xml

DEFAULT_URI = "qemu:///system"
VIRTLOGD_SOCK = "/run/libvirt/virtlogd-sock"  # libvirtd hands every QEMU's console log to virtlogd here

# libvirt reports failures on stderr by default; we raise them as HypervisorError instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


@dataclass
class DomainInfo:
    name: str
    uuid: str
    state: str
    persistent: bool
    metadata: dict[str, str]


class Hypervisor:
    """One libvirt host reached by URI (the design's CEC)."""

    def __init__(self, uri: str = DEFAULT_URI, home: str | None = None) -> None:
        """``home``: the OSIMG_HOME whose domains this handle may destroy or undefine (its metadata
        must name it); None only for tools that own the whole host (the test driver's tests)."""
        self.uri = uri
        self.home = home
        self._conn: libvirt.virConnect | None = None

    # -- connection -------------------------------------------------------------------------------
    @property
    def conn(self) -> libvirt.virConnect:
        """The connection, opened again if libvirtd went away under it (a restarted libvirtd keeps
        its guests running; a swap in its downtime window must still be able to roll back)."""
        if self._conn is not None and not self._alive(self._conn):
            self.close()
        if self._conn is None:
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as err:
                fix = ("start it with 'libvirtd -d' or 'bash scripts/run.sh setup'" if self.uri == DEFAULT_URI
                       else "is libvirtd running on that host?")
                raise HostUnreachableError(
                    f"cannot reach libvirtd at {self.uri[:120]}: {err.get_error_message()} ({fix})"
                ) from None
        return self._conn

    @staticmethod
    def _alive(conn: libvirt.virConnect) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def versions(self) -> dict[str, str]:
        def fmt(v: int) -> str:
            return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

        with self._calling("asking libvirtd its versions"):
            return {
                "libvirt": fmt(self.conn.getLibVersion()),
                "hypervisor": f"{self.conn.getType()} {fmt(self.conn.getVersion())}",
                "uri": self.conn.getURI(),
            }

    def _lookup(self, name: str) -> libvirt.virDomain:
        """``lookupByName``, once more over a new connection if libvirtd went away under the old one
        (the client only notices at its next call; every domain operation starts with a lookup)."""
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError:
            if self._conn is None or self._alive(self._conn):
                raise
            self.close()
            return self.conn.lookupByName(name)

    def _dom(self, name: str) -> libvirt.virDomain:
        try:
            return self._lookup(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFoundError(f"no libvirt domain named {name!r} on {self.uri}") from None
            raise HypervisorError(f"{name}: {err.get_error_message()}") from None

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except libvirt.libvirtError as err:
            msg = err.get_error_message()
            if self._lost(err):
                self.close()
                raise HostUnreachableError(f"{what}: libvirtd at {self.uri[:120]} stopped answering "
                                           f"({msg})") from None
            if VIRTLOGD_SOCK in msg:
                msg += " (virtlogd is not running: start it with 'virtlogd -d', or run 'bash scripts/run.sh setup')"
            raise HypervisorError(f"{what}: {msg}") from None

    def _lost(self, err: libvirt.libvirtError) -> bool:
        """True when a call failed because the connection died under it (libvirtd stopped)."""
        return err.get_error_domain() == libvirt.VIR_FROM_RPC or (
            self._conn is not None and not self._alive(self._conn))

    def _find(self, name: str) -> libvirt.virDomain | None:
        """The domain, or None if libvirt has none of that name. Any other failure (libvirtd gone)
        is an error, never "not there": a rollback must not take a lost connection for a lost guest."""
        try:
            return self._lookup(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"{name}: {err.get_error_message()}") from None

    # -- inventory --------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self._find(name) is not None

    def list_domains(self) -> list[DomainInfo]:
        out = []
        with self._calling("list domains"):
            doms = self.conn.listAllDomains()
        for d in doms:
            try:
                xml = d.XMLDesc(0)
                out.append(
                    DomainInfo(d.name(), d.UUIDString(), STATE_NAMES.get(d.state()[0], "?"),
                               bool(d.isPersistent()), metadata_of(xml))
                )
            except libvirt.libvirtError:
                continue  # vanished while listing
        return out

    def info(self, name: str) -> DomainInfo:
        d = self._dom(name)
        with self._calling(name):
            return DomainInfo(d.name(), d.UUIDString(), STATE_NAMES.get(d.state()[0], "?"),
                              bool(d.isPersistent()), metadata_of(d.XMLDesc(0)))

    def xml(self, name: str, inactive: bool = False) -> str:
        d = self._dom(name)
        with self._calling(name):
            return str(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))

    # -- lifecycle --------------------------------------------------------------------------------
    def create(self, spec: DomainSpec, persistent: bool = True, paused: bool = False) -> None:
        """Define (when persistent) and start a domain."""
        if self.exists(spec.name):
            raise ConflictError(f"a libvirt domain named {spec.name!r} already exists on {self.uri}")
        xml = domain_xml(spec)
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        with self._calling(f"start {spec.name}"):
            if persistent:
                dom = self.conn.defineXML(xml)
                try:
                    dom.createWithFlags(flags)
                except libvirt.libvirtError:
                    dom.undefine()
                    raise
            else:
                self.conn.createXML(xml, flags)

    def define(self, xml: str) -> None:
        with self._calling("define domain"):
            self.conn.defineXML(xml)

    def start(self, name: str) -> None:
        d = self._dom(name)
        with self._calling(f"start {name}"):
            d.create()

    def is_active(self, name: str) -> bool:
        d = self._find(name)
        if d is None:
            return False
        with self._calling(f"{name}: state"):
            return bool(d.isActive())

    def state(self, name: str) -> str:
        d = self._dom(name)
        with self._calling(name):
            return STATE_NAMES.get(d.state()[0], "?")

    def _check_owner(self, d: libvirt.virDomain, name: str) -> None:
        """Refuse to touch a domain that osimg did not make for this OSIMG_HOME: a guest name may
        collide with another tool's domain, and its metadata is what tells them apart."""
        if self.home is None:
            return
        with self._calling(name):
            owner = metadata_of(d.XMLDesc(0)).get("home")
        if owner != self.home:
            why = f"its osimg metadata names {short(owner)}" if owner else "it has no osimg metadata"
            raise ConflictError(f"libvirt domain {name!r} on {self.uri} was not made by osimg for {self.home} "
                                f"({why}); refusing to destroy it")

    def destroy(self, name: str) -> None:
        """Hard power-off; a no-op when the domain is gone or already off."""
        d = self._find(name)
        if d is None:
            return
        self._check_owner(d, name)
        with contextlib.suppress(libvirt.libvirtError):
            if d.isActive():
                d.destroy()

    def undefine(self, name: str) -> None:
        """Destroy and remove the definition with its snapshot and managed-save metadata."""
        self.destroy(name)
        d = self._find(name)
        if d is None:
            return
        flags = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        with contextlib.suppress(libvirt.libvirtError):
            if d.isPersistent():
                try:
                    d.undefineFlags(flags | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                except libvirt.libvirtError as err:
                    if err.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                        raise
                    # a driver without firmware variables (libvirt's test driver) refuses the NVRAM
                    # flag; osimg's direct-kernel-boot domains have no NVRAM to remove anyway
                    d.undefineFlags(flags)

    def shutdown(self, name: str, timeout: float = 30.0) -> None:
        """Clean shutdown through the guest agent, falling back to ACPI, then to a hard stop."""
        d = self._dom(name)
        if not d.isActive():
            return
        for flag in (libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT, libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN):
            # the agent may die with the guest before it answers: poll the state instead of trusting it
            with contextlib.suppress(libvirt.libvirtError):
                d.shutdownFlags(flag)
            deadline = time.monotonic() + timeout / 2
            while time.monotonic() < deadline:
                if not d.isActive():
                    return
                time.sleep(0.1)
        self.destroy(name)

    def suspend(self, name: str) -> None:
        d = self._dom(name)
        with self._calling(f"suspend {name}"):
            d.suspend()

    def resume(self, name: str) -> None:
        d = self._dom(name)
        with self._calling(f"resume {name}"):
            d.resume()

    def save(self, name: str, path: str) -> None:
        """Page out: write the memory state to ``path``; the domain stops."""
        d = self._dom(name)
        with self._calling(f"save {name}"):
            d.save(path)

    def restore(self, path: str, xml: str | None = None, paused: bool = False) -> None:
        """Page in a saved state, optionally under another identity (``xml``)."""
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0
        with self._calling(f"restore {Path(path).name}"):
            self.conn.restoreFlags(path, xml, flags)

    def saved_xml(self, path: str) -> str:
        with self._calling(f"read saved state {path}"):
            return str(self.conn.saveImageGetXMLDesc(path, 0))

    # -- guest agent --------------------------------------------------------------------------------
    def agent(self, name: str, command: str, args: dict[str, Any] | None = None, timeout: int = 5) -> Any:
        d = self._dom(name)
        payload = json.dumps({"execute": command, **({"arguments": args} if args else {})})
        with self._calling(f"{name}: guest agent {command}"):
            reply = libvirt_qemu.qemuAgentCommand(d, payload, timeout, 0)
        return json.loads(reply).get("return")

    def agent_ping(self, name: str, timeout: int = 2) -> bool:
        try:
            self.agent(name, "guest-ping", timeout=timeout)
            return True
        except (HypervisorError, NotFoundError):
            return False

    def fs_freeze(self, name: str) -> int:
        d = self._dom(name)
        with self._calling(f"{name}: fsfreeze"):
            return int(d.fsFreeze())

    def fs_thaw(self, name: str) -> int:
        d = self._dom(name)
        with self._calling(f"{name}: fsthaw"):
            return int(d.fsThaw())

    def guest_exec(
        self, name: str, argv: list[str], stdin: str | bytes | None = None, timeout: float = 60
    ) -> tuple[int, str, str]:
        """Run a program in the guest through the agent: no SSH handshake, so it fits in a downtime window."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            data = stdin.encode() if isinstance(stdin, str) else stdin
            args["input-data"] = base64.b64encode(data).decode()
        pid = self.agent(name, "guest-exec", args, timeout=10)["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.agent(name, "guest-exec-status", {"pid": pid}, timeout=10)
            if st.get("exited"):
                out, err = (base64.b64decode(st.get(k, "")).decode(errors="replace") for k in ("out-data", "err-data"))
                return int(st.get("exitcode", -1)), out, err
            time.sleep(0.02)
        raise GuestError(f"{name}: {argv[0]} did not finish within {timeout:.0f}s (guest agent)")

    # -- snapshots ---------------------------------------------------------------------------------------
    def snapshot_create(self, name: str, snap: str) -> None:
        """Internal snapshot with memory (QEMU savevm into the qcow2 overlays; read-only disks are skipped)."""
        d = self._dom(name)
        xml = snapshot_xml(snap)
        with self._calling(f"{name}: snapshot {snap}"):
            d.snapshotCreateXML(xml, 0)

    def snapshot_revert(self, name: str, snap: str) -> None:
        d = self._dom(name)
        with self._calling(f"{name}: revert to snapshot {snap}"):
            d.revertToSnapshot(d.snapshotLookupByName(snap, 0), libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)

    def snapshot_delete(self, name: str, snap: str, metadata_only: bool = False) -> None:
        """Delete a snapshot; a no-op when it does not exist."""
        try:
            s = self._dom(name).snapshotLookupByName(snap, 0)
        except (libvirt.libvirtError, NotFoundError):
            return
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY if metadata_only else 0
        with self._calling(f"{name}: delete snapshot {snap}"):
            s.delete(flags)

    def has_snapshot(self, name: str, snap: str) -> bool:
        try:
            self._dom(name).snapshotLookupByName(snap, 0)
            return True
        except (libvirt.libvirtError, NotFoundError):
            return False

    # -- devices --------------------------------------------------------------------------------------
    def attach_disk(self, name: str, disk: DiskSpec, persistent: bool = False) -> None:
        d = self._dom(name)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if persistent else 0)
        with self._calling(f"{name}: attach disk {disk.target}"):
            d.attachDeviceFlags(disk_xml(disk), flags)

    def detach_disk(self, name: str, disk: DiskSpec, persistent: bool = False) -> None:
        d = self._dom(name)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if persistent else 0)
        with self._calling(f"{name}: detach disk {disk.target}"):
            d.detachDeviceFlags(disk_xml(disk), flags)

    def block_resize(self, name: str, target: str, size_bytes: int) -> None:
        d = self._dom(name)
        with self._calling(f"{name}: resize {target}"):
            d.blockResize(target, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    def qemu_pid(self, name: str) -> int | None:
        pidfile = Path("/run/libvirt/qemu") / f"{name}.pid"
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def qmp(self, name: str, command: dict[str, Any]) -> Any:
        """QMP passthrough, for what libvirt 9.0 cannot express (e.g. NBD reconnect-delay)."""
        d = self._dom(name)
        with self._calling(f"{name}: qmp {command.get('execute')}"):
            return json.loads(libvirt_qemu.qemuMonitorCommand(d, json.dumps(command), 0))

    # -- accelerator ----------------------------------------------------------------------------------
    def probe_kvm(self, kernel: str, initrd: str, workdir: Path, timeout: float = 10.0,
                  device: str = "/dev/kvm") -> tuple[bool, str]:
        """Boot a throw-away KVM domain that prints a marker from userspace, then powers off.

        ``/dev/kvm`` existing proves little: on nested hosts KVM_CREATE_VM succeeds and the guest
        then hangs in early boot. Only a real boot within ``timeout`` counts.
        """
        if not os.path.exists(device):
            return False, f"{device} does not exist (no hardware virtualization or kvm module not loaded)"
        if "kvm" not in self.conn.getCapabilities():
            return False, "libvirt reports no kvm domain type for this host"
        name = f"osimg-kvm-probe-{os.getpid()}"
        log = workdir / f"{name}.serial"
        log.unlink(missing_ok=True)
        spec = DomainSpec(
            name=name, kernel=kernel, initrd=initrd, disks=[], serial_log=str(log), accel="kvm",
            cmdline="console=ttyS0 osimg.probe panic=-1", memory_mib=128, tb_cache_mib=None,
            metadata={"home": self.home, "probe": "1"} if self.home else {},
        )
        started = time.monotonic()
        try:
            self.create(spec, persistent=False)
        except (HypervisorError, ConflictError) as err:
            if VIRTLOGD_SOCK in str(err):
                raise  # the host is broken for every domain type: no verdict about KVM to remember
            return False, f"KVM domain failed to start: {err}"
        try:
            while time.monotonic() - started < timeout:
                with contextlib.suppress(OSError):
                    if "OSIMG-PROBE-OK" in log.read_text(errors="replace"):
                        return True, f"KVM guest reached userspace in {time.monotonic() - started:.1f}s"
                time.sleep(0.1)
            return False, f"KVM guest did not reach userspace within {timeout:.0f}s (hangs in early boot)"
        finally:
            self.destroy(name)
            log.unlink(missing_ok=True)

    # -- storage pools and volumes (how files reach a host without a shared file system) ------------
    def pool_ensure(self, name: str, path: str, gid: int | None) -> None:
        """A running directory pool ``name`` at ``path`` on this host (made, built and started if
        missing): libvirtd creates the folder there, 0750 root and QEMU's group ``gid``."""
        with self._calling(f"storage pool {name}"):
            pool = self._pool(name)
            if pool is None:
                pool = self.conn.storagePoolDefineXML(pool_xml(name, path, gid), 0)
                pool.build(0)
            if not pool.isActive():
                pool.create(0)

    def make_dir(self, path: str, gid: int | None) -> None:
        """Make sure ``path`` exists on the host, 0750 root and QEMU's group ``gid``: a transient pool
        built there and dropped at once (libvirt's only way to make a folder on a remote host; its
        own parents are made with libvirtd's umask, which may shut QEMU out, so every osimg pool
        folder is made right under one folder made this way)."""
        name = f"osimg-mkdir-{os.getpid()}-{threading.get_ident() % 100000}"
        with self._calling(f"making folder {path[:120]}"):
            pool = self.conn.storagePoolCreateXML(pool_xml(name, path, gid), libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
            pool.destroy()

    def pool_remove(self, name: str) -> None:
        """Delete a pool's volumes, its folder and its definition; a missing pool is no error."""
        with self._calling(f"storage pool {name}"):
            pool = self._pool(name)
            if pool is None:
                return
            if not pool.isActive():
                pool.create(0)
            pool.refresh(0)
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
            pool.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                pool.delete(0)  # the folder; left behind only if something not ours is in it
            pool.undefine()

    def pool_path(self, name: str) -> str:
        with self._calling(f"storage pool {name}"):
            return str(self.conn.storagePoolLookupByName(name).XMLDesc(0)).split("<path>", 1)[1].split("</path>", 1)[0]

    def _pool(self, name: str) -> libvirt.virStoragePool | None:
        """The pool, or None if this host has none of that name (any other failure raises)."""
        try:
            return self.conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                return None
            raise

    def _vol(self, pool: str, vol: str, refresh: bool = False) -> libvirt.virStorageVol | None:
        p = self.conn.storagePoolLookupByName(pool)
        if refresh:
            p.refresh(0)
        try:
            return p.storageVolLookupByName(vol)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise

    def _existing_vol(self, pool: str, vol: str) -> libvirt.virStorageVol:
        """The volume (its pool refreshed first), or NotFoundError."""
        v = self._vol(pool, vol, refresh=True)
        if v is None:
            raise NotFoundError(f"no volume {vol!r} in pool {pool!r} on {self.uri[:120]}")
        return v

    @contextlib.contextmanager
    def _stream(self) -> Iterator[libvirt.virStream]:
        """A stream finished when the block ends, aborted when it fails."""
        st = self.conn.newStream(0)
        try:
            yield st
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                st.abort()
            raise
        st.finish()

    def vol_size(self, pool: str, vol: str) -> int | None:
        """A volume's capacity in bytes, or None if the pool has no such volume."""
        with self._calling(f"volume {vol} of pool {pool}"):
            v = self._vol(pool, vol, refresh=True)
            return None if v is None else int(v.info()[1])

    def vol_capacity(self, pool: str, vol: str) -> int:
        """A disk volume's virtual size (qcow2: what the guest sees)."""
        with self._calling(f"volume {vol} of pool {pool}"):
            return int(self._existing_vol(pool, vol).info()[1])

    def vol_allocation(self, pool: str, vol: str) -> int | None:
        with self._calling(f"volume {vol} of pool {pool}"):
            v = self._vol(pool, vol, refresh=True)
            return None if v is None else int(v.info()[2])

    def vol_create(self, pool: str, vol: str, capacity: int, fmt: str = "raw",
                   backing: tuple[str, str] | None = None) -> str:
        """Create a volume (qcow2 through qemu-img on that host, with ``backing`` (path, format) as
        its backing file); returns its path on the host."""
        with self._calling(f"creating volume {vol} in pool {pool}"):
            p = self.conn.storagePoolLookupByName(pool)
            return str(p.createXML(vol_xml(vol, capacity, fmt, backing), 0).path())

    def vol_clone(self, pool: str, vol: str, src_pool: str, src_vol: str, wait: float = 300) -> str:
        """Copy a volume within the host (libvirtd copies; nothing crosses the connection).

        libvirt refuses a copy out of a pool while another copy from it runs ("asynchronous jobs
        running"): a batch swapping two guests of one host to one image copies its golden state
        twice at once, and other orchestrators may too. Copies out of one pool therefore take turns
        in this process and retry while another process's copy runs, up to ``wait`` seconds."""
        with _pool_turn(self.uri, src_pool), self._calling(f"copying volume {src_vol} to {vol}"):
            deadline = time.monotonic() + wait
            while True:
                src = self._existing_vol(src_pool, src_vol)
                p = self.conn.storagePoolLookupByName(pool)
                try:
                    return str(p.createXMLFrom(vol_xml(vol, int(src.info()[1]), "raw"), src, 0).path())
                except libvirt.libvirtError as err:
                    if "asynchronous jobs" not in (err.get_error_message() or "") or time.monotonic() > deadline:
                        raise
                time.sleep(0.2)

    def vol_delete(self, pool: str, vol: str) -> None:
        with self._calling(f"deleting volume {vol} of pool {pool}"):
            v = self._vol(pool, vol, refresh=True)
            if v is not None:
                v.delete(0)

    def vol_upload(self, pool: str, vol: str, src: Path, create: bool = True) -> str:
        """Send a local file's bytes into a volume over the connection (``virStorageVolUpload``).

        ``create``: make the volume first (a new raw file of the source's length; an existing one is
        replaced); otherwise the bytes overwrite the volume's first bytes, the rest unchanged.
        Returns the volume's path on the host."""
        size = src.stat().st_size
        with self._calling(f"uploading {src.name} to pool {pool}"):
            if create:
                old = self._vol(pool, vol, refresh=True)
                if old is not None:
                    old.delete(0)
                v = self.conn.storagePoolLookupByName(pool).createXML(vol_xml(vol, size, "raw"), 0)
            else:
                v = self._existing_vol(pool, vol)
            with self._stream() as st, open(src, "rb") as f:
                v.upload(st, 0, size, 0)
                while chunk := f.read(STREAM_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        n = st.send(view.tobytes())
                        if n < 0:
                            raise HypervisorError(f"uploading {src.name} to pool {pool}: the stream refused data")
                        view = view[n:]
            return str(v.path())

    def vol_download(self, pool: str, vol: str, sink: Any, limit: int = 0) -> int:
        """Stream a volume's bytes (at most ``limit``, 0: all) to ``sink(chunk)`` over the connection;
        returns the byte count. Used to verify an upload by hash on the host's own copy."""
        with self._calling(f"reading volume {vol} of pool {pool}"):
            v = self._existing_vol(pool, vol)
            got = 0
            with self._stream() as st:
                v.download(st, 0, limit, 0)
                while chunk := st.recv(STREAM_CHUNK):
                    if chunk == -2:
                        raise HypervisorError(f"reading volume {vol}: the stream would block")
                    sink(chunk)
                    got += len(chunk)
            return got

    def free_memory(self) -> int:
        """Bytes of memory free on the host (placement's measure)."""
        with self._calling("free memory"):
            return int(self.conn.getFreeMemory())


STREAM_CHUNK = 1 << 20
_POOL_TURNS: dict[tuple[str, str], threading.Lock] = {}
_POOL_TURNS_LOCK = threading.Lock()


def _pool_turn(uri: str, pool: str) -> threading.Lock:
    """The lock copies out of one pool of one host take turns on (see ``Hypervisor.vol_clone``)."""
    with _POOL_TURNS_LOCK:
        return _POOL_TURNS.setdefault((uri, pool), threading.Lock())


def pool_xml(name: str, path: str, gid: int | None) -> str:
    group = f"<group>{int(gid)}</group>" if gid is not None else ""
    return (f"<pool type='dir'><name>{escape(name)}</name><target><path>{escape(path)}</path>"
            f"<permissions><mode>0750</mode><owner>0</owner>{group}</permissions></target></pool>")


def vol_xml(name: str, capacity: int, fmt: str, backing: tuple[str, str] | None = None) -> str:
    back = (f"<backingStore><path>{escape(backing[0])}</path><format type='{escape(backing[1])}'/></backingStore>"
            if backing else "")
    return (f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{capacity}</capacity>"
            f"<target><format type='{escape(fmt)}'/><permissions><mode>0640</mode></permissions></target>"
            f"{back}</volume>")
