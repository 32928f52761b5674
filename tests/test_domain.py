"""Domain XML and save files without QEMU: every kind of guest osimg defines is written, read back and
compared; the identity rewrite of a page-in runs on the XML libvirt really wrote into a saved state;
the save-file copy is checked byte by byte.

``fixtures/saved-state-domain.xml`` and ``fixtures/saved-state-cookie.xml`` are the domain XML and
migration cookie of a real libvirt 9.0 save file (a tiny:v1 golden image captured with
``osimg image build`` under TCG on QEMU 7.2), with the host's paths replaced by /var/lib/osimg ones.
"""

from __future__ import annotations

import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import guests
from orchestrator.context import Context
from orchestrator.customize import Customization
from orchestrator.errors import HypervisorError, ValidationError
from orchestrator.host.domain import (
    NETDEV_ID,
    OSIMG_NS,
    QEMU_NS,
    SAVE_HEADER,
    SAVE_MAGIC,
    DiskSpec,
    DomainDocument,
    DomainSpec,
    NetSpec,
    disk_xml,
    domain_xml,
    metadata_of,
    parse_user_netdev,
    retarget_saved_state,
    rewrite_identity,
    snapshot_xml,
    user_netdev,
)
from orchestrator.swap.staging import staging_spec
from orchestrator.validate import name as valid_name

FIXTURES = Path(__file__).parent / "fixtures"
SAVED_XML = (FIXTURES / "saved-state-domain.xml").read_text()
SAVED_COOKIE = (FIXTURES / "saved-state-cookie.xml").read_bytes()
SAVED_DATA_LEN = 68674  # the real file's header size for this XML and cookie
Q = f"{{{QEMU_NS}}}"


# -- the guests osimg defines, from the code that defines them -------------------------------------------------------
def record(**kw: object) -> guests.Guest:
    base = dict(
        name="web1", image="tiny:v1", base="/var/lib/osimg/images/tiny/disk.qcow2", kernel="/boot/vmlinuz",
        initrd="/boot/initrd.img", cmdline="console=ttyS0 root=/dev/vda rootfstype=ext4 quiet panic=-1",
        host_key="ssh-ed25519 AAAA", os_version="1", family="tiny", memory_mib=256, vcpus=1, accel="qemu",
        uuid="5f0c6f3e-8d1e-4c39-9a51-0b7b3c1d2e4f", mac="52:54:00:12:34:56", ssh_port=40022, app_port=40080,
        guest_app_port=8080, ready_marker="OSIMG-READY",
    )
    base.update(kw)
    return guests.Guest(**base)  # type: ignore[arg-type]


def guest_spec(tmp_path: Path, config_drive: bool = True, **kw: object) -> DomainSpec:
    """``guests.domain_spec`` for a guest record: the spec every created guest is defined from."""
    ctx = Context.from_env(home=str(tmp_path))
    g = record(**kw)
    if config_drive:
        g.dir(ctx).mkdir(parents=True)
        g.config_drive(ctx).write_bytes(b"")
    return guests.domain_spec(ctx, g)


def plain(tmp_path: Path) -> DomainSpec:
    return guest_spec(tmp_path, config_drive=False)


def with_config_drive(tmp_path: Path) -> DomainSpec:
    return guest_spec(tmp_path)


def with_data_volume(tmp_path: Path) -> DomainSpec:
    return guest_spec(tmp_path, data_uuid="0f6bd1e2-8f7a-4b5c-9d3e-2a1b0c9d8e7f", data_size=64 << 20)


def static_address(tmp_path: Path) -> DomainSpec:
    """User mode with the guest's own address: slirp's subnet carries dhcpstart (Customization.user_mode_net)."""
    custom = Customization(address="10.0.2.21/24", gateway="10.0.2.2", kernel_params=["osimg.role=web"])
    return guest_spec(tmp_path, customization=custom.to_dict())


def libvirt_network(tmp_path: Path) -> DomainSpec:
    return guest_spec(tmp_path, network="lan", mac="52:54:00:0a:0b:0c", accel="kvm")


