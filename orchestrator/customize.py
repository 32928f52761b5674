"""Per-guest changes on a shared base, delivered as a NoCloud config drive (label ``cidata``).

The drive carries cloud-init's own formats (meta-data, ``#cloud-config`` user-data, network-config
version 1), so a real distribution image with cloud-init accepts it unchanged; the tiny test image
reads the same files with a small awk parser. The YAML is written by hand in block style with
double-quoted scalars: valid YAML for cloud-init and a narrow subset for the tiny parser.
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pycdlib

from .errors import ValidationError
from .settings import create_private
from .validate import ip_address, ip_interface, parse_duration, short

USER_RE_ALLOWED = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")
KEY_TYPES = ("ssh-ed25519 ", "ssh-rsa ", "ecdsa-sha2-", "sk-ssh-ed25519@openssh.com ", "sk-ecdsa-sha2-")
DEFAULT_USER_NET = "10.0.2.0/24"
DATA_MOUNT = "/data"


@dataclass
class User:
    name: str
    uid: int | None = None
    groups: list[str] = field(default_factory=list)
    shell: str = "/bin/sh"
    ssh_authorized_keys: list[str] = field(default_factory=list)


@dataclass
class Mount:
    device: str  # "UUID=...", "LABEL=..." or a /dev path
    path: str
    fstype: str = "ext4"
    options: str = "defaults"


MAX_COMMAND = 4096


@dataclass
class Quiesce:
    """How to stop and start the guest's own workload around a swap, besides the image's application.

    ``stop`` runs in the guest first; whatever still has the data volume open or as its working
    directory after ``grace`` seconds is killed, because /data must be unmounted before the other OS
    may write to it. ``start`` runs once /data is back: on the new OS, and on the old one after a
    rollback, so it must be harmless when the workload already runs."""

    stop: str | None = None
    start: str | None = None
    grace: float = 10.0

    def validate(self, where: str) -> Quiesce:
        for label, cmd in (("stop", self.stop), ("start", self.start)):
            if cmd is not None and (not isinstance(cmd, str) or not cmd.strip() or "\0" in cmd
                                    or len(cmd) > MAX_COMMAND):
                raise ValidationError(f"{where}.quiesce.{label} {short(cmd)}: expected a shell command of at most "
                                      f"{MAX_COMMAND} characters")
        self.grace = parse_duration(self.grace, f"{where}.quiesce.grace", 0, 600)
        return self

    @classmethod
    def from_value(cls, value: Any, where: str) -> Quiesce:
        """From a spec's mapping (``stop``, ``start``, ``grace``), refusing any other key or shape."""
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise ValidationError(f"{where}.quiesce: expected a mapping with keys stop, start, grace, got "
                                  f"{short(value)}")
        unknown = [k for k in value if k not in ("stop", "start", "grace")]
        if unknown:
            raise ValidationError(f"{where}.quiesce.{short(unknown[0])}: unknown key; expected stop, start, grace")
        return cls(stop=value.get("stop"), start=value.get("start"),
                   grace=value["grace"] if value.get("grace") is not None else 10.0).validate(where)


MAX_CARRIED = 8
MAX_CARRY_FILES = 32
UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@-]{1,200}\.service$")
PATH_RE = re.compile(r"^/[^\s\0]{0,4095}$")


