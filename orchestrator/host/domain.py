"""Domain XML and libvirt save files as data: what a guest's libvirt domain looks like, with no connection.

Everything here is pure (no libvirt import, no I/O except the save-file copy), so it is tested in
seconds without QEMU. ``host.libvirt`` hands these documents to libvirtd.

Networking note: tests and the demo use QEMU user-mode networking with ``hostfwd`` on 127.0.0.1,
passed through ``<qemu:commandline>``. libvirt 9.0 rejects the passt backend (so ``<portForward>``
is unavailable) and a forward added at runtime to ``<interface type='user'>`` is lost on
save/restore; a forward on the QEMU command line survives both. Real hosts use a libvirt network.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HypervisorError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
OSIMG_NS = "https://osimg.dev/xmlns/domain/1"
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("osimg", OSIMG_NS)
NETDEV_ID = "osimgnet0"


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


def user_netdev(net: NetSpec) -> str:
    """QEMU's ``-netdev user`` value: the guest's subnet and its forwards, on 127.0.0.1 only.

    The one place that spells a host forward: a fresh domain and a paged-in golden state both get
    their forwards from here, so the two can never disagree.
    """
    fwd = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in sorted(net.forwards.items()))
    return f"user,id={NETDEV_ID},net={net.subnet}{fwd}"


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
        args = [
            "-netdev",
            user_netdev(spec.net),
            "-device",
            f"virtio-net-pci,netdev={NETDEV_ID},mac={spec.net.mac},bus=pci.0,addr=0x1e",
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


def disk_xml(disk: DiskSpec) -> str:
    """One ``<disk>`` element as text, for hot-plug and unplug."""
    return ET.tostring(disk_element(disk), encoding="unicode")


def snapshot_xml(snap: str) -> str:
    """An internal snapshot named ``snap`` (memory and disks: libvirt's default for a running domain)."""
    el = ET.Element("domainsnapshot")
    ET.SubElement(el, "name").text = snap
    return ET.tostring(el, encoding="unicode")


def metadata_of(xml: str) -> dict[str, str]:
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
        for arg in cl.findall(f"{{{QEMU_NS}}}arg"):
            if arg.get("value", "").startswith(f"user,id={NETDEV_ID}"):
                arg.set("value", user_netdev(spec.net))
    return ET.tostring(root, encoding="unicode")


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


