"""Hostile input, table-driven: every class of bad input the CLI meets ends in one line on stderr, the
right exit code and no traceback, and changes nothing. Runs the real CLI entry point in-process on
libvirt's test:///default driver (no QEMU), so the whole table takes seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.context import Context
from orchestrator.swap import journal
from orchestrator.validate import MAX_YAML_BYTES

Setup = Callable[[Path], list[str]]  # gets the home folder, returns extra argv for the case


@dataclass
class Case:
    argv: list[str]
    code: int
    text: str  # what the one line must say
    env: dict[str, str] = field(default_factory=dict)
    setup: Setup | None = None
    stdout: bool = False  # the message goes to stdout (a report), stderr stays empty


def _file(name: str, content: str | bytes) -> Setup:
    def make(home: Path) -> list[str]:
        p = home.parent / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return [str(p)]
    return make


def _guest_record(name: str, text: str) -> Setup:
    def make(home: Path) -> list[str]:
        d = home / "guests" / name
        d.mkdir(parents=True)
        (d / "guest.json").write_text(text.replace("{home}", str(home)))  # records name files under home
        return []
    return make


def _journal(rec: dict[str, object]) -> Setup:
    def make(home: Path) -> list[str]:
        (home / "guests" / "g1").mkdir(parents=True)  # an entry of a removed guest is only dropped
        ctx = Context.from_env(home=str(home), uri="test:///default")
        try:
            ctx.store.update(journal.KIND, "g1", lambda _old: dict(rec))
        finally:
            ctx.close()
        return []
    return make


def _orphan_image(home: Path) -> list[str]:
    (home / "images" / "orphan").mkdir(parents=True)
    return []


GOOD_RECORD = {
    "name": "good", "image": "tiny:v1", "base": "{home}/images/none/disk.qcow2",
    "kernel": "{home}/images/none/vmlinuz", "initrd": "{home}/images/none/initrd.img",
    "cmdline": "", "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILk5UUsVHT67UTXAWokwGzHsfiDy7l0E55YLxahmfjHF",
    "os_version": "v1", "family": "tiny", "memory_mib": 256, "vcpus": 1, "accel": "qemu",
    "uuid": "0b3c3c1e-9d55-4d1d-8a8e-6b0f0e0f0e0f", "mac": "52:54:00:12:34:56", "ssh_port": 1, "app_port": 2,
    "guest_app_port": 8080, "ready_marker": "OSIMG-READY",
}
SPEC_HEAD = "guests:\n"
BIG = "x" * (2 << 20)

CASES: dict[str, Case] = {
    # the environment and global options
    "accel-unknown": Case(["guest", "list"], 2, "OSIMG_ACCEL", env={"OSIMG_ACCEL": "turbo"}),
    "home-is-file": Case(["--home", "/etc/hostname", "guest", "list"], 2, "is a file, not a folder"),
    "home-under-proc": Case(["--home", "/proc/self", "guest", "list"], 2, "not a place for osimg's state"),
    "uri-malformed": Case(["--uri", "not a uri", "guest", "list"], 2, "expected a libvirt URI"),
    "uri-unreachable": Case(["--uri", "qemu+unix:///system?socket=/nonexistent/sock", "guest", "rm", "x"], 5,
                            "cannot reach libvirtd"),
    "unknown-verb": Case(["frobnicate"], 2, "invalid choice"),
    "host-uri-malformed": Case(["host", "add", "b", "not a uri"], 2, "is not a libvirt URI"),
    "host-name-bad": Case(["host", "add", "b/../x", "qemu:///system"], 2, "host name"),
    "host-root-relative": Case(["host", "add", "b", "test:///default", "--root", "var/lib"], 2,
                               "not an absolute folder path"),
    "host-root-dotdot": Case(["host", "add", "b", "test:///default", "--root", "/var/../etc"], 2,
                             "not an absolute folder path"),
    "host-unreachable": Case(["host", "add", "b", "qemu+unix:///system?socket=/nonexistent/sock"], 5,
                             "cannot reach libvirtd"),
    "host-unknown": Case(["guest", "create", "g", "--image", "v1", "--host", "nowhere"], 3, "no host named"),
    "host-rm-unknown": Case(["host", "rm", "nowhere"], 3, "no host named"),
    "ship-unknown-host": Case(["image", "ship", "v1", "--host", "nowhere"], 3, "no host named"),
    "per-host-zero": Case(["swap", "g", "--to", "v2", "--per-host", "0"], 2, "per-host must be in 1..64"),
    "store-url": Case(["--store", "foo://" + "x" * 10000, "image", "list"], 2, "invalid cluster store URL"),
    "store-member-port": Case(["--store", "etcds://127.0.0.1:2379,127.0.0.1:" + "9" * 10000, "image", "list"], 2,
                              "is not a number in 1..65535"),
    "store-too-many-members": Case(["image", "list"], 2, "at most 9",
                                   env={"OSIMG_STORE": "etcd://" + ",".join(f"h{i}:1" for i in range(50))}),
    "store-member-twice": Case(["--store", "etcd://a:1,a:1", "image", "list"], 2, "named twice"),
    "cache-is-file": Case(["guest", "list"], 2, "OSIMG_CACHE", env={"OSIMG_CACHE": "/etc/hostname"}),
    "control-chars": Case(["guest", "rm", "a\x1b[31mb\nc"], 2, "invalid guest name"),
    "huge-argument": Case(["guest", "create", BIG, "--image", "tiny:v1"], 2, "invalid guest name"),
    # ranges of sizes, counts, vcpus, memory
    "vcpus-zero": Case(["guest", "create", "g", "--image", "tiny:v1", "--vcpus", "0"], 2, "vcpus 0 is outside"),
    "vcpus-huge": Case(["guest", "create", "g", "--image", "tiny:v1", "--vcpus", "100000"], 2, "outside 1..64"),
    "memory-negative": Case(["guest", "create", "g", "--image", "tiny:v1", "--memory", "-5"], 2, "memory"),
    "memory-text": Case(["guest", "create", "g", "--image", "tiny:v1", "--memory", "lots"], 2, "--memory"),
    "data-inf": Case(["guest", "create", "g", "--image", "tiny:v1", "--data-size", "inf"], 2, "invalid size"),
    "data-1e999": Case(["guest", "create", "g", "--image", "tiny:v1", "--data-size", "1e999"], 2, "invalid size"),
    "data-negative": Case(["guest", "create", "g", "--image", "tiny:v1", "--data-size=-1G"], 2, "invalid size"),
    "data-tiny": Case(["guest", "create", "g", "--image", "tiny:v1", "--data-size", "4k"], 2, "outside 8M..16T"),
    "quiesce-grace": Case(["guest", "create", "g", "--image", "tiny:v1", "--quiesce-grace", "forever"], 2,
                          "quiesce.grace"),
    "carry-no-pidfile": Case(["guest", "create", "g", "--image", "tiny:v1", "--carry", "app"], 2, "NAME=PIDFILE"),
    "carry-relative": Case(["guest", "create", "g", "--image", "tiny:v1", "--carry", "app=run/app.pid"], 2,
                           "carry[app].pidfile"),
    "carry-and-no-carry": Case(["guest", "create", "g", "--image", "tiny:v1", "--carry", "a=/run/a.pid",
                                "--no-carry"], 2, "not both"),
    "resize-fraction": Case(["guest", "resize", "g", "--disk", "os", "--size", "0.0001k"], 2, "invalid size"),
    "batch-zero": Case(["swap", "g", "--to", "x", "--batch", "0"], 2, "batch"),
    "batch-huge": Case(["swap", "g", "--to", "x", "--batch", "100000"], 2, "batch must be in 1..64"),
    "swap-too-many-guests": Case(["swap", *(f"g{i}" for i in range(1001)), "--to", "x"], 2, "at most 1000"),
    "max-failures-negative": Case(["swap", "g", "--to", "x", "--max-failures", "-1"], 2, "max-failures"),
    # stored state that is broken
    "guest-json-corrupt": Case(["guest", "ssh", "bad"], 6, "is broken (not JSON", setup=_guest_record("bad", '{"na')),
    "guest-json-partial": Case(["guest", "ssh", "bad"], 6, "is broken (missing",
                               setup=_guest_record("bad", '{"name": "bad", "image": "tiny:v1"}')),
    "guest-json-types": Case(["guest", "ssh", "bad"], 6, "vcpus is",
                             setup=_guest_record("bad", json.dumps({**GOOD_RECORD, "name": "bad", "vcpus": "x"}))),
    "client-key-missing": Case(["guest", "ssh", "good"], 6, "client key", env={"OSIMG_CACHE": "{tmp}/nocache"},
                               setup=_guest_record("good", json.dumps(GOOD_RECORD))),
    "journal-missing-fields": Case(["swap", "--resume"], 2, "swap journal record of g1: old is broken",
                                   setup=_journal({"guest": "g1", "step": "paged-out"}), stdout=True),
    "image-orphan-build": Case(["image", "build", "orphan", "--from", "tiny:v1"], 4, "already exists",
                               setup=_orphan_image),
    # build steps
    "steps-int-mode": Case(["image", "build", "n", "--from", "tiny:v1", "--customize"], 2, "mode must be octal",
                           setup=_file("s.yaml", "files:\n  - {path: /etc/x, content: hi, mode: 0644}\n")),
    "steps-unknown-file-key": Case(["image", "build", "n", "--from", "tiny:v1", "--customize"], 2, "unknown key",
                                   setup=_file("s.yaml", "files:\n  - {path: /etc/x, owner: root}\n")),
    "steps-not-utf8": Case(["image", "build", "n", "--from", "tiny:v1", "--customize"], 2, "not UTF-8",
                           setup=_file("s.yaml", b"files: \xff\xfe\n")),
    # fleet specs
    "spec-not-utf8": Case(["fleet", "validate"], 2, "not UTF-8", setup=_file("f.yaml", b"guests: [\xff]\n")),
    "spec-network-map": Case(["fleet", "validate"], 2, "network",
                             setup=_file("f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, network: {x: 1}}\n")),
    "spec-size-inf": Case(["fleet", "validate"], 2, "invalid size",
                          setup=_file("f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, data: .inf}\n")),
    "spec-size-fraction": Case(["fleet", "validate"], 2, "invalid size",
                               setup=_file("f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, data: 0.5}\n")),
    "spec-vcpus-zero": Case(["fleet", "validate"], 2, "vcpus",
                            setup=_file("f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, vcpus: 0}\n")),
    "spec-vcpus-huge": Case(["fleet", "validate"], 2, "vcpus",
                            setup=_file("f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, vcpus: 100000}\n")),
    "spec-quiesce-list": Case(["fleet", "validate"], 2, "quiesce",
                              setup=_file("f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, quiesce: [1]}\n")),
    "spec-carry-map": Case(["fleet", "validate"], 2, "carry: expected a list",
                           setup=_file("f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, carry: {x: 1}}\n")),
    "spec-carry-no-pid": Case(["fleet", "validate"], 2, "exactly one of pidfile and unit",
                              setup=_file("f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, carry: [{name: x}]}\n")),
    "spec-carry-unit": Case(["fleet", "validate"], 2, "systemd service name", setup=_file(
        "f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, carry: [{name: x, unit: 'a b'}]}\n")),
    "spec-carry-key": Case(["fleet", "validate"], 2, "unknown key", setup=_file(
        "f.yaml", SPEC_HEAD + "  - {name: a, image: tiny:v1, carry: [{name: x, pid: 1}]}\n")),
    "spec-too-many-guests": Case(["fleet", "validate"], 2, "at most 1000", setup=_file(
        "f.yaml", SPEC_HEAD + "".join(f"  - {{name: g{i}, image: tiny:v1}}\n" for i in range(1001)))),
    "spec-alias-bomb": Case(["fleet", "validate"], 2, "expands to more than", setup=_file(
        "f.yaml", "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        + "guests: *i\n")),
    "spec-too-big": Case(["fleet", "validate"], 2, "larger than",
                         setup=_file("f.yaml", "# " + "x" * MAX_YAML_BYTES + "\n")),
    "spec-huge-value": Case(["fleet", "validate"], 2, "image", setup=_file(
        "f.yaml", SPEC_HEAD + "  - {name: a, image: '" + "y" * 500_000 + "'}\n")),
}


def _files(root: Path) -> list[str]:
    """The files under ``root``; the store (opened by many commands) and empty state folders don't count."""
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and "cluster.sqlite" not in p.name)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_and_its_exit_code(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    extra = case.setup(home) if case.setup else []
    for k, v in case.env.items():
        monkeypatch.setenv(k, v.replace("{tmp}", str(tmp_path)))
    before = _files(tmp_path)
    argv = ["--home", str(home), "--uri", "test:///default", *case.argv, *extra]
    if case.argv[0] == "--home":
        argv = argv[2:]
    elif "--uri" in case.argv:
        argv = ["--home", str(home), *case.argv, *extra]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == case.code, (code, err, out)
    if case.stdout:
        assert case.text in out, out
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "\x1b" not in err, "a terminal escape from the input reached the terminal"
        assert case.text in lines[0], lines[0]
        assert len(lines[0]) <= 400, f"{len(lines[0])} characters: values in messages must be cut short"
    after = _files(tmp_path)
    assert after == before, "bad input changed files"


def test_one_broken_record_does_not_hide_the_others(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    _guest_record("bad", '{"name": "bad", "ima')(home)
    _guest_record("good", json.dumps(GOOD_RECORD))(home)
    assert cli.main(["--home", str(home), "--uri", "test:///default", "guest", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good"]["image"] == "tiny:v1" and rows["bad"]["state"] == "broken"
    assert "remove the guest with 'osimg guest rm bad'" in rows["bad"]["error"]
    assert cli.main(["--home", str(home), "--uri", "test:///default", "guest", "rm", "bad"]) == 0
    assert not (home / "guests" / "bad").exists()


def test_image_rm_removes_a_folder_without_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``image build`` refuses a name whose folder exists: ``image rm`` must agree that it exists."""
    home = tmp_path / "home"
    _orphan_image(home)
    assert cli.main(["--home", str(home), "--uri", "test:///default", "image", "rm", "orphan"]) == 0
    assert not (home / "images" / "orphan").exists()
    assert cli.main(["--home", str(home), "--uri", "test:///default", "image", "rm", "orphan"]) == 3


def test_report_in_a_file_keeps_its_headers(tmp_path: Path) -> None:
    """Not a terminal: the table is written whole, no header cut to 'stat…'."""
    home = tmp_path / "home"
    for i in range(3):
        _guest_record(f"a-rather-long-guest-name-{i:02d}-" + "x" * 30, json.dumps(
            {**GOOD_RECORD, "name": f"a-rather-long-guest-name-{i:02d}-" + "x" * 30}))(home)
    exe = Path(sys.executable).parent / "osimg"
    res = subprocess.run([str(exe), "--home", str(home), "--uri", "test:///default", "guest", "list"],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ, "COLUMNS": "40"})
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout, res.stdout
    header = next(line for line in res.stdout.splitlines() if "name" in line)
    for word in ("name", "image", "state", "accel", "ssh", "app"):
        assert word in header, header


def test_a_long_cell_folds_instead_of_cutting_headers() -> None:
    """The demo's report with a long error in its last column, written where it is not a terminal."""
    from io import StringIO

    from rich.console import Console

    from orchestrator.cli.common import Table
    headers = ("guest", "hostname", "OS before", "OS after", "downtime", "counter before", "counter after",
               "overlay", "result")
    t = Table(*headers, title="rolling warm swap v1 -> v2")
    t.add_row("web1", "web1.example", "v1", "v2", "5.10s", "10", "11", "1.2 MiB", "swap failed: " + "x" * 400)
    buf = StringIO()
    Console(file=buf, width=200).print(t)
    text = buf.getvalue()
    assert "…" not in text, text
    header = next(line for line in text.splitlines() if "guest" in line)
    for h in headers:
        assert h in header, header
    assert "x" * 100 in text.replace("\n", "").replace("│", "").replace(" ", ""), "the long cell was cut"


def test_a_record_from_before_quiesce_existed_has_no_drift() -> None:
    from orchestrator import guests
    from orchestrator.customize import Customization, Quiesce
    old = {"image": "x", "customization": {"hostname": "a"}}
    assert guests.config_drift(old, {"image": "x", "customization": Customization(hostname="a").to_dict()}) == []
    changed = Customization(hostname="a", quiesce=Quiesce(stop="systemctl stop db")).to_dict()
    assert guests.config_drift(old, {"image": "x", "customization": changed}) != []


def test_fleet_spec_carries_quiesce_to_the_customization(tmp_path: Path) -> None:
    from orchestrator.customize import Customization
    from orchestrator.fleet import spec as fleetspec
    p = tmp_path / "f.yaml"
    p.write_text("defaults: {quiesce: {stop: systemctl stop db, grace: 500ms}}\n"
                 "guests:\n  - {name: a, image: tiny:v1}\n  - {name: b, image: tiny:v1, quiesce: {start: x}}\n")
    a, b = fleetspec.load(p).guests
    assert (a.custom.quiesce.stop, a.custom.quiesce.grace) == ("systemctl stop db", 0.5)
    assert (b.custom.quiesce.stop, b.custom.quiesce.start, b.custom.quiesce.grace) == (None, "x", 10.0)
    # what the guest record keeps comes back the same
    assert Customization.from_dict(a.custom.to_dict()).quiesce == a.custom.quiesce


def test_a_record_from_before_carry_existed_has_no_drift(tmp_path: Path) -> None:
    from orchestrator import guests
    from orchestrator.customize import Carry, Customization
    from orchestrator.fleet import spec as fleetspec
    old = {"image": "x", "customization": {"hostname": "a"}}
    assert guests.config_drift(old, {"image": "x", "customization": Customization(hostname="a").to_dict()}) == []
    p = tmp_path / "f.yaml"
    p.write_text("guests:\n"
                 "  - {name: a, image: tiny:v1, carry: [{name: db, unit: db.service, files: [/etc/db.conf]}]}\n"
                 "  - {name: b, image: tiny:v1, carry: []}\n  - {name: c, image: tiny:v1}\n")
    a, b, c = fleetspec.load(p).guests
    assert a.custom.carried() == [Carry(name="db", unit="db.service", files=["/etc/db.conf"])]
    assert b.custom.carried() == [] and [t.name for t in c.custom.carried()] == ["app"]
    assert Customization.from_dict(a.custom.to_dict()).carry == a.custom.carry
    assert guests.config_drift({"image": "tiny:v1", "customization": c.custom.to_dict()},
                               {"image": "tiny:v1", "customization": a.custom.to_dict()}) != []


def test_carry_lines_from_the_guest_become_the_result() -> None:
    from orchestrator.swap import checkpoints
    trees: dict[str, checkpoints.TreeResult] = {}
    checkpoints.parse("held 12 sh\ncarry app dumped 9109 620\ncarry db restarted it was not running\n", trees)
    checkpoints.parse("carry app resumed 480\nnoise carry x resumed 1\n", trees)
    assert trees["app"] == checkpoints.TreeResult("app", "resumed", None, 9109, 0.62, 0.48)
    assert trees["db"] == checkpoints.TreeResult("db", "restarted", "it was not running")
    assert checkpoints.ready("carry app ready\ncarry db restarted x\n") == {"app"}