@dataclass
class Carry:
    """A process tree carried across a warm swap (checkpointed with CRIU on the old OS, restored on
    the new one), found by its PID file or its systemd unit's main PID.

    ``files`` are files the tree depends on without keeping them mapped (a script, a config read at
    start): they must have the same content on the new OS, or the tree is restarted instead of
    resumed. ``pause`` runs in the guest right before the checkpoint (e.g. to let the application
    finish what it is doing)."""

    name: str
    pidfile: str | None = None
    unit: str | None = None
    files: list[str] = field(default_factory=list)
    pause: str | None = None

    def validate(self, where: str) -> Carry:
        if not isinstance(self.name, str) or not self.name or not set(self.name) <= USER_RE_ALLOWED \
                or self.name[0] == "-" or len(self.name) > 32:
            raise ValidationError(f"{where}.carry.name {short(self.name)}: expected a name of lowercase letters, "
                                  "digits, _ and - (at most 32)")
        w = f"{where}.carry[{self.name}]"
        if (self.pidfile is None) == (self.unit is None):
            raise ValidationError(f"{w}: give exactly one of pidfile and unit")
        if self.pidfile is not None and not _abs_path(self.pidfile):
            raise ValidationError(f"{w}.pidfile {short(self.pidfile)}: expected an absolute path without "
                                  "spaces or '..'")
        if self.unit is not None and (not isinstance(self.unit, str) or not UNIT_RE.match(self.unit)):
            raise ValidationError(f"{w}.unit {short(self.unit)}: expected a systemd service name, e.g. app.service")
        if not isinstance(self.files, list) or len(self.files) > MAX_CARRY_FILES:
            raise ValidationError(f"{w}.files: expected a list of at most {MAX_CARRY_FILES} absolute paths")
        for f in self.files:
            if not _abs_path(f):
                raise ValidationError(f"{w}.files: {short(f)} is not an absolute path without spaces or '..'")
        if self.pause is not None and (not isinstance(self.pause, str) or not self.pause.strip()
                                       or "\0" in self.pause or len(self.pause) > MAX_COMMAND):
            raise ValidationError(f"{w}.pause {short(self.pause)}: expected a shell command of at most "
                                  f"{MAX_COMMAND} characters")
        return self

    @classmethod
    def from_value(cls, value: Any, where: str) -> list[Carry] | None:
        """From a spec's list of mappings (their shape only: ``Customization.validate`` checks each tree
        and that no name comes twice); None (the key absent) means the image's default."""
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > MAX_CARRIED:
            raise ValidationError(f"{where}.carry: expected a list of at most {MAX_CARRIED} mappings "
                                  f"(name, pidfile or unit, files, pause), got {short(value)}")
        out: list[Carry] = []
        for item in value:
            if not isinstance(item, dict):
                raise ValidationError(f"{where}.carry: expected a mapping with name and pidfile or unit, "
                                      f"got {short(item)}")
            unknown = [k for k in item if k not in CARRY_KEYS]
            if unknown:
                raise ValidationError(f"{where}.carry.{short(unknown[0])}: unknown key; expected "
                                      f"{', '.join(CARRY_KEYS)}")
            out.append(cls(name=item.get("name"), pidfile=item.get("pidfile"), unit=item.get("unit"),  # type: ignore[arg-type]
                           files=item.get("files") or [], pause=item.get("pause")))
        return out


CARRY_KEYS = ("name", "pidfile", "unit", "files", "pause")
# What a guest carries when its spec says nothing: the image's demo application (its server script
# is read at start, not mapped, so it is compared by content).
DEFAULT_CARRY = (Carry(name="app", pidfile="/run/osimg-app.pid", files=["/usr/lib/osimg/app.py"]),)


def _abs_path(p: Any) -> bool:
    return isinstance(p, str) and bool(PATH_RE.match(p)) and ".." not in p.split("/")


