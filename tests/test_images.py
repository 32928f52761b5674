"""The image repository on real libvirt/QEMU (issue 3): build, capture, snapshot, clone, verify, rm.

One image is built for the whole module (a hidden builder boots, runs build steps, is captured with
its memory state); every other test derives cheap snapshots or clones from it. Image names carry the
run id; the catalog and files live in the session's OSIMG_HOME and go away with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator import guests
from orchestrator.context import Context
from orchestrator.errors import ConflictError, GuestError, NotFoundError, StorageError
from orchestrator.host import qemu_img
from orchestrator.images import catalog, lifecycle

from .conftest import HOME, gname, osimg, osimg_json

pytestmark = pytest.mark.guest

V1 = gname("img-v1")
MARKER_PATH = "/etc/osimg-build-marker"
MARKER = f"built by test_images {V1}"
STEPS = f"""\
files:
  - path: {MARKER_PATH}
    content: "{MARKER}\\n"
    mode: "0644"
commands:
  - echo "step ran as $(id -u)" >> {MARKER_PATH}
"""


# -- helpers --------------------------------------------------------------------------------------------
def run_qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True, timeout=60)


def repo_state(ctx: Context) -> tuple[list[tuple[str, int, int, int]], list[tuple[str, str]], list[str]]:
    """Everything a refused operation must leave alone: image files, catalog records, guest folders."""
    root = ctx.settings.images_dir
    files = sorted((str(p.relative_to(root)), p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in root.rglob("*")) if root.exists() else []
    records = sorted((i.name, json.dumps(i.files, sort_keys=True)) for i in catalog.list_images(ctx))
    folders = sorted(p.name for p in ctx.settings.guests_dir.iterdir()) if ctx.settings.guests_dir.exists() else []
    return files, records, folders


def builder_leftovers(ctx: Context, name: str) -> list[str]:
    """Builder domains, builder guest folders and staging folders of a build of ``name``."""
    prefix = f"build-{name}-"
    left = [f"domain {d.name}" for d in ctx.hv.list_domains() if d.name.startswith(prefix)]
    if ctx.settings.guests_dir.exists():
        left += [f"guest dir {p.name}" for p in ctx.settings.guests_dir.iterdir() if p.name.startswith(prefix)]
    if ctx.settings.images_dir.exists():
        left += [f"staging {p.name}" for p in ctx.settings.images_dir.iterdir() if p.name.startswith(f".tmp-{name}-")]
    return left


def assert_absent(ctx: Context, name: str) -> None:
    assert ctx.store.get(catalog.KIND, name) is None
    assert not catalog.image_dir(ctx, name).exists()
    assert not builder_leftovers(ctx, name)


@contextlib.contextmanager
def writable(path: Path) -> Iterator[None]:
    path.chmod(0o644)
    try:
        yield
    finally:
        path.chmod(0o440)


def rerecord_hash(ctx: Context, name: str) -> None:
    """Make the catalog agree with a tampered disk, as if the bad disk had been recorded at creation
    (e.g. a repository moved after a snapshot was taken): then only the backing-chain check catches it."""
    disk = catalog.image_dir(ctx, name) / catalog.DISK

    def fix(rec: dict[str, Any] | None) -> dict[str, Any] | None:
        assert rec is not None
        rec["files"][catalog.DISK] = qemu_img.sha256(disk)
        return rec

    ctx.store.update(catalog.KIND, name, fix)


@contextlib.contextmanager
def guests_removed(ctx: Context) -> Iterator[list[str]]:
    """Names appended to the yielded list are removed afterwards, also when the test fails."""
    names: list[str] = []
    try:
        yield names
    finally:
        for n in names:
            with contextlib.suppress(NotFoundError):
                guests.remove(ctx, n)


@dataclass
class Built:
    image: catalog.Image
    seconds: float
    builder: str = ""
    listed: list[str] = field(default_factory=list)  # `guest list` while the builder ran
    listed_all: list[dict[str, Any]] = field(default_factory=list)  # `guest list --all` while it ran


@pytest.fixture(scope="module")
def built(ctx: Context, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Build V1 from tiny:v1 with a marker-writing step, looking at `guest list` while the builder runs."""
    steps_file = tmp_path_factory.mktemp("steps") / "steps.yaml"
    steps_file.write_text(STEPS)
    seen: dict[str, Any] = {}

    def progress(msg: str) -> None:
        if msg.startswith("booting hidden builder "):
            seen["builder"] = msg.split()[3]
        elif msg.startswith("running ") and "listed_all" not in seen:
            rows = osimg_json("guest", "list")
            rows_all = osimg_json("guest", "list", "--all")
            assert isinstance(rows, list) and isinstance(rows_all, list)
            seen["listed"] = [r["name"] for r in rows]
            seen["listed_all"] = rows_all

    t0 = time.monotonic()
    img = lifecycle.build(ctx, V1, "tiny:v1", lifecycle.BuildSteps.load(steps_file), progress=progress)
    out = Built(img, time.monotonic() - t0, **seen)
    print(f"\n[measure] image {V1} built and captured in {out.seconds:.1f}s")
    return out