def nbd_disks(tmp_path: Path) -> DomainSpec:
    """VIOS LUs attached as plain libvirt NBD disks: one on a unix socket, one on a 127.0.0.1 port."""
    spec = guest_spec(tmp_path)
    spec.disks += [
        DiskSpec("sda", bus="scsi", scsi_unit=1, readonly=True, nbd_export="base-lu",
                 nbd_socket="/var/lib/osimg/vios/n1/nbd.sock"),
        DiskSpec("sdb", bus="scsi", scsi_unit=5, nbd_export="data-lu", nbd_port=10809),
    ]
    return spec


def vios_client(tmp_path: Path) -> DomainSpec:
    """A client booting from a VIOS quorum: its root disk is declared on the QEMU command line (JSON)."""
    spec = guest_spec(tmp_path)
    spec.disks = [d for d in spec.disks if d.target != "vda"]
    spec.cmdline = spec.cmdline.replace("root=/dev/vda", "root=/dev/sda")
    spec.extra_qemu_args += [
        "-blockdev", '{"driver": "nbd", "node-name": "vios1x1p0", "server": {"type": "unix", "path": '
                     '"/var/lib/osimg/vios/n1/nbd.sock"}, "export": "base", "read-only": true, "reconnect-delay": 2}',
        "-blockdev", '{"driver": "quorum", "node-name": "vios1x1q", "vote-threshold": 1, "children": ["vios1x1p0"]}',
        "-device", '{"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": 0, "lun": 1, "drive": "vios1x1o", '
                   '"id": "vios-1-1", "werror": "stop", "rerror": "stop"}',
    ]
    return spec


def kvm_probe(tmp_path: Path) -> DomainSpec:
    """``Hypervisor.probe_kvm``'s throw-away domain: no disks, no network, no metadata, KVM."""
    return DomainSpec(name="osimg-kvm-probe-1", kernel="/boot/vmlinuz", initrd="/boot/initrd.img", disks=[],
                      serial_log=str(tmp_path / "probe.serial"), accel="kvm",
                      cmdline="console=ttyS0 osimg.probe panic=-1", memory_mib=128, tb_cache_mib=None)


KINDS: list[Callable[[Path], DomainSpec]] = [
    plain, with_config_drive, with_data_volume, static_address, libvirt_network, nbd_disks, vios_client, kvm_probe,
]


@pytest.mark.parametrize("make", KINDS, ids=[k.__name__ for k in KINDS])
def test_every_kind_of_guest_reads_back_equal(make: Callable[[Path], DomainSpec], tmp_path: Path) -> None:
    spec = make(tmp_path)
    xml = domain_xml(spec)
    back = DomainSpec.from_xml(xml)
    assert back == spec
    assert back.to_xml() == xml
    for disk in spec.disks:
        assert DiskSpec.from_xml(disk_xml(disk)) == disk


def test_the_kinds_differ_where_they_should(tmp_path: Path) -> None:
    """Guard against a round trip that holds because the parts are missing on both sides."""
    assert [d.target for d in with_data_volume(tmp_path / "a").disks] == ["vda", "vdb", "vdc"]
    assert DomainSpec.from_xml(domain_xml(static_address(tmp_path / "b"))).net == NetSpec(
        forwards={22: 40022, 8080: 40080}, subnet="10.0.2.0/24,dhcpstart=10.0.2.21")
    assert DomainSpec.from_xml(domain_xml(static_address(tmp_path / "c"))).cmdline.endswith(" osimg.role=web")
    net = DomainSpec.from_xml(domain_xml(libvirt_network(tmp_path / "d"))).net
    assert net == NetSpec(mode="network", network="lan", mac="52:54:00:0a:0b:0c")
    assert len(DomainSpec.from_xml(domain_xml(vios_client(tmp_path / "e"))).extra_qemu_args) == 6
    probe = DomainSpec.from_xml(domain_xml(kvm_probe(tmp_path / "f")))
    assert (probe.net, probe.metadata, probe.tb_cache_mib, probe.accel) == (None, {}, None, "kvm")


def test_forwards_are_on_loopback_only(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(static_address(tmp_path)))
    args = [a.get("value", "") for a in root.iter(f"{Q}arg")]
    fwds = [f for a in args for f in a.split(",") if "hostfwd" in f]
    assert sorted(fwds) == ["hostfwd=tcp:127.0.0.1:40022-:22", "hostfwd=tcp:127.0.0.1:40080-:8080"]
    assert args[:2] == ["-netdev", f"user,id={NETDEV_ID},net=10.0.2.0/24,dhcpstart=10.0.2.21,"
                                   "hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:40080-:8080"]
    assert args[2:] == ["-device", f"virtio-net-pci,netdev={NETDEV_ID},mac=52:54:00:12:34:56,bus=pci.0,addr=0x1e"]
    assert root.find("devices/interface") is None