@dataclass
class Customization:
    """The design's per-LPAR changes: identity, network, mounts, scripts, accounts, kernel."""

    hostname: str | None = None
    address: str | None = None  # CIDR, e.g. 10.0.2.21/24
    gateway: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    init_scripts: list[str] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    kernel_modules: list[str] = field(default_factory=list)
    kernel_params: list[str] = field(default_factory=list)
    quiesce: Quiesce = field(default_factory=Quiesce)
    # process trees carried across a warm swap; None: the image's demo application (DEFAULT_CARRY)
    carry: list[Carry] | None = None

    def validate(self, where: str = "customization") -> Customization:
        """Check every field; errors name ``where`` and the field. Returns self for chaining."""
        if self.hostname is not None and (not isinstance(self.hostname, str) or len(self.hostname) > 253
                                          or not HOSTNAME_RE.match(self.hostname)):
            raise ValidationError(f"{where}.hostname {self.hostname!r}: expected a host name (letters, digits "
                                  "and '-' in dot-separated labels of at most 63 characters)")
        if self.address is not None:
            if "/" not in str(self.address):
                raise ValidationError(f"{where}.address {self.address!r}: give a prefix length, e.g. 10.0.2.21/24")
            iface = ip_interface(self.address, f"{where}.address")
            net = iface.network
            if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
                raise ValidationError(f"{where}.address {iface.ip} is the network or broadcast address of {net}; "
                                      "expected a host address")
            if self.gateway is not None:
                gw = ip_address(self.gateway, f"{where}.gateway")
                if gw not in iface.network:
                    raise ValidationError(f"{where}.gateway {gw} is outside the subnet {iface.network}")
                if gw == iface.ip:
                    raise ValidationError(f"{where}.gateway {gw} equals the guest's own address")
        elif self.gateway is not None:
            raise ValidationError(f"{where}.gateway given without {where}.address")
        for g in self.groups:
            _unix_name(g, f"{where}.groups")
        seen: set[str] = set()
        for u in self.users:
            _unix_name(u.name, f"{where}.users.name")
            if u.name in seen:
                raise ValidationError(f"{where}.users: user {u.name!r} is listed twice")
            seen.add(u.name)
            if u.uid is not None and (isinstance(u.uid, bool) or not isinstance(u.uid, int)
                                      or not 1 <= u.uid <= 65533):
                raise ValidationError(f"{where}.users.{u.name}.uid {u.uid!r}: expected an integer in 1..65533")
            if not isinstance(u.shell, str) or not u.shell.startswith("/") or any(c.isspace() for c in u.shell):
                raise ValidationError(f"{where}.users.{u.name}.shell {u.shell!r}: expected an absolute path")
            for g in u.groups:
                _unix_name(g, f"{where}.users.{u.name}.groups")
            for k in u.ssh_authorized_keys:
                if not isinstance(k, str) or not k.startswith(KEY_TYPES) or "\n" in k or "\r" in k:
                    raise ValidationError(f"{where}.users.{u.name}.ssh_authorized_keys: {str(k)[:30]!r}... is not "
                                          "an OpenSSH public key line (expected e.g. 'ssh-ed25519 AAAA... comment')")
        for m in self.kernel_modules:
            if not isinstance(m, str) or not m or not set(m) <= USER_RE_ALLOWED:
                raise ValidationError(f"{where}.kernel_modules: invalid module name {m!r}")
        for p in self.kernel_params:
            if not isinstance(p, str) or not p or any(c.isspace() or c in "\"'\\" for c in p):
                raise ValidationError(f"{where}.kernel_params: {p!r} must be one word without spaces or quotes")
        paths: set[str] = set()
        for mnt in self.mounts:
            if not isinstance(mnt.path, str) or not mnt.path.startswith("/") or ".." in mnt.path.split("/"):
                raise ValidationError(f"{where}.mounts: path {mnt.path!r} must be absolute without '..'")
            if mnt.path == "/":
                raise ValidationError(f"{where}.mounts: the root file system cannot be a mount of the customization")
            if mnt.path in paths:
                raise ValidationError(f"{where}.mounts: {mnt.path} is mounted twice")
            paths.add(mnt.path)
            for label, value in (("device", mnt.device), ("path", mnt.path), ("fstype", mnt.fstype),
                                 ("options", mnt.options)):
                # they end up in /etc/fstab, whose fields are separated by white space
                if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                    raise ValidationError(f"{where}.mounts[{mnt.path}].{label} {value!r}: expected one word "
                                          "without spaces")
        for script in self.init_scripts:
            if not isinstance(script, str) or not script.strip():
                raise ValidationError(f"{where}.init_scripts: {script!r} is not a command")
        self.quiesce.validate(where)
        if self.carry is not None:
            if len(self.carry) > MAX_CARRIED:
                raise ValidationError(f"{where}.carry: at most {MAX_CARRIED} process trees")
            names = [c.validate(where).name for c in self.carry]
            if len(set(names)) != len(names):
                raise ValidationError(f"{where}.carry: a process tree is named twice")
        return self

    def carried(self) -> list[Carry]:
        """The trees to carry: the spec's, or the demo application when the spec says nothing."""
        return list(DEFAULT_CARRY) if self.carry is None else list(self.carry)

    def with_data(self, data_uuid: str | None, path: str = DATA_MOUNT) -> Customization:
        """A copy that also mounts the guest's data volume (by UUID) at ``path``, unless a mount of
        that device or at that path is already there. The one place that adds the data mount: the
        config drive, a fleet guest and the live form of a warm swap all go through it."""
        out = Customization.from_dict(self.to_dict())
        if data_uuid and not any(m.path == path or m.device == f"UUID={data_uuid}" for m in out.mounts):
            out.mounts.append(Mount(device=f"UUID={data_uuid}", path=path))
        return out

    def user_mode_net(self) -> str:
        """QEMU user-mode (slirp) network options for a guest with this customization.

        The subnet is the one the static address lives in, and ``dhcpstart`` is that address: slirp
        sends host forwards to its first DHCP address (``.15``) unless told otherwise, so without it
        the 127.0.0.1 forwards would never reach a guest that set a static address of its own.
        """
        if not self.address:
            return DEFAULT_USER_NET
        iface = ipaddress.IPv4Interface(self.address)
        return f"{iface.network},dhcpstart={iface.ip}"

    def short_hostname(self, guest: str) -> str:
        """The host name the guest ends up with: cloud-init sets the first label of a dotted name
        and keeps the whole as the FQDN. The config drive and the live form both take it from here."""
        return (self.hostname or guest).split(".")[0]

    @property
    def netmask(self) -> str | None:
        return str(ipaddress.IPv4Interface(self.address).netmask) if self.address else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Customization:
        d = dict(data)
        d["users"] = [User(**u) for u in d.get("users", [])]
        d["mounts"] = [Mount(**m) for m in d.get("mounts", [])]
        d["quiesce"] = Quiesce(**(d.get("quiesce") or {}))
        if d.get("carry") is not None:
            d["carry"] = [Carry(**c) for c in d["carry"]]
        return cls(**d)


