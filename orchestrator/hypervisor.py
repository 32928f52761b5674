"""The only module that talks to libvirt: connection, domain XML, lifecycle, save/restore, agent.

Domain XML is built from dataclasses with ElementTree, never by string concatenation. Everything
above this layer speaks in guest names and dataclasses and never sees a ``virDomain``.

Networking note: tests and the demo use QEMU user-mode networking with ``hostfwd`` on 127.0.0.1,
passed through ``<qemu:commandline>``. libvirt 9.0 rejects the passt backend (so ``<portForward>``
is unavailable) and a forward added at runtime to ``<interface type='user'>`` is lost on
save/restore; a forward on the QEMU command line survives both. Real hosts use a libvirt network.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from .errors import ConflictError, GuestError, HypervisorError, NotFoundError

DEFAULT_URI = "qemu:///system"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
OSIMG_NS = "https://osimg.dev/xmlns/domain/1"
VIRTLOGD_SOCK = "/run/libvirt/virtlogd-sock"  # libvirtd hands every QEMU's console log to virtlogd here
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("osimg", OSIMG_NS)

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
class DiskSpec:
    """A guest disk: a local file, or an NBD export (unix socket or 127.0.0.1 port)."""

    target: str
    path: str | None = None
    fmt: str = "qcow2"
    bus: str = "virtio"
    readonly: bool = False
    serial: str | None = None
    nbd_export: str | None = None
    nbd_socket: str | None = None
    nbd_port: int | None = None
    scsi_unit: int | None = None


@dataclass
class NetSpec:
    """``mode='user'``: slirp with host forwards on 127.0.0.1; ``mode='network'``: a libvirt network."""

    mode: str = "user"
    network: str | None = None
    forwards: dict[int, int] = field(default_factory=dict)  # guest port -> host port on 127.0.0.1
    mac: str = "52:54:00:12:34:56"
    subnet: str = "10.0.2.0/24"


@dataclass
class DomainSpec:
    name: str
    kernel: str
    initrd: str
    cmdline: str
    disks: list[DiskSpec]
    serial_log: str
    accel: str = "qemu"
    memory_mib: int = 256
    vcpus: int = 1
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    net: NetSpec | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    tb_cache_mib: int | None = 64
    extra_qemu_args: list[str] = field(default_factory=list)


@dataclass
class DomainInfo:
    name: str
    uuid: str
    state: str
    persistent: bool
    metadata: dict[str, str]


def domain_xml(spec: DomainSpec) -> str:
    """Render a DomainSpec as libvirt domain XML."""
    dom = ET.Element("domain", {"type": spec.accel})
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    if spec.metadata:
        meta = ET.SubElement(dom, "metadata")
        ET.SubElement(meta, f"{{{OSIMG_NS}}}guest", dict(sorted(spec.metadata.items())))
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": "pc"}).text = "hvm"
    ET.SubElement(os_el, "kernel").text = spec.kernel
    ET.SubElement(os_el, "initrd").text = spec.initrd
    ET.SubElement(os_el, "cmdline").text = spec.cmdline
    feats = ET.SubElement(dom, "features")
    ET.SubElement(feats, "acpi")
    if spec.accel == "qemu" and spec.tb_cache_mib:
        # TCG's translation cache defaults to 1 GiB; a small one keeps each guest near 220 MiB RSS.
        tcg = ET.SubElement(feats, "tcg")
        ET.SubElement(tcg, "tb-cache", {"unit": "MiB"}).text = str(spec.tb_cache_mib)
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devs = ET.SubElement(dom, "devices")
    for disk in spec.disks:
        devs.append(disk_element(disk))
    ET.SubElement(devs, "controller", {"type": "scsi", "index": "0", "model": "virtio-scsi"})
    serial = ET.SubElement(devs, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": spec.serial_log})
    ET.SubElement(serial, "target", {"port": "0"})
    chan = ET.SubElement(devs, "channel", {"type": "unix"})
    ET.SubElement(chan, "target", {"type": "virtio", "name": "org.qemu.guest_agent.0"})
    ET.SubElement(devs, "memballoon", {"model": "none"})
    args = list(spec.extra_qemu_args)
    if spec.net and spec.net.mode == "network":
        iface = ET.SubElement(devs, "interface", {"type": "network"})
        ET.SubElement(iface, "source", {"network": spec.net.network or "default"})
        ET.SubElement(iface, "mac", {"address": spec.net.mac})
        ET.SubElement(iface, "model", {"type": "virtio"})
    elif spec.net:
        fwd = "".join(
            f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in sorted(spec.net.forwards.items())
        )
        args = [
            "-netdev",
            f"user,id=osimgnet0,net={spec.net.subnet}{fwd}",
            "-device",
            f"virtio-net-pci,netdev=osimgnet0,mac={spec.net.mac},bus=pci.0,addr=0x1e",
            *args,
        ]
    if args:
        cl = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in args:
            ET.SubElement(cl, f"{{{QEMU_NS}}}arg", {"value": arg})
    return ET.tostring(dom, encoding="unicode")


def disk_element(disk: DiskSpec) -> ET.Element:
    if disk.nbd_export:
        el = ET.Element("disk", {"type": "network", "device": "disk"})
        ET.SubElement(el, "driver", {"name": "qemu", "type": "raw", "cache": "none"})
        src = ET.SubElement(el, "source", {"protocol": "nbd", "name": disk.nbd_export})
        if disk.nbd_socket:
            ET.SubElement(src, "host", {"transport": "unix", "socket": disk.nbd_socket})
        else:
            ET.SubElement(src, "host", {"name": "127.0.0.1", "port": str(disk.nbd_port)})
    else:
        el = ET.Element("disk", {"type": "file", "device": "disk"})
        ET.SubElement(el, "driver", {"name": "qemu", "type": disk.fmt, "discard": "unmap"})
        ET.SubElement(el, "source", {"file": str(disk.path)})
    ET.SubElement(el, "target", {"dev": disk.target, "bus": disk.bus})
    if disk.readonly:
        ET.SubElement(el, "readonly")
    if disk.serial:
        ET.SubElement(el, "serial").text = disk.serial
    if disk.bus == "scsi" and disk.scsi_unit is not None:
        ET.SubElement(
            el, "address", {"type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": str(disk.scsi_unit)}
        )
    return el


def _snapshot_element(snap: str) -> ET.Element:
    el = ET.Element("domainsnapshot")
    ET.SubElement(el, "name").text = snap
    return el


def _metadata_of(xml: str) -> dict[str, str]:
    root = ET.fromstring(xml)
    node = root.find(f"metadata/{{{OSIMG_NS}}}guest")
    return dict(node.attrib) if node is not None else {}


def rewrite_identity(xml: str, spec: DomainSpec) -> str:
    """Give a saved domain's XML another guest's identity: name, UUID, disks, serial log, forwards.

    Used when a golden image's memory state is paged into a guest. Everything guest-visible (the
    device model, MAC, PCI layout) stays as saved, because libvirt's ABI check refuses changes there.
    """
    root = ET.fromstring(xml)
    for tag, value in (("name", spec.name), ("uuid", spec.uuid)):
        el = root.find(tag)
        if el is not None:
            el.text = value
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for old in list(meta):
        meta.remove(old)
    ET.SubElement(meta, f"{{{OSIMG_NS}}}guest", dict(sorted(spec.metadata.items())))
    by_target = {d.target: d for d in spec.disks}
    devs = root.find("devices")
    assert devs is not None
    for el in devs.findall("disk"):
        tgt = el.find("target")
        src = el.find("source")
        if tgt is None or src is None:
            continue
        want = by_target.get(tgt.get("dev", ""))
        if want is not None and want.path:
            src.set("file", want.path)
    for tag in ("serial", "console"):
        for el in devs.findall(tag):
            src = el.find("source")
            if src is not None and src.get("path"):
                src.set("path", spec.serial_log)
    os_el = root.find("os")
    if os_el is not None:
        for tag, value in (("kernel", spec.kernel), ("initrd", spec.initrd)):
            el = os_el.find(tag)
            if el is not None:
                el.text = value
    cl = root.find(f"{{{QEMU_NS}}}commandline")
    if cl is not None and spec.net is not None:
        fwd = "".join(
            f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in sorted(spec.net.forwards.items())
        )
        for arg in cl.findall(f"{{{QEMU_NS}}}arg"):
            if arg.get("value", "").startswith("user,id=osimgnet0"):
                arg.set("value", f"user,id=osimgnet0,net={spec.net.subnet}{fwd}")
    return ET.tostring(root, encoding="unicode")


class Hypervisor:
    """One libvirt host reached by URI (the design's CEC)."""

    def __init__(self, uri: str = DEFAULT_URI) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None

    # -- connection -------------------------------------------------------------------------------
    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as err:
                raise HypervisorError(
                    f"cannot reach libvirtd at {self.uri}: {err.get_error_message()} "
                    "(start it with 'libvirtd -d' or 'make setup')"
                ) from None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def versions(self) -> dict[str, str]:
        def fmt(v: int) -> str:
            return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

        return {
            "libvirt": fmt(self.conn.getLibVersion()),
            "hypervisor": f"{self.conn.getType()} {fmt(self.conn.getVersion())}",
            "uri": self.conn.getURI(),
        }

    def _dom(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(name)
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
            if VIRTLOGD_SOCK in msg:
                msg += " (virtlogd is not running: start it with 'virtlogd -d', or run 'bash scripts/run.sh setup')"
            raise HypervisorError(f"{what}: {msg}") from None

    # -- inventory --------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        try:
            self.conn.lookupByName(name)
            return True
        except libvirt.libvirtError:
            return False

    def list_domains(self) -> list[DomainInfo]:
        out = []
        with self._calling("list domains"):
            doms = self.conn.listAllDomains()
        for d in doms:
            try:
                xml = d.XMLDesc(0)
                out.append(
                    DomainInfo(d.name(), d.UUIDString(), STATE_NAMES.get(d.state()[0], "?"),
                               bool(d.isPersistent()), _metadata_of(xml))
                )
            except libvirt.libvirtError:
                continue  # vanished while listing
        return out

    def info(self, name: str) -> DomainInfo:
        d = self._dom(name)
        with self._calling(name):
            return DomainInfo(d.name(), d.UUIDString(), STATE_NAMES.get(d.state()[0], "?"),
                              bool(d.isPersistent()), _metadata_of(d.XMLDesc(0)))

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
        try:
            return bool(self.conn.lookupByName(name).isActive())
        except libvirt.libvirtError:
            return False

    def state(self, name: str) -> str:
        d = self._dom(name)
        with self._calling(name):
            return STATE_NAMES.get(d.state()[0], "?")

    def destroy(self, name: str) -> None:
        """Hard power-off; a no-op when the domain is gone or already off."""
        try:
            d = self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if d.isActive():
                d.destroy()

    def undefine(self, name: str) -> None:
        """Destroy and remove the definition with its snapshot and managed-save metadata."""
        self.destroy(name)
        try:
            d = self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        with contextlib.suppress(libvirt.libvirtError):
            if d.isPersistent():
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
        self, name: str, argv: list[str], stdin: str | None = None, timeout: float = 60
    ) -> tuple[int, str, str]:
        """Run a program in the guest through the agent: no SSH handshake, so it fits in a downtime window."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin.encode()).decode()
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
        xml = ET.tostring(_snapshot_element(snap), encoding="unicode")
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
            d.attachDeviceFlags(ET.tostring(disk_element(disk), encoding="unicode"), flags)

    def detach_disk(self, name: str, disk: DiskSpec, persistent: bool = False) -> None:
        d = self._dom(name)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if persistent else 0)
        with self._calling(f"{name}: detach disk {disk.target}"):
            d.detachDeviceFlags(ET.tostring(disk_element(disk), encoding="unicode"), flags)

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
    def probe_kvm(self, kernel: str, initrd: str, workdir: Path, timeout: float = 10.0) -> tuple[bool, str]:
        """Boot a throw-away KVM domain that prints a marker from userspace, then powers off.

        ``/dev/kvm`` existing proves little: on nested hosts KVM_CREATE_VM succeeds and the guest
        then hangs in early boot. Only a real boot within ``timeout`` counts.
        """
        if not os.path.exists("/dev/kvm"):
            return False, "/dev/kvm does not exist (no hardware virtualization or kvm module not loaded)"
        if "kvm" not in self.conn.getCapabilities():
            return False, "libvirt reports no kvm domain type for this host"
        name = f"osimg-kvm-probe-{os.getpid()}"
        log = workdir / f"{name}.serial"
        log.unlink(missing_ok=True)
        spec = DomainSpec(
            name=name, kernel=kernel, initrd=initrd, disks=[], serial_log=str(log), accel="kvm",
            cmdline="console=ttyS0 osimg.probe panic=-1", memory_mib=128, tb_cache_mib=None,
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


SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("<16s5I56x")  # magic, version, data_len, was_running, compressed, cookieOffset


def retarget_saved_state(src: Path, dst: Path, xml: str) -> None:
    """Write a copy of a libvirt save file whose embedded domain XML is ``xml``.

    libvirt refuses to restore a saved state under another UUID (its ABI check treats the UUID as
    guest-visible), so paging one golden state into many guests needs a per-guest copy carrying
    that guest's identity. The header layout is libvirt's ``virQEMUSaveHeader`` (version 2): XML,
    NUL, migration cookie, NUL, zero padding up to ``data_len``, then QEMU's migration stream,
    which is copied unchanged in the kernel (copy_file_range).
    """
    with open(src, "rb") as f:
        head = f.read(SAVE_HEADER.size)
        if len(head) < SAVE_HEADER.size:
            raise HypervisorError(f"{src}: truncated save file")
        magic, version, data_len, was_running, compressed, cookie_off = SAVE_HEADER.unpack(head)
        if magic != SAVE_MAGIC or version != 2:
            raise HypervisorError(f"{src}: not a libvirt save file of a known version ({magic!r} v{version})")
        data = f.read(data_len)
    cookie = data[cookie_off:].split(b"\0", 1)[0] if cookie_off else b""
    new_xml = xml.encode()
    body = new_xml + b"\0" + (cookie + b"\0" if cookie else b"")
    if len(body) > data_len:
        raise HypervisorError(f"{src}: rewritten domain XML does not fit the save file's header padding")
    new_cookie_off = len(new_xml) + 1 if cookie else 0
    tmp = dst.with_suffix(".tmp")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        fout.write(SAVE_HEADER.pack(magic, version, data_len, was_running, compressed, new_cookie_off))
        fout.write(body.ljust(data_len, b"\0"))
        offset = SAVE_HEADER.size + data_len
        remaining = os.fstat(fin.fileno()).st_size - offset
        while remaining > 0:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), remaining, offset)
            if n == 0:
                break
            offset += n
            remaining -= n
    tmp.rename(dst)


def wait_for_serial(path: Path, marker: str, timeout: float, is_alive: Any = None) -> float:
    """Wait until ``marker`` appears in a serial log; returns seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError):
            if marker in path.read_text(errors="replace"):
                return time.monotonic() - start
        if is_alive is not None and not is_alive():
            raise GuestError(f"guest stopped before printing {marker!r}; console log: {path}")
        time.sleep(0.05)
    raise GuestError(f"no {marker!r} on the console within {timeout:.0f}s; console log: {path}")