def test_user_netdev_is_the_only_spelling_of_a_forward() -> None:
    """No other module builds a hostfwd string: the fresh domain and the page-in both use user_netdev."""
    src = Path(__file__).resolve().parent.parent / "orchestrator"
    spelled = [p.relative_to(src).as_posix() for p in src.rglob("*.py") if "hostfwd=" in p.read_text()]
    assert spelled == ["host/domain.py"]
    net = NetSpec(forwards={22: 2222, 8080: 8888}, subnet="10.1.0.0/16,dhcpstart=10.1.0.9")
    assert parse_user_netdev(user_netdev(net)) == (net.subnet, net.forwards)


@pytest.mark.parametrize("bad", ["hostfwd=tcp:0.0.0.0:2222-:22", "hostfwd=udp:127.0.0.1:2222-:22",
                                 "hostfwd=tcp::2222-:22", "hostfwd=tcp:127.0.0.1:2222-10.0.2.9:22"])
def test_a_forward_off_loopback_is_refused_on_read(bad: str, tmp_path: Path) -> None:
    xml = domain_xml(plain(tmp_path)).replace("hostfwd=tcp:127.0.0.1:40022-:22", bad)
    with pytest.raises(HypervisorError, match=r"not TCP on 127\.0\.0\.1"):
        DomainSpec.from_xml(xml)


def test_config_drive_is_a_readonly_raw_disk(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(with_data_volume(tmp_path)))
    by_target = {d.find("target").get("dev"): d for d in root.iter("disk")}  # type: ignore[union-attr]
    cd = by_target["vdb"]
    assert cd.find("readonly") is not None
    assert cd.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert cd.find("source").get("file", "").endswith("/web1/cidata.iso")  # type: ignore[union-attr]
    assert by_target["vda"].find("readonly") is None
    data = by_target["vdc"]
    assert data.findtext("serial") == guests.DATA_SERIAL
    assert data.find("source").get("file", "").endswith("/web1/data.qcow2")  # type: ignore[union-attr]


def test_nbd_disks_have_their_scsi_address_and_loopback_host(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(nbd_disks(tmp_path)))
    disks = {d.find("target").get("dev"): d for d in root.iter("disk")}  # type: ignore[union-attr]
    sda, sdb = disks["sda"], disks["sdb"]
    assert sda.get("type") == "network" and sda.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert sda.find("source").attrib == {"protocol": "nbd", "name": "base-lu"}  # type: ignore[union-attr]
    assert sda.find("source/host").attrib == {  # type: ignore[union-attr]
        "transport": "unix", "socket": "/var/lib/osimg/vios/n1/nbd.sock"}
    assert sda.find("address").attrib == {  # type: ignore[union-attr]
        "type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": "1"}
    assert sda.find("readonly") is not None
    assert sdb.find("source/host").attrib == {"name": "127.0.0.1", "port": "10809"}  # type: ignore[union-attr]
    assert sdb.find("address").get("unit") == "5"  # type: ignore[union-attr]
    # a VIOS LU is served raw to the guest whatever its file format: the spec says so too
    assert DiskSpec("sdc", fmt="qcow2", nbd_export="x", nbd_port=1).fmt == "raw"


def test_an_nbd_host_off_loopback_is_refused_on_read() -> None:
    xml = disk_xml(DiskSpec("sda", bus="scsi", nbd_export="lu", nbd_port=10809)).replace("127.0.0.1", "10.0.0.7")
    with pytest.raises(HypervisorError, match=r"not 127\.0\.0\.1"):
        DiskSpec.from_xml(xml)