def _unix_name(value: str, where: str) -> None:
    if not value or not set(value) <= USER_RE_ALLOWED or value[0] == "-" or len(value) > 32:
        raise ValidationError(f"{where}: invalid user or group name {value!r} (lowercase letters, digits, _ and -)")


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML with JSON-quoted strings: the subset both cloud-init and the tiny parser read."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                lines.append(f"{pad}{k}:")
                lines.extend(_yaml(v, indent + 2))
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)):
                sub = _yaml(item, indent + 2)
                first = sub[0][indent + 2:]
                lines.append(f"{pad}- {first}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return lines


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    # JSON escapes are YAML double-quoted escapes; UTF-8 stays as it is, and what YAML would read
    # as a line break (NEL, U+2028/9) or refuse as unprintable is escaped as \uXXXX as well
    return "".join(c if _printable(c) else f"\\u{ord(c):04x}" for c in json.dumps(str(v), ensure_ascii=False))


def _printable(c: str) -> bool:
    n = ord(c)
    return (0x20 <= n < 0x7F or (0xA0 <= n <= 0xD7FF and n not in (0x2028, 0x2029)) or 0xE000 <= n <= 0xFFFD
            or 0x10000 <= n <= 0x10FFFF)


@dataclass(frozen=True)
class HostKey:
    """A guest's own SSH host key: the private key in OpenSSH format and its public line."""

    private: str
    public: str


def render(guest: str, c: Customization, instance_id: str, host_key: HostKey | None = None) -> dict[str, str]:
    """The three NoCloud files for one guest.

    ``host_key`` goes into cloud-init's ``ssh_keys`` (the tiny image's reader honours the same key),
    so the guest presents its own host key from its first boot on, not the image's.
    """
    name = c.hostname or guest
    meta = {"instance-id": instance_id, "local-hostname": name}
    # spelled out so the tiny image, which reads "hostname" as it is, ends up with cloud-init's name
    ud: dict[str, Any] = {"hostname": c.short_hostname(guest)}
    if "." in name:
        ud["fqdn"] = name
    if c.groups:
        ud["groups"] = list(c.groups)
    if c.users:
        ud["users"] = [
            {k: v for k, v in {
                "name": u.name, "uid": u.uid, "groups": ",".join(u.groups) or None, "shell": u.shell,
                "lock_passwd": True, "ssh_authorized_keys": u.ssh_authorized_keys or None,
            }.items() if v is not None}
            for u in c.users
        ]
    bootcmd = [f"modprobe {m}" for m in c.kernel_modules]
    if c.kernel_modules:
        ud["write_files"] = [{"path": "/etc/modules-load.d/osimg.conf",
                              "content": "".join(f"{m}\n" for m in c.kernel_modules), "permissions": "0644"}]
    if bootcmd:
        ud["bootcmd"] = bootcmd
    if c.mounts:
        ud["mounts"] = [[m.device, m.path, m.fstype, m.options, "0", "2"] for m in c.mounts]
    if c.init_scripts:
        ud["runcmd"] = list(c.init_scripts)
    if host_key is not None:
        ud["ssh_keys"] = {"ed25519_private": host_key.private, "ed25519_public": host_key.public}
    files = {
        "meta-data": "\n".join(_yaml(meta)) + "\n",
        "user-data": "#cloud-config\n" + "\n".join(_yaml(ud)) + "\n",
    }
    if c.address:
        subnet: dict[str, Any] = {"type": "static", "address": c.address.split("/")[0], "netmask": c.netmask}
        if c.gateway:
            subnet["gateway"] = c.gateway
        net = {"version": 1, "config": [{"type": "physical", "name": "eth0", "subnets": [subnet]}]}
        files["network-config"] = "\n".join(_yaml(net)) + "\n"
    return files


def write_config_drive(path: Path, files: dict[str, str]) -> None:
    """An ISO9660 image labelled ``cidata`` with Rock Ridge and Joliet names (pure Python).

    Created 0600: it may carry the guest's private host key. libvirt hands it to QEMU's user
    while the guest runs (dynamic ownership).
    """
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for i, (fname, text) in enumerate(sorted(files.items())):
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), f"/F{i}.;1", rr_name=fname, joliet_path=f"/{fname}")
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    buf = io.BytesIO()
    iso.write_fp(buf)
    iso.close()
    create_private(tmp, buf.getvalue())
    tmp.rename(path)


