"""Where osimg keeps its state and which host it drives, from the environment with sane defaults.

``OSIMG_HOME``  repository and guest files (default /var/lib/osimg; must be readable by the QEMU user)
``OSIMG_URI``   libvirt URI (default qemu:///system)
``OSIMG_CACHE`` build cache: recipe images, etcd (default /var/cache/osimg, shared by every checkout)
``OSIMG_ACCEL`` force ``kvm`` or ``tcg`` instead of probing
``OSIMG_STORE`` cluster store URL (default sqlite under OSIMG_HOME; ``etcds://127.0.0.1:2379`` for etcd
              with TLS and a client certificate, see ``cluster.open``)
``OSIMG_ETCD_PKI`` folder of ``ca.crt``, ``client.crt``, ``client.key`` for etcds:// (default $OSIMG_CACHE/etcd/pki)
``OSIMG_LU_ROOTS`` folders (``:``-separated) whose files may be LUs, besides OSIMG_HOME and the cache
``OSIMG_KVM_DEVICE`` the KVM device the probe checks (default /dev/kvm; a missing path forces the TCG fallback)
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ValidationError
from .validate import short

SOURCE_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = SOURCE_ROOT / "images"
DEFAULT_CACHE = "/var/cache/osimg"  # FHS: regenerable data of a root tool, shared by every checkout
QEMU_USER = "libvirt-qemu"  # Debian's user for libvirt's QEMU processes
URI_RE = re.compile(r"^[a-z][a-z0-9+]*:///?[^\s]*$")
MAX_URI = 400  # a host's URI in a record or a fleet spec


def host_uri_ok(uri: object) -> bool:
    """A libvirt URI as a host record or a fleet spec's ``hosts:`` may name it."""
    return isinstance(uri, str) and URI_RE.match(uri) is not None and len(uri) <= MAX_URI
PSEUDO_FS = (Path("/proc"), Path("/sys"), Path("/dev"))


def state_folder(value: str, what: str) -> Path:
    """A folder osimg may keep state in: a directory (or not there yet), not / nor a kernel pseudo file system."""
    if "\0" in value:
        raise ValidationError(f"{what} {short(value)}: not a valid path")
    path = Path(value).resolve()
    if path == Path("/") or any(path == p or path.is_relative_to(p) for p in PSEUDO_FS):
        raise ValidationError(f"{what} {short(value)}: not a place for osimg's state (/, /proc, /sys and /dev "
                              "are refused); give a folder such as /var/lib/osimg")
    if path.exists() and not path.is_dir():
        raise ValidationError(f"{what} {short(value)} is a file, not a folder")
    return path


# Only root and QEMU reach guest disks, memory images, sockets and the store. Folders are owned by
# root with QEMU's group and the setgid bit, so what is made inside gets QEMU's group; the umask
# keeps every new file from others (0640, 0750).
UMASK = 0o027
DIR_MODE = 0o2750
FILE_MODE = 0o640
READONLY_MODE = 0o440  # image files: immutable once captured
SOCKET_MODE = 0o660  # NBD sockets: QEMU connects, nobody else
PRIVATE_MODE = 0o600  # keys and the SQLite store: root alone
PRIVATE_SUFFIXES = (".key", ".sqlite", ".sqlite-wal", ".sqlite-shm")  # not keys.psk: QEMU loads it


def qemu_gid() -> int | None:
    """The primary group of QEMU's user (``kvm`` on Debian), None where that user does not exist."""
    try:
        return pwd.getpwnam(QEMU_USER).pw_gid
    except KeyError:
        return None


def qemu_gids() -> set[int]:
    """Groups a file under OSIMG_HOME may have: root's, and QEMU's user's (libvirt gives the files of a
    running guest to ``libvirt-qemu:libvirt-qemu`` and gives them back when it stops)."""
    try:
        pw = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return {0}
    return {0, pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if QEMU_USER in g.gr_mem or g.gr_name == QEMU_USER}


def qemu_group_name() -> str:
    gid = qemu_gid()
    if gid is None:
        return "root"
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents under it) a folder root and QEMU's group reach, nobody else."""
    path.mkdir(parents=True, exist_ok=True)
    gid = qemu_gid()
    if gid is not None and os.geteuid() == 0:
        os.chown(path, 0, gid)
    path.chmod(DIR_MODE)
    return path


