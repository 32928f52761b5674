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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import customize
from .context import Context
from .errors import ConflictError, GuestError, NotFoundError, OsimgError, StorageError, ValidationError
from .host import qemu_img
from .host.console import wait_for_serial
from .host.domain import DiskSpec, DomainSpec, NetSpec
from .host.ssh import Session, new_host_key
from .images import catalog
from .validate import name as valid_name

DATA_LABEL = "osimg-data"
DATA_TARGET = "vdc"
DATA_SERIAL = "osimg-data"
HOST_KEY_FILE = "ssh_host_ed25519_key"


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

    def dir(self, ctx: Context) -> Path:
        return ctx.settings.guests_dir / self.name

    def overlay(self, ctx: Context) -> Path:
        return self.dir(ctx) / self.overlay_file

    def data_volume(self, ctx: Context) -> Path | None:
        return self.dir(ctx) / "data.qcow2" if self.data_uuid else None

    def config_drive(self, ctx: Context) -> Path:
        return self.dir(ctx) / "cidata.iso"

    def console(self, ctx: Context) -> Path:
        return self.dir(ctx) / "console.log"

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(ctx: Context, name: str) -> Guest:
    valid_name(name, "guest name")
    path = ctx.settings.guests_dir / name / "guest.json"
    if not path.exists():
        raise NotFoundError(f"no guest named {name!r} (see 'osimg guest list')")
    return Guest(**json.loads(path.read_text()))


def all_guests(ctx: Context, hidden: bool = False) -> list[Guest]:
    out = []
    root = ctx.settings.guests_dir
    if root.exists():
        for p in sorted(root.glob("*/guest.json")):
            g = Guest(**json.loads(p.read_text()))
            if hidden or not g.hidden:
                out.append(g)
    return out


def domain_spec(ctx: Context, g: Guest) -> DomainSpec:
    """The libvirt domain for a guest record: OS overlay, config drive, data volume, forwards."""
    disks = [DiskSpec("vda", path=str(g.overlay(ctx)))]
    if g.config_drive(ctx).exists():
        disks.append(DiskSpec("vdb", path=str(g.config_drive(ctx)), fmt="raw", readonly=True))
    data = data_disk(ctx, g)
    if data is not None:
        disks.append(data)
    custom = g.custom()
    extra = " ".join(custom.kernel_params)
    net = (NetSpec(mode="network", network=g.network, mac=g.mac) if g.network else
           NetSpec(forwards={22: g.ssh_port, g.guest_app_port: g.app_port}, mac=g.mac,
                   subnet=custom.user_mode_net()))
    return DomainSpec(
        name=g.name, uuid=g.uuid, kernel=g.kernel, initrd=g.initrd,
        cmdline=f"{g.cmdline} {extra}".strip(), disks=disks, serial_log=str(g.console(ctx)),
        accel=g.accel, memory_mib=g.memory_mib, vcpus=g.vcpus, net=net,
        metadata={"home": str(ctx.settings.home), "image": g.image, "hidden": "1" if g.hidden else "0",
                  "ssh-port": str(g.ssh_port), "app-port": str(g.app_port)},
    )


def data_disk(ctx: Context, g: Guest) -> DiskSpec | None:
    """The guest's data volume as a disk (one definition for boot, hot-plug and unplug), or None."""
    data = g.data_volume(ctx)
    return DiskSpec(DATA_TARGET, path=str(data), serial=DATA_SERIAL) if data is not None else None


def write_customization(ctx: Context, g: Guest) -> None:
    c = g.custom().with_data(g.data_uuid)
    customize.write_config_drive(g.config_drive(ctx), customize.render(g.name, c, g.uuid, g.own_key(ctx)))


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
) -> Guest:
    """Create a guest on a fresh overlay of ``image`` and start it.

    All checks run before anything is written; on a failure after that, everything created here
    is removed again, so a refused or failed create leaves no trace.
    """
    valid_name(name, "guest name")
    custom = (custom or customize.Customization()).validate(f"guest {name}")
    if memory_mib is not None and not 64 <= memory_mib <= 65536:
        raise ValidationError(f"guest {name}: memory {memory_mib} MiB is outside 64..65536")
    gdir = ctx.settings.guests_dir / name
    if gdir.exists():
        raise ConflictError(f"a guest named {name!r} already exists (remove it with 'osimg guest rm {name}')")
    if ctx.hv.exists(name):
        raise ConflictError(f"libvirt already has a domain named {name!r}; choose another guest name")
    img = catalog.resolve(ctx, image)
    if img.disk.stat().st_mode & 0o222:
        raise StorageError(f"image {image!r}: {img.disk} is writable; images must be immutable (mode 0444)")
    accel = ctx.accel.accel
    ctx.settings.ensure_dirs()
    g = Guest(
        name=name, image=image, base=str(img.disk), kernel=str(img.kernel), initrd=str(img.initrd),
        cmdline=img.cmdline, host_key=img.host_key, os_version=img.os_version, family=img.family,
        memory_mib=memory_mib or img.memory_mib, vcpus=vcpus, accel=accel, uuid=str(uuidlib.uuid4()),
        mac="52:54:00:12:34:56", ssh_port=free_port(), app_port=free_port(), guest_app_port=img.app_port,
        ready_marker=img.ready_marker, data_size=data_size,
        data_uuid=str(uuidlib.uuid4()) if data_size else None, hidden=hidden, network=network,
        customization=custom.to_dict(),
    )
    gdir.mkdir()
    gdir.chmod(0o755)
    try:
        qemu_img.create_overlay(g.overlay(ctx), img.disk)
        data = g.data_volume(ctx)
        if data is not None and g.data_uuid:
            qemu_img.make_ext4_volume(data, data_size, DATA_LABEL, g.data_uuid)
        if config_drive:
            # its own host key, on its own drive: no other guest of the image can pass as this one
            g.host_key = new_host_key(g.host_key_file(ctx))
            g.own_host_key = True
            write_customization(ctx, g)
        g.save(ctx)
        if start:
            ctx.hv.create(domain_spec(ctx, g))
    except BaseException:
        ctx.hv.undefine(name)
        shutil.rmtree(gdir, ignore_errors=True)
        raise
    return g