def test_metadata_lives_in_the_osimg_namespace(tmp_path: Path) -> None:
    spec = with_data_volume(tmp_path)
    xml = domain_xml(spec)
    node = ET.fromstring(xml).find(f"metadata/{{{OSIMG_NS}}}guest")
    assert node is not None and node.attrib == spec.metadata
    assert set(spec.metadata) == {"home", "image", "hidden", "ssh-port", "app-port"}
    assert metadata_of(xml) == spec.metadata
    assert metadata_of(xml.replace(OSIMG_NS, "https://example.org/other")) == {}
    assert re.search(r'xmlns:osimg="https://osimg.dev/xmlns/domain/1"', xml)
    assert ET.fromstring(snapshot_xml("osimg-rollback")).findtext("name") == "osimg-rollback"


def test_libvirt_written_units_are_read(tmp_path: Path) -> None:
    """libvirt writes memory and the TCG cache back in KiB; osimg writes MiB."""
    xml = domain_xml(plain(tmp_path)).replace('<memory unit="MiB">256</memory>', '<memory unit="KiB">262144</memory>')
    xml = xml.replace('<tb-cache unit="MiB">64</tb-cache>', '<tb-cache unit="GiB">1</tb-cache>')
    back = DomainSpec.from_xml(xml)
    assert (back.memory_mib, back.tb_cache_mib) == (256, 1024)


def test_bad_documents_are_refused_in_one_line() -> None:
    with pytest.raises(HypervisorError, match="not well-formed"):
        DomainSpec.from_xml("<domain><name>x</domain>")
    with pytest.raises(HypervisorError, match="expected a <domain> document"):
        DomainSpec.from_xml("<disk/>")
    with pytest.raises(HypervisorError, match="no <os><kernel>"):
        DomainSpec.from_xml("<domain><name>x</name><uuid>u</uuid><devices/></domain>")


# -- a saved golden state, paged into a guest ------------------------------------------------------------------------
def page_in_spec(tmp_path: Path) -> DomainSpec:
    """What a warm swap passes to rewrite_identity: the guest's own spec on the new image."""
    spec = guest_spec(tmp_path, data_uuid="0f6bd1e2-8f7a-4b5c-9d3e-2a1b0c9d8e7f", overlay_file="os-gold.qcow2",
                      kernel="/var/lib/osimg/images/gold2/vmlinuz", initrd="/var/lib/osimg/images/gold2/initrd.img",
                      customization=Customization(address="10.0.2.21/24").to_dict())
    assert [d.target for d in spec.disks] == ["vda", "vdb", "vdc"]
    return spec


def flat(el: ET.Element, path: str = "", index: int = 0) -> dict[str, tuple[str, dict[str, str], str]]:
    """Every element by its position (``/domain[0]/devices[14]/disk[1]``): tag, attributes, stripped text."""
    here = f"{path}/{el.tag.split('}')[-1]}[{index}]"
    out = {here: (el.tag, dict(el.attrib), (el.text or "").strip())}
    for i, child in enumerate(el):
        out.update(flat(child, here, i))
    return out


def test_page_in_rewrite_changes_the_identity_and_nothing_else(tmp_path: Path) -> None:
    spec = page_in_spec(tmp_path)
    before, after = flat(ET.fromstring(SAVED_XML)), flat(ET.fromstring(rewrite_identity(SAVED_XML, spec)))
    assert before.keys() == after.keys()  # no element added, removed or moved (the data disk is hot-plugged later)
    changed = {k: after[k][1:] for k in before if before[k] != after[k]}
    log = {"path": str(tmp_path / "guests/web1/console.log")}
    assert changed == {
        "/domain[0]/name[0]": ({}, "web1"),
        "/domain[0]/uuid[1]": ({}, spec.uuid),
        "/domain[0]/metadata[2]/guest[0]": (spec.metadata, ""),
        "/domain[0]/os[7]/kernel[1]": ({}, "/var/lib/osimg/images/gold2/vmlinuz"),
        "/domain[0]/os[7]/initrd[2]": ({}, "/var/lib/osimg/images/gold2/initrd.img"),
        "/domain[0]/devices[14]/disk[1]/source[1]": ({"file": str(tmp_path / "guests/web1/os-gold.qcow2")}, ""),
        "/domain[0]/devices[14]/serial[6]/source[0]": (log, ""),
        "/domain[0]/devices[14]/console[7]/source[0]": (log, ""),
        "/domain[0]/commandline[15]/arg[1]": ({"value": "user,id=osimgnet0,net=10.0.2.0/24,dhcpstart=10.0.2.21,"
                                                         "hostfwd=tcp:127.0.0.1:40022-:22,"
                                                         "hostfwd=tcp:127.0.0.1:40080-:8080"}, ""),
    }


