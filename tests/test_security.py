"""Security (issue 13, storage and transport): records are data, qemu-img never probes, osimg only
destroys its own domains, file modes, NBD and etcd reachable by root and QEMU only.

The fast tests here need no guest: they craft store records and image files by hand and run the
real CLI on them. Tests marked ``guest`` start real daemons (qemu-storage-daemon, VIOS guests).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from orchestrator import guests
from orchestrator.cluster import open_store
from orchestrator.cluster.store import LU_KIND
from orchestrator.context import Context
from orchestrator.errors import ClusterError, ConflictError, HypervisorError, StorageError, ValidationError
from orchestrator.host import qemu_img
from orchestrator.host.domain import DomainSpec, NetSpec, domain_xml
from orchestrator.host.libvirt import Hypervisor
from orchestrator.host.ssh import ensure_client_key
from orchestrator.images import catalog
from orchestrator.settings import create_private, private_dir, qemu_gid, too_wide
from orchestrator.swap import journal
from orchestrator.vios import attach, lus, node

from .conftest import HOME, gname, osimg

pytest_plugins = ["tests.cluster_fixtures"]  # the session's etcd
ETCD_SH = Path(__file__).resolve().parent.parent / "scripts" / "etcd.sh"


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error: exactly one line on stderr, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def hostile_raw(path: Path, backing: str = "/etc/shadow") -> None:
    """A raw disk whose first bytes are a qcow2 header naming ``backing`` as its backing file: what a
    guest can write to the start of any raw disk it owns."""
    hdr = path.with_suffix(".hdr")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", str(hdr), "1G"],
                   check=True, capture_output=True, timeout=30)
    with path.open("wb") as f:
        f.write(hdr.read_bytes())
        f.truncate(4 << 20)
    hdr.unlink()


# -- records are data, not trust ------------------------------------------------------------------------
def test_lu_outside_the_roots_is_refused_with_the_allowed_roots(ctx: Context) -> None:
    name = gname("shadow")
    proc = osimg("vios", "lu", "add", name, "/etc/shadow", "--role", "data")
    assert proc.returncode == 2
    line = one_line(proc)
    assert "/etc/shadow" in line and str(HOME) in line and str(ctx.settings.cache) in line
    assert ctx.store.get(LU_KIND, name) is None


def test_lu_symlink_out_of_home_is_refused(ctx: Context) -> None:
    link = HOME / f"{gname('link')}.qcow2"
    link.symlink_to("/etc/shadow")
    try:
        with pytest.raises(ValidationError, match="outside the allowed roots"):
            lus.define_lu(ctx, gname("link"), link, "data")
    finally:
        link.unlink()


def test_crafted_lu_record_is_not_served(ctx: Context) -> None:
    """A record written straight into the store (as anyone holding the store could) names /etc/shadow:
    every reader refuses it, the node daemon included (it calls ``checked_lu`` before serving)."""
    name = gname("crafted-lu")
    ctx.store.put(LU_KIND, name, {"name": name, "path": "/etc/shadow", "fmt": "raw", "readonly": False,
                                  "role": "data", "size": 1, "created": time.time()})
    try:
        with pytest.raises(ValidationError, match="outside the allowed roots"):
            lus.get_lu(ctx, name)
        rec = ctx.store.get(LU_KIND, name)
        assert rec is not None
        with pytest.raises(ValidationError):
            lus.checked_lu(ctx, rec)
        with pytest.raises(ValidationError, match="format"):
            lus.checked_lu(ctx, {**rec, "path": str(HOME / "x.raw"), "fmt": "vmdk"})
        proc = osimg("vios", "export", name, gname("nonode"))
        assert proc.returncode == 2, proc.stderr
        one_line(proc)
    finally:
        ctx.store.delete(LU_KIND, name)


def test_crafted_export_paths_are_not_handed_to_qemu(ctx: Context) -> None:
    """An export record is written by a node daemon, but anyone holding the store could write one:
    its unix socket and its TLS key folder must be osimg's before QEMU is told to use them."""
    with pytest.raises(ValidationError, match="NBD socket"):
        attach.check_path(ctx, attach.Path_("n1", "n1.lu", "/run/libvirt/libvirt-sock", None))
    with pytest.raises(ValidationError, match="TLS key folder"):
        attach.tls_object(ctx, attach.Path_("n1", "n1.lu", None, 10809, tls="/etc/ssl/private"))
    with pytest.raises(ValidationError, match="node name"):
        attach.check_path(ctx, attach.Path_("../n1", "n1.lu", None, 10809))
    ok = attach.Path_("n1", "n1.lu", str(HOME / "vios" / "n1" / "nbd.sock"), None)
    assert attach.check_path(ctx, ok).socket == str(HOME / "vios" / "n1" / "nbd.sock")


