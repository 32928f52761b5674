"""Fleet specs: many guests declared in one YAML file, loaded and validated once (``reconcile`` acts on them).

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

import difflib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import recipes
from ..context import Context
from ..customize import Carry, Customization, Mount, Quiesce, User
from ..errors import NotFoundError, OsimgError, ValidationError
from ..images import catalog
from ..settings import URI_RE, host_uri_ok
from ..validate import NAME_RE, load_yaml_file, parse_size, short
from ..validate import name as valid_name

KIND = "fleet"
USER = "user"
LIBVIRT = "libvirt"
DEFAULT_NETWORK = "user"
DEFAULT_SUBNET = "10.0.2.0/24"

TOP_KEYS = ("name", "uri", "hosts", "networks", "defaults", "guests")
HOST_KEYS = ("uri", "root", "accel")
NETWORK_KEYS = ("mode", "subnet", "gateway", "network")
SHARED_KEYS = ("image", "memory", "vcpus", "network", "netmask", "gateway", "data", "users", "groups", "mounts",
               "init_scripts", "kernel_modules", "kernel_params", "quiesce", "carry", "host")
GUEST_KEYS = ("name", "hostname", "ip", *SHARED_KEYS)
USER_KEYS = ("name", "uid", "groups", "shell", "ssh_authorized_keys")
MOUNT_KEYS = ("device", "path", "fstype", "options")
DATA_KEYS = ("size", "mount")
MAX_GUESTS = 1000  # a swap or an "up" runs a thread per guest of a batch: a spec is a fleet, not a flood

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
    host: str | None = None  # None: placed by osimg when the spec has hosts (fleet.reconcile.place)

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
    hosts: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> uri, root, accel

    def guest(self, name: str) -> GuestSpec:
        for g in self.guests:
            if g.name == name:
                return g
        raise NotFoundError(f"{self.path}: no guest named {name!r} in fleet {self.name}")


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
        try:
            return parse_size(value, "size", lo, hi)
        except ValidationError as err:
            raise self.error(key, str(err)) from None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"[:80]


def load(path: str | Path, ctx: Context | None = None) -> FleetSpec:
    """Read and validate a fleet spec. With ``ctx``, image names are also checked against the catalog."""
    p = Path(path)
    r = _Reader(p)
    data = load_yaml_file(p, "the fleet spec")
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
    if len(raw_guests) > MAX_GUESTS:
        raise r.error("guests", f"{len(raw_guests)} guests; a fleet spec holds at most {MAX_GUESTS}")
    hosts = _hosts(r, top.get("hosts"))
    guests = [_guest(r, f"guests[{i}]", g, defaults, networks) for i, g in enumerate(raw_guests)]
    for i, gs in enumerate(guests):
        if gs.host is not None and hosts and gs.host not in hosts:
            raise r.error(f"guests[{i}].host", f"unknown host {short(gs.host)}; the spec defines "
                                               f"{', '.join(sorted(hosts))}")
    _check_unique(r, guests)
    _default_addresses(networks, guests)
    spec = FleetSpec(p, name, uri, networks, guests, hosts)
    if ctx is not None:
        check_images(ctx, spec)
    return spec


def _hosts(r: _Reader, raw: Any) -> dict[str, dict[str, str]]:
    """``hosts: {NAME: {uri, root, accel}}``: the libvirt hosts the fleet's guests are spread over."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise r.error("hosts", f"expected a mapping of host names to {{uri: ...}}, got {_kind(raw)}")
    if len(raw) > 64:
        raise r.error("hosts", f"{len(raw)} hosts; a fleet spec names at most 64")
    out = {}
    for name, value in raw.items():
        key = f"hosts.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise r.error(key, "expected a host name of letters, digits, '.', '_' and '-'")
        h = r.mapping(value, key, HOST_KEYS, required=("uri",))
        uri = h["uri"]
        if not host_uri_ok(uri):
            raise r.error(f"{key}.uri", f"expected a libvirt URI such as qemu+ssh://root@HOST/system, got {short(uri)}")
        entry = {"uri": uri}
        if h.get("root") is not None:
            entry["root"] = r.string(h["root"], f"{key}.root", "an absolute folder path on that host")
            if not entry["root"].startswith("/"):
                raise r.error(f"{key}.root", f"expected an absolute folder path, got {short(entry['root'])}")
        if h.get("accel") is not None:
            if h["accel"] not in ("tcg", "kvm"):
                raise r.error(f"{key}.accel", f"expected tcg or kvm, got {short(h['accel'])}")
            entry["accel"] = h["accel"]
        out[name] = entry
    return out


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
        if not isinstance(net_name, str) or net_name not in networks:
            raise r.error(f"{key}.network", f"unknown network {short(net_name)}; the spec defines "
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
        quiesce=_quiesce(r, key, g.get("quiesce")),
        carry=_carry(r, key, g.get("carry")),
    )
    if data is not None and any(m.path == data.mount for m in custom.mounts):
        raise r.error(f"{key}.mounts", f"{data.mount} is already the data volume's mount point ({key}.data.mount)")
    try:
        custom.validate(f"{r.path}: {key}")
    except ValidationError as err:
        raise ValidationError(str(err)) from None
    host = g.get("host")
    if host is not None and (not isinstance(host, str) or not NAME_RE.match(host)):
        raise r.error(f"{key}.host", f"expected a host name, got {short(host)}")
    return GuestSpec(name=name, image=image, network=net_name, memory_mib=memory, vcpus=vcpus, data=data,
                     custom=custom, host=host)


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


def _quiesce(r: _Reader, key: str, raw: Any) -> Quiesce:
    try:
        return Quiesce.from_value(raw, f"{r.path}: {key}")
    except ValidationError as err:
        raise ValidationError(str(err)) from None


def _carry(r: _Reader, key: str, raw: Any) -> list[Carry] | None:
    try:
        return Carry.from_value(raw, f"{r.path}: {key}")
    except ValidationError as err:
        raise ValidationError(str(err)) from None


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


def _default_addresses(networks: dict[str, NetworkSpec], guests: list[GuestSpec]) -> None:
    """A guest without ``ip`` gets one in its network's subnet: the images' own default
    (10.0.2.15) only fits a user-mode network on the default subnet, so any other network (or a
    libvirt network, where guests share the subnet) hands out free host addresses from ``.15`` up."""
    taken = {(g.network, g.custom.address.split("/")[0]) for g in guests if g.custom.address}
    for g in guests:
        net = networks[g.network]
        if g.custom.address or (net.mode == USER and str(net.subnet) == DEFAULT_SUBNET):
            continue
        for ip in net.subnet.hosts():
            if int(ip) - int(net.subnet.network_address) >= 15 and (g.network, str(ip)) not in taken:
                taken.add((g.network, str(ip)))
                g.custom.address, g.custom.gateway = f"{ip}/{net.subnet.prefixlen}", str(net.gateway)
                break


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
                catalog.get(ctx, g.image)
                known[g.image] = True
            except NotFoundError as err:
                raise ValidationError(f"{spec.path}: guests[{i}].image: unknown image {g.image!r} ({err})") from None