def create_private(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Write a new file that is ``mode`` from its first byte (a key is never world-readable, not even
    between a write and a chmod); refuses to follow a symlink or to reuse an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def allowed_mode(path: Path, st: os.stat_result) -> int:
    """The widest permission bits a file or folder under OSIMG_HOME may have."""
    if stat.S_ISDIR(st.st_mode):
        return DIR_MODE
    if stat.S_ISSOCK(st.st_mode):
        return SOCKET_MODE | 0o110  # x means nothing on a socket (a QMP socket made under umask 027 has it)
    if path.name.endswith(PRIVATE_SUFFIXES) or path.name.startswith("id_"):
        return PRIVATE_MODE
    return FILE_MODE


def too_wide(root: Path) -> list[tuple[Path, int, int]]:
    """Every file or folder under ``root`` (``root`` included; symlinks skipped) whose mode grants
    more than ``allowed_mode``, or whose group is not QEMU's: (path, mode, allowed)."""
    out = []
    gids = qemu_gids()
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        entries = [d] if d == root else []
        entries += [d / n for n in (*dirnames, *filenames)]
        for p in entries:
            try:
                st = p.lstat()
            except OSError:
                continue  # vanished while walking
            if stat.S_ISLNK(st.st_mode):
                continue
            allowed = allowed_mode(p, st)
            mode = stat.S_IMODE(st.st_mode)
            wrong_group = st.st_gid not in gids and allowed != PRIVATE_MODE
            if mode & ~allowed & 0o7777 & ~stat.S_ISGID or wrong_group:
                out.append((p, mode, allowed))
    return out


def narrow(root: Path) -> list[tuple[Path, int, int]]:
    """``doctor --fix``: take away the bits ``too_wide`` reports (never adds any) and give folders and
    shared files QEMU's group, so QEMU still reaches what it needs. Returns what was changed."""
    changed = too_wide(root)
    gid = qemu_gid()
    for p, mode, allowed in changed:
        if gid is not None and allowed != PRIVATE_MODE:
            os.chown(p, -1, gid, follow_symlinks=False)
        new = mode & allowed
        if allowed == DIR_MODE:
            new |= stat.S_ISGID
        p.chmod(new)
    return changed

@dataclass(frozen=True)
class Settings:
    home: Path
    uri: str
    cache: Path
    accel: str | None
    store_url: str
    extra_lu_roots: tuple[Path, ...] = ()
    kvm_device: str = "/dev/kvm"

    @classmethod
    def from_env(cls, home: str | None = None, uri: str | None = None, store: str | None = None) -> Settings:
        h = state_folder(home or os.environ.get("OSIMG_HOME") or "/var/lib/osimg", "--home/OSIMG_HOME")
        accel = os.environ.get("OSIMG_ACCEL") or None
        if accel not in (None, "kvm", "tcg"):
            raise ValidationError(f"OSIMG_ACCEL={short(accel)}: expected 'kvm' or 'tcg'")
        u = uri or os.environ.get("OSIMG_URI") or "qemu:///system"
        if not URI_RE.match(u):
            raise ValidationError(f"--uri/OSIMG_URI {short(u)}: expected a libvirt URI such as qemu:///system "
                                  "or qemu+ssh://host/system")
        return cls(
            home=h,
            uri=u,
            cache=state_folder(os.environ.get("OSIMG_CACHE") or DEFAULT_CACHE, "OSIMG_CACHE"),
            accel=accel,
            store_url=store or os.environ.get("OSIMG_STORE") or f"sqlite://{h / 'cluster.sqlite'}",
            extra_lu_roots=tuple(Path(p).resolve() for p in os.environ.get("OSIMG_LU_ROOTS", "").split(":") if p),
            kvm_device=os.environ.get("OSIMG_KVM_DEVICE") or "/dev/kvm",
        )

    @property
    def guests_dir(self) -> Path:
        return self.home / "guests"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def file_roots(self) -> list[Path]:
        """Where files named by records may lie: the repository and the build cache (recipe images)."""
        return [self.home, self.cache]

    @property
    def lu_roots(self) -> list[Path]:
        """Where an LU's disk file may lie: osimg's own folders and the ones ``OSIMG_LU_ROOTS`` adds."""
        return [*self.file_roots, *self.extra_lu_roots]

    @property
    def client_key(self) -> Path:
        """The private key osimg logs into guests with (created by ``recipes.client_key``).

        It lives with the guests that trust it, under OSIMG_HOME: changing the build cache must not
        lock osimg out of existing guests."""
        return self.home / "keys" / "id_ed25519"

    @property
    def legacy_client_key(self) -> Path:
        """Where the client key lived before it moved under OSIMG_HOME (copied from there once)."""
        return self.cache / "keys" / "id_ed25519"

    def ensure_dirs(self) -> None:
        """Create the state folders for root and QEMU's group only (QEMU runs as another user and must
        reach them; nobody else may). Parents outside OSIMG_HOME need only be traversable."""
        for d in (self.home, self.guests_dir, self.images_dir):
            private_dir(d)