def test_page_in_rewrite_reads_back_as_the_guest(tmp_path: Path) -> None:
    spec = page_in_spec(tmp_path)
    out = rewrite_identity(SAVED_XML, spec)
    doc = DomainDocument.parse(out)
    assert (doc.name, doc.uuid, doc.metadata, doc.kernel, doc.initrd) == (
        spec.name, spec.uuid, spec.metadata, spec.kernel, spec.initrd)
    assert doc.disk_file("vda") == spec.disks[0].path and doc.disk_file("vdc") is None
    assert doc.serial_log == spec.serial_log
    assert doc.net == NetSpec(forwards={22: 40022, 8080: 40080}, subnet="10.0.2.0/24,dhcpstart=10.0.2.21")
    assert doc.extra_qemu_args == []
    # what the saved state keeps: the machine, memory, MAC and the command line it booted with
    saved = DomainDocument.parse(SAVED_XML)
    assert (doc.memory_mib, doc.tb_cache_mib, doc.cmdline, doc.accel) == (256, 64, saved.cmdline, "qemu")
    assert out.count("mac=52:54:00:12:34:56") == 1
    assert rewrite_identity(out, spec) == out  # a second rewrite is a fixed point


def test_the_saved_state_reads_as_the_builder_it_was(tmp_path: Path) -> None:
    saved = DomainDocument.parse(SAVED_XML).spec()
    assert saved.name == "build-gold-e9b220" and saved.metadata["hidden"] == "1"
    assert saved.net == NetSpec(forwards={22: 47609, 8080: 58267})
    assert [(d.target, d.path) for d in saved.disks] == [
        ("vda", "/var/lib/osimg/guests/build-gold-e9b220/os.qcow2")]


def test_page_in_keeps_foreign_metadata_and_adds_missing_metadata(tmp_path: Path) -> None:
    spec = page_in_spec(tmp_path)
    foreign = SAVED_XML.replace("</metadata>", '<lib:os xmlns:lib="http://libosinfo.org/xmlns/libvirt/domain/1.0" '
                                               'id="http://debian.org/debian/12"/></metadata>')
    out = ET.fromstring(rewrite_identity(foreign, spec))
    meta = out.find("metadata")
    assert meta is not None and [c.tag.split("}")[0] for c in meta] == [
        f"{{{OSIMG_NS}", "{http://libosinfo.org/xmlns/libvirt/domain/1.0"]
    bare = re.sub(r"<metadata.*?</metadata>\s*", "", SAVED_XML, flags=re.S)
    out = ET.fromstring(rewrite_identity(bare, spec))
    assert [c.tag for c in out][:4] == ["name", "uuid", "metadata", "memory"]
    assert metadata_of(ET.tostring(out, encoding="unicode")) == spec.metadata


def test_page_in_refuses_what_it_cannot_carry(tmp_path: Path) -> None:
    spec = page_in_spec(tmp_path)
    no_net = re.sub(r"<qemu:commandline>.*?</qemu:commandline>", "", SAVED_XML, flags=re.S)
    with pytest.raises(HypervisorError, match="no user-mode network"):
        rewrite_identity(no_net, spec)
    nbd_root = re.sub(r"<disk type='file'.*?<source file='[^']*'/>", "<disk type='network' device='disk'>"
                      "<source protocol='nbd' name='x'><host transport='unix' socket='/s'/></source>",
                      SAVED_XML, count=1, flags=re.S)
    with pytest.raises(HypervisorError, match="disk vda is a network disk"):
        rewrite_identity(nbd_root, spec)


# -- save files ------------------------------------------------------------------------------------------------------
STREAM = random.Random(12).randbytes(300_000)


def save_file(path: Path, xml: bytes = SAVED_XML.encode(), cookie: bytes = SAVED_COOKIE,
              data_len: int = SAVED_DATA_LEN, magic: bytes = SAVE_MAGIC, version: int = 2, was_running: int = 1,
              compressed: int = 0, stream: bytes = b"QEVM" + STREAM) -> Path:
    """A file in libvirt's save format: header, XML NUL cookie NUL, zero padding to data_len, stream."""
    body = xml + b"\0" + (cookie + b"\0" if cookie else b"")
    cookie_off = len(xml) + 1 if cookie else 0
    path.write_bytes(SAVE_HEADER.pack(magic, version, data_len, was_running, compressed, cookie_off)
                     + body.ljust(data_len, b"\0") + stream)
    return path