def fake_guest(ctx: Context, guest: str, **over: object) -> dict[str, object]:
    img = ctx.settings.images_dir / "none"
    g = guests.Guest(name=guest, image="x", base=str(img / "disk.qcow2"), kernel=str(img / "vmlinuz"),
                     initrd=str(img / "initrd.img"), cmdline="", host_key="", os_version="1", family="tiny",
                     memory_mib=128, vcpus=1, accel="tcg", uuid=str(uuid.uuid4()), mac="52:54:00:12:34:56",
                     ssh_port=1, app_port=2, guest_app_port=8080, ready_marker="X")
    return {**asdict(g), **over}


@pytest.mark.parametrize("field,value", [("overlay_file", "VICTIM"), ("overlay_file", "../../VICTIM"),
                                         ("base", "/etc/shadow"), ("name", "../x")])
def test_crafted_journal_record_is_refused_and_nothing_unlinked(
        ctx: Context, tmp_path: Path, field: str, value: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    value = str(victim) if value == "VICTIM" else value.replace("VICTIM", str(victim).lstrip("/"))
    name = gname("journal")
    (ctx.settings.guests_dir / name).mkdir(parents=True, exist_ok=True)
    rec = dict(guest=name, strategy="warm", step="paged-in", from_image="a", to_image="b",
               old=fake_guest(ctx, name), new=fake_guest(ctx, name, **{field: value}))
    ctx.store.update(journal.KIND, name, lambda _old: rec)
    try:
        proc = osimg("swap", "--resume")
        assert proc.returncode == 2, proc.stderr
        assert "swap journal" in one_line(proc)
        assert victim.read_text() == "keep me"
        assert journal.get(ctx, name) is not None  # refused, not acted on
    finally:
        journal.drop_unlocked(ctx, name)
        (ctx.settings.guests_dir / name).rmdir()


def make_image(ctx: Context, name: str, disk_backing: str | None = None, **over: object) -> None:
    """A catalog image made by hand: a disk (optionally with a backing file), kernel and initrd files,
    read-only, hashed, and its record; ``over`` changes record fields."""
    d = catalog.image_dir(ctx, name)
    d.mkdir(parents=True)
    disk = d / catalog.DISK
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if disk_backing:
        args += ["-b", disk_backing, "-F", "raw"]
    subprocess.run([*args, str(disk), "16M"], check=True, capture_output=True, timeout=30)
    for f in catalog.BOOT_FILES:
        (d / f).write_bytes(b"not a kernel")
    files = {f.name: qemu_img.sha256(f) for f in sorted(d.iterdir())}
    for f in d.iterdir():
        qemu_img.write_protect(f)
    img = catalog.Image(name=name, kind="imported", parent=None, source="test", family="tiny", os_version="1",
                        files=files, virtual_size=16 << 20, allocated_size=0, has_memory_state=False,
                        state_from=None, host_key="", cmdline="", memory_mib=128, ready_marker="X", app_port=8080)
    ctx.store.put(catalog.KIND, name, {**asdict(img), **over})


def drop_image(ctx: Context, name: str) -> None:
    ctx.store.delete(catalog.KIND, name)
    d = catalog.image_dir(ctx, name)
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def test_snapshot_and_guest_create_verify_the_source_chain(ctx: Context) -> None:
    """An image whose disk's backing chain points at /etc/shadow: nothing is made from it."""
    name = gname("evil-img")
    make_image(ctx, name, disk_backing="/etc/shadow")
    try:
        proc = osimg("image", "snapshot", name, gname("evil-snap"))
        assert proc.returncode == 6, proc.stderr
        assert "/etc/shadow" in one_line(proc)
        assert not catalog.image_dir(ctx, gname("evil-snap")).exists()
        proc = osimg("guest", "create", gname("evil-g"), "--image", name)
        assert proc.returncode == 6, proc.stderr
        one_line(proc)
        assert not (ctx.settings.guests_dir / gname("evil-g")).exists()
    finally:
        drop_image(ctx, name)


def test_verified_source_is_cached_until_a_file_changes(ctx: Context) -> None:
    name = gname("good-img")
    make_image(ctx, name)
    try:
        catalog.verify_source(ctx, name)
        cached = json.loads((ctx.settings.images_dir / catalog.VERIFIED).read_text())
        assert name in cached
        kernel = catalog.image_dir(ctx, name) / "vmlinuz"
        kernel.chmod(0o644)
        kernel.write_bytes(b"changed kernel")  # same size class, new content, new ctime
        kernel.chmod(0o444)
        with pytest.raises(StorageError, match="vmlinuz was modified"):
            catalog.verify_source(ctx, name)
    finally:
        drop_image(ctx, name)


def test_crafted_image_record_state_file_outside_the_repository_is_refused(ctx: Context) -> None:
    name = gname("evil-state")
    make_image(ctx, name, has_memory_state=True, state_from="../../../../tmp")
    try:
        with pytest.raises(ValidationError, match="state_from"):
            catalog.resolve(ctx, name)
        proc = osimg("image", "inspect", name)
        assert proc.returncode == 2, proc.stderr
        one_line(proc)
    finally:
        drop_image(ctx, name)


# -- qemu-img never probes -----------------------------------------------------------------------------
def test_raw_lu_with_a_qcow2_header_is_never_opened_as_qcow2(ctx: Context) -> None:
    d = HOME / "lus"
    d.mkdir(exist_ok=True)
    raw = d / f"{gname('hostile')}.raw"
    hostile_raw(raw)
    lu = lus.define_lu(ctx, gname("hostile"), raw, "data")
    try:
        assert lu.fmt == "raw"
        assert lu.size == 4 << 20  # the file's own size, not the 1G the header claims
        assert qemu_img.info(raw, "raw").backing is None
        with pytest.raises(StorageError):
            qemu_img.info(raw, "vmdk")
    finally:
        lus.delete_lu(ctx, lu.name)
        raw.unlink()


def test_every_qemu_img_call_names_the_format() -> None:
    """Source check backing the runtime tests: no qemu-img/qemu-nbd argument list without ``-f``."""
    root = Path(__file__).resolve().parent.parent / "orchestrator"
    offenders = []
    for p in root.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if ('["qemu-img",' in line or '["qemu-nbd",' in line) and '"create"' not in line and '"-f"' not in line:
                offenders.append(f"{p.name}:{i}: {line.strip()}")
    assert not offenders, offenders


# -- osimg destroys only its own domains ---------------------------------------------------------------
def spec_with(home: str | None) -> DomainSpec:
    name = f"osimgsec-{uuid.uuid4().hex[:6]}"
    return DomainSpec(name=name, kernel="/boot/vmlinuz", initrd="/boot/initrd.img", cmdline="console=ttyS0",
                      serial_log=f"/var/lib/osimg/guests/{name}/console.log", disks=[],
                      net=NetSpec(mode="network", network="default", mac="52:54:00:00:00:08"),
                      metadata={"home": home} if home else {})


def test_only_domains_of_this_home_are_destroyed_on_the_test_driver() -> None:
    hv = Hypervisor("test:///default", home="/var/lib/osimg")
    try:
        hv.versions()
    except HypervisorError as err:
        pytest.skip(f"libvirt's test driver is not available: {err}")
    ours, theirs, bare = spec_with("/var/lib/osimg"), spec_with("/srv/other-osimg"), spec_with(None)
    try:
        for s in (ours, theirs, bare):
            hv.create(s)
        for s, why in ((theirs, "names '/srv/other-osimg'"), (bare, "has no osimg metadata")):
            with pytest.raises(ConflictError, match=why):
                hv.destroy(s.name)
            with pytest.raises(ConflictError, match="refusing"):
                hv.undefine(s.name)
            assert hv.state(s.name) == "running"
        with pytest.raises(ConflictError):
            hv.destroy("test")  # the driver's own domain
        hv.undefine(ours.name)
        assert not hv.exists(ours.name)
    finally:
        owner = Hypervisor("test:///default")
        for s in (ours, theirs, bare):
            owner.undefine(s.name)
        owner.close()
        hv.close()


def test_guest_rm_refuses_a_foreign_domain_of_the_same_name(ctx: Context) -> None:
    """On the real libvirtd: a defined (never started) domain without osimg metadata, and a guest
    folder of the same name: ``guest rm`` refuses with one line and leaves the domain alone."""
    spec = spec_with(None)
    spec.net = NetSpec(forwards={22: 1})
    admin = Hypervisor(ctx.settings.uri)
    admin.define(domain_xml(spec))
    gdir = ctx.settings.guests_dir / spec.name
    gdir.mkdir(parents=True)
    try:
        proc = osimg("guest", "rm", spec.name)
        assert proc.returncode == 4, proc.stderr
        assert "refusing" in one_line(proc)
        assert admin.exists(spec.name)
        assert gdir.exists()
    finally:
        admin.undefine(spec.name)
        admin.close()
        gdir.rmdir()


# -- file modes ----------------------------------------------------------------------------------------
NOBODY_READS = """
import os, sys
readable = []
for dirpath, dirnames, filenames in os.walk(sys.argv[1]):
    for n in filenames:
        p = os.path.join(dirpath, n)
        try:
            with open(p, "rb") as f:
                f.read(1)
            readable.append(p)
        except OSError:
            pass
print(len(readable), *readable[:5])
"""


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "nobody", "--", *args], capture_output=True, text=True, timeout=60)


