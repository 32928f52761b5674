"""The Ansible collection in ansible/ against real guests, through ansible-playbook as a user runs it.

The example playbook (ansible/playbooks/rolling_swap.yml) runs in stages, because the test writes
data into the guests between the fleet coming up and the swap: in check mode on an empty home
(reports the builds, creates nothing), images and fleet (changes), the whole playbook in check
mode (reports the swap, changes nothing), for real (swaps to v2, data intact), then again and in
check mode once more (no change). The image and guest
modules run as the collection's integration target, a role whose asserts do the checking.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator import guests, hosts
from orchestrator.context import Context
from orchestrator.errors import OsimgError
from orchestrator.fleet import reconcile
from orchestrator.fleet import spec as fleetspec
from orchestrator.images import catalog, lifecycle
from orchestrator.settings import SOURCE_ROOT

from .conftest import HOME, RUN_ID, gname

pytestmark = pytest.mark.guest

ANSIBLE = SOURCE_ROOT / "ansible"
COLLECTIONS = ANSIBLE / "collections"
TARGETS = COLLECTIONS / "ansible_collections" / "osimg" / "virt" / "tests" / "integration" / "targets"
PLAYBOOK = ANSIBLE / "playbooks" / "rolling_swap.yml"
SEVERAL = ANSIBLE / "playbooks" / "several_hosts.yml"
SECOND_HOST = SOURCE_ROOT / "scripts" / "second_host.sh"
V1, V2 = f"a{RUN_ID}-v1", f"a{RUN_ID}-v2"
GUESTS = [gname("ans1"), gname("ans2")]
SPEC = HOME / "ansible-fleet.yml"

TASK_RE = re.compile(r"^TASK \[(.+?)\]")
STATUS_RE = re.compile(r"^(ok|changed|skipping|fatal|failed): \[localhost\]")
RECAP_RE = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


@dataclass
class Run:
    rc: int
    out: str
    tasks: dict[str, str]  # task name -> ok | changed | skipping | fatal
    changed: int
    failed: int
    seconds: float

    def explain(self) -> str:
        return f"ansible-playbook exited {self.rc}:\n{self.out[-6000:]}"


def ansible_playbook(playbook: Path, *args: str, extra: dict[str, str] | None = None) -> Run:
    """Run ansible-playbook from the venv against the repo's inventory, as the README shows."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
           "ANSIBLE_ROLES_PATH": str(TARGETS), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(ANSIBLE / "inventory.ini"),
            str(playbook), *args]
    for k, v in (extra or {}).items():
        argv += ["-e", f"{k}={v}"]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=SOURCE_ROOT, timeout=600, check=False)
    seconds = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    tasks: dict[str, str] = {}
    task = None
    for line in proc.stdout.splitlines():
        if m := TASK_RE.match(line):
            task = m.group(1)
        elif task and (m := STATUS_RE.match(line)):
            tasks[task] = m.group(1)
            task = None
    recap = RECAP_RE.search(proc.stdout)
    changed, failed = (int(recap.group(2)), int(recap.group(4))) if recap else (-1, -1)
    return Run(proc.returncode, out, tasks, changed, failed, seconds)


def ansible_module(module: str, args: dict[str, Any], *flags: str) -> tuple[str, dict[str, Any]]:
    """One module run ad hoc ('ansible localhost -m ...'): its status (CHANGED, SUCCESS, FAILED!) and result."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "0"}
    argv = [str(Path(sys.executable).parent / "ansible"), "-i", str(ANSIBLE / "inventory.ini"), "localhost",
            "-m", module, "-a", json.dumps(args), *flags]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=SOURCE_ROOT, timeout=600, check=False)
    m = re.search(r"^localhost \| (\S+) => (\{.*\})\s*$", proc.stdout, re.M | re.S)
    assert m, f"ansible -m {module} exited {proc.returncode}: {proc.stdout}{proc.stderr}"
    return m.group(1), json.loads(m.group(2))


def rolling_swap(*args: str) -> Run:
    run = ansible_playbook(PLAYBOOK, *args, extra={
        "osimg_home": str(HOME), "image_v1": V1, "image_v2": V2, "fleet_spec": str(SPEC),
        "swap_batch": "1", "swap_max_failures": "1"})
    print(f"\n[measure] rolling_swap.yml {' '.join(args) or '(full)'}: {run.seconds:.1f}s, changed={run.changed}, "
          f"tasks {run.tasks}")
    return run


def _inside(ctx: Context, name: str) -> tuple[str, str]:
    """(OS version, data marker) read over SSH with the pinned host key."""
    g = guests.load(ctx, name)
    with guests.session(ctx, g) as s:
        return (s.run(["cat", "/etc/osimg-version"], check=True).out.strip(),
                s.run(["cat", "/data/marker"], check=True).out.strip())


def _state(ctx: Context) -> dict[str, object]:
    """What check mode must leave alone: guest records, domains, overlays and the catalog."""
    out: dict[str, object] = {"images": sorted((i.name, tuple(sorted(i.files.items())))
                                               for i in catalog.list_images(ctx))}
    for name in GUESTS:
        g = guests.load(ctx, name)
        out[name] = (g.image, g.overlay_file, ctx.hv.info(name).uuid, ctx.hv.state(name))
    return out


@pytest.fixture
def fleet_spec(ctx: Context) -> Iterator[Path]:
    SPEC.write_text(f"""\
