"""Guests (the design's client LPARs): a private qcow2 overlay on a shared read-only base.

Each guest lives in ``OSIMG_HOME/guests/NAME/``: ``guest.json`` (its record), ``os.qcow2`` (its
redirect-on-write delta), ``cidata.iso`` (its customization), ``data.qcow2`` (its application
data, never an overlay of the OS), ``ssh_host_ed25519_key`` (its own SSH host key, 0600) and
``console.log``. The libvirt domain has the same name and
carries an osimg metadata element so ``guest list`` can tell our domains from anyone else's.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import customize, hosts, recipes
from .context import Context
from .errors import (
    ConflictError,
    GuestError,
    HostUnreachableError,
    NotFoundError,
    OsimgError,
    StorageError,
    ValidationError,
)
from .host import qemu_img
from .host.console import wait_for_text
from .host.domain import DiskSpec, DomainSpec, NetSpec
from .host.ssh import Session, new_host_key
from .images import catalog
from .settings import private_dir
from .validate import file_name, inside, short
from .validate import name as valid_name

DATA_LABEL = "osimg-data"
DATA_TARGET = "vdc"
DATA_SERIAL = customize.DATA_SERIAL
MAX_VCPUS = 64
MIN_DATA, MAX_DATA = 8 << 20, 16 << 40  # mkfs.ext4 needs a few MiB; the fleet spec allows the same range
HOST_KEY_FILE = "ssh_host_ed25519_key"
CONFIG_DRIVE, DATA_VOLUME, CONSOLE = "cidata.iso", "data.qcow2", "console.log"


@dataclass
class Guest:
    """A guest's record, persisted as guest.json next to its disks."""

    name: str
    image: str
    base: str
    kernel: str
    initrd: str
    cmdline: str
    host_key: str
    os_version: str
    family: str
    memory_mib: int
    vcpus: int
    accel: str
    uuid: str
    mac: str
    ssh_port: int
    app_port: int
    guest_app_port: int
    ready_marker: str
    data_size: int = 0
    data_uuid: str | None = None
    hidden: bool = False
    network: str | None = None
    customization: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    overlay_file: str = "os.qcow2"  # a swap puts the new OS on a new file, so the old one survives for rollback
    # host_key is the guest's own (made at create, on its config drive); False: the image's key
    # (a builder without a drive, or a record from before per-guest keys)
    own_host_key: bool = False
    host: str | None = None  # a registered host (its files in a pool there, see ``hosts``); None: this one

    def dir(self, ctx: Context) -> Path:
        """The guest's folder under OSIMG_HOME: its record and its host key (its disks, for a local guest)."""
        return ctx.settings.guests_dir / self.name

    def files(self, ctx: Context) -> hosts.Files:
        """Where QEMU's files of the guest are: this folder, or the guest's pool on its host."""
        return hosts.guest_files(ctx, self.host, self.name, self.dir(ctx))

    def at(self, ctx: Context) -> Context:
        """The handle of the guest's libvirt host."""
        return hosts.context(ctx, self.host)

    def overlay(self, ctx: Context) -> Path:
        return self.dir(ctx) / self.overlay_file

    def data_volume(self, ctx: Context) -> Path | None:
        """The data volume of a local guest (a guest on another host: ``files(ctx)``)."""
        return self.dir(ctx) / DATA_VOLUME if self.data_uuid else None

    def config_drive(self, ctx: Context) -> Path:
        return self.dir(ctx) / CONFIG_DRIVE

    def console(self, ctx: Context) -> Path:
        return self.dir(ctx) / CONSOLE

    def host_key_file(self, ctx: Context) -> Path:
        return self.dir(ctx) / HOST_KEY_FILE

    def own_key(self, ctx: Context) -> customize.HostKey | None:
        """The guest's own host key (private and public), or None when it presents the image's."""
        if not self.own_host_key:
            return None
        return customize.HostKey(self.host_key_file(ctx).read_text(), self.host_key)

    def custom(self) -> customize.Customization:
        return customize.Customization.from_dict(self.customization)

    def save(self, ctx: Context) -> None:
        path = self.dir(ctx) / "guest.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.rename(path)


