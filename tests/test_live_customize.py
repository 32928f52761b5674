"""``customize.live_script`` executed for real, in a throw-away busybox root on the host.

A warm swap applies a guest's customization to a running OS with this script, through the guest
agent. Here it runs under the host's static busybox in a chroot whose ``ip``, ``modprobe``,
``mount``, ``findfs``, ``hostname``, ``sleep`` and ``osimg-app`` are stubs that log their
arguments; the account files, home directories and keys it writes are real files, checked
afterwards.

Two things keep the host safe, and both are needed. Debian's busybox shell runs its own applet for
a command named like one *before* it looks at PATH, so a stub file alone would lose to the real
``ip`` (which once flushed the host's eth0 this way): the stubs are shell functions defined ahead
of the script. And the chroot runs in its own network, UTS, mount and PID namespaces
(``unshare --net --uts --mount --pid``), so even a command that slipped past a stub could only
touch an empty network and a private host name and mount table.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from orchestrator.customize import DATA_SERIAL, Customization, Mount, User, live_script

BUSYBOX = shutil.which("busybox")
UNSHARE = shutil.which("unshare")
CHROOT = shutil.which("chroot")
STUBBED = ("ip", "modprobe", "mount", "findfs", "hostname", "sleep", "blockdev")  # sleep: the device wait, counted
DATA_UUID = "0f6bd1e2-8f7a-4b5c-9d3e-2a1b0c9d8e7f"
KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILk5UUsVHT67UTXAWokwGzHsfiDy7l0E55YLxahmfjHF alice@laptop",
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 alice's other key"]

pytestmark = [
    pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)"),
    pytest.mark.skipif(UNSHARE is None or CHROOT is None, reason="unshare or chroot (util-linux, coreutils) missing"),
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot and mknod need root"),
]

# Each stub logs "name<TAB>arg<TAB>arg..." so arguments with spaces stay distinguishable.
STUB = """#!/bin/sh
{ printf '%s' "${0##*/}"; for a in "$@"; do printf '\\t%s' "$a"; done; echo; } >>/stub.log
"""
STUB_EXTRA = {
    # modprobe fails for one module: the script must go on
    "modprobe": '[ "$1" = nosuchmod ] && exit 1\nexit 0\n',
    "findfs": f'case $1 in UUID={DATA_UUID}) echo /dev/vdc;; LABEL=logs) echo /dev/vdd;; *) exit 1;; esac\n',
    # /proc/mounts is a plain file here: a mount shows up in it as it would in the guest
    "mount": 'echo "$5 $6 $2 $4 0 0" >>/proc/mounts\n',
}
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
GROUP = "root:x:0:\nwheel:x:10:root\napp:x:1000:\nnogroup:x:65534:\n"


def sample() -> Customization:
    return Customization(
        hostname="web1.example.test", address="10.0.2.21/24", gateway="10.0.2.2",
        groups=["ops"],
        users=[User("alice", uid=2001, groups=["ops", "wheel"], shell="/bin/bash", ssh_authorized_keys=KEYS),
               User("bob"),
               User("app", groups=["ops"])],  # exists already: only its group membership is added
        kernel_modules=["br_netfilter", "nosuchmod"],
        mounts=[Mount("LABEL=logs", "/var/log/app", options="noatime")],
        init_scripts=["echo \"init ran as $(id -u)\" >/tmp/init-ran", "exit 3"],
    ).validate()


def sandbox(root: Path) -> Path:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "dev", "tmp", "root", "home/app"):
        (root / d).mkdir(parents=True, exist_ok=True)
    assert BUSYBOX is not None
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet not in STUBBED and not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    (root / "stubs").mkdir()
    for name in STUBBED:
        write_exe(root / "stubs" / name, STUB + STUB_EXTRA.get(name, ""))
    write_exe(root / "usr/sbin/osimg-app", STUB)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "proc/mounts").write_text("/dev/vda / ext4 rw,relatime 0 0\n")
    # the script waits for the data disk's device node: give it real block devices
    for dev, minor in (("vdc", 32), ("vdd", 48)):
        os.mknod(root / "dev" / dev, 0o600 | stat.S_IFBLK, os.makedev(254, minor))
    # sysfs as the staged window's data mount reads it: the data volume's device by its serial
    for dev, serial in (("vda", ""), ("vdc", DATA_SERIAL), ("vdd", "logs")):
        (root / "sys/block" / dev).mkdir(parents=True)
        (root / "sys/block" / dev / "serial").write_text(serial)
    return root


def write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


# busybox sh prefers its applets to PATH, not to functions: these make the stubs win
PRELUDE = "".join(f'{name}() {{ /stubs/{name} "$@"; }}\n' for name in STUBBED)


def run(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    assert UNSHARE is not None and CHROOT is not None
    return subprocess.run([UNSHARE, "--net", "--uts", "--mount", "--pid", "--fork", CHROOT, str(root), "/bin/sh", "-s"],
                          input=PRELUDE + script, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"})


def calls(root: Path) -> list[list[str]]:
    return [line.split("\t") for line in (root / "stub.log").read_text().splitlines()]


def table(path: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = sandbox(tmp_path_factory.mktemp("live") / "root")
    proc = run(root, live_script(sample(), "web1", DATA_UUID))
    return root, proc


def test_the_script_runs_to_the_end(applied: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, proc = applied
    assert proc.returncode == 0, proc.stderr
    # the failing init script is reported and does not stop the rest
    assert proc.stderr.strip() == "init script failed: 3"
    assert (root / "tmp/init-ran").read_text() == "init ran as 0\n"


def test_host_name_is_the_short_name_as_on_the_config_drive(
        applied: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = applied
    assert (root / "etc/hostname").read_text() == "web1\n"
    assert ["hostname", "web1"] in calls(root)


def test_network_modules_mounts_and_app_calls(applied: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = applied
    log = calls(root)
    assert [c for c in log if c[0] == "ip"] == [
        ["ip", "addr", "flush", "dev", "eth0"],
        ["ip", "addr", "add", "10.0.2.21/24", "dev", "eth0"],
        ["ip", "link", "set", "eth0", "up"],
        ["ip", "route", "replace", "default", "via", "10.0.2.2", "dev", "eth0"],
    ]
    assert [c for c in log if c[0] == "modprobe"] == [["modprobe", "br_netfilter"], ["modprobe", "nosuchmod"]]
    assert [c for c in log if c[0] == "mount"] == [
        ["mount", "-t", "ext4", "-o", "noatime", "/dev/vdd", "/var/log/app"],
        ["mount", "-t", "ext4", "-o", "defaults", "/dev/vdc", "/data"],  # the data volume, by its UUID
    ]
    assert ["findfs", f"UUID={DATA_UUID}"] in log and ["findfs", "LABEL=logs"] in log
    assert (root / "var/log/app").is_dir() and (root / "data").is_dir()
    assert not [c for c in log if c[0] == "sleep"]  # the device nodes were there: no waiting
    # the application starts last, once /data is mounted
    assert log[-1] == ["osimg-app", "start"]


def test_accounts_groups_and_membership(applied: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = applied
    passwd, group = table(root / "etc/passwd"), table(root / "etc/group")
    assert passwd["alice"] == ["alice", "*", "2001", "2001", "alice", "/home/alice", "/bin/bash"]
    # no uid given: the next after the highest regular one (alice's 2001)
    assert passwd["bob"] == ["bob", "*", "2002", "2002", "bob", "/home/bob", "/bin/sh"]
    assert passwd["app"] == ["app", "x", "1000", "1000", "app", "/home/app", "/bin/sh"]  # untouched
    assert (root / "etc/passwd").read_text().startswith(PASSWD)
    assert group["ops"] == ["ops", "x", "1001", "alice,app"]
    assert group["alice"] == ["alice", "x", "2001", ""] and group["bob"] == ["bob", "x", "2002", ""]
    assert group["wheel"] == ["wheel", "x", "10", "root,alice"]
    for name, uid in (("alice", 2001), ("bob", 2002)):
        st = (root / "home" / name).stat()
        assert (st.st_uid, st.st_gid) == (uid, uid)


def test_authorized_keys_content_and_modes(applied: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = applied
    ssh = root / "home/alice/.ssh"
    keys = ssh / "authorized_keys"
    assert keys.read_text() == "".join(k + "\n" for k in KEYS)
    assert stat.S_IMODE(ssh.stat().st_mode) == 0o700 and stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert (ssh.stat().st_uid, keys.stat().st_uid) == (2001, 2001)
    assert not (root / "home/bob/.ssh").exists()


def test_a_second_run_adds_nothing(tmp_path: Path) -> None:
    """A resumed warm swap may apply the customization twice: accounts and mounts must not double."""
    root = sandbox(tmp_path / "root")
    script = live_script(sample(), "web1", DATA_UUID)
    assert run(root, script).returncode == 0
    files = {p: (root / p).read_text() for p in ("etc/passwd", "etc/group", "proc/mounts", "etc/hostname")}
    assert run(root, script).returncode == 0
    assert {p: (root / p).read_text() for p in files} == files
    assert sum(c[0] == "mount" for c in calls(root)) == 2


def test_without_a_data_volume_the_app_is_not_started(tmp_path: Path) -> None:
    root = sandbox(tmp_path / "root")
    proc = run(root, live_script(Customization(), "plain", None))
    assert proc.returncode == 0, proc.stderr
    assert (root / "etc/hostname").read_text() == "plain\n"
    assert calls(root) == [["hostname", "plain"]]
    assert (root / "etc/passwd").read_text() == PASSWD and (root / "etc/group").read_text() == GROUP


def test_a_tmpfs_mount_does_not_wait_for_a_device(tmp_path: Path) -> None:
    """Only UUID=, LABEL= and /dev/ devices have a node to wait for; tmpfs must not cost the swap 5 s."""
    root = sandbox(tmp_path / "root")
    c = Customization(mounts=[Mount("tmpfs", "/srv/scratch", "tmpfs", "size=16m")])
    proc = run(root, live_script(c, "g", None))
    assert proc.returncode == 0, proc.stderr
    assert [x for x in calls(root) if x[0] == "mount"] == [
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", "/srv/scratch"]]
    assert "sleep" not in [x[0] for x in calls(root)]


def test_the_staged_and_data_parts_together_do_what_the_whole_script_does(tmp_path: Path) -> None:
    """A staged page-in runs the ``staged`` part in the staging domain and only the ``data`` part in
    the window: nothing may be lost between them, nothing needing /data may run early, and the data
    part drops the stand-in disk's cached blocks before it mounts the data volume."""
    whole, parts = sandbox(tmp_path / "whole"), sandbox(tmp_path / "parts")
    assert run(whole, live_script(sample(), "web1", DATA_UUID)).returncode == 0
    staged = run(parts, live_script(sample(), "web1", DATA_UUID, part="staged"))
    assert staged.returncode == 0, staged.stderr
    early = calls(parts)
    assert [c for c in early if c[0] == "mount"] == [
        ["mount", "-t", "ext4", "-o", "noatime", "/dev/vdd", "/var/log/app"]]  # not the data volume
    assert not [c for c in early if c[0] in ("osimg-app", "blockdev")]
    assert not (parts / "tmp/init-ran").exists(), "an init script ran before /data was there"
    data = run(parts, live_script(sample(), "web1", DATA_UUID, part="data"))
    assert data.returncode == 0 and data.stderr.strip() == "init script failed: 3", data.stderr
    late = calls(parts)[len(early):]
    assert late[0] == ["blockdev", "--flushbufs", "/dev/vdc"], late  # the data volume's device, by serial
    assert not [c for c in late if c[0] == "findfs"], late  # found by its serial: no findfs in the window
    assert [c for c in late if c[0] in ("mount", "hostname", "ip", "modprobe")] == [
        ["mount", "-t", "ext4", "-o", "defaults", "/dev/vdc", "/data"]]
    assert late[-1] == ["osimg-app", "start"]
    for f in ("etc/passwd", "etc/group", "etc/hostname", "proc/mounts", "home/alice/.ssh/authorized_keys",
              "tmp/init-ran"):
        assert (parts / f).read_text() == (whole / f).read_text(), f
    data_lookup = (["blockdev", "--flushbufs", "/dev/vdc"], ["findfs", f"UUID={DATA_UUID}"])
    assert sorted(c for c in calls(parts) if c not in data_lookup) == \
        sorted(c for c in calls(whole) if c not in data_lookup)