def read_save(path: Path) -> tuple[tuple[int, ...], bytes, bytes]:
    raw = path.read_bytes()
    fields = SAVE_HEADER.unpack(raw[:SAVE_HEADER.size])
    data_len = fields[2]
    return fields, raw[SAVE_HEADER.size:SAVE_HEADER.size + data_len], raw[SAVE_HEADER.size + data_len:]


@pytest.mark.parametrize(("was_running", "compressed"), [(1, 0), (0, 2)])
def test_retarget_writes_the_new_xml_and_keeps_the_rest(tmp_path: Path, was_running: int, compressed: int) -> None:
    src = save_file(tmp_path / "state.sav", was_running=was_running, compressed=compressed)
    new_xml = rewrite_identity(SAVED_XML, page_in_spec(tmp_path))
    dst = tmp_path / "pagein.sav"
    retarget_saved_state(src, dst, new_xml)
    (magic, version, data_len, running, comp, cookie_off), data, stream = read_save(dst)
    assert (magic, version, data_len, running, comp) == (SAVE_MAGIC, 2, SAVED_DATA_LEN, was_running, compressed)
    raw_xml = new_xml.encode()
    assert cookie_off == len(raw_xml) + 1
    assert data[:cookie_off] == raw_xml + b"\0"
    assert data[cookie_off:cookie_off + len(SAVED_COOKIE) + 1] == SAVED_COOKIE + b"\0"
    assert data[cookie_off + len(SAVED_COOKIE) + 1:] == bytes(SAVED_DATA_LEN - cookie_off - len(SAVED_COOKIE) - 1)
    assert stream == b"QEVM" + STREAM
    assert dst.stat().st_size == src.stat().st_size
    assert DomainDocument.parse(data[:cookie_off - 1].decode()).name == "web1"
    assert not (tmp_path / "pagein.tmp").exists()


def test_retarget_without_a_cookie_writes_offset_zero(tmp_path: Path) -> None:
    src = save_file(tmp_path / "state.sav", cookie=b"", data_len=8192)
    retarget_saved_state(src, tmp_path / "out.sav", "<domain><name>b</name></domain>")
    (_, _, data_len, _, _, cookie_off), data, stream = read_save(tmp_path / "out.sav")
    assert (data_len, cookie_off) == (8192, 0)
    assert data == b"<domain><name>b</name></domain>".ljust(8192, b"\0")
    assert stream == b"QEVM" + STREAM


def test_retarget_refuses_xml_that_does_not_fit(tmp_path: Path) -> None:
    src = save_file(tmp_path / "state.sav")
    room = SAVED_DATA_LEN - len(SAVED_COOKIE) - 2
    fits = "<domain>" + " " * (room - len("<domain></domain>")) + "</domain>"
    retarget_saved_state(src, tmp_path / "ok.sav", fits)  # exactly full: accepted
    dst = tmp_path / "big.sav"
    with pytest.raises(HypervisorError, match="does not fit"):
        retarget_saved_state(src, dst, fits.replace("<domain>", "<domain> "))
    assert not dst.exists() and not (tmp_path / "big.tmp").exists()