# -- the live form (warm swap) ---------------------------------------------------------------------------------------
def identity_lines(host_key: HostKey | None, machine_id: str | None) -> list[str]:
    """Shell lines giving a paged-in OS this guest's identity instead of the golden state's.

    The golden state carries the host key and machine-id of the builder it was captured from, the
    same for every guest paged in from it. ``host_key`` is installed for whichever SSH server the
    image has and the server is made to use it at once: dropbear (tiny) reads its key only at
    start, so it is restarted (after converting the OpenSSH key to its own format, as at boot);
    OpenSSH is sent SIGHUP (it re-executes and reloads its keys). ``machine_id`` replaces
    /etc/machine-id (and a separate dbus copy) where the image has one (Debian); the kernel's
    boot_id cannot be changed from inside a running guest.
    """
    q = sh_quote
    lines: list[str] = []
    if host_key is not None:
        lines += [
            f"K={q(host_key.private)}",
            "if [ -x /usr/sbin/dropbearconvert ]; then",
            "  F=/etc/dropbear/dropbear_ed25519_host_key",
            "  (umask 077; printf '%s\\n' \"$K\" >/run/osimg-host-key &&",
            "   dropbearconvert openssh dropbear /run/osimg-host-key \"$F.new\" >/dev/null 2>&1) &&"
            " mv -f \"$F.new\" \"$F\" ||"
            " { rm -f /run/osimg-host-key \"$F.new\"; echo 'installing the host key failed' >&2; exit 1; }",
            "  rm -f /run/osimg-host-key",
            "  if [ -s /run/dropbear.pid ]; then P=$(cat /run/dropbear.pid); kill \"$P\" 2>/dev/null; n=0",
            "    while kill -0 \"$P\" 2>/dev/null && [ $n -lt 200 ]; do n=$((n+1)); sleep 0.01; done; fi",
            "  /usr/sbin/dropbear -r \"$F\" -p 22 -P /run/dropbear.pid </dev/null >/dev/null 2>&1",
            "elif [ -d /etc/ssh ]; then",
            "  F=/etc/ssh/ssh_host_ed25519_key",
            "  (umask 077; printf '%s\\n' \"$K\" >\"$F.new\") && mv -f \"$F.new\" \"$F\" ||"
            " { echo 'installing the host key failed' >&2; exit 1; }",
            f"  printf '%s\\n' {q(host_key.public)} >\"$F.pub\"",
            "  if [ -s /run/sshd.pid ]; then kill -HUP \"$(cat /run/sshd.pid)\"; fi",
            "fi",
            "unset K",
        ]
    if machine_id is not None:
        lines += [
            f"MID={q(machine_id)}",
            '[ -s /etc/machine-id ] && echo "$MID" >/etc/machine-id',
            "D_=/var/lib/dbus/machine-id",
            '[ -f "$D_" ] && [ ! -L "$D_" ] && echo "$MID" >"$D_"',
        ]
    return lines


