"""Domain XML and libvirt save files as data: what a guest's libvirt domain looks like, with no connection.

Everything here is pure (no libvirt import, no I/O except the save-file copy), so it is tested in
seconds without QEMU. ``host.libvirt`` hands these documents to libvirtd.

The idea is OpenStack Nova's ``nova/virt/libvirt/config.py``, at osimg's size: each piece of the
XML (a disk, a network, the whole domain) is a dataclass that writes itself (``to_xml``) and reads
itself back (``from_xml``), and write-then-read gives an equal object. A domain that libvirt wrote
(a saved golden state) holds far more than osimg models (PCI addresses, controllers, the CPU
model...), and libvirt's ABI check refuses a restore that changes any guest-visible part of it. So
such XML is read into a :class:`DomainDocument`, which keeps the whole tree and exposes typed
fields for the parts osimg changes; the identity rewrite of a page-in is "parse, set fields,
write", and whatever the document does not model goes back out as it came in.

Networking note: tests and the demo use QEMU user-mode networking with ``hostfwd`` on 127.0.0.1,
passed through ``<qemu:commandline>``. libvirt 9.0 rejects the passt backend (so ``<portForward>``
is unavailable) and a forward added at runtime to ``<interface type='user'>`` is lost on
save/restore; a forward on the QEMU command line survives both. Real hosts use a libvirt network.
"""

from __future__ import annotations

import os
import re
import struct
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HypervisorError
from ..validate import short

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
OSIMG_NS = "https://osimg.dev/xmlns/domain/1"
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("osimg", OSIMG_NS)
NETDEV_ID = "osimgnet0"
LOOPBACK = "127.0.0.1"
OSIMG_GUEST = f"{{{OSIMG_NS}}}guest"
QEMU_COMMANDLINE = f"{{{QEMU_NS}}}commandline"
QEMU_ARG = f"{{{QEMU_NS}}}arg"
IDENTITY_TAGS = ("name", "uuid", "genid", "title", "description")  # libvirt writes <metadata> after these

# libvirt's scaled integers (docs: formatdomain "memory"); a bare number of memory is KiB
UNITS = {
    "b": 1, "bytes": 1, "KB": 10**3, "k": 1 << 10, "KiB": 1 << 10, "MB": 10**6, "M": 1 << 20, "MiB": 1 << 20,
    "GB": 10**9, "G": 1 << 30, "GiB": 1 << 30, "TB": 10**12, "T": 1 << 40, "TiB": 1 << 40,
}


# -- disks -----------------------------------------------------------------------------------------------------------
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

    def __post_init__(self) -> None:
        # An NBD export hands the guest plain blocks: whatever format the file has, the server
        # decodes it, so the guest's driver always reads raw. Saying so here keeps a parsed disk
        # equal to the spec it came from.
        if self.nbd_export:
            self.fmt = "raw"

    def to_element(self) -> ET.Element:
        if self.nbd_export:
            el = ET.Element("disk", {"type": "network", "device": "disk"})
            ET.SubElement(el, "driver", {"name": "qemu", "type": "raw", "cache": "none"})
            src = ET.SubElement(el, "source", {"protocol": "nbd", "name": self.nbd_export})
            if self.nbd_socket:
                ET.SubElement(src, "host", {"transport": "unix", "socket": self.nbd_socket})
            else:
                ET.SubElement(src, "host", {"name": LOOPBACK, "port": str(self.nbd_port)})
        else:
            if not self.path:
                raise HypervisorError(f"disk {self.target}: neither a file path nor an NBD export to attach")
            el = ET.Element("disk", {"type": "file", "device": "disk"})
            ET.SubElement(el, "driver", {"name": "qemu", "type": self.fmt, "discard": "unmap"})
            ET.SubElement(el, "source", {"file": self.path})
        ET.SubElement(el, "target", {"dev": self.target, "bus": self.bus})
        if self.readonly:
            ET.SubElement(el, "readonly")
        if self.serial:
            ET.SubElement(el, "serial").text = self.serial
        if self.bus == "scsi" and self.scsi_unit is not None:
            ET.SubElement(el, "address", {"type": "drive", "controller": "0", "bus": "0", "target": "0",
                                          "unit": str(self.scsi_unit)})
        return el

    def to_xml(self) -> str:
        return ET.tostring(self.to_element(), encoding="unicode")

    @classmethod
    def from_element(cls, el: ET.Element) -> DiskSpec:
        tgt = el.find("target")
        if tgt is None or not tgt.get("dev"):
            raise HypervisorError(f"<disk> without a target device: {short(ET.tostring(el, encoding='unicode'))}")
        target = tgt.get("dev", "")
        src = el.find("source")
        drv = el.find("driver")
        addr = el.find("address")
        unit = addr.get("unit") if addr is not None and addr.get("type") == "drive" else None
        disk = cls(
            target, bus=tgt.get("bus", "virtio"), readonly=el.find("readonly") is not None,
            serial=el.findtext("serial"), scsi_unit=int(unit) if unit is not None else None,
        )
        if el.get("type") == "network":
            if src is None or src.get("protocol") != "nbd":
                raise HypervisorError(f"disk {target}: a network disk that is not NBD")
            host = src.find("host")
            if host is None:
                raise HypervisorError(f"disk {target}: NBD source without a host")
            disk.nbd_export = src.get("name")
            disk.fmt = "raw"
            if host.get("transport") == "unix":
                disk.nbd_socket = host.get("socket")
            elif host.get("name") == LOOPBACK and host.get("port"):
                disk.nbd_port = int(host.get("port", ""))
            else:
                # the host never contacts another address (README, Networking)
                raise HypervisorError(f"disk {target}: NBD host {short(host.get('name'))} is not {LOOPBACK}")
        else:
            disk.path = src.get("file") if src is not None else None
            if drv is not None and drv.get("type"):
                disk.fmt = drv.get("type", "")
        return disk

    @classmethod
    def from_xml(cls, xml: str) -> DiskSpec:
        return cls.from_element(parse_xml(xml, "disk"))