def from_record(ctx: Context, data: object, what: str, hint: str = "") -> Guest:
    """A guest record (guest.json, a swap journal's old/new) made safe to act on.

    Records are data, not trust: the name and overlay file become paths that root unlinks, and the
    base, kernel and initrd are opened by QEMU, so each is checked against the name rule or the
    folders osimg keeps such files in before anything uses it (after ``from_dict``'s field types)."""
    g = from_dict(data, what, hint)
    file_name(g.overlay_file, f"{what}: overlay file")
    # the carried process trees name files and commands that a swap hands to a root shell in the guest
    try:
        for tree in g.custom().carried():
            tree.validate(what)
    except ValidationError as err:
        raise StorageError(f"{what} is broken ({err}){hint}") from None
    except (TypeError, ValueError, AttributeError):
        raise StorageError(f"{what} is broken (its customization is malformed){hint}") from None
    for label in ("base", "kernel", "initrd"):
        inside(getattr(g, label), ctx.settings.file_roots, f"{what}: {label}")
    if g.host is not None:
        try:
            valid_name(g.host, f"{what}: host")
        except ValidationError as err:
            raise StorageError(f"{what} is broken ({err}){hint}") from None
    return g


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MAX_RECORD = 1 << 20
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str, "int": int, "bool": bool, "float": (int, float), "str | None": (str, type(None)),
    "dict[str, Any]": dict}