LIVE_PARTS = ("all", "staged", "data")
DATA_SERIAL = "osimg-data"  # the data volume's virtio serial: how a guest script finds its device


def live_script(c: Customization, guest: str, data_uuid: str | None, host_key: HostKey | None = None,
                machine_id: str | None = None, after_mounts: str = "", part: str = "all") -> str:
    """The guest's NoCloud customization as a POSIX shell script for a *running* OS.

    A warm swap pages in a golden state that booted without this guest's config drive, so the same
    settings are applied live: host key and machine-id (``identity_lines``), hostname, address,
    accounts, mounts, modules, init scripts, the app. Written for both busybox and Debian userlands
    (``ip``, ``findfs`` and plain file edits). ``after_mounts`` (a script) runs right after the
    mounts, before the init scripts and the application start.

    ``part`` splits the script for a staged page-in (``swap.staging``): ``"staged"`` is everything
    that needs no data volume (identity, hostname, address, accounts, modules, the other mounts) and
    runs in the staging domain before the guest is quiesced; ``"data"`` is the rest (the data volume's
    mount, ``after_mounts``, init scripts, the application), the only part left in the downtime.
    """
    if part not in LIVE_PARTS:
        raise ValueError(f"live_script part {part!r}")
    q = sh_quote
    data_dev = f"UUID={data_uuid}" if data_uuid else None
    lines = ["set -u"]
    if part == "data":
        mounts = _mount_lines(c, data_uuid, only=data_dev) if data_dev else []
        return "\n".join(lines + mounts + _data_lines(c, after_mounts)) + "\n"
    lines += [*identity_lines(host_key, machine_id), f"H={q(c.short_hostname(guest))}",
              'echo "$H" >/etc/hostname; hostname "$H"']
    if c.address:
        lines += [
            "ip addr flush dev eth0",
            f"ip addr add {q(c.address)} dev eth0",
            "ip link set eth0 up",
        ]
        if c.gateway:
            lines.append(f"ip route replace default via {q(c.gateway)} dev eth0")
    lines.append(
        'addgroup_() { grep -q "^$1:" /etc/group || echo "$1:x:${2:-$(awk -F: \'$3>=1000 && $3<60000 '
        '{m=$3} END {print (m ? m+1 : 1000)}\' /etc/group)}:" >>/etc/group; }'
    )
    lines.append(
        'member_() { awk -F: -v g="$1" -v u="$2" \'BEGIN{OFS=":"} $1==g { n=split($4,a,","); f=0; '
        'for(i=1;i<=n;i++) if(a[i]==u) f=1; if(!f) $4=($4=="" ? u : $4","u) } {print}\' /etc/group '
        '>/etc/group.new && cat /etc/group.new >/etc/group && rm -f /etc/group.new; }'
    )
    for g in c.groups:
        lines.append(f"addgroup_ {q(g)}")
    for u in c.users:
        uid = str(u.uid) if u.uid is not None else ""
        lines += [
            f"U={q(u.name)}; UID_={q(uid)}",
            'if ! grep -q "^$U:" /etc/passwd; then',
            '  [ -n "$UID_" ] || UID_=$(awk -F: \'$3>=1000 && $3<60000 {m=$3} END {print (m ? m+1 : 1000)}\' '
            "/etc/passwd)",
            '  addgroup_ "$U" "$UID_"; GID_=$(awk -F: -v g="$U" \'$1==g{print $3}\' /etc/group)',
            f'  mkdir -p "/home/$U"; echo "$U:*:$UID_:$GID_:$U:/home/$U:"{q(u.shell)} >>/etc/passwd',
            '  chown "$UID_:$GID_" "/home/$U"',
            "fi",
        ]
        for g in u.groups:
            lines.append(f'addgroup_ {q(g)}; member_ {q(g)} "$U"')
        if u.ssh_authorized_keys:
            keys = "\n".join(u.ssh_authorized_keys)
            lines += [
                'HOME_=$(awk -F: -v u="$U" \'$1==u{print $6}\' /etc/passwd)',
                'mkdir -p "$HOME_/.ssh"',
                f'printf "%s\\n" {q(keys)} >"$HOME_/.ssh/authorized_keys"',
                'chmod 700 "$HOME_/.ssh"; chmod 600 "$HOME_/.ssh/authorized_keys"; chown -R "$U" "$HOME_/.ssh"',
            ]
    for m in c.kernel_modules:
        lines.append(f"modprobe {q(m)} || true")
    if part == "staged":
        return "\n".join(lines + _mount_lines(c, data_uuid, but=data_dev)) + "\n"
    return "\n".join(lines + _mount_lines(c, data_uuid) + _data_lines(c, after_mounts)) + "\n"


