"""Host checks (``osimg doctor``): versions, the accelerator, daemons, and whether QEMU can read our files."""

from __future__ import annotations

import grp
import pwd
import shutil
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from .accel import choose_accel
from .errors import OsimgError
from .host import ksm
from .host.libvirt import VIRTLOGD_SOCK, Hypervisor
from .settings import QEMU_USER, Settings, narrow, qemu_group_name, too_wide


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    versions: dict[str, str] = field(default_factory=dict)
    accel: dict[str, object] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _readable_by(path: Path, user: str) -> tuple[bool, str]:
    """Can ``user`` traverse every parent of ``path``? The classic libvirt 'Permission denied' trap."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return True, f"user {user} does not exist (QEMU runs as another user; not checked)"
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {pw.pw_gid}
    p = path
    chain = [p, *p.parents]
    for d in reversed(chain):
        if not d.exists():
            continue
        st = d.stat()
        need = stat.S_IXOTH if d.is_dir() else stat.S_IROTH
        if st.st_uid == pw.pw_uid or st.st_gid in groups or st.st_mode & need:
            continue
        return False, f"{d} (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}) blocks user {user}"
    return True, f"{user} can reach {path}"


def _confinement() -> str:
    notes = []
    if Path("/sys/kernel/security/apparmor/profiles").exists():
        notes.append("AppArmor active: libvirt's virt-aa-helper adds guest files to each domain's profile; "
                     "backing files outside the pool may need an abstraction")
    if Path("/sys/fs/selinux/enforce").exists() and Path("/sys/fs/selinux/enforce").read_text().strip() == "1":
        notes.append("SELinux enforcing: image files need the virt_image_t label")
    return "; ".join(notes) or "no AppArmor or SELinux confinement active"


def _ksm() -> str:
    """Information, never a failure: KSM is the operator's host-wide choice, off unless turned on."""
    try:
        st = ksm.status()
    except OsimgError as err:
        return str(err)
    if st.run != ksm.RUN_ON:
        return (f"{st.state}: guests restored from one golden state keep their own copies of identical "
                "pages ('osimg host ksm on' merges them; host-wide, see the README)")
    return (f"on: {st.pages_sharing} pages merged into {st.pages_shared}, {st.saved_bytes / (1 << 20):.0f} MiB "
            f"saved; ksmd scans {st.pages_to_scan} pages every {st.sleep_ms} ms")


def _virtlogd() -> tuple[bool, str]:
    """A stale socket file outlives a dead virtlogd; only a connection tells them apart."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(VIRTLOGD_SOCK)
        except OSError as err:
            return False, f"{VIRTLOGD_SOCK}: {err.strerror or err}; domains cannot start (run 'virtlogd -d')"
    return True, f"answers on {VIRTLOGD_SOCK}"


def _modes(settings: Settings, fix: bool) -> Check:
    """Files and folders under OSIMG_HOME wider than root + QEMU's group (keys and the store: root
    alone); ``fix`` narrows them (and gives them QEMU's group) instead of only reporting them."""
    def show(items: list[tuple[Path, int, int]]) -> str:
        listed = ", ".join(f"{p} {m:04o} (at most {a:04o})" for p, m, a in items[:5])
        return listed + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    if fix:
        changed = narrow(settings.home)
        left = too_wide(settings.home)
        if left:
            return Check("file modes", False, f"could not narrow {show(left)}")
        return Check("file modes", True, f"narrowed {len(changed)}: {show(changed)}" if changed else
                     f"nothing under {settings.home} is readable beyond root and group {qemu_group_name()}")
    wide = too_wide(settings.home)
    if wide:
        return Check("file modes", False, f"{len(wide)} wider than root + group {qemu_group_name()}: {show(wide)} "
                     "(osimg doctor --fix narrows them)")
    return Check("file modes", True, f"nothing under {settings.home} is readable beyond root and group "
                 f"{qemu_group_name()}")


def run(settings: Settings, hv: Hypervisor, reprobe: bool = False, fix: bool = False) -> Report:
    rep = Report()
    rep.versions = hv.versions()
    rep.checks.append(Check("virtlogd", *_virtlogd()))
    choice = choose_accel(settings, hv, reprobe=reprobe)
    rep.accel = {"accel": choice.accel, "label": choice.label, "reason": choice.reason,
                 "probed_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(choice.probed_at))}
    settings.ensure_dirs()
    for path, what in ((settings.home, "state folder"), (settings.cache, "image cache")):
        ok, detail = _readable_by(path, QEMU_USER)
        rep.checks.append(Check(f"{what} readable by QEMU", ok, detail))
    rep.checks.append(_modes(settings, fix))
    rep.checks.append(Check("confinement", True, _confinement()))
    rep.checks.append(Check("KSM", True, _ksm()))
    free = shutil.disk_usage(settings.home).free
    rep.checks.append(Check("free disk", free > 2 << 30, f"{free / (1 << 30):.1f} GiB free under {settings.home}"))
    for tool in ("qemu-img", "mkfs.ext4", "qemu-storage-daemon"):
        found = shutil.which(tool)
        rep.checks.append(Check(f"tool {tool}", bool(found), found or "not installed (make setup)"))
    return rep