def disk_xml(disk: DiskSpec) -> str:
    """One ``<disk>`` element as text, for hot-plug and unplug."""
    return disk.to_xml()


# -- networks --------------------------------------------------------------------------------------------------------
@dataclass
class NetSpec:
    """``mode='user'``: slirp with host forwards on 127.0.0.1; ``mode='network'``: a libvirt network.

    ``subnet`` is the value of slirp's ``net=`` option and any slirp options after it (a guest with
    a static address adds ``dhcpstart``, see ``Customization.user_mode_net``).
    """

    mode: str = "user"
    network: str | None = None
    forwards: dict[int, int] = field(default_factory=dict)  # guest port -> host port on 127.0.0.1
    mac: str = "52:54:00:12:34:56"
    subnet: str = "10.0.2.0/24"

    def __post_init__(self) -> None:
        if self.mode not in ("user", "network"):
            raise HypervisorError(f"network mode {short(self.mode)}: expected 'user' or 'network'")
        if self.mode == "network" and self.network is None:
            self.network = "default"  # what the domain gets: write-then-read gives back the same spec

    def interface_element(self) -> ET.Element:
        """Mode ``network``: a libvirt ``<interface>``."""
        iface = ET.Element("interface", {"type": "network"})
        ET.SubElement(iface, "source", {"network": self.network or "default"})
        ET.SubElement(iface, "mac", {"address": self.mac})
        ET.SubElement(iface, "model", {"type": "virtio"})
        return iface

    def qemu_args(self) -> list[str]:
        """Mode ``user``: the QEMU arguments of the slirp back end and its NIC."""
        return ["-netdev", user_netdev(self), "-device", user_nic(self)]

    @classmethod
    def from_interface(cls, iface: ET.Element) -> NetSpec:
        src = iface.find("source")
        mac = iface.find("mac")
        net = cls(mode="network", network=src.get("network") if src is not None else None)
        if mac is not None and mac.get("address"):
            net.mac = mac.get("address", "")
        return net

    @classmethod
    def from_qemu_args(cls, netdev: str, nic: str | None) -> NetSpec:
        """The inverse of :meth:`qemu_args` (``nic`` None: the NIC argument is missing, default MAC)."""
        subnet, forwards = parse_user_netdev(netdev)
        net = cls(forwards=forwards, subnet=subnet)
        mac = dict(o.split("=", 1) for o in (nic or "").split(",") if "=" in o).get("mac")
        if mac:
            net.mac = mac
        return net


HOSTFWD_RE = re.compile(rf"hostfwd=tcp:{re.escape(LOOPBACK)}:(\d+)-:(\d+)")


