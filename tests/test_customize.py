"""Customization without guests: validation, the NoCloud files, and the tiny image's real parser.

The tiny image reads the drive with ``yaml2kv.awk`` under busybox; these tests run that very file
with the host's busybox on rendered output and compare what it reads with what PyYAML (cloud-init's
parser) reads, so the two guests of a customization cannot drift apart unnoticed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from orchestrator import customize
from orchestrator.customize import Customization, Mount, User
from orchestrator.errors import ValidationError
from orchestrator.settings import RECIPES_DIR

AWK = RECIPES_DIR / "tiny" / "rootfs" / "usr" / "lib" / "osimg" / "yaml2kv.awk"
BUSYBOX = shutil.which("busybox")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILk5UUsVHT67UTXAWokwGzHsfiDy7l0E55YLxahmfjHF alice@example"

needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")


def full() -> Customization:
    return Customization(
        hostname="web1.example.test", address="10.0.2.21/24", gateway="10.0.2.2",
        mounts=[Mount("UUID=0f6bd1e2-8f7a-4b5c-9d3e-2a1b0c9d8e7f", "/srv/data"),
                Mount("tmpfs", "/srv/scratch", "tmpfs", "size=16m")],
        init_scripts=['echo "hello $(hostname)" >/run/hello', "printf 'a\\nb\\n' >/run/two-lines"],
        users=[User("alice", uid=2001, groups=["ops", "web"], ssh_authorized_keys=[KEY])],
        groups=["ops"], kernel_modules=["dummy", "tun"], kernel_params=["osimg.role=web"],
    ).validate()


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """The "path=value" view yaml2kv.awk produces, computed from PyYAML's reading."""
    out: dict[str, str] = {}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list)):
            out.update(flatten(v, key))
        elif isinstance(v, bool):
            out[key] = "true" if v else "false"
        else:
            out[key] = str(v)
    return out


def awk_read(text: str, tmp_path: Path) -> dict[str, str]:
    """Run the image's flattener with busybox awk, and decode values as osimg-cidata does (printf %b)."""
    assert BUSYBOX is not None
    f = tmp_path / "in.yaml"
    f.write_text(text)
    # bytes, not text: universal newlines would turn a carriage return inside a value into a line end
    lines = subprocess.run([BUSYBOX, "awk", "-f", str(AWK), str(f)], capture_output=True,
                           check=True).stdout.decode().split("\n")
    out = {}
    for line in filter(None, lines):
        key, _, enc = line.partition("=")
        out[key] = subprocess.run([BUSYBOX, "printf", "%b", enc], capture_output=True,
                                  check=True).stdout.decode()
    return out


# -- rendering -------------------------------------------------------------------------------------------
def test_render_is_cloud_init_yaml() -> None:
    files = customize.render("g1", full(), "iid-1")
    assert set(files) == {"meta-data", "user-data", "network-config"}
    meta = yaml.safe_load(files["meta-data"])
    assert meta == {"instance-id": "iid-1", "local-hostname": "web1.example.test"}
    assert files["user-data"].startswith("#cloud-config\n")
    ud = yaml.safe_load(files["user-data"])
    assert (ud["hostname"], ud["fqdn"]) == ("web1", "web1.example.test")
    assert ud["groups"] == ["ops"]
    assert ud["users"] == [{"name": "alice", "uid": 2001, "groups": "ops,web", "shell": "/bin/sh",
                            "lock_passwd": True, "ssh_authorized_keys": [KEY]}]
    assert ud["mounts"][0] == ["UUID=0f6bd1e2-8f7a-4b5c-9d3e-2a1b0c9d8e7f", "/srv/data", "ext4", "defaults", "0", "2"]
    assert ud["bootcmd"] == ["modprobe dummy", "modprobe tun"]
    assert ud["write_files"] == [{"path": "/etc/modules-load.d/osimg.conf", "content": "dummy\ntun\n",
                                  "permissions": "0644"}]
    assert ud["runcmd"] == full().init_scripts
    net = yaml.safe_load(files["network-config"])
    assert net == {"version": 1, "config": [{"type": "physical", "name": "eth0", "subnets": [
        {"type": "static", "address": "10.0.2.21", "netmask": "255.255.255.0", "gateway": "10.0.2.2"}]}]}


def test_render_without_address_has_no_network_config() -> None:
    files = customize.render("plain", Customization(), "iid-2")
    assert "network-config" not in files
    assert yaml.safe_load(files["meta-data"])["local-hostname"] == "plain"
    assert "fqdn" not in yaml.safe_load(files["user-data"])


@needs_busybox
def test_tiny_parser_reads_what_cloud_init_reads(tmp_path: Path) -> None:
    files = customize.render("g1", full(), "iid-1")
    for name, text in files.items():
        assert awk_read(text, tmp_path) == flatten(yaml.safe_load(text)), name