def start(ctx: Context, g: Guest) -> None:
    if ctx.hv.exists(g.name):
        if not ctx.hv.is_active(g.name):
            ctx.hv.start(g.name)
    else:
        ctx.hv.create(domain_spec(ctx, g))


def wait_ready(ctx: Context, g: Guest, timeout: float = 120) -> float:
    """Seconds until the guest printed its ready marker and answers SSH with the pinned key."""
    t0 = time.monotonic()
    wait_for_serial(g.console(ctx), g.ready_marker, timeout, lambda: ctx.hv.is_active(g.name))
    with session(ctx, g, timeout=max(5.0, timeout - (time.monotonic() - t0))) as s:
        s.run(["true"], check=True)
    return time.monotonic() - t0


def session(ctx: Context, g: Guest, timeout: float = 60) -> Session:
    return Session(g.ssh_port, g.host_key, ctx.settings.client_key, timeout=timeout)


def rotate_host_key(ctx: Context, name: str) -> str:
    """Give a running guest a new SSH host key; returns its public line.

    The key is made on the host (0600), installed in the guest through the guest agent (the SSH
    server reloads it at once, see ``customize.identity_lines``), written to the config drive for
    later boots, and only then pinned. If the guest refuses it, nothing changes on the host.
    """
    g = load(ctx, name)
    if not g.own_host_key or not g.config_drive(ctx).exists():
        raise ValidationError(f"guest {name} has no host key of its own (made without a config drive); "
                              "recreate it to give it one")
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
        with contextlib.suppress(OsimgError):
            info = ctx.hv.info(name)
        if info is None or info.metadata.get("home") != str(ctx.settings.home):
            raise NotFoundError(f"no guest named {name!r} (see 'osimg guest list')")
    ctx.hv.undefine(name)
    shutil.rmtree(gdir, ignore_errors=True)


def status(ctx: Context, g: Guest) -> str:
    try:
        return ctx.hv.state(g.name)
    except NotFoundError:
        return "undefined"


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
    path = g.overlay(ctx) if disk == "os" else g.data_volume(ctx)
    if path is None:
        raise NotFoundError(f"guest {name} has no data volume (give it one at creation with a data size)")
    if size <= 0:
        raise ValidationError(f"invalid size {size} for the {disk} disk of guest {name}: expected a positive size")
    size = -(-size // 512) * 512  # qcow2 sizes are whole sectors
    old = qemu_img.info(path).virtual_size
    if size < old:
        raise ValidationError(f"the {disk} disk of guest {name} is {old} bytes ({old / (1 << 20):.0f} MiB); "
                              f"shrinking it to {size} bytes is refused (only growing is supported)")
    if size == old:
        return old, old
    if ctx.hv.is_active(name):
        ctx.hv.block_resize(name, DISK_TARGETS[disk], size)
    else:
        qemu_img.resize(path, size)
    return old, qemu_img.info(path).virtual_size


# -- the guest's application -------------------------------------------------------------------------------
def app_counter(port: int, timeout: float = 2.0) -> int | None:
    """Ask the demo application for its counter (each request increments it); None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/counter", timeout=timeout) as r:
            return int(r.read().decode().split()[0])
    except (urllib.error.URLError, OSError, ValueError, IndexError, TimeoutError):
        return None


def wait_app(port: int, timeout: float, poll: float = 0.05) -> int | None:
    """Poll until the application answers. Each request may take up to 3 s: a request given up on
    keeps running in the guest, and on a slow guest (Debian's CGI forks several processes under
    TCG) abandoned requests pile up behind the counter's lock faster than they finish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = app_counter(port, timeout=3.0)
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
            out += [f"{ck}: {a.get(ck)!r} -> {b.get(ck)!r}" for ck in sorted(set(a) | set(b))
                    if a.get(ck) != b.get(ck) and not (only_given and b.get(ck) is None)]
        elif recorded.get(k) != wanted.get(k):
            out.append(f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}")
    return out