# -- build and capture ----------------------------------------------------------------------------------
def test_build_captures_disk_and_memory_state(ctx: Context, built: Built) -> None:
    img = built.image
    d = catalog.image_dir(ctx, V1)
    assert img.kind == "built" and img.source == "tiny:v1" and img.os_version == "v1"
    assert img.has_memory_state and img.state_from == V1
    assert (d / catalog.STATE).stat().st_size > 1 << 20
    assert {"disk.qcow2", "state.sav", "vmlinuz", "initrd.img", "domain.xml"} <= set(img.files)
    assert catalog.verify(ctx, V1) == []
    rec = osimg_json("image", "inspect", V1)
    assert isinstance(rec, dict) and rec["has_memory_state"] is True and rec["dependents"] == []


def test_builder_is_hidden_while_it_runs_and_gone_after(ctx: Context, built: Built) -> None:
    assert built.builder.startswith(f"build-{V1}-")
    assert built.builder not in built.listed
    hidden = [r for r in built.listed_all if r["name"] == built.builder]
    assert hidden and hidden[0]["hidden"] is True and hidden[0]["state"] == "running"
    assert builder_leftovers(ctx, V1) == []
    rows = osimg_json("guest", "list", "--all")
    assert isinstance(rows, list) and not [r for r in rows if r["name"].startswith("build-")]


def test_failed_build_step_leaves_no_builder_and_no_image(ctx: Context, built: Built, tmp_path: Path) -> None:
    name = gname("img-fail")
    steps = tmp_path / "fail.yaml"
    steps.write_text("commands:\n  - echo first step ok\n  - exit 3\n")
    before = repo_state(ctx)
    res = osimg("image", "build", name, "--from", "tiny:v1", "--customize", str(steps))
    assert res.returncode == GuestError.exit_code, res.stderr
    assert "'exit 3'" in res.stderr and "exit code 3" in res.stderr and "Traceback" not in res.stderr
    assert_absent(ctx, name)
    assert repo_state(ctx) == before