def user_netdev(net: NetSpec) -> str:
    """QEMU's ``-netdev user`` value: the guest's subnet and its forwards, on 127.0.0.1 only.

    The one place that spells a host forward: a fresh domain and a paged-in golden state both get
    their forwards from here, so the two can never disagree. ``parse_user_netdev`` reads it back.
    """
    fwd = "".join(f",hostfwd=tcp:{LOOPBACK}:{host}-:{guest}" for guest, host in sorted(net.forwards.items()))
    return f"user,id={NETDEV_ID},net={net.subnet}{fwd}"


def user_nic(net: NetSpec) -> str:
    """The NIC on the slirp back end, at a fixed PCI slot so a saved state's device layout never moves."""
    return f"virtio-net-pci,netdev={NETDEV_ID},mac={net.mac},bus=pci.0,addr=0x1e"


def parse_user_netdev(value: str) -> tuple[str, dict[int, int]]:
    """``(subnet, forwards)`` of a value written by :func:`user_netdev`.

    A forward that is not TCP on 127.0.0.1 is refused rather than dropped: osimg never writes one,
    and passing it on would open a guest port on an outside address.
    """
    parts = value.split(",")
    if parts[:2] != ["user", f"id={NETDEV_ID}"]:
        raise HypervisorError(f"{short(value)} is not osimg's user-mode netdev (user,id={NETDEV_ID},...)")
    net: str | None = None
    options: list[str] = []
    forwards: dict[int, int] = {}
    for part in parts[2:]:
        if part.startswith("hostfwd="):
            m = HOSTFWD_RE.fullmatch(part)
            if m is None:
                raise HypervisorError(f"host forward {short(part)} is not TCP on {LOOPBACK}")
            forwards[int(m.group(2))] = int(m.group(1))
        elif part.startswith("net="):
            net = part[len("net="):]
        else:
            options.append(part)
    if net is None:
        raise HypervisorError(f"user-mode netdev {short(value)} has no net= subnet")
    return ",".join([net, *options]), forwards


# -- domains ---------------------------------------------------------------------------------------------------------
@dataclass
class DomainSpec:
    """A guest's domain as osimg writes it: direct kernel boot, its disks, serial log, network.

    ``tb_cache_mib`` is TCG's translation cache and only exists for ``accel='qemu'`` (libvirt refuses
    TCG features on a KVM domain), so it is None for any other accelerator.

    ``genid`` is the VM generation ID (``<genid>``, QEMU's vmgenid device): a guest kernel that
    watches it learns it was cloned or restored and reseeds its RNG. Every domain gets one; a golden
    state saved with it gets a new one at every page-in (``rewrite_identity``, and libvirt itself
    regenerates it on restore). A state saved without the device cannot gain it later (the device
    would be new hardware to the saved guest), so only states captured with it carry it.
    """

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
    genid: str | None = field(default_factory=lambda: str(uuidlib.uuid4()))  # None: read from a domain without one

    def __post_init__(self) -> None:
        if self.accel != "qemu" or not self.tb_cache_mib:
            self.tb_cache_mib = None

    def to_xml(self) -> str:
        dom = ET.Element("domain", {"type": self.accel})
        ET.SubElement(dom, "name").text = self.name
        ET.SubElement(dom, "uuid").text = self.uuid
        if self.genid is not None:
            ET.SubElement(dom, "genid").text = self.genid
        if self.metadata:
            meta = ET.SubElement(dom, "metadata")
            ET.SubElement(meta, OSIMG_GUEST, dict(sorted(self.metadata.items())))
        ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(self.memory_mib)
        ET.SubElement(dom, "vcpu").text = str(self.vcpus)
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": "pc"}).text = "hvm"
        ET.SubElement(os_el, "kernel").text = self.kernel
        ET.SubElement(os_el, "initrd").text = self.initrd
        ET.SubElement(os_el, "cmdline").text = self.cmdline
        feats = ET.SubElement(dom, "features")
        ET.SubElement(feats, "acpi")
        if self.tb_cache_mib:
            # TCG's translation cache defaults to 1 GiB; a small one keeps each guest near 220 MiB RSS.
            tcg = ET.SubElement(feats, "tcg")
            ET.SubElement(tcg, "tb-cache", {"unit": "MiB"}).text = str(self.tb_cache_mib)
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "restart"
        ET.SubElement(dom, "on_crash").text = "destroy"
        devs = ET.SubElement(dom, "devices")
        for disk in self.disks:
            devs.append(disk.to_element())
        ET.SubElement(devs, "controller", {"type": "scsi", "index": "0", "model": "virtio-scsi"})
        serial = ET.SubElement(devs, "serial", {"type": "file"})
        ET.SubElement(serial, "source", {"path": self.serial_log})
        ET.SubElement(serial, "target", {"port": "0"})
        chan = ET.SubElement(devs, "channel", {"type": "unix"})
        ET.SubElement(chan, "target", {"type": "virtio", "name": "org.qemu.guest_agent.0"})
        ET.SubElement(devs, "memballoon", {"model": "none"})
        args = list(self.extra_qemu_args)
        if self.net and self.net.mode == "network":
            devs.append(self.net.interface_element())
        elif self.net:
            args = [*self.net.qemu_args(), *args]
        if args:
            cl = ET.SubElement(dom, QEMU_COMMANDLINE)
            for arg in args:
                ET.SubElement(cl, QEMU_ARG, {"value": arg})
        return ET.tostring(dom, encoding="unicode")

    @classmethod
    def from_xml(cls, xml: str) -> DomainSpec:
        return DomainDocument.parse(xml).spec()