def _mount_lines(c: Customization, data_uuid: str | None, only: str | None = None,
                 but: str | None = None) -> list[str]:
    """Mount lines of ``c``'s mounts (with the data volume): all, ``only`` one device, or all ``but`` one.

    Mounting ``only`` the data volume (a staged page-in's window) first drops the guest's cached
    blocks of the data volume's device: the staged OS saw an empty stand-in disk there, and the
    kernel would otherwise read the stand-in's zeros where the file system's superblock is.
    """
    q = sh_quote
    lines: list[str] = []
    find = 'case $D in UUID=*|LABEL=*) DEV=$(findfs "$D" 2>/dev/null);; *) DEV=$D;; esac'
    if only is not None:
        # the data volume's device by its serial (no findfs: each program costs ~0.1 s under TCG)
        lines.append(f'SDEV=; for b in /sys/block/*; do s=; read -r s 2>/dev/null <"$b/serial"; '
                     f'[ "$s" = {q(DATA_SERIAL)} ] && {{ SDEV=/dev/${{b##*/}}; blockdev --flushbufs "$SDEV"; }}; done')
        find = f'if [ -n "$SDEV" ]; then DEV=$SDEV; else {find}; fi'
    for mnt in c.with_data(data_uuid).mounts:
        if (only is not None and mnt.device != only) or (but is not None and mnt.device == but):
            continue
        lines += [
            f"D={q(mnt.device)}; MP={q(mnt.path)}",
            # the device node of a hot-plugged disk can take a moment to appear; a device that is no
            # node (tmpfs) has nothing to wait for
            f'n=0; while :; do {find}',
            '  case $DEV in /dev/*) [ -b "$DEV" ] && break;; *) [ -n "$DEV" ] && break;; esac',
            '  n=$((n+1)); [ $n -gt 100 ] && break; sleep 0.05; done',
            'mkdir -p "$MP"',
            f'grep -q " $MP " /proc/mounts || mount -t {q(mnt.fstype)} -o {q(mnt.options)} "$DEV" "$MP"',
        ]
    return lines


def _data_lines(c: Customization, after_mounts: str) -> list[str]:
    """What follows the mounts: ``after_mounts``, the init scripts, the application."""
    q = sh_quote
    lines: list[str] = []
    if after_mounts:
        # what must run once the mounts are back and before anything else touches them (the
        # restore of carried processes): a function body of its own, its failure fails the script
        lines += ["after_mounts_() {", after_mounts.rstrip("\n"), "}", "after_mounts_ || exit $?"]
    for script in c.init_scripts:
        lines.append(f"sh -c {q(script)} || echo \"init script failed: $?\" >&2")
    # the application keeps its state on the data volume: no /data, no application
    lines.append('if grep -q " /data " /proc/mounts; then /usr/sbin/osimg-app start; fi')
    return lines


def sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"