# -- snapshot and clone -----------------------------------------------------------------------------------
def test_snapshot_and_clone_boot_and_show_the_marker(ctx: Context, built: Built) -> None:
    snap = catalog.snapshot(ctx, V1, gname("img-snap"))
    clone = catalog.clone(ctx, V1, gname("img-clone"))
    sdir, cdir = catalog.image_dir(ctx, snap.name), catalog.image_dir(ctx, clone.name)
    # a snapshot is metadata only: an overlay on V1, sharing V1's memory state, kernel and initrd
    assert qemu_img.info(sdir / catalog.DISK).backing == str(catalog.image_dir(ctx, V1) / catalog.DISK)
    assert snap.state_from == V1 and snap.allocated_size < 1 << 20
    assert not (sdir / catalog.STATE).exists() and not (sdir / "vmlinuz").exists()
    # a clone is independent: no backing file, its own memory state
    assert qemu_img.info(cdir / catalog.DISK).backing is None
    assert clone.state_from == clone.name and (cdir / catalog.STATE).exists()
    assert catalog.verify(ctx, snap.name) == [] and catalog.verify(ctx, clone.name) == []
    with guests_removed(ctx) as names:
        booted = {}
        for img in (snap, clone):  # start both, then wait: the boots overlap
            names.append(gname(f"on-{img.kind}"))
            booted[img.name] = guests.create(ctx, names[-1], img.name)
        for img_name, g in booted.items():
            ready = guests.wait_ready(ctx, g)
            with guests.session(ctx, g) as s:
                text = s.run(["cat", MARKER_PATH], check=True).out
            print(f"\n[measure] guest on {img_name} SSH-ready in {ready:.1f}s")
            assert MARKER in text and "step ran as 0" in text
            assert g.os_version == "v1"


def test_rm_of_a_base_with_a_snapshot_is_refused(ctx: Context, built: Built) -> None:
    dep = catalog.snapshot(ctx, V1, gname("img-dep"))
    before = repo_state(ctx)
    with pytest.raises(ConflictError, match=f"image {dep.name}"):
        lifecycle.remove(ctx, V1)
    res = osimg("image", "rm", V1)
    assert res.returncode == ConflictError.exit_code and dep.name in res.stderr and "Traceback" not in res.stderr
    assert repo_state(ctx) == before
    lifecycle.remove(ctx, dep.name)
    assert_absent(ctx, dep.name)
    assert catalog.verify(ctx, V1) == []


def test_rm_of_an_unused_clone_removes_it(ctx: Context, built: Built) -> None:
    c = catalog.clone(ctx, V1, gname("img-tmpclone"))
    res = osimg("image", "rm", c.name)
    assert res.returncode == 0, res.stderr
    assert_absent(ctx, c.name)


# -- corruption and crafted backing chains ---------------------------------------------------------------
def flip(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        data = f.read(4096)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - (64 << 10))


@pytest.mark.parametrize("damage", [flip, truncate], ids=["flip", "truncate"])
def test_corrupted_image_fails_verify_and_is_not_cloned(
        ctx: Context, built: Built, damage: Callable[[Path], None]) -> None:
    bad = catalog.clone(ctx, V1, gname(f"img-bad-{damage.__name__}"))
    disk = catalog.image_dir(ctx, bad.name) / catalog.DISK
    with writable(disk):
        damage(disk)
    res = osimg("image", "verify", bad.name)
    assert res.returncode == StorageError.exit_code
    assert "disk.qcow2 was modified or truncated" in res.stderr and "Traceback" not in res.stderr
    before = repo_state(ctx)
    dst = gname(f"img-from-bad-{damage.__name__}")
    with pytest.raises(StorageError, match=r"disk\.qcow2 was modified"):
        catalog.clone(ctx, bad.name, dst)
    res = osimg("image", "clone", bad.name, dst)
    assert res.returncode == StorageError.exit_code and bad.name in res.stderr
    assert_absent(ctx, dst)
    assert repo_state(ctx) == before


@pytest.mark.parametrize("outside", ["existing", "missing"])
def test_backing_chain_outside_the_repository_is_reported(
        ctx: Context, built: Built, tmp_path: Path, outside: str) -> None:
    target = tmp_path / "outside.qcow2"
    if outside == "existing":
        run_qemu_img("create", "-q", "-f", "qcow2", str(target), "256M")
    s = catalog.snapshot(ctx, V1, gname(f"img-out-{outside}"))
    disk = catalog.image_dir(ctx, s.name) / catalog.DISK
    with writable(disk):
        run_qemu_img("rebase", "-u", "-F", "qcow2", "-b", str(target), str(disk))
    assert any("disk.qcow2 was modified" in p for p in catalog.verify(ctx, s.name))
    rerecord_hash(ctx, s.name)
    problems = catalog.verify(ctx, s.name)
    assert problems and all(str(target) in p for p in problems), problems
    if outside == "existing":
        assert "backing chain leaves the repository" in problems[0]
    res = osimg("image", "verify", s.name)
    assert res.returncode == StorageError.exit_code and str(target) in res.stderr
    with pytest.raises(StorageError, match="failed verification"):
        catalog.clone(ctx, s.name, gname(f"img-out-{outside}-c"))
    assert_absent(ctx, gname(f"img-out-{outside}-c"))