@needs_busybox
@pytest.mark.parametrize("script", [
    "echo 'single' \"double\" $HOME `date`",
    "line one\nline two\n\nline four",
    "backslashes \\ \\\\ \\n \\t stay literal",
    "colon: space # not a comment",
    "- dash first",
    "ünïcødé ✓ and emoji 🚀",
    "tab\there and carriage\rreturn",
    "bell \x07, escape \x1b, NEL \x85, line separator \u2028",
    "",
])
def test_tricky_values_survive_both_parsers(tmp_path: Path, script: str) -> None:
    c = Customization(init_scripts=[script] if script else ["true"],
                      users=[User("bob", ssh_authorized_keys=[KEY])])
    text = customize.render("g", c, "i")["user-data"]
    ci = yaml.safe_load(text)
    assert ci["runcmd"] == c.init_scripts
    assert awk_read(text, tmp_path)["runcmd.0"] == c.init_scripts[0]


@needs_busybox
def test_multi_line_file_content_is_kept_whole(tmp_path: Path) -> None:
    text = customize.render("g", Customization(kernel_modules=["dummy", "tun", "nbd"]), "i")["user-data"]
    assert awk_read(text, tmp_path)["write_files.0.content"] == "dummy\ntun\nnbd\n"


def test_config_drive_is_iso9660_labelled_cidata(tmp_path: Path) -> None:
    files = customize.render("g1", full(), "iid-1")
    path = tmp_path / "cidata.iso"
    customize.write_config_drive(path, files)
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        for name, text in files.items():
            import io

            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            assert buf.getvalue().decode() == text
    finally:
        iso.close()


def test_user_mode_net_points_forwards_at_the_static_address() -> None:
    assert Customization().user_mode_net() == "10.0.2.0/24"
    assert full().user_mode_net() == "10.0.2.0/24,dhcpstart=10.0.2.21"
    assert Customization(address="10.0.5.9/16").user_mode_net() == "10.0.0.0/16,dhcpstart=10.0.5.9"


def test_round_trip_through_guest_record() -> None:
    c = full()
    assert Customization.from_dict(c.to_dict()) == c


# -- validation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"hostname": "bad_host"}, "hostname 'bad_host': expected a host name"),
    ({"hostname": "-lead"}, "expected a host name"),
    ({"hostname": "a" * 64}, "expected a host name"),
    ({"address": "10.0.2.21"}, "give a prefix length"),
    ({"address": "10.0.2.300/24"}, "invalid where.address"),
    ({"address": "10.0.2.0/24"}, "network or broadcast address"),
    ({"address": "10.0.2.255/24"}, "network or broadcast address"),
    ({"gateway": "10.0.3.1"}, "gateway 10.0.3.1 is outside the subnet 10.0.2.0/24"),
    ({"gateway": "10.0.2.21"}, "equals the guest's own address"),
    ({"address": None}, "gateway given without where.address"),
    ({"groups": ["Ops"]}, "invalid user or group name 'Ops'"),
    ({"users": [User("alice"), User("alice")]}, "user 'alice' is listed twice"),
    ({"users": [User("alice", uid=0)]}, "uid 0: expected an integer in 1..65533"),
    ({"users": [User("alice", shell="sh")]}, "shell 'sh': expected an absolute path"),
    ({"users": [User("alice", ssh_authorized_keys=["hunter2"])]}, "is not an OpenSSH public key line"),
    ({"users": [User("alice", ssh_authorized_keys=[KEY + "\nssh-rsa AAAA"])]}, "not an OpenSSH public key"),
    ({"kernel_modules": ["../evil"]}, "invalid module name"),
    ({"kernel_params": ["a b"]}, "must be one word"),
    ({"kernel_params": ['x="y"']}, "without spaces or quotes"),
    ({"mounts": [Mount("tmpfs", "relative")]}, "must be absolute"),
    ({"mounts": [Mount("tmpfs", "/a/../b")]}, "must be absolute without '..'"),
    ({"mounts": [Mount("tmpfs", "/")]}, "root file system"),
    ({"mounts": [Mount("tmpfs", "/x", "tmpfs"), Mount("tmpfs", "/x", "tmpfs")]}, "/x is mounted twice"),
    ({"mounts": [Mount("tmpfs", "/x", "tmpfs", "size=1m mode=1777")]}, "options 'size=1m mode=1777'"),
    ({"init_scripts": ["  "]}, "is not a command"),
])
def test_invalid_customization_is_refused(change: dict[str, Any], message: str) -> None:
    base = {"hostname": "web1", "address": "10.0.2.21/24", "gateway": "10.0.2.2"}
    c = Customization(**{**base, **change})
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        c.validate("where")
