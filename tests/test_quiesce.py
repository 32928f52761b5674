"""A swap quiesces a workload the image does not know: a writer that keeps appending synced records
to /data loses none of them, on commit and on rollback, warm and cold (real tiny guests)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from orchestrator import guests, swap
from orchestrator.context import Context
from orchestrator.customize import Customization, Quiesce, live_script
from orchestrator.images import lifecycle
from orchestrator.swap import steps

from .conftest import RUN_ID, gname
from .writer import ConsoleWatch, Writer, check, read_records

pytestmark = pytest.mark.guest

V2, BAD = f"q{RUN_ID}-v2", f"q{RUN_ID}-v2bad"


@pytest.fixture(scope="module")
def golden(ctx: Context) -> Iterator[None]:
    lifecycle.build(ctx, V2, "tiny:v2")
    # an image whose application never starts: the health check after the swap fails, it rolls back
    lifecycle.build(ctx, BAD, "tiny:v2", lifecycle.BuildSteps(
        files=[{"path": "/usr/sbin/osimg-app", "content": "#!/bin/sh\nexit 0\n", "mode": "0755"}]))
    yield


def _run(ctx: Context, label: str, target: str, strategy: str, writer: Writer,
         grace: float = 10, source: str = "tiny:v1") -> tuple[swap.SwapResult, int]:
    """A guest running ``writer`` (restarted by its quiesce.start) is swapped; returns the result and
    how many records the checker found, after checking them."""
    custom = Customization(quiesce=Quiesce(start=writer.start_command(), grace=grace))
    g = guests.create(ctx, gname(label), source, custom=custom, data_size=64 << 20)
    try:
        guests.wait_ready(ctx, g, timeout=600)
        with ConsoleWatch(g.console(ctx)) as watch:
            writer.start(ctx, g)
            time.sleep(3)
            before = len(watch.synced)
            p = swap.plan(ctx, [g.name], target, strategy)
            # the bad image's application never answers: a short health wait is enough to see it
            [res] = swap.rollout(ctx, replace(p, health_timeout=20.0) if target == BAD else p)
            after = len(watch.synced)
            # the writer goes on, on the new OS or on the old one after the rollback
            deadline = time.monotonic() + 60
            while len(watch.synced) < after + 10 and time.monotonic() < deadline:
                time.sleep(0.5)
            g = guests.load(ctx, g.name)
            Writer.stop(ctx, g)
            synced = watch.stop()
        v = check(read_records(ctx, g), synced)
        print(f"\n[measure] {strategy} swap to {target} with the writer running: ok={res.ok} "
              f"rolled_back={res.rolled_back} downtime={res.downtime} stopped={res.stopped} killed={res.killed}; "
              f"{v}; {before} before the swap")
        assert len(synced) > before + 5, "the writer did not go on after the swap"
        assert swap.journal.entries(ctx) == []
        return res, v.count
    finally:
        guests.remove(ctx, g.name)


@pytest.mark.parametrize("strategy", ["warm", "cold"])
def test_writer_loses_nothing_on_commit(ctx: Context, golden: None, strategy: str) -> None:
    res, _ = _run(ctx, f"qc-{strategy}", V2, strategy, Writer())
    assert res.ok, res.error


@pytest.mark.parametrize("strategy", ["warm", "cold"])
def test_writer_loses_nothing_on_rollback(ctx: Context, golden: None, strategy: str) -> None:
    res, _ = _run(ctx, f"qrb-{strategy}", BAD, strategy, Writer())
    assert not res.ok and res.rolled_back, res


def test_writer_holding_data_is_killed_after_the_grace(ctx: Context, golden: None) -> None:
    res, _ = _run(ctx, "qhold", V2, "warm", Writer(hold=True), grace=1)
    assert res.ok, res.error
    assert any(k.endswith(" sh") for k in res.killed), res.killed


def test_writer_loses_nothing_on_a_debian_warm_swap(ctx: Context) -> None:
    """The issue's Debian case: systemd, dash, GNU tools; a warm swap v1 -> v2 with the writer running."""
    target = f"q{RUN_ID}-deb2"
    lifecycle.build(ctx, target, "debian:v2", boot_timeout=600)
    res, _ = _run(ctx, "qdeb", target, "warm", Writer(), source="debian:v1")
    assert res.ok, res.error


@pytest.mark.parametrize("image", ["tiny:v1", "debian:v1"])
def test_quiesce_covers_data_and_a_rollback_in_place_uncovers_it(ctx: Context, image: str) -> None:
    """The quiesce script on each family's userland (busybox; Debian's dash, GNU ls, mawk, systemd),
    then what a rollback that never left the old OS does: the writer is kept out of /data meanwhile
    and carries on afterwards without a lost or doubled record."""
    w = Writer()
    family = image.split(":")[0]
    custom = Customization(quiesce=Quiesce(start=w.start_command(), grace=2))
    g = guests.create(ctx, gname(f"qs-{family}"), image, custom=custom, data_size=64 << 20)
    try:
        guests.wait_ready(ctx, g, timeout=600)
        with ConsoleWatch(g.console(ctx)) as watch:
            w.start(ctx, g)
            time.sleep(3)
            res = steps.SwapResult(g.name, "warm", g.image, g.image, g.os_version)
            t0 = time.monotonic()
            steps.quiesce(ctx, g, res)
            took = time.monotonic() - t0
            with guests.session(ctx, g) as s:
                r = s.run(["sh", "-c", "grep ' /data ' /proc/mounts; echo x >/data/probe"])
            assert f"{steps.QUIESCED} /data tmpfs ro" in r.out and r.rc != 0, (r.out, r.err)
            quiet = len(watch.synced)
            time.sleep(2)
            assert len(watch.synced) <= quiet + 1, "the writer synced records while /data was covered"
            steps.guest_sh(ctx, g, steps.unquiesce(g) + live_script(g.custom(), g.name, g.data_uuid), "re-mount")
            steps.start_workload(ctx, g)
            time.sleep(4)
            Writer.stop(ctx, g)
            synced = watch.stop()
        v = check(read_records(ctx, g), synced)
        print(f"\n[measure] quiesce on {image}: {took:.2f}s, held={res.stopped} killed={res.killed}; {v}")
        assert len(synced) > quiet + 5, "the writer did not carry on after /data came back"
    finally:
        guests.remove(ctx, g.name)