@pytest.mark.timeout(120)
def test_backing_chain_loop_is_reported_and_refused_quickly(ctx: Context, built: Built) -> None:
    a, b = (catalog.snapshot(ctx, V1, gname(f"img-loop-{x}")) for x in "ab")
    da, db = (catalog.image_dir(ctx, i.name) / catalog.DISK for i in (a, b))
    with writable(da), writable(db):
        run_qemu_img("rebase", "-u", "-F", "qcow2", "-b", str(db), str(da))
        run_qemu_img("rebase", "-u", "-F", "qcow2", "-b", str(da), str(db))
    for i in (a, b):
        rerecord_hash(ctx, i.name)
    problems = catalog.verify(ctx, a.name)
    assert any("infinite loop" in p for p in problems), problems
    res = osimg("image", "verify", b.name)
    assert res.returncode == StorageError.exit_code and "infinite loop" in res.stderr
    before = repo_state(ctx)
    with pytest.raises(StorageError, match="infinite loop"):
        catalog.clone(ctx, a.name, gname("img-loop-c"))
    # qemu-img create spins forever on a looping backing file: these must fail fast instead
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="infinite loop"):
        catalog.snapshot(ctx, a.name, gname("img-loop-s"))
    with guests_removed(ctx) as names:
        names.append(gname("on-loop"))
        with pytest.raises(StorageError, match="infinite loop"):
            guests.create(ctx, names[-1], a.name)
        assert not ctx.hv.exists(names[-1])
    assert time.monotonic() - t0 < 30
    assert repo_state(ctx) == before


# -- bad input ------------------------------------------------------------------------------------------------
NEW = gname("img-new")
BAD_INPUT = [
    # (CLI arguments, exit code, text the one-line error must contain)
    (["clone", "nosuch", NEW], 3, "no image named 'nosuch'"),
    (["clone", "nosuch:v1", NEW], 2, "nosuch:v1"),
    (["snapshot", "nosuch", NEW], 3, "no image named 'nosuch'"),
    (["snapshot", "nosuch:v1", NEW], 2, "nosuch:v1"),
    (["build", NEW, "--from", "nosuch"], 3, "no image named 'nosuch'"),
    (["build", NEW, "--from", "nosuch:v1"], 3, "unknown recipe family 'nosuch'"),
    (["clone", V1, V1], 4, "already exists"),
    (["snapshot", V1, V1], 4, "already exists"),
    (["build", V1, "--from", "tiny:v1"], 4, "already exists"),
    (["clone", V1, "a/b"], 2, "invalid image name 'a/b'"),
    (["snapshot", V1, ".."], 2, "invalid image name '..'"),
    (["snapshot", V1, "../escape"], 2, "invalid image name '../escape'"),
    (["clone", V1, "has space"], 2, "invalid image name 'has space'"),
    (["build", "x/y", "--from", "tiny:v1"], 2, "invalid image name 'x/y'"),
    (["build", "has space", "--from", "tiny:v1"], 2, "invalid image name 'has space'"),
    (["clone", "../etc", NEW], 2, "invalid image name '../etc'"),
    (["build", NEW, "--from", "../etc"], 2, "invalid image name '../etc'"),
    (["verify", "nosuch"], 3, "no image named 'nosuch'"),
    (["rm", "nosuch"], 3, "no image named 'nosuch'"),
]