def read_record(ctx: Context, path: Path) -> Guest:
    """A guest.json as a Guest, or a StorageError that says what is wrong with it: a record is data
    written by an earlier run (maybe cut short by a crash or edited by hand), not something to trust."""
    what = f"guest record {path}"
    hint = f"; remove the guest with 'osimg guest rm {path.parent.name}'"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECORD + 1)
        data = json.loads(raw.decode("utf-8"))
    except OSError as err:
        raise StorageError(f"{what} cannot be read: {err.strerror}{hint}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise StorageError(f"{what} is broken (not JSON: {str(err)[:60]}){hint}") from None
    if len(raw) > MAX_RECORD:
        raise StorageError(f"{what} is broken (larger than {MAX_RECORD >> 20} MiB){hint}")
    g = from_record(ctx, data, what, hint)
    if g.name != path.parent.name:
        raise StorageError(f"{what} is broken (it names {short(g.name, 40)}){hint}")
    return g


def from_dict(data: object, what: str, hint: str = "") -> Guest:
    """A Guest from stored data (a guest.json, a swap journal's copy), checked field by field."""
    if not isinstance(data, dict):
        raise StorageError(f"{what} is broken (not a guest record){hint}")
    names = {f.name: f for f in fields(Guest)}
    unknown = sorted(set(data) - set(names))
    missing = [n for n, f in names.items() if n not in data and f.default is MISSING
               and f.default_factory is MISSING]
    if unknown or missing:
        raise StorageError(f"{what} is broken (missing {', '.join(missing) or 'nothing'}, unknown "
                           f"{short(', '.join(unknown)) if unknown else 'nothing'}){hint}")
    for n, v in data.items():
        want = FIELD_TYPES.get(str(names[n].type))
        if want is not None and (not isinstance(v, want) or (isinstance(v, bool) and want is int)):
            raise StorageError(f"{what} is broken ({n} is {short(v, 40)}){hint}")
    try:
        valid_name(data["name"], "guest name")
    except ValidationError as err:
        raise StorageError(f"{what} is broken ({err}){hint}") from None
    return Guest(**data)


def load(ctx: Context, name: str) -> Guest:
    valid_name(name, "guest name")
    path = ctx.settings.guests_dir / name / "guest.json"
    if not path.exists():
        raise NotFoundError(f"no guest named {name!r} (see 'osimg guest list')")
    return read_record(ctx, path)


def all_guests(ctx: Context, hidden: bool = False) -> list[Guest]:
    """Every guest with a sound record; the broken ones are in ``broken_guests``, so one bad file
    does not hide the others."""
    out = []
    root = ctx.settings.guests_dir
    if root.exists():
        for p in sorted(root.glob("*/guest.json")):
            try:
                g = read_record(ctx, p)
            except OsimgError:
                continue
            if hidden or not g.hidden:
                out.append(g)
    return out


def broken_guests(ctx: Context) -> dict[str, str]:
    """Guest folders whose record cannot be read, with the reason (``guest list`` shows them)."""
    out = {}
    root = ctx.settings.guests_dir
    if root.exists():
        for p in sorted(root.glob("*/guest.json")):
            try:
                read_record(ctx, p)
            except OsimgError as err:
                out[p.parent.name] = str(err)
    return out


def domain_spec(ctx: Context, g: Guest) -> DomainSpec:
    """The libvirt domain for a guest record: OS overlay, config drive, data volume, forwards (paths
    as the guest's host sees them)."""
    files = g.files(ctx)
    disks = [DiskSpec("vda", path=files.path(g.overlay_file))]
    if files.exists(CONFIG_DRIVE):
        disks.append(DiskSpec("vdb", path=files.path(CONFIG_DRIVE), fmt="raw", readonly=True))
    data = data_disk(ctx, g)
    if data is not None:
        disks.append(data)
    custom = g.custom()
    extra = " ".join(custom.kernel_params)
    net = (NetSpec(mode="network", network=g.network, mac=g.mac) if g.network else
           NetSpec(forwards={22: g.ssh_port, g.guest_app_port: g.app_port}, mac=g.mac,
                   subnet=custom.user_mode_net()))
    return DomainSpec(
        name=g.name, uuid=g.uuid, kernel=hosts.image_path(ctx, g.host, g.kernel),
        initrd=hosts.image_path(ctx, g.host, g.initrd),
        cmdline=f"{g.cmdline} {extra}".strip(), disks=disks, serial_log=files.path(CONSOLE),
        accel=g.accel, memory_mib=g.memory_mib, vcpus=g.vcpus, net=net,
        metadata={"home": str(ctx.settings.home), "image": g.image, "hidden": "1" if g.hidden else "0",
                  "ssh-port": str(g.ssh_port), "app-port": str(g.app_port)},
    )


def data_disk(ctx: Context, g: Guest) -> DiskSpec | None:
    """The guest's data volume as a disk (one definition for boot, hot-plug and unplug), or None."""
    if not g.data_uuid:
        return None
    return DiskSpec(DATA_TARGET, path=g.files(ctx).path(DATA_VOLUME), serial=DATA_SERIAL)


def write_customization(ctx: Context, g: Guest) -> None:
    c = g.custom().with_data(g.data_uuid)
    files = g.files(ctx)
    tmp = g.dir(ctx) / (CONFIG_DRIVE + ".new")
    customize.write_config_drive(tmp, customize.render(g.name, c, g.uuid, g.own_key(ctx)))
    files.put(CONFIG_DRIVE, tmp)


USER_MODE_MAC = "52:54:00:12:34:56"


def create(
    ctx: Context,
    name: str,
    image: str,
    custom: customize.Customization | None = None,
    memory_mib: int | None = None,
    vcpus: int = 1,
    data_size: int = 0,
    hidden: bool = False,
    network: str | None = None,
    start: bool = True,
    config_drive: bool = True,
    host: str | None = None,
) -> Guest:
    """Create a guest on a fresh overlay of ``image`` and start it.

    ``host``: a registered host (``hosts``) to create it on; the image is shipped there first if the
    host lacks it. All checks run before anything is written; on a failure after that, everything
    created here is removed again, so a refused or failed create leaves no trace.
    """
    valid_name(name, "guest name")
    custom = (custom or customize.Customization()).validate(f"guest {name}")
    if memory_mib is not None and (isinstance(memory_mib, bool) or not isinstance(memory_mib, int)
                                   or not 64 <= memory_mib <= 65536):
        raise ValidationError(f"guest {name}: memory {short(memory_mib)} MiB is outside 64..65536")
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise ValidationError(f"guest {name}: vcpus {short(vcpus)} is outside 1..{MAX_VCPUS}")
    if isinstance(data_size, bool) or not isinstance(data_size, int) or not (
            data_size == 0 or MIN_DATA <= data_size <= MAX_DATA):
        raise ValidationError(f"guest {name}: data volume size {short(data_size)} is outside 8M..16T "
                              "(or 0 for none)")
    gdir = ctx.settings.guests_dir / name
    if gdir.exists():
        raise ConflictError(f"a guest named {name!r} already exists (remove it with 'osimg guest rm {name}')")
    if host is not None:
        valid_name(host, "host name")
        hosts.get(ctx, host)
        if ":" in image:
            raise ValidationError(f"guest {name}: a guest on host {host} needs a catalog image, not recipe "
                                  f"{short(image)} (build one with 'osimg image build NAME --from {short(image)}')")
    hctx = hosts.context(ctx, host)
    if hctx.hv.exists(name):
        raise ConflictError(f"libvirt already has a domain named {name!r}; choose another guest name")
    img = catalog.resolve(ctx, image)
    if ":" not in image:
        catalog.verify_source(ctx, image)
    if img.disk.stat().st_mode & 0o222:
        raise StorageError(f"image {image!r}: {img.disk} is writable; images must be immutable (mode 0444)")
    if host is not None:
        hosts.ship(ctx, host, image)
    accel = hctx.accel.accel
    ctx.settings.ensure_dirs()
    guest_uuid = uuidlib.uuid4()
    g = Guest(
        name=name, image=image, base=str(img.disk), kernel=str(img.kernel), initrd=str(img.initrd),
        cmdline=img.cmdline, host_key=img.host_key, os_version=img.os_version, family=img.family,
        memory_mib=memory_mib or img.memory_mib, vcpus=vcpus, accel=accel, uuid=str(guest_uuid),
        # user mode: every guest has its own slirp and keeps the MAC its image was captured with (a
        # warm swap restores that device state); guests sharing a libvirt network need their own
        mac=USER_MODE_MAC if network is None else "52:54:00:" + ":".join(f"{b:02x}" for b in guest_uuid.bytes[:3]),
        ssh_port=free_port(), app_port=free_port(), guest_app_port=img.app_port,
        ready_marker=img.ready_marker, data_size=data_size,
        data_uuid=str(uuidlib.uuid4()) if data_size else None, hidden=hidden, network=network,
        customization=custom.to_dict(), host=host,
    )
    gdir.mkdir()
    private_dir(gdir)
    try:
        files = g.files(ctx)
        files.create_overlay(g.overlay_file, hosts.image_path(ctx, host, str(img.disk)))
        if g.data_uuid:
            tmp = gdir / (DATA_VOLUME + ".new")
            qemu_img.make_ext4_volume(tmp, data_size, DATA_LABEL, g.data_uuid)
            files.put(DATA_VOLUME, tmp)
        if config_drive:
            # its own host key, on its own drive: no other guest of the image can pass as this one
            g.host_key = new_host_key(g.host_key_file(ctx))
            g.own_host_key = True
            write_customization(ctx, g)
        g.save(ctx)
        if start:
            hctx.hv.create(domain_spec(ctx, g))
    except BaseException:
        with contextlib.suppress(OsimgError):
            hctx.hv.undefine(name)
            if host is not None:
                hosts.remove_guest_files(ctx, host, name)
        shutil.rmtree(gdir, ignore_errors=True)
        raise
    return g


def start(ctx: Context, g: Guest) -> None:
    hv = g.at(ctx).hv
    if hv.exists(g.name):
        if not hv.is_active(g.name):
            hv.start(g.name)
    else:
        hv.create(domain_spec(ctx, g))


def wait_serial(ctx: Context, g: Guest, timeout: float) -> float:
    """Seconds until the guest printed its ready marker on its console (read through libvirt when
    the guest is on another host)."""
    hv = g.at(ctx).hv
    files = g.files(ctx)
    where = f"{g.host}:{files.path(CONSOLE)}" if g.host else files.path(CONSOLE)
    return wait_for_text(lambda: files.read_text(CONSOLE), where, g.ready_marker, timeout,
                         lambda: hv.is_active(g.name), poll=0.05 if g.host is None else 0.3)


def wait_ready(ctx: Context, g: Guest, timeout: float = 120) -> float:
    """Seconds until the guest printed its ready marker and answers SSH with the pinned key."""
    t0 = time.monotonic()
    wait_serial(ctx, g, timeout)
    with session(ctx, g, timeout=max(5.0, timeout - (time.monotonic() - t0))) as s:
        s.run(["true"], check=True)
    return time.monotonic() - t0


def session(ctx: Context, g: Guest, timeout: float = 60) -> Session:
    return Session(g.ssh_port, g.host_key, recipes.existing_client_key(ctx.settings), timeout=timeout)


def rotate_host_key(ctx: Context, name: str) -> str:
    """Give a running guest a new SSH host key; returns its public line.

    The key is made on the host (0600), installed in the guest through the guest agent (the SSH
    server reloads it at once, see ``customize.identity_lines``), written to the config drive for
    later boots, and only then pinned. If the guest refuses it, nothing changes on the host.
    """
    g = load(ctx, name)
    if not g.own_host_key or not g.files(ctx).exists(CONFIG_DRIVE):
        raise ValidationError(f"guest {name} has no host key of its own (made without a config drive); "
                              "recreate it to give it one")
    ctx = g.at(ctx)
    if not ctx.hv.is_active(name) or not ctx.hv.agent_ping(name):
        raise GuestError(f"guest {name} is not running with its guest agent: start it, then rotate its key")
    new = g.host_key_file(ctx).with_suffix(".new")
    new.unlink(missing_ok=True)
    try:
        pub = new_host_key(new)
        key = customize.HostKey(new.read_text(), pub)
        script = "\n".join(["set -u", *customize.identity_lines(key, None)]) + "\n"
        rc, out, err = ctx.hv.guest_exec(name, ["/bin/sh", "-s"], stdin=script, timeout=60)
        if rc != 0:
            raise GuestError(f"guest {name}: installing the new host key failed ({rc}): {(err or out).strip()[-200:]}")
        new.rename(g.host_key_file(ctx))
    finally:
        new.unlink(missing_ok=True)
    g.host_key = key.public
    write_customization(ctx, g)
    g.save(ctx)
    return key.public


def remove(ctx: Context, name: str) -> None:
    """Destroy the domain and delete the guest's own files (overlay, drive, data volume)."""
    valid_name(name, "guest name")
    gdir = ctx.settings.guests_dir / name
    if not gdir.exists():
        info = None
        with contextlib.suppress(NotFoundError):  # an unreachable libvirt is an error of its own, not "no guest"
            info = ctx.hv.info(name)
        if info is None or info.metadata.get("home") != str(ctx.settings.home):
            raise NotFoundError(f"no guest named {name!r} (see 'osimg guest list')")
    host = None
    with contextlib.suppress(OsimgError):  # a broken record still lets its guest go
        host = load(ctx, name).host
    if host is not None:
        # its domain is on its host only: a domain of that name here is another home's (or nobody's) to remove
        hosts.context(ctx, host).hv.undefine(name)
        hosts.remove_guest_files(ctx, host, name)
    else:
        ctx.hv.undefine(name)
    shutil.rmtree(gdir, ignore_errors=True)


def status(ctx: Context, g: Guest) -> str:
    """The domain's state; "undefined" without one, "unreachable" when its host does not answer (a
    listing of many guests must not fail for one lost host)."""
    try:
        return g.at(ctx).hv.state(g.name)
    except NotFoundError:
        return "undefined"
    except HostUnreachableError:
        return "unreachable"


DISK_TARGETS = {"os": "vda", "data": DATA_TARGET}  # the targets domain_spec gives the two disks


def resize(ctx: Context, name: str, disk: str, size: int) -> tuple[int, int]:
    """Grow a guest's OS overlay (``disk='os'``) or data volume (``'data'``) to ``size`` bytes.

    A running or paused guest is resized live through libvirt (its kernel sees the new capacity at
    once), a stopped one with qemu-img. Shrinking is refused: the file system inside ends where it
    ends, and cutting the disk under it destroys data. Only the block device grows; growing the
    file system on it is the guest's business (``resize2fs``). Returns the old and new sizes.
    """
    g = load(ctx, name)
    if disk not in DISK_TARGETS:
        raise ValidationError(f"unknown disk {disk!r} of guest {name}: expected one of {', '.join(DISK_TARGETS)}")
    if disk == "data" and not g.data_uuid:
        raise NotFoundError(f"guest {name} has no data volume (give it one at creation with a data size)")
    if size <= 0:
        raise ValidationError(f"invalid size {size} for the {disk} disk of guest {name}: expected a positive size")
    size = -(-size // 512) * 512  # qcow2 sizes are whole sectors
    files = g.files(ctx)
    fname = g.overlay_file if disk == "os" else DATA_VOLUME
    ctx = g.at(ctx)
    old = files.virtual_size(fname)
    if size < old:
        raise ValidationError(f"the {disk} disk of guest {name} is {old} bytes ({old / (1 << 20):.0f} MiB); "
                              f"shrinking it to {size} bytes is refused (only growing is supported)")
    if size == old:
        return old, old
    if ctx.hv.is_active(name):
        ctx.hv.block_resize(name, DISK_TARGETS[disk], size)
    elif g.host is not None:
        raise GuestError(f"guest {name} on host {g.host} is stopped: start it, then grow its disk (a running "
                         "guest's disk grows through libvirt)")
    else:
        qemu_img.resize(g.dir(ctx) / fname, size)
    return old, files.virtual_size(fname)


# -- the guest's application -------------------------------------------------------------------------------
def app_answer(port: int, timeout: float = 2.0) -> str | None:
    """The demo application's whole answer: "COUNTER VERSION", and on the Debian family also its
    in-memory state ("pid=1 started=... served=N"); None if it does not answer. Each request
    increments the counter."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/counter", timeout=timeout) as r:
            return str(r.read(512).decode(errors="replace").strip())
    except (urllib.error.URLError, OSError, ValueError, TimeoutError):
        return None


def app_counter(port: int, timeout: float = 2.0) -> int | None:
    """Ask the demo application for its counter (each request increments it); None if it does not answer."""
    answer = app_answer(port, timeout)
    try:
        return int(answer.split()[0]) if answer is not None else None
    except (ValueError, IndexError):
        return None


def wait_app(port: int, timeout: float, poll: float = 0.05, request_timeout: float = 3.0) -> int | None:
    """Poll until the application answers. Each request may take up to ``request_timeout``: a request
    given up on keeps running in the guest, and on a slow guest abandoned requests pile up behind the
    counter's lock faster than they finish. While a guest boots, a request sent before its network is
    up waits for nothing: a shorter timeout notices the application sooner."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = app_counter(port, timeout=request_timeout)
        if n is not None:
            return n
        time.sleep(poll)
    return None


def config_of(g: Guest) -> dict[str, Any]:
    """What a guest was made with, in the shape ``config_drift`` compares."""
    return {"image": g.image, "memory_mib": g.memory_mib, "vcpus": g.vcpus, "data_size": g.data_size,
            "customization": g.customization}


def config_drift(recorded: dict[str, Any], wanted: dict[str, Any], only_given: bool = False) -> list[str]:
    """The one "is it already what was asked for?" rule: readable differences between two configs.

    The fleet compares the spec a guest was made from with the spec now; the Ansible guest module
    compares an existing guest (``config_of``) with its task, where options not given are None and,
    with ``only_given``, not compared. ``customization`` is compared field by field.
    """
    out = []
    for k in sorted(set(recorded) | set(wanted)):
        if only_given and wanted.get(k) is None:
            continue
        if k == "customization":
            a, b = recorded.get(k) or {}, wanted.get(k) or {}
            # a record written before a field existed lacks it: it had the field's default
            base = customize.Customization().to_dict()
            a = {**base, **a}
            if not only_given:
                b = {**base, **b}
            out += [f"{ck}: {a.get(ck)!r} -> {b.get(ck)!r}" for ck in sorted(set(a) | set(b))
                    if a.get(ck) != b.get(ck) and not (only_given and b.get(ck) is None)]
        elif recorded.get(k) != wanted.get(k):
            out.append(f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}")
    return out
