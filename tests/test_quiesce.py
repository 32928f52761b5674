"""A swap quiesces a workload the image does not know: a writer that keeps appending synced records
to /data loses none of them, on commit and on rollback, warm and cold (real tiny guests)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from orchestrator import guests, swap
from orchestrator.context import Context
from orchestrator.customize import Customization, Quiesce
from orchestrator.images import lifecycle

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
         grace: float = 10) -> tuple[swap.SwapResult, int]:
    """A guest running ``writer`` (restarted by its quiesce.start) is swapped; returns the result and
    how many records the checker found, after checking them."""
    custom = Customization(quiesce=Quiesce(start=writer.start_command(), grace=grace))
    g = guests.create(ctx, gname(label), "tiny:v1", custom=custom, data_size=64 << 20)
    try:
        guests.wait_ready(ctx, g)
        with ConsoleWatch(g.console(ctx)) as watch:
            writer.start(ctx, g)
            time.sleep(3)
            before = len(watch.synced)
            [res] = swap.rollout(ctx, swap.plan(ctx, [g.name], target, strategy))
            time.sleep(3)  # the writer goes on, on the new OS or on the old one after the rollback
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


def test_writer_loses_nothing_on_rollback(ctx: Context, golden: None) -> None:
    res, _ = _run(ctx, "qrb", BAD, "warm", Writer())
    assert not res.ok and res.rolled_back, res


def test_writer_holding_data_is_killed_after_the_grace(ctx: Context, golden: None) -> None:
    res, _ = _run(ctx, "qhold", V2, "warm", Writer(hold=True), grace=1)
    assert res.ok, res.error
    assert any(k.endswith(" sh") for k in res.killed), res.killed