@pytest.mark.parametrize(("args", "code", "text"), BAD_INPUT, ids=[" ".join(a) for a, _, _ in BAD_INPUT])
def test_bad_input_is_refused_and_changes_nothing(
        ctx: Context, built: Built, args: list[str], code: int, text: str) -> None:
    before = repo_state(ctx)
    res = osimg("image", *args)
    assert res.returncode == code, res.stderr
    assert text in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert repo_state(ctx) == before
    assert not builder_leftovers(ctx, NEW)


@pytest.mark.parametrize(("content", "text"), [
    ("files: [unclosed\n", "malformed YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("steps: []\n", "unknown key(s) steps"),
    ("commands: echo hi\n", "'commands' must be a list of strings"),
    ("files:\n  - path: relative/file\n", "files[0].path must be an absolute path"),
    ("files:\n  - path: /etc/x\n    mode: '999'\n", "files[0].mode must be octal"),
    (None, "cannot read build steps"),
], ids=["syntax", "list", "unknown-key", "commands", "relative-path", "mode", "missing-file"])
def test_malformed_steps_file_is_refused(ctx: Context, tmp_path: Path, content: str | None, text: str) -> None:
    bad = tmp_path / "bad.yaml"
    if content is not None:
        bad.write_text(content)
    before = repo_state(ctx)
    res = osimg("image", "build", NEW, "--from", "tiny:v1", "--customize", str(bad))
    assert res.returncode == 2, res.stderr
    assert str(bad) in res.stderr and text in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert repo_state(ctx) == before
    assert_absent(ctx, NEW)


# -- immutability -------------------------------------------------------------------------------------------
def test_image_files_are_read_only(ctx: Context, built: Built) -> None:
    s = catalog.snapshot(ctx, V1, gname("img-ro"))
    for name in (V1, s.name):
        d = catalog.image_dir(ctx, name)
        modes = {f.name: oct(f.stat().st_mode & 0o777) for f in d.iterdir()}
        assert set(modes.values()) == {"0o440"}, (name, modes)


def test_guest_on_an_image_made_writable_is_refused(ctx: Context, built: Built) -> None:
    s = catalog.snapshot(ctx, V1, gname("img-w"))
    disk = catalog.image_dir(ctx, s.name) / catalog.DISK
    name = gname("on-writable")
    with writable(disk):
        before = repo_state(ctx)
        with pytest.raises(StorageError, match="writable"):
            guests.create(ctx, name, s.name)
        res = osimg("guest", "create", name, "--image", s.name)
        assert res.returncode == StorageError.exit_code and "writable" in res.stderr
        assert not ctx.hv.exists(name) and not (HOME / "guests" / name).exists()
        assert repo_state(ctx) == before
        assert any("disk.qcow2 is writable" in p for p in catalog.verify(ctx, s.name))
    assert catalog.verify(ctx, s.name) == []


# -- import (the benchmark's way in) -------------------------------------------------------------------------
def test_import_disk_then_snapshot_shares_boot_files(ctx: Context, tmp_path: Path) -> None:
    src = tmp_path / "prepared.qcow2"
    run_qemu_img("create", "-q", "-f", "qcow2", str(src), "64M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(src)], check=True,
                   capture_output=True, timeout=60)
    name = gname("img-imported")
    img = catalog.import_disk(ctx, name, src, like="tiny:v1")
    assert img.kind == "imported" and not img.has_memory_state and img.virtual_size == 64 << 20
    assert catalog.verify(ctx, name) == []
    snap = catalog.snapshot(ctx, name, gname("img-imported-s"))
    boot = catalog.resolve(ctx, snap.name)
    assert boot.kernel == catalog.image_dir(ctx, name) / "vmlinuz" and boot.state_file is None
    with pytest.raises(NotFoundError, match="no such file"):
        catalog.import_disk(ctx, gname("img-nofile"), tmp_path / "absent.qcow2")
    with pytest.raises(ConflictError):
        catalog.import_disk(ctx, name, src)
    lifecycle.remove(ctx, snap.name)
    lifecycle.remove(ctx, name)
    assert_absent(ctx, name)