def test_nobody_reads_no_file_under_osimg_home(ctx: Context) -> None:
    """What a fresh osimg makes without a guest (the store, an image, a data volume, a guest folder)
    is root's and QEMU's group's only; nobody can list or read any of it."""
    name = gname("modes-img")
    make_image(ctx, name)
    vol = ctx.settings.guests_dir / gname("modes") / "data.qcow2"
    private_dir(vol.parent)
    qemu_img.make_ext4_volume(vol, 8 << 20, "modes", str(uuid.uuid4()))
    try:
        ctx.store.put("probe", "x", {"secret": 1})
        files = [p for p in HOME.rglob("*") if p.is_file()]
        assert len(files) >= 5
        proc = as_nobody("/usr/bin/python3", "-c", NOBODY_READS, str(HOME))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[0] == "0", proc.stdout
        assert as_nobody("cat", str(HOME / "cluster.sqlite")).returncode != 0
        assert as_nobody("ls", str(HOME)).returncode != 0
        assert stat.S_IMODE((HOME / "cluster.sqlite").stat().st_mode) == 0o600
        assert stat.S_IMODE(vol.stat().st_mode) == 0o640
        assert stat.S_IMODE((catalog.image_dir(ctx, name) / catalog.DISK).stat().st_mode) == 0o440
        assert vol.parent.stat().st_gid == qemu_gid()
        mine = [vol, vol.parent, HOME / "cluster.sqlite", *catalog.image_dir(ctx, name).iterdir()]
        assert not [w for w in too_wide(HOME) if w[0] in mine]
    finally:
        drop_image(ctx, name)
        vol.unlink()
        vol.parent.rmdir()