name: a{RUN_ID}
networks:
  lan: {{mode: user}}
defaults:
  image: {V1}
  memory: 256M
  data: {{size: 64M, mount: /data}}
guests:
  - name: {GUESTS[0]}
  - name: {GUESTS[1]}
""")
    yield SPEC
    # the API directly: the cleanup must work even when the collection does not
    with contextlib.suppress(OsimgError):
        reconcile.down(ctx, fleetspec.load(SPEC))
    for name in GUESTS:
        with contextlib.suppress(OsimgError):
            guests.remove(ctx, name)
    for img in (V2, V1):
        with contextlib.suppress(OsimgError):
            lifecycle.remove(ctx, img)


def test_rolling_swap_playbook(ctx: Context, fleet_spec: Path) -> None:
    t0 = time.monotonic()
    fresh = rolling_swap("--check")
    assert fresh.rc == 0, fresh.explain()
    assert fresh.tasks == {"Golden image v1, captured with its memory state": "changed",
                           "Golden image v2, captured with its memory state": "changed",
                           "Fleet up on v1": "skipping", "Roll the fleet to v2": "skipping",
                           "Report the rollout": "skipping"}, fresh.explain()
    assert not {V1, V2} & {i.name for i in catalog.list_images(ctx)}
    assert not any((HOME / "guests" / n).exists() for n in GUESTS), "check mode created a guest"

    first = rolling_swap("--skip-tags", "swap")
    assert first.rc == 0, first.explain()
    assert first.tasks == {"Golden image v1, captured with its memory state": "changed",
                           "Golden image v2, captured with its memory state": "changed",
                           "Fleet up on v1": "changed"}, first.explain()
    markers = {}
    for name in GUESTS:
        g = guests.load(ctx, name)
        assert g.image == V1 and ctx.hv.state(name) == "running"
        with guests.session(ctx, g) as s:
            markers[name] = s.run(["sh", "-c", "echo precious-$RANDOM-$$ >/data/marker && sync && cat /data/marker"],
                                  check=True).out.strip()
    before = _state(ctx)

    check = rolling_swap("--check")
    assert check.rc == 0, check.explain()
    assert check.changed == 1 and check.tasks["Roll the fleet to v2"] == "changed", check.explain()
    assert "would swap: " + ", ".join(GUESTS) in check.out, check.explain()
    assert _state(ctx) == before, "check mode changed something"
    assert {n: _inside(ctx, n) for n in GUESTS} == {n: ("v1", markers[n]) for n in GUESTS}

    swap = rolling_swap()
    assert swap.rc == 0, swap.explain()
    assert swap.changed == 1 and swap.tasks["Roll the fleet to v2"] == "changed", swap.explain()
    assert swap.tasks["Fleet up on v1"] == "ok"
    assert swap.tasks["Golden image v2, captured with its memory state"] == "ok"
    for name in GUESTS:
        g = guests.load(ctx, name)
        assert g.image == V2 and g.os_version == "v2" and ctx.hv.state(name) == "running"
        assert _inside(ctx, name) == ("v2", markers[name]), f"{name}: OS or data wrong after the swap"

    again = rolling_swap()
    assert again.rc == 0 and again.changed == 0, again.explain()
    assert "already on " + V2 + ": " + ", ".join(GUESTS) in again.out
    after = _state(ctx)
    recheck = rolling_swap("--check")
    assert recheck.rc == 0 and recheck.changed == 0, recheck.explain()
    assert _state(ctx) == after

    down = {"spec": str(fleet_spec), "state": "absent", "home": str(HOME)}
    status, res = ansible_module("osimg.virt.fleet", down, "--check")
    assert status == "CHANGED" and [g["action"] for g in res["guests"]] == ["removed", "removed"], res
    assert all(ctx.hv.state(n) == "running" for n in GUESTS), "check mode removed a guest"
    status, res = ansible_module("osimg.virt.fleet", down)
    assert status == "CHANGED" and res["summary"] == f"fleet a{RUN_ID}: 2 removed", res
    assert not any(ctx.hv.exists(n) or (HOME / "guests" / n).exists() for n in GUESTS)
    status, res = ansible_module("osimg.virt.fleet", down)
    assert status == "SUCCESS" and not res["changed"], res
    print(f"\n[measure] rolling swap playbook test: {time.monotonic() - t0:.1f}s")


def test_image_and_guest_modules(ctx: Context) -> None:
    play = HOME / "ansible-modules.yml"
    play.write_text("- name: osimg.virt modules\n  hosts: osimg_hosts\n  gather_facts: false\n"
                    "  roles:\n    - osimg_modules\n")
    prefix, guest = f"m{RUN_ID}", gname("mod")
    try:
        run = ansible_playbook(play, extra={"osimg_home": str(HOME), "prefix": prefix, "guest": guest})
        print(f"\n[measure] osimg_modules target: {run.seconds:.1f}s, changed={run.changed}")
        assert run.rc == 0 and run.failed == 0, run.explain()
    finally:
        with contextlib.suppress(OsimgError):
            guests.remove(ctx, guest)
        for img in (f"{prefix}-snap", f"{prefix}-clone", f"{prefix}-base"):
            with contextlib.suppress(OsimgError):
                lifecycle.remove(ctx, img)
    assert not any(i.name.startswith(prefix) for i in catalog.list_images(ctx))


@pytest.fixture
def host_b() -> Iterator[str]:
    """A second libvirtd (scripts/second_host.sh) for the several-hosts playbook; its URI."""
    d = SOURCE_ROOT / ".cache" / f"ans-host-b-{RUN_ID}"
    mask = os.umask(0o022)  # its folders become the host's /var/lib/libvirt: QEMU's user must traverse them
    try:
        started = subprocess.run(["bash", str(SECOND_HOST), "start", str(d)], capture_output=True, text=True,
                                 timeout=60, check=False)
    finally:
        os.umask(mask)
    try:
        assert started.returncode == 0, f"the second libvirt host did not start: {started.stderr[-300:]}"
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(SECOND_HOST), "stop", str(d)], check=False, timeout=60)
        time.sleep(1)
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False, timeout=60)


def test_several_hosts_playbook(ctx: Context, host_b: str, gold_v1: str, gold_v2: str) -> None:
    """playbooks/several_hosts.yml: a fleet of 4 over this machine's libvirtd and a second one, two
    guests placed by the spec and two by osimg, rolled to v2 with batch 2 and per_host 1. The
    images are the session's golden ones (built from the recipes the playbook names, so its image
    tasks find them made the same way and leave them)."""
    t0 = time.monotonic()
    a, b, fleet = f"ha{RUN_ID}", f"hb{RUN_ID}", f"s{RUN_ID}"
    names = [f"{fleet}-{i}" for i in range(1, 5)]
    v1, v2 = gold_v1, gold_v2
    spec = HOME / f"fleet-{fleet}.yml"
    extra = {"osimg_home": str(HOME), "image_v1": v1, "image_v2": v2, "fleet_name": fleet, "fleet_spec": str(spec),
             "host_a_name": a, "host_b_name": b, "host_b_uri": host_b, "host_a_root": str(HOME / "host-a")}
    try:
        up = ansible_playbook(SEVERAL, "--skip-tags", "swap", extra=extra)
        assert up.rc == 0 and up.tasks["Fleet up on v1, over both hosts"] == "changed", up.explain()
        placed = {n: guests.load(ctx, n).host for n in names}
        assert placed[names[0]] == a and placed[names[1]] == b, placed
        assert sorted(str(h) for h in placed.values()) == sorted([a, a, b, b]), f"both placed on one host: {placed}"
        for n in names:
            assert hosts.context(ctx, placed[n]).hv.state(n) == "running", f"{n} is not running on {placed[n]}"
        assert v1 in hosts.shipped(ctx, b), "the image was not uploaded to the second host's pool"

        # ordered host by host, batch 2 alone would pair two guests of one host: per_host 1 must not
        by_host = sorted(names, key=lambda n: (str(placed[n]), n))
        status, res = ansible_module("osimg.virt.swap", {"guests": by_host, "to_image": v2, "batch": 2, "per_host": 1,
                                                         "home": str(HOME)}, "--check")
        assert status == "CHANGED" and res["would_swap"] == by_host, res
        assert all(len({placed[g] for g in batch}) == len(batch) for batch in res["batches"]), res["batches"]
        assert max(len(batch) for batch in res["batches"]) == 2, res["batches"]

        roll = ansible_playbook(SEVERAL, extra=extra)
        assert roll.rc == 0, roll.explain()
        assert roll.tasks["Roll the fleet to v2, at most one guest of each host at once"] == "changed", roll.explain()
        for n in names:
            g = guests.load(ctx, n)
            assert (g.image, g.os_version, g.host) == (v2, "v2", placed[n]), f"{n}: {g.image} {g.host}"
            assert hosts.context(ctx, g.host).hv.state(n) == "running"
        again = ansible_playbook(SEVERAL, extra=extra)
        assert again.rc == 0 and again.changed == 0, again.explain()
    finally:
        with contextlib.suppress(OsimgError):
            if spec.exists():
                reconcile.down(ctx, fleetspec.load(spec))
        for n in names:
            with contextlib.suppress(OsimgError):
                guests.remove(ctx, n)
        for h in (a, b):  # with the images' pools there; the session's images stay
            with contextlib.suppress(OsimgError):
                hosts.remove(ctx, h, [])
    print(f"\n[measure] several hosts playbook test: {time.monotonic() - t0:.1f}s")