@pytest.mark.parametrize(("kw", "message"), [
    ({"magic": b"LibvirtQemudPart"}, "not a libvirt save file"),
    ({"version": 3}, "not a libvirt save file"),
    ({"version": 1}, "not a libvirt save file"),
])
def test_retarget_refuses_unknown_files(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    src = save_file(tmp_path / "state.sav", **kw)  # type: ignore[arg-type]
    with pytest.raises(HypervisorError, match=message):
        retarget_saved_state(src, tmp_path / "out.sav", "<domain/>")
    assert not (tmp_path / "out.sav").exists()


@pytest.mark.parametrize("cut", [0, 50, SAVE_HEADER.size + 100, SAVE_HEADER.size + SAVED_DATA_LEN])
def test_retarget_refuses_a_truncated_file(tmp_path: Path, cut: int) -> None:
    src = save_file(tmp_path / "state.sav")
    src.write_bytes(src.read_bytes()[:cut])
    with pytest.raises(HypervisorError, match="truncated save file"):
        retarget_saved_state(src, tmp_path / "out.sav", "<domain/>")
    assert not (tmp_path / "out.sav").exists()


def test_retarget_refuses_a_cookie_offset_outside_the_header(tmp_path: Path) -> None:
    src = save_file(tmp_path / "state.sav")
    raw = bytearray(src.read_bytes())
    raw[32:36] = (SAVED_DATA_LEN + 5).to_bytes(4, "little")  # cookieOffset: 16-byte magic, then 4 uint32s
    src.write_bytes(bytes(raw))
    with pytest.raises(HypervisorError, match="cookie offset"):
        retarget_saved_state(src, tmp_path / "out.sav", "<domain/>")


# -- the VM generation ID --------------------------------------------------------------------------------------------
def test_every_domain_gets_its_own_genid_and_reads_it_back(tmp_path: Path) -> None:
    a, b = guest_spec(tmp_path / "a"), guest_spec(tmp_path / "b")
    assert a.genid and b.genid and a.genid != b.genid
    root = ET.fromstring(domain_xml(a))
    assert [c.tag for c in root][:3] == ["name", "uuid", "genid"] and root.findtext("genid") == a.genid
    assert DomainSpec.from_xml(domain_xml(a)).genid == a.genid


def test_page_in_gives_a_saved_state_with_a_genid_a_new_one_every_time(tmp_path: Path) -> None:
    gold = "0c5b3f3e-1111-4c39-9a51-0b7b3c1d2e4f"
    saved = SAVED_XML.replace("</uuid>", f"</uuid>\n  <genid>{gold}</genid>", 1)
    spec = page_in_spec(tmp_path)
    first, second = (DomainDocument.parse(rewrite_identity(saved, spec)).genid for _ in range(2))
    assert first and second and len({gold, first, second, spec.genid}) == 4
    # a state saved without the device stays without it: adding one would be new hardware to the saved guest
    assert DomainDocument.parse(rewrite_identity(SAVED_XML, spec)).genid is None
    with pytest.raises(HypervisorError, match="cannot gain the vmgenid"):
        DomainDocument.parse(SAVED_XML).genid = gold


def test_a_staging_domain_is_the_guest_without_its_forwards_its_data_and_its_name(tmp_path: Path) -> None:
    """The staged page-in (swap.staging) runs beside the guest: it must not claim the guest's host
    ports, its data volume, its console log, its name or its UUID; and the staged save, given the
    guest's identity again, names the data volume where the staging had its stand-in disk."""
    spec = page_in_spec(tmp_path)
    staging = staging_spec(spec, tmp_path / "guests/web1")
    assert staging.name == "web1~staged" and staging.uuid != spec.uuid
    with pytest.raises(ValidationError):  # no guest can have a staging domain's name
        valid_name(staging.name)
    assert [d.target for d in staging.disks] == ["vda"] and staging.disks[0] == spec.disks[0]
    assert staging.serial_log != spec.serial_log and staging.metadata == spec.metadata
    doc = DomainDocument.parse(rewrite_identity(SAVED_XML, staging))
    assert doc.net is not None and doc.net.forwards == {} and doc.net.mac == spec.net.mac  # type: ignore[union-attr]
    assert "hostfwd" not in rewrite_identity(SAVED_XML, staging)
    # the staging domain, saved with the stand-in in the data volume's slot, back under the guest's identity
    [data] = [d for d in spec.disks if d.target == guests.DATA_TARGET]
    stand_in = ET.fromstring(disk_xml(DiskSpec(data.target, path=str(tmp_path / "stand-in.qcow2"), serial=data.serial)))
    root = ET.fromstring(rewrite_identity(SAVED_XML, staging))
    root.find("devices").append(stand_in)  # type: ignore[union-attr]
    back = DomainDocument.parse(rewrite_identity(ET.tostring(root, encoding="unicode"), spec))
    assert (back.name, back.uuid) == (spec.name, spec.uuid)
    assert back.disk_file(guests.DATA_TARGET) == data.path and back.net == spec.net