def domain_xml(spec: DomainSpec) -> str:
    """Render a DomainSpec as libvirt domain XML."""
    return spec.to_xml()


def parse_xml(xml: str, tag: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise HypervisorError(f"not well-formed <{tag}> XML ({err}): {short(xml)}") from None
    if root.tag != tag:
        raise HypervisorError(f"expected a <{tag}> document, got <{root.tag}>")
    return root


def scaled_mib(el: ET.Element | None, default_unit: str = "KiB") -> int | None:
    """A libvirt scaled integer (``<memory unit='KiB'>262144</memory>``) in MiB."""
    if el is None or el.text is None:
        return None
    unit = el.get("unit", default_unit)
    if unit not in UNITS:
        raise HypervisorError(f"<{el.tag}> has an unknown unit {short(unit)}")
    return int(el.text.strip()) * UNITS[unit] // UNITS["MiB"]


class DomainDocument:
    """A domain XML tree with typed fields on the parts osimg reads or changes.

    The tree is kept whole: setting a field edits its element in place, and :meth:`to_xml` writes
    every element the document does not model (addresses, controllers, CPU, MAC) as it was read.
    """

    def __init__(self, root: ET.Element) -> None:
        self.root = root

    @classmethod
    def parse(cls, xml: str) -> DomainDocument:
        return cls(parse_xml(xml, "domain"))

    def to_xml(self) -> str:
        return ET.tostring(self.root, encoding="unicode")

    # -- identity ------------------------------------------------------------------------------------------------
    def _text(self, path: str) -> str | None:
        return self.root.findtext(path)

    def _set_text(self, parent: ET.Element, tag: str, value: str) -> None:
        el = parent.find(tag)
        if el is None:
            el = ET.SubElement(parent, tag)
        el.text = value

    def _os(self) -> ET.Element:
        os_el = self.root.find("os")
        if os_el is None:
            os_el = ET.SubElement(self.root, "os")
        return os_el

    def _required(self, value: str | None, what: str) -> str:
        if value is None:
            raise HypervisorError(f"domain {self.name or '?'} has no {what}: not a domain osimg defines")
        return value

    @property
    def name(self) -> str | None:
        return self._text("name")

    @name.setter
    def name(self, value: str) -> None:
        self._set_text(self.root, "name", value)

    @property
    def uuid(self) -> str | None:
        return self._text("uuid")

    @uuid.setter
    def uuid(self, value: str) -> None:
        self._set_text(self.root, "uuid", value)

    @property
    def genid(self) -> str | None:
        """The VM generation ID; None when the domain has no ``<genid>`` (no vmgenid device)."""
        el = self.root.find("genid")
        return None if el is None else (el.text or "")

    @genid.setter
    def genid(self, value: str) -> None:
        el = self.root.find("genid")
        if el is None:
            raise HypervisorError(f"domain {self.name} has no <genid>: a saved state cannot gain the vmgenid "
                                  "device (capture the image again to give its guests one)")
        el.text = value

    @property
    def accel(self) -> str:
        return self.root.get("type", "qemu")

    @property
    def memory_mib(self) -> int | None:
        return scaled_mib(self.root.find("memory"))

    @property
    def vcpus(self) -> int | None:
        text = self._text("vcpu")
        return int(text) if text is not None else None

    @property
    def tb_cache_mib(self) -> int | None:
        return scaled_mib(self.root.find("features/tcg/tb-cache"))

    @property
    def metadata(self) -> dict[str, str]:
        """osimg's attributes in ``<metadata><osimg:guest .../></metadata>``; {} when absent."""
        node = self.root.find(f"metadata/{OSIMG_GUEST}")
        return dict(node.attrib) if node is not None else {}

    @metadata.setter
    def metadata(self, value: dict[str, str]) -> None:
        """Replace osimg's element only: metadata of other namespaces belongs to other tools."""
        meta = self.root.find("metadata")
        node = meta.find(OSIMG_GUEST) if meta is not None else None
        if not value:
            if meta is not None and node is not None:
                meta.remove(node)
                if len(meta) == 0:
                    self.root.remove(meta)
            return
        if meta is None:
            # where libvirt writes it: after the identity elements
            idents = [i for i, el in enumerate(self.root) if el.tag in IDENTITY_TAGS]
            meta = ET.Element("metadata")
            self.root.insert(idents[-1] + 1 if idents else 0, meta)
        if node is None:
            node = ET.SubElement(meta, OSIMG_GUEST)
        node.attrib.clear()
        node.attrib.update(sorted(value.items()))

    # -- boot ----------------------------------------------------------------------------------------------------
    @property
    def kernel(self) -> str | None:
        return self._text("os/kernel")

    @kernel.setter
    def kernel(self, value: str) -> None:
        self._set_text(self._os(), "kernel", value)

    @property
    def initrd(self) -> str | None:
        return self._text("os/initrd")

    @initrd.setter
    def initrd(self, value: str) -> None:
        self._set_text(self._os(), "initrd", value)

    @property
    def cmdline(self) -> str | None:
        return self._text("os/cmdline")

    # -- devices -------------------------------------------------------------------------------------------------
    def _devices(self) -> ET.Element:
        devs = self.root.find("devices")
        if devs is None:
            raise HypervisorError(f"domain {self.name or '?'} has no <devices>")
        return devs

    def _disk(self, target: str) -> ET.Element | None:
        for el in self.root.findall("devices/disk"):
            tgt = el.find("target")
            if tgt is not None and tgt.get("dev") == target:
                return el
        return None

    @property
    def disks(self) -> list[DiskSpec]:
        return [DiskSpec.from_element(el) for el in self.root.findall("devices/disk")]

    def disk_file(self, target: str) -> str | None:
        """The file behind disk ``target`` (None: no such disk, or not a file)."""
        el = self._disk(target)
        src = el.find("source") if el is not None and el.get("type") == "file" else None
        return src.get("file") if src is not None else None

    def set_disk_file(self, target: str, path: str) -> bool:
        """Point file disk ``target`` at ``path``; False when the domain has no disk ``target``."""
        el = self._disk(target)
        if el is None:
            return False
        src = el.find("source")
        if el.get("type") != "file" or src is None:
            raise HypervisorError(f"domain {self.name}: disk {target} is a {el.get('type')} disk, not a file; "
                                  "a saved state cannot be moved onto another kind of disk")
        src.set("file", path)
        return True

    def _log_sources(self) -> list[ET.Element]:
        """The ``<source path=...>`` of every file-backed serial port and console (libvirt writes both)."""
        out = []
        for tag in ("serial", "console"):
            for el in self.root.findall(f"devices/{tag}"):
                src = el.find("source")
                if src is not None and src.get("path"):
                    out.append(src)
        return out

    @property
    def serial_log(self) -> str | None:
        srcs = self._log_sources()
        return srcs[0].get("path") if srcs else None

    @serial_log.setter
    def serial_log(self, path: str) -> None:
        srcs = self._log_sources()
        if not srcs:
            raise HypervisorError(f"domain {self.name} has no file-backed serial console to point at {path}")
        for src in srcs:
            src.set("path", path)

    # -- QEMU command line and network ---------------------------------------------------------------------------
    def _arg_elements(self) -> list[ET.Element]:
        return self.root.findall(f"{QEMU_COMMANDLINE}/{QEMU_ARG}")

    @property
    def qemu_args(self) -> list[str]:
        return [el.get("value", "") for el in self._arg_elements()]

    def _net_arg_indexes(self) -> tuple[int | None, int | None]:
        """Indexes of the values of osimg's ``-netdev user`` and of the NIC on it, in :attr:`qemu_args`."""
        args = self.qemu_args
        netdev = nic = None
        for i in range(1, len(args)):
            if args[i - 1] == "-netdev" and args[i].startswith(f"user,id={NETDEV_ID},"):
                netdev = i
            elif args[i - 1] == "-device" and f"netdev={NETDEV_ID}" in args[i].split(","):
                nic = i
        return netdev, nic

    @property
    def user_netdev(self) -> str | None:
        """The value of osimg's ``-netdev user`` argument (subnet and forwards), or None."""
        i, _ = self._net_arg_indexes()
        return self.qemu_args[i] if i is not None else None

    def set_user_net(self, net: NetSpec) -> None:
        """Give the slirp back end ``net``'s subnet and forwards. The NIC and its MAC are left as they
        are: they are guest-visible, and a paged-in OS keeps the NIC it was saved with."""
        i, _ = self._net_arg_indexes()
        if i is None:
            raise HypervisorError(f"domain {self.name} has no user-mode network (-netdev user,id={NETDEV_ID}) "
                                  "to carry the forwards")
        self._arg_elements()[i].set("value", user_netdev(net))

    @property
    def net(self) -> NetSpec | None:
        iface = self.root.find("devices/interface[@type='network']")
        if iface is not None:
            return NetSpec.from_interface(iface)
        netdev, nic = self._net_arg_indexes()
        if netdev is None:
            return None
        args = self.qemu_args
        return NetSpec.from_qemu_args(args[netdev], args[nic] if nic is not None else None)

    @property
    def extra_qemu_args(self) -> list[str]:
        """The QEMU arguments other than osimg's network pair (VIOS clients put -blockdev/-device here)."""
        args = self.qemu_args
        drop = {j for i in self._net_arg_indexes() if i is not None for j in (i - 1, i)}
        return [a for i, a in enumerate(args) if i not in drop]

    def spec(self) -> DomainSpec:
        """The document as a DomainSpec (what osimg models of it)."""
        memory = self.memory_mib
        vcpus = self.vcpus
        return DomainSpec(
            name=self._required(self.name, "<name>"), uuid=self._required(self.uuid, "<uuid>"),
            kernel=self._required(self.kernel, "<os><kernel>"), initrd=self._required(self.initrd, "<os><initrd>"),
            cmdline=self.cmdline or "", disks=self.disks,
            serial_log=self._required(self.serial_log, "file-backed serial console"), accel=self.accel,
            memory_mib=memory if memory is not None else 256, vcpus=vcpus if vcpus is not None else 1,
            net=self.net, metadata=self.metadata, tb_cache_mib=self.tb_cache_mib,
            extra_qemu_args=self.extra_qemu_args, genid=self.genid,
        )


def snapshot_xml(snap: str) -> str:
    """An internal snapshot named ``snap`` (memory and disks: libvirt's default for a running domain)."""
    el = ET.Element("domainsnapshot")
    ET.SubElement(el, "name").text = snap
    return ET.tostring(el, encoding="unicode")


def metadata_of(xml: str) -> dict[str, str]:
    return DomainDocument.parse(xml).metadata


def rewrite_identity(xml: str, spec: DomainSpec) -> str:
    """Give a saved domain's XML another guest's identity: name, UUID, metadata, disk files, serial
    log, kernel and initrd, forwards.

    Used when a golden image's memory state is paged into a guest. Everything guest-visible (the
    device model, MAC, PCI layout) stays as saved, because libvirt's ABI check refuses changes
    there. Disks of ``spec`` that the saved domain does not have (the data volume, hot-plugged
    after the page-in) are left out. The VM generation ID is the exception: every page-in gets a
    new one (a state saved without a ``<genid>`` keeps having none: the device cannot be added).
    """
    doc = DomainDocument.parse(xml)
    doc.name = spec.name
    doc.uuid = spec.uuid
    if doc.genid is not None:
        doc.genid = str(uuidlib.uuid4())
    doc.metadata = spec.metadata
    for disk in spec.disks:
        if disk.path:
            doc.set_disk_file(disk.target, disk.path)
    doc.serial_log = spec.serial_log
    doc.kernel = spec.kernel
    doc.initrd = spec.initrd
    if spec.net is not None and spec.net.mode == "user":
        doc.set_user_net(spec.net)
    return doc.to_xml()


# -- save files ------------------------------------------------------------------------------------------------------
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_VERSION = 2
SAVE_HEADER = struct.Struct("<16s5I56x")  # magic, version, data_len, was_running, compressed, cookieOffset


def saved_header(src: Path, xml: str) -> bytes:
    """The header (libvirt's, then the XML area) of a copy of save file ``src`` whose domain XML is ``xml``.

    libvirt refuses to restore a saved state under another UUID (its ABI check treats the UUID as
    guest-visible), so paging one golden state into many guests needs a per-guest copy carrying
    that guest's identity. The header layout is libvirt's ``virQEMUSaveHeader`` (version 2): XML,
    NUL, migration cookie, NUL, zero padding up to ``data_len``, then QEMU's migration stream,
    which is copied unchanged in the kernel (copy_file_range).
    """
    (magic, version, data_len, was_running, compressed, cookie_off), data = _read_save_header(src)
    if os.stat(src).st_size - SAVE_HEADER.size - data_len <= 0:
        raise HypervisorError(f"{src}: truncated save file (no migration stream after the header)")
    if cookie_off >= data_len:
        raise HypervisorError(f"{src}: cookie offset {cookie_off} lies outside the {data_len}-byte header")
    cookie = data[cookie_off:].split(b"\0", 1)[0] if cookie_off else b""
    new_xml = xml.encode()
    if b"\0" in new_xml:
        raise HypervisorError(f"{src}: the new domain XML contains a NUL byte")
    body = new_xml + b"\0" + (cookie + b"\0" if cookie else b"")
    if len(body) > data_len:
        raise HypervisorError(f"{src}: rewritten domain XML ({len(body)} bytes with the cookie) does not fit "
                              f"the save file's {data_len}-byte header")
    new_cookie_off = len(new_xml) + 1 if cookie else 0
    head = SAVE_HEADER.pack(magic, version, data_len, was_running, compressed, new_cookie_off)
    return head + body.ljust(data_len, b"\0")


def saved_domain_xml(src: Path) -> str:
    """The domain XML inside a save file, read locally (``Hypervisor.saved_xml`` asks a libvirtd,
    which reads the file on its own host)."""
    _, data = _read_save_header(src)
    return data.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _read_save_header(src: Path) -> tuple[tuple[bytes, int, int, int, int, int], bytes]:
    """A save file's libvirt header fields and its XML area (``data_len`` bytes), checked: whole, of a
    known version, an XML area of at most 16 MiB."""
    with open(src, "rb") as f:
        head = f.read(SAVE_HEADER.size)
        if len(head) < SAVE_HEADER.size:
            raise HypervisorError(f"{src}: truncated save file (header of {len(head)} bytes)")
        fields = SAVE_HEADER.unpack(head)
        magic, version, data_len = fields[:3]
        if magic != SAVE_MAGIC or version != SAVE_VERSION or not 0 < data_len <= 1 << 24:
            raise HypervisorError(f"{src}: not a libvirt save file of a known version "
                                  f"({short(magic)} v{version}, XML area of {data_len} bytes; expected "
                                  f"{SAVE_MAGIC.decode()} v{SAVE_VERSION})")
        data = f.read(data_len)
    if len(data) < data_len:
        raise HypervisorError(f"{src}: truncated save file ({len(data)} of {data_len} header bytes)")
    return fields, data


def retarget_saved_state(src: Path, dst: Path, xml: str) -> None:
    """Write a copy of save file ``src`` whose embedded domain XML is ``xml`` (see ``saved_header``):
    the new header, then QEMU's migration stream copied unchanged in the kernel (copy_file_range).
    The header keeps its length, so a copy of the same file elsewhere (another host's) becomes the
    same page-in file by overwriting its first ``len(header)`` bytes."""
    header = saved_header(src, xml)
    stream_len = os.stat(src).st_size - len(header)
    tmp = dst.with_suffix(".tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            fout.write(header)
            offset = len(header)
            remaining = stream_len
            while remaining > 0:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), remaining, offset)
                if n == 0:
                    raise HypervisorError(f"{src}: save file shrank while it was copied")
                offset += n
                remaining -= n
        tmp.rename(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
