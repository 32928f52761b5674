"""Fleets: many guests declared in one YAML spec, each a private overlay on a shared read-only base.

The spec (README "Fleet spec", ``examples/fleet.yaml``) names the libvirt host, the networks and,
per guest, the image, memory, vCPUs, data volume and customization. It is loaded and validated once:
every error names the file, the key and what was expected, and nothing is touched before the whole
spec is known to be good.

``up`` converges the host to the spec: it creates missing guests, starts stopped ones and changes
nothing when everything already matches (a second run says so). A guest that exists but differs
from the spec is refused rather than silently rebuilt, because rebuilding throws its overlay away.
``down`` removes the fleet's guests with their overlays, config drives and data volumes. Which
guests belong to which fleet is recorded in the cluster store (kind ``fleet``), so ``down`` also
finds guests dropped from the spec since ``up`` and never removes a guest the fleet did not create.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from . import images, partitions, recipes, storage
from .context import Context
from .customize import Customization, Mount, User
from .errors import ConflictError, GuestError, NotFoundError, OsimgError, ValidationError
from .hypervisor import wait_for_serial
from .validate import NAME_RE
from .validate import name as valid_name

KIND = "fleet"
USER = "user"
LIBVIRT = "libvirt"
DEFAULT_NETWORK = "user"
DEFAULT_SUBNET = "10.0.2.0/24"
URI_RE = re.compile(r"^[a-z][a-z0-9+]*://[^\s]*$")
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt])?(?:i?b)?\s*$", re.IGNORECASE)
LOCK_WAIT = 10.0  # seconds another up/down of the same fleet may hold it before we give up
UNITS = {None: 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

TOP_KEYS = ("name", "uri", "networks", "defaults", "guests")
NETWORK_KEYS = ("mode", "subnet", "gateway", "network")
SHARED_KEYS = ("image", "memory", "vcpus", "network", "netmask", "gateway", "data", "users", "groups", "mounts",
               "init_scripts", "kernel_modules", "kernel_params")
GUEST_KEYS = ("name", "hostname", "ip", *SHARED_KEYS)
USER_KEYS = ("name", "uid", "groups", "shell", "ssh_authorized_keys")
MOUNT_KEYS = ("device", "path", "fstype", "options")
DATA_KEYS = ("size", "mount")

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


# -- the spec ------------------------------------------------------------------------------------------
@dataclass
class NetworkSpec:
    """A network guests attach to: QEMU user mode (127.0.0.1 forwards) or a libvirt network."""

    name: str
    mode: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    libvirt_network: str | None = None


@dataclass
class DataSpec:
    size: int  # bytes
    mount: str = "/data"


@dataclass
class GuestSpec:
    name: str
    image: str
    network: str
    memory_mib: int | None = None  # None: the image's default
    vcpus: int = 1
    data: DataSpec | None = None
    custom: Customization = field(default_factory=Customization)

    def config(self) -> dict[str, Any]:
        """What the guest was made from, as recorded in the fleet record to detect drift."""
        return {
            "image": self.image, "network": self.network, "memory_mib": self.memory_mib, "vcpus": self.vcpus,
            "data": None if self.data is None else {"size": self.data.size, "mount": self.data.mount},
            "customization": self.custom.to_dict(),
        }


@dataclass
class FleetSpec:
    path: Path
    name: str
    uri: str | None
    networks: dict[str, NetworkSpec]
    guests: list[GuestSpec]

    def guest(self, name: str) -> GuestSpec:
        for g in self.guests:
            if g.name == name:
                return g
        raise NotFoundError(f"{self.path}: no guest named {name!r} in fleet {self.name}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; a spec must not say a thing twice."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


class _Reader:
    """Type checks that turn into errors naming the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, msg: str) -> ValidationError:
        return ValidationError(f"{self.path}: {key}: {msg}" if key else f"{self.path}: {msg}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping with keys {', '.join(allowed)}, got {_kind(value)}")
        for k in value:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(f"{key}.{k}" if key else str(k),
                                 f"unknown key{hint}; expected one of {', '.join(allowed)}")
        for k in required:
            if value.get(k) is None:
                raise self.error(key, f"missing required key {k!r}")
        return value

    def string(self, value: Any, key: str, expected: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected {expected}, got {_kind(value)}")
        return value

    def strings(self, value: Any, key: str, expected: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of {expected}, got {_kind(value)}")
        return [self.string(v, f"{key}[{i}]", expected) for i, v in enumerate(value)]

    def integer(self, value: Any, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(key, f"expected an integer in {lo}..{hi}, got {value!r}")
        return value

    def size(self, value: Any, key: str, lo: int, hi: int) -> int:
        """A size in bytes from ``256M``, ``1.5G``, ``512k`` or a plain number of MiB."""
        m = SIZE_RE.match(str(value)) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        if m is None:
            raise self.error(key, f"expected a size such as 256M or 2G (a plain number means MiB), got {value!r}")
        n = int(float(m.group(1)) * UNITS[m.group(2).lower() if m.group(2) else None])
        if not lo <= n <= hi:
            raise self.error(key, f"{value!r} is outside {_human(lo)}..{_human(hi)}")
        return n


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"[:80]


def _human(n: int) -> str:
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n / (1 << 20):.1f}M"


def load(path: str | Path, ctx: Context | None = None) -> FleetSpec:
    """Read and validate a fleet spec. With ``ctx``, image names are also checked against the catalog."""
    p = Path(path)
    r = _Reader(p)
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as err:
        raise ValidationError(f"{p}: cannot read the fleet spec: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValidationError(f"{p}: malformed YAML{where}: {problem}") from None
    top = r.mapping(data, "", TOP_KEYS, required=("guests",))
    name = top.get("name", p.stem)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise r.error("name", f"expected a fleet name of letters, digits, '.', '_' and '-', got {name!r}")
    uri = top.get("uri")
    if uri is not None and (not isinstance(uri, str) or not URI_RE.match(uri)):
        raise r.error("uri", f"expected a libvirt URI such as qemu:///system or qemu+ssh://host/system, got {uri!r}")
    networks = _networks(r, top.get("networks"))
    defaults = r.mapping(top.get("defaults") or {}, "defaults", SHARED_KEYS)
    raw_guests = top["guests"]
    if not isinstance(raw_guests, list) or not raw_guests:
        raise r.error("guests", f"expected a non-empty list of guests, got {_kind(raw_guests)}")
    guests = [_guest(r, f"guests[{i}]", g, defaults, networks) for i, g in enumerate(raw_guests)]
    _check_unique(r, guests)
    spec = FleetSpec(p, name, uri, networks, guests)
    if ctx is not None:
        check_images(ctx, spec)
    return spec


def _networks(r: _Reader, raw: Any) -> dict[str, NetworkSpec]:
    if raw is None:
        subnet = ipaddress.IPv4Network(DEFAULT_SUBNET)
        return {DEFAULT_NETWORK: NetworkSpec(DEFAULT_NETWORK, USER, subnet, subnet.network_address + 2)}
    if not isinstance(raw, dict) or not raw:
        raise r.error("networks", f"expected a mapping of network names to networks, got {_kind(raw)}")
    out = {}
    for name, value in raw.items():
        key = f"networks.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise r.error(key, "expected a network name of letters, digits, '.', '_' and '-'")
        n = r.mapping(value or {}, key, NETWORK_KEYS)
        mode = n.get("mode", USER)
        if mode not in (USER, LIBVIRT):
            raise r.error(f"{key}.mode", f"expected 'user' (QEMU user mode, 127.0.0.1 forwards) or 'libvirt' "
                                         f"(a libvirt network), got {mode!r}")
        try:
            subnet = ipaddress.IPv4Network(str(n.get("subnet", DEFAULT_SUBNET)), strict=True)
        except ValueError as err:
            raise r.error(f"{key}.subnet", f"expected an IPv4 subnet such as 10.0.2.0/24: {err}") from None
        if subnet.prefixlen > 30:
            raise r.error(f"{key}.subnet", f"{subnet} leaves no room for guests; expected a prefix of /30 or shorter")
        slirp_host = subnet.network_address + 2
        gateway = _address(r, n.get("gateway", str(slirp_host)), f"{key}.gateway")
        if gateway not in subnet:
            raise r.error(f"{key}.gateway", f"{gateway} is outside the subnet {subnet}")
        if mode == USER and gateway != slirp_host:
            raise r.error(f"{key}.gateway", f"a user-mode network's gateway is QEMU's host address {slirp_host}, "
                                            f"got {gateway}")
        libvirt_net = n.get("network")
        if mode == LIBVIRT:
            libvirt_net = r.string(libvirt_net if libvirt_net is not None else name, f"{key}.network",
                                   "the name of a libvirt network")
        elif libvirt_net is not None:
            raise r.error(f"{key}.network", "only a network of mode 'libvirt' names a libvirt network")
        out[name] = NetworkSpec(name, mode, subnet, gateway, libvirt_net)
    return out


def _address(r: _Reader, value: Any, key: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError:
        raise r.error(key, f"expected an IPv4 address such as 10.0.2.21, got {value!r}") from None


def _guest(r: _Reader, key: str, raw: Any, defaults: dict[str, Any],
           networks: dict[str, NetworkSpec]) -> GuestSpec:
    own = r.mapping(raw, key, GUEST_KEYS, required=("name",))
    g = {**defaults, **own}
    name = own["name"]
    try:
        valid_name(name, "guest name")
    except ValidationError as err:
        raise r.error(f"{key}.name", str(err)) from None
    image = r.string(g.get("image"), f"{key}.image", "an image: a catalog name or a recipe FAMILY:VERSION")
    if ":" in image:
        try:
            recipes.parse_ref(image)
        except OsimgError as err:
            raise r.error(f"{key}.image", f"unknown image {image!r}: {err}") from None
    elif not NAME_RE.match(image):
        raise r.error(f"{key}.image", f"unknown image {image!r}: expected a catalog name or a recipe FAMILY:VERSION")
    memory = r.size(g["memory"], f"{key}.memory", 64 << 20, 64 << 30) >> 20 if g.get("memory") is not None else None
    vcpus = r.integer(g.get("vcpus", 1), f"{key}.vcpus", 1, 64)
    if "network" in g:
        net_name = g["network"]
        if net_name not in networks:
            raise r.error(f"{key}.network", f"unknown network {net_name!r}; the spec defines "
                                            f"{', '.join(sorted(networks))}")
    elif len(networks) == 1:
        net_name = next(iter(networks))
    else:
        raise r.error(key, f"missing required key 'network' (the spec defines {', '.join(sorted(networks))})")
    net = networks[net_name]

    address = gateway = None
    if g.get("ip") is not None:
        address = _guest_address(r, key, g, net)
        gateway = str(_address(r, g["gateway"], f"{key}.gateway") if g.get("gateway") is not None else net.gateway)
        gw = ipaddress.IPv4Address(gateway)
        if gw not in net.subnet:
            raise r.error(f"{key}.gateway", f"{gw} is outside the subnet {net.subnet} of network {net.name}")
        if net.mode == USER and gw != net.gateway:
            raise r.error(f"{key}.gateway", f"on user-mode network {net.name} the gateway is {net.gateway}, got {gw}")
        if gw == ipaddress.IPv4Interface(address).ip:
            raise r.error(f"{key}.gateway", f"{gw} is the guest's own address")
    else:
        for k in ("netmask", "gateway"):
            if own.get(k) is not None:
                raise r.error(f"{key}.{k}", f"given without {key}.ip")

    data = _data(r, f"{key}.data", g.get("data"))
    hostname = g.get("hostname", name)
    if "hostname" not in g and not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", name):
        raise r.error(f"{key}.hostname", f"the guest name {name!r} is not a valid host name; give a hostname")
    custom = Customization(
        hostname=hostname, address=address, gateway=gateway,
        mounts=_mounts(r, f"{key}.mounts", g.get("mounts")),
        init_scripts=r.strings(g.get("init_scripts"), f"{key}.init_scripts", "shell commands"),
        users=_users(r, f"{key}.users", g.get("users")),
        groups=r.strings(g.get("groups"), f"{key}.groups", "group names"),
        kernel_modules=r.strings(g.get("kernel_modules"), f"{key}.kernel_modules", "kernel module names"),
        kernel_params=r.strings(g.get("kernel_params"), f"{key}.kernel_params", "kernel parameters"),
    )
    if data is not None and any(m.path == data.mount for m in custom.mounts):
        raise r.error(f"{key}.mounts", f"{data.mount} is already the data volume's mount point ({key}.data.mount)")
    try:
        custom.validate(f"{r.path}: {key}")
    except ValidationError as err:
        raise ValidationError(str(err)) from None
    return GuestSpec(name=name, image=image, network=net_name, memory_mib=memory, vcpus=vcpus, data=data,
                     custom=custom)


def _guest_address(r: _Reader, key: str, g: dict[str, Any], net: NetworkSpec) -> str:
    """``ip`` (with a /prefix or a separate ``netmask``) as CIDR, checked against the network."""
    ip_text = str(g["ip"])
    ip_part, slash, prefix = ip_text.partition("/")
    ip = _address(r, ip_part, f"{key}.ip")
    if slash:
        try:
            iface = ipaddress.IPv4Interface(ip_text)
        except ValueError:
            raise r.error(f"{key}.ip", f"expected an IPv4 address such as 10.0.2.21 or 10.0.2.21/24, "
                                       f"got {ip_text!r}") from None
    else:
        iface = ipaddress.IPv4Interface(f"{ip}/{net.subnet.prefixlen}")
    mask_key = f"{key}.ip"
    if g.get("netmask") is not None:
        mask_key = f"{key}.netmask"
        mask = g["netmask"]
        try:
            masked = ipaddress.IPv4Interface(f"{ip}/{mask}")
        except ValueError:
            raise r.error(f"{key}.netmask", f"expected a netmask such as 255.255.255.0, got {mask!r}") from None
        if slash and masked.network.prefixlen != iface.network.prefixlen:
            raise r.error(f"{key}.netmask", f"{mask} contradicts the prefix /{prefix} of {key}.ip")
        iface = masked
    if ip not in net.subnet:
        raise r.error(f"{key}.ip", f"{ip} is outside the subnet {net.subnet} of network {net.name}")
    if iface.network != net.subnet:
        raise r.error(mask_key, f"{iface.netmask} makes the guest's subnet {iface.network}, but network "
                                        f"{net.name} is {net.subnet} (expected netmask {net.subnet.netmask})")
    if ip in (net.subnet.network_address, net.subnet.broadcast_address):
        raise r.error(f"{key}.ip", f"{ip} is the network or broadcast address of {net.subnet}")
    if ip == net.gateway:
        raise r.error(f"{key}.ip", f"{ip} is the gateway of network {net.name}")
    if net.mode == USER and ip == net.subnet.network_address + 3:
        raise r.error(f"{key}.ip", f"{ip} is QEMU's DNS address on user-mode network {net.name}")
    return f"{ip}/{iface.network.prefixlen}"


def _data(r: _Reader, key: str, raw: Any) -> DataSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        return DataSpec(r.size(raw, key, 8 << 20, 16 << 40))
    d = r.mapping(raw, key, DATA_KEYS, required=("size",))
    mount = d.get("mount", "/data")
    if not isinstance(mount, str) or not mount.startswith("/") or mount == "/" or ".." in mount.split("/") or any(
            c.isspace() for c in mount):
        raise r.error(f"{key}.mount", f"expected an absolute path other than / without '..', got {mount!r}")
    return DataSpec(r.size(d["size"], f"{key}.size", 8 << 20, 16 << 40), mount)


def _users(r: _Reader, key: str, raw: Any) -> list[User]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise r.error(key, f"expected a list of users, got {_kind(raw)}")
    out = []
    for i, u in enumerate(raw):
        k = f"{key}[{i}]"
        d = r.mapping(u, k, USER_KEYS, required=("name",))
        out.append(User(
            name=r.string(d["name"], f"{k}.name", "a user name"),
            uid=r.integer(d["uid"], f"{k}.uid", 1, 65533) if d.get("uid") is not None else None,
            groups=r.strings(d.get("groups"), f"{k}.groups", "group names"),
            shell=r.string(d.get("shell", "/bin/sh"), f"{k}.shell", "a login shell path"),
            ssh_authorized_keys=r.strings(d.get("ssh_authorized_keys"), f"{k}.ssh_authorized_keys",
                                          "OpenSSH public key lines"),
        ))
    return out


def _mounts(r: _Reader, key: str, raw: Any) -> list[Mount]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise r.error(key, f"expected a list of mounts, got {_kind(raw)}")
    out = []
    for i, m in enumerate(raw):
        k = f"{key}[{i}]"
        d = r.mapping(m, k, MOUNT_KEYS, required=("device", "path"))
        out.append(Mount(
            device=r.string(d["device"], f"{k}.device", "a device (UUID=..., LABEL=..., /dev/... or tmpfs)"),
            path=r.string(d["path"], f"{k}.path", "an absolute path"),
            fstype=r.string(d.get("fstype", "ext4"), f"{k}.fstype", "a file system type"),
            options=r.string(d.get("options", "defaults"), f"{k}.options", "mount options"),
        ))
    return out


def _check_unique(r: _Reader, guests: list[GuestSpec]) -> None:
    names: dict[str, int] = {}
    hosts: dict[str, int] = {}
    addrs: dict[tuple[str, str], int] = {}
    for i, g in enumerate(guests):
        if g.name in names:
            raise r.error(f"guests[{i}].name", f"duplicate guest name {g.name!r} (also guests[{names[g.name]}])")
        names[g.name] = i
        host = (g.custom.hostname or g.name).lower()
        if host in hosts:
            raise r.error(f"guests[{i}].hostname",
                          f"duplicate host name {host!r} (also guests[{hosts[host]}]); expected one per guest")
        hosts[host] = i
        if g.custom.address:
            ip = (g.network, g.custom.address.split("/")[0])
            if ip in addrs:
                raise r.error(f"guests[{i}].ip", f"duplicate IP address {ip[1]} on network {g.network} "
                                                 f"(also guests[{addrs[ip]}])")
            addrs[ip] = i


def check_images(ctx: Context, spec: FleetSpec) -> None:
    """Every catalog image the spec names must exist (recipe references are built on demand)."""
    known: dict[str, bool] = {}
    for i, g in enumerate(spec.guests):
        if ":" in g.image:
            continue
        if g.image not in known:
            try:
                images.get(ctx, g.image)
                known[g.image] = True
            except NotFoundError as err:
                raise ValidationError(f"{spec.path}: guests[{i}].image: unknown image {g.image!r} ({err})") from None


# -- the host side ----------------------------------------------------------------------------------------
@dataclass
class GuestAction:
    """What up/down did (or found) for one guest."""

    name: str
    action: str  # created | started | resumed | unchanged | removed | absent | kept
    detail: str = ""
    ready_seconds: float | None = None


@dataclass
class FleetResult:
    fleet: str
    actions: list[GuestAction]

    @property
    def changed(self) -> bool:
        return any(a.action in ("created", "started", "resumed", "removed") for a in self.actions)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for a in self.actions:
            counts[a.action] = counts.get(a.action, 0) + 1
        what = ", ".join(f"{n} {action}" for action, n in counts.items())
        return f"fleet {self.fleet}: {what}" + ("" if self.changed else "; nothing to do")


def context_for(ctx: Context, spec: FleetSpec) -> Context:
    """A context driving the spec's libvirt host (``ctx`` itself when it already does)."""
    if not spec.uri or spec.uri == ctx.settings.uri:
        return ctx
    return Context(replace(ctx.settings, uri=spec.uri))


def members(ctx: Context, fleet: str) -> dict[str, dict[str, Any]]:
    """The guests a fleet created, with the spec each was made from."""
    rec = ctx.store.get(KIND, fleet)
    return dict(rec.get("guests", {})) if rec else {}


def _owner(ctx: Context, guest: str) -> str | None:
    for name, rec in ctx.store.items(KIND):
        if guest in rec.get("guests", {}):
            return name
    return None


def _record(ctx: Context, spec: FleetSpec, guest: str, config: dict[str, Any] | None) -> None:
    """Add (config given) or drop (None) one guest in the fleet's record; the record goes when empty."""

    def upd(rec: dict[str, Any] | None) -> dict[str, Any] | None:
        out = dict(rec or {"guests": {}})
        out["spec"] = str(spec.path.resolve())
        out["uri"] = ctx.settings.uri
        guests = dict(out.get("guests", {}))
        if config is None:
            guests.pop(guest, None)
        else:
            guests[guest] = config
        out["guests"] = guests
        return out if guests else None

    ctx.store.update(KIND, spec.name, upd)


def _holder() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"[:63]


def drift(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between the spec a guest was made from and the spec now."""
    out = []
    for k in sorted(set(recorded) | set(wanted)):
        if k == "customization":
            a, b = recorded.get(k) or {}, wanted.get(k) or {}
            out += [f"{ck}: {a.get(ck)!r} -> {b.get(ck)!r}" for ck in sorted(set(a) | set(b)) if a.get(ck) != b.get(ck)]
        elif recorded.get(k) != wanted.get(k):
            out.append(f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}")
    return out


def plan_up(ctx: Context, spec: FleetSpec, prune: bool = False) -> FleetResult:
    """What ``up`` would do to each guest, refused for the reasons ``up`` refuses; changes nothing.

    Refused (ConflictError naming every problem): a guest whose spec changed since the fleet made
    it (rebuilding would discard its overlay; ``osimg guest resize`` grows disks), a guest or
    libvirt domain of the same name that the fleet did not create. Unknown images: ValidationError.
    """
    check_images(ctx, spec)
    mine = members(ctx, spec.name)
    actions: list[GuestAction] = []
    problems: list[str] = []
    for gs in spec.guests:
        exists = (ctx.settings.guests_dir / gs.name / "guest.json").exists()
        if gs.name in mine and exists:
            diffs = drift(mine[gs.name], gs.config())
            if diffs:
                problems.append(f"guest {gs.name} differs from the spec ({'; '.join(diffs)})")
            state = ctx.hv.state(gs.name) if ctx.hv.exists(gs.name) else "undefined"
            if state == "running":
                actions.append(GuestAction(gs.name, "unchanged", "running"))
            elif state == "paused":
                actions.append(GuestAction(gs.name, "resumed", "was paused"))
            else:
                actions.append(GuestAction(gs.name, "started", f"was {state}"))
        elif exists:
            owner = _owner(ctx, gs.name)
            by = f"fleet {owner}" if owner else "'osimg guest create' or another tool"
            problems.append(f"guest {gs.name} already exists, created by {by}; remove it or rename the "
                            f"guest in the spec")
        elif ctx.hv.exists(gs.name):
            problems.append(f"libvirt already has a domain named {gs.name!r} that osimg does not manage")
        else:
            actions.append(GuestAction(gs.name, "created", f"overlay on {gs.image}"))
    if problems:
        raise ConflictError(f"{spec.path}: {'; '.join(problems)}. Nothing was changed; to rebuild a guest "
                            f"from the new spec, remove it first ('osimg guest rm NAME') and run up again")
    for name in sorted(set(mine) - {g.name for g in spec.guests}):
        actions.append(GuestAction(name, "removed", "no longer in the spec") if prune else
                       GuestAction(name, "kept", "no longer in the spec; 'fleet up --prune' removes it"))
    return FleetResult(spec.name, actions)


def up(ctx: Context, spec: FleetSpec, wait: bool = True, prune: bool = False, timeout: float = 180,
       progress: Progress = _quiet) -> FleetResult:
    """Create what is missing, start what is stopped; a spec the host already matches changes nothing.

    Everything is checked (``plan_up``) before the first change. With ``prune``, guests the fleet
    created that are no longer in the spec are removed; without, they are reported and kept.
    """
    with ctx.store.lock(f"fleet-{spec.name}", _holder(), ttl=60, wait=LOCK_WAIT):
        res = plan_up(ctx, spec, prune)
        new = [spec.guest(a.name) for a in res.actions if a.action == "created"]
        for image in dict.fromkeys(gs.image for gs in new):
            progress(f"resolving image {image}")
            images.resolve(ctx, image)
        for a in res.actions:
            if a.action == "created":
                progress(f"creating {a.name} on an overlay of {spec.guest(a.name).image}")
                _create(ctx, spec, spec.guest(a.name))
            elif a.action == "resumed":
                progress(f"resuming {a.name}")
                ctx.hv.resume(a.name)
            elif a.action == "started":
                progress(f"starting {a.name}")
                partitions.start(ctx, partitions.load(ctx, a.name))
            elif a.action == "removed":
                progress(f"removing {a.name} (no longer in the spec)")
                _remove(ctx, spec, a.name)
    if wait:
        _wait(ctx, spec, [a for a in res.actions if a.action in ("created", "started")], timeout, progress)
    return res


def _create(ctx: Context, spec: FleetSpec, gs: GuestSpec) -> None:
    """One guest: overlay, data volume, config drive naming the data volume by UUID, then boot."""
    net = spec.networks[gs.network]
    # recorded first, so a failure half-way leaves nothing that 'down' would not find
    _record(ctx, spec, gs.name, gs.config())
    try:
        g = partitions.create(
            ctx, gs.name, gs.image, custom=gs.custom, memory_mib=gs.memory_mib, vcpus=gs.vcpus,
            data_size=gs.data.size if gs.data else 0,
            network=net.libvirt_network if net.mode == LIBVIRT else None, start=False, config_drive=False,
        )
    except BaseException:
        _record(ctx, spec, gs.name, None)
        raise
    try:
        custom = Customization.from_dict(g.customization)
        if gs.data is not None and g.data_uuid:
            custom.mounts.append(Mount(device=f"UUID={g.data_uuid}", path=gs.data.mount))
        g.customization = custom.to_dict()
        g.save(ctx)
        partitions.write_customization(ctx, g)
        partitions.start(ctx, g)
    except BaseException:
        _remove(ctx, spec, gs.name)
        raise


def _remove(ctx: Context, spec: FleetSpec, name: str) -> None:
    with contextlib.suppress(NotFoundError):
        partitions.remove(ctx, name)
    _record(ctx, spec, name, None)


def _wait(ctx: Context, spec: FleetSpec, actions: list[GuestAction], timeout: float, progress: Progress) -> None:
    """Wait for all booting guests at once; SSH through the forward where there is one."""
    if not actions:
        return
    progress(f"waiting for {len(actions)} guest(s) to be ready")

    def ready(a: GuestAction) -> float:
        g = partitions.load(ctx, a.name)
        if g.network:
            return wait_for_serial(g.console(ctx), g.ready_marker, timeout, lambda: ctx.hv.is_active(g.name))
        return partitions.wait_ready(ctx, g, timeout=timeout)

    _ = ctx.hv.conn  # connect once, before the threads share the connection
    failures = []
    with ThreadPoolExecutor(max_workers=len(actions)) as pool:
        futures = [(a, pool.submit(ready, a)) for a in actions]
        for a, fut in futures:
            try:
                a.ready_seconds = fut.result()
            except OsimgError as err:
                failures.append(f"{a.name}: {err}")
    if failures:
        raise GuestError(f"fleet {spec.name}: {len(failures)} guest(s) did not become ready: {'; '.join(failures)} "
                         f"(they are left as they are for inspection; 'osimg fleet down' removes them)")


def plan_down(ctx: Context, spec: FleetSpec) -> FleetResult:
    """What ``down`` would do to each guest; changes nothing."""
    mine = members(ctx, spec.name)
    actions = []
    for name in [g.name for g in spec.guests] + sorted(set(mine) - {g.name for g in spec.guests}):
        exists = (ctx.settings.guests_dir / name).exists() or ctx.hv.exists(name)
        if name in mine:
            actions.append(GuestAction(name, "removed") if exists else GuestAction(name, "absent", "already gone"))
        elif exists:
            actions.append(GuestAction(name, "kept", "not created by this fleet; 'osimg guest rm' removes it"))
        else:
            actions.append(GuestAction(name, "absent"))
    return FleetResult(spec.name, actions)


def down(ctx: Context, spec: FleetSpec, progress: Progress = _quiet) -> FleetResult:
    """Remove the fleet's guests (those in the spec and those the fleet created since) and their files.

    Each guest's overlay, config drive and data volume go with it; the shared base stays. A guest
    of the same name that the fleet did not create is left alone and reported as ``kept``.
    """
    with ctx.store.lock(f"fleet-{spec.name}", _holder(), ttl=60, wait=LOCK_WAIT):
        res = plan_down(ctx, spec)
        mine = members(ctx, spec.name)
        for a in res.actions:
            if a.action == "removed":
                progress(f"removing {a.name}")
                _remove(ctx, spec, a.name)
            elif a.name in mine:
                _record(ctx, spec, a.name, None)  # gone behind the fleet's back: forget it
    return res


def status(ctx: Context, spec: FleetSpec) -> list[dict[str, Any]]:
    """One row per guest of the spec or the fleet record: state, address, disks, drift."""
    mine = members(ctx, spec.name)
    rows = []
    for name in [g.name for g in spec.guests] + sorted(set(mine) - {g.name for g in spec.guests}):
        in_spec = any(g.name == name for g in spec.guests)
        row: dict[str, Any] = {"name": name, "in_spec": in_spec, "member": name in mine, "state": "absent",
                               "image": None, "address": None, "ssh_port": None, "overlay_bytes": None,
                               "base": None, "data_bytes": None, "drift": []}
        if in_spec:
            gs = spec.guest(name)
            row.update(image=gs.image, address=gs.custom.address)
            if name in mine:
                row["drift"] = drift(mine[name], gs.config())
        try:
            g = partitions.load(ctx, name)
        except NotFoundError:
            rows.append(row)
            continue
        data = g.data_volume(ctx)
        row.update(state=partitions.status(ctx, g), image=g.image, base=g.base, ssh_port=g.ssh_port,
                   address=g.custom().address, overlay_bytes=storage.allocated_bytes(g.overlay(ctx)),
                   data_bytes=storage.allocated_bytes(data) if data is not None and data.exists() else None)
        rows.append(row)
    return rows