def test_doctor_reports_wider_modes_and_fix_narrows_them(ctx: Context) -> None:
    ctx.settings.ensure_dirs()
    loose = HOME / gname("loose")
    loose.mkdir()
    loose.chmod(0o755)
    leak = loose / "state.sav"
    leak.write_text("guest memory")
    leak.chmod(0o644)
    key = loose / "node.key"
    key.write_text("secret")
    key.chmod(0o640)
    env = {"OSIMG_ACCEL": "tcg"}
    try:
        proc = osimg_env(env, "doctor", "--json")
        checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
        assert not checks["file modes"]["ok"]
        assert str(leak) in checks["file modes"]["detail"] and str(key) in checks["file modes"]["detail"]
        proc = osimg_env(env, "doctor", "--fix", "--json")
        checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
        assert checks["file modes"]["ok"], checks["file modes"]
        assert stat.S_IMODE(leak.stat().st_mode) == 0o640 and leak.stat().st_gid == qemu_gid()
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(loose.stat().st_mode) == 0o2750
        assert leak.read_text() == "guest memory"
    finally:
        key.unlink()
        leak.unlink()
        loose.rmdir()


def osimg_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "osimg"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OSIMG_HOME": str(HOME), **env})


def test_client_key_is_private_from_its_first_byte(tmp_path: Path) -> None:
    """The key is created with its mode (os.open), never chmod-ed after: even a umask of 0 cannot
    make it readable by others at any moment."""
    old = os.umask(0)
    try:
        ensure_client_key(tmp_path / "id_ed25519")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "id_ed25519").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        create_private(tmp_path / "id_ed25519", b"x")


# -- NBD: host service socket and VIOS-guest exports over TLS ----------------------------------------------
NOBODY_CONNECTS = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as err:
    print(err.errno)
"""


@pytest.mark.guest
def test_nobody_cannot_connect_to_the_host_service_nbd_socket(ctx: Context) -> None:
    """A real node daemon with its qemu-storage-daemon: the NBD socket is 0660 root:<QEMU's group> in a
    2750 folder; root connects, nobody gets EACCES (errno 13)."""
    name = gname("sock")
    node.start(ctx, name, ttl=2.0)
    try:
        info = node.get_info(ctx, name)
        assert info is not None
        sock = Path(info.folder) / "nbd.sock"
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == qemu_gid()
        assert stat.S_IMODE(Path(info.folder).stat().st_mode) == 0o2750
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))  # root (and QEMU's group) may
        proc = as_nobody("/usr/bin/python3", "-c", NOBODY_CONNECTS, str(sock))
        assert proc.stdout.strip() == "13", proc.stdout + proc.stderr
        # a raw LU that starts with a qcow2 header naming /etc/shadow is served as the raw bytes it is
        raw = private_dir(HOME / "lus") / f"{gname('served')}.raw"
        hostile_raw(raw)
        lu = lus.define_lu(ctx, gname("served"), raw, "data")
        try:
            lus.export_lu(ctx, lu.name, name)
            out = subprocess.run(["qemu-img", "info", "-f", "raw", "--output=json",
                                  f"nbd+unix:///{lu.name}?socket={sock}"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            assert json.loads(out)["virtual-size"] == 4 << 20  # qcow2 would have shown the header's 1 GiB
            assert info.backend_pid
            opened = [os.readlink(f) for f in Path(f"/proc/{info.backend_pid}/fd").iterdir()]
            assert str(raw) in opened and "/etc/shadow" not in opened
            lus.unexport(ctx, lu.name, name)
        finally:
            lus.delete_lu(ctx, lu.name)
            raw.unlink()
    finally:
        node.stop(ctx, name, timeout=15)


def nbd_info(port: int, lu: str, key_dir: Path | None) -> subprocess.CompletedProcess[str]:
    nbd = f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export={lu}"
    args = ["qemu-img", "info", "--output=json"]
    if key_dir is not None:
        args += ["--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={key_dir},username=osimg"]
        nbd += ",file.tls-creds=tls0"
    return subprocess.run([*args, "--image-opts", nbd], capture_output=True, text=True, timeout=60)


@pytest.mark.guest
def test_vios_guest_export_needs_the_nodes_tls_key(ctx: Context, tmp_path: Path) -> None:
    """A VIOS guest serves an LU with qemu-nbd on a 127.0.0.1 forward: without TLS, or with another
    key, ``qemu-img info`` fails; with the node's key it succeeds and sees the LU's size."""
    name = gname("tlsvg")
    d = HOME / "lus"
    private_dir(d)
    raw = d / f"{gname('tls')}.raw"
    with raw.open("wb") as f:
        f.truncate(6 << 20)
    lu = lus.define_lu(ctx, gname("tls"), raw, "data")
    try:
        node.start(ctx, name, as_guest=True, ttl=3.0, slots=1, timeout=300)
        exp = lus.export_lu(ctx, lu.name, name, wait=120)
        assert exp.port and exp.tls
        key_dir = Path(exp.tls)
        assert stat.S_IMODE((key_dir / "keys.psk").stat().st_mode) == 0o640
        assert not [w for w in too_wide(HOME) if w[0].parent == key_dir]  # doctor --fix leaves it to QEMU
        plain = nbd_info(exp.port, lu.name, None)
        assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
        other = tmp_path / "other"
        other.mkdir()
        (other / "keys.psk").write_text("osimg:" + "ab" * 32 + "\n")
        wrong = nbd_info(exp.port, lu.name, other)
        assert wrong.returncode != 0 and "TLS handshake failed" in wrong.stderr, wrong.stderr
        good = nbd_info(exp.port, lu.name, key_dir)
        assert good.returncode == 0, good.stderr
        assert json.loads(good.stdout)["virtual-size"] == 6 << 20
    finally:
        stop = node.get_info(ctx, name)
        node.stop(ctx, name, timeout=30)
        if stop is not None and stop.domain and ctx.hv.exists(stop.domain):
            ctx.hv.undefine(stop.domain)
        lus.delete_lu(ctx, lu.name)
        raw.unlink()


# -- etcd: TLS and client certificates -----------------------------------------------------------------
@pytest.mark.etcd
def test_etcd_refuses_clients_without_osimg_credentials(etcd_url: str, tmp_path: Path) -> None:
    """The session's etcd (started by scripts/etcd.sh with TLS and --client-cert-auth): osimg's client
    with the set-up's certificates works; plain HTTP, TLS without a client certificate, and a client
    certificate of another CA are all refused."""
    port = urlsplit(etcd_url).port
    with open_store(f"{etcd_url}/sec-{uuid.uuid4().hex[:8]}") as good:
        good.put("probe", "x", {"ok": 1})
        assert good.get("probe", "x") == {"ok": 1}
    with pytest.raises(ClusterError), open_store(f"etcd://127.0.0.1:{port}/sec", timeout=3) as plain:
        plain.get("probe", "x")
    pki = Path(os.environ["OSIMG_ETCD_PKI"])
    body = {"key": "L29zaW1n"}  # base64 of /osimg
    with requests.Session() as s:
        s.trust_env = False
        with pytest.raises(requests.exceptions.SSLError):
            s.post(f"https://127.0.0.1:{port}/v3/kv/range", json=body, verify=str(pki / "ca.crt"), timeout=5)
        with pytest.raises(requests.exceptions.SSLError):  # the server is not trusted without osimg's CA
            s.post(f"https://127.0.0.1:{port}/v3/kv/range", json=body, timeout=5,
                   verify="/etc/ssl/certs/ca-certificates.crt", cert=(str(pki / "client.crt"), str(pki / "client.key")))
    other = tmp_path / "other-pki"
    subprocess.run([str(ETCD_SH), "pki", str(other)], check=True, capture_output=True, timeout=60)
    for f in ("client.crt", "client.key"):
        (tmp_path / "mixed").mkdir(exist_ok=True)
        (tmp_path / "mixed" / f).write_bytes((other / f).read_bytes())
    (tmp_path / "mixed" / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    with pytest.raises(ClusterError), open_store(f"{etcd_url}/sec?pki={tmp_path / 'mixed'}", timeout=3) as forged:
        forged.get("probe", "x")
    assert stat.S_IMODE((pki / "client.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
