"""A swap quiesces a workload the image does not know: a writer that keeps appending synced records
to /data loses none of them, on commit and on rollback, warm and cold (real tiny guests)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from orchestrator import guests, swap
from orchestrator.context import Context
from orchestrator.customize import Customization, Quiesce, live_script
from orchestrator.swap import steps

from .conftest import GOLD_BAD, GOLD_V1, GOLD_V2, gname
from .writer import RECORDS, ConsoleWatch, Writer, check, read_records

pytestmark = pytest.mark.guest

V1, V2, BAD = GOLD_V1, GOLD_V2, GOLD_BAD  # the session's golden images (conftest); BAD's app never starts
# The health wait for BAD (the default is 120 s): a warm swap waits this long for the paged-in
# application, which on a good image answers within a second; a cold swap waits this long for the
# application's first answer while the new OS boots (a good tiny image answers ~6 s after the start).
BAD_WAIT = {"warm": 8.0, "cold": 12.0}
SEEN = 10  # reports the writer must have made before the swap (and after it) to count as running


@pytest.fixture(scope="module")
def golden(gold_v1: str, gold_v2: str, gold_bad: str) -> None:
    """V1, V2 and BAD, captured once per session: no test here changes or removes them."""


def _last_record(ctx: Context, g: guests.Guest) -> int:
    """The last record in the guest's records file (0 if none). A guest an earlier test ran the writer
    on has those reports on its console, and the writer goes on after this record: only the reports
    above it count as this test's."""
    with guests.session(ctx, g) as s:
        last = s.run(["sh", "-c", f"tail -n 1 {RECORDS} 2>/dev/null | cut -d' ' -f1"]).out.strip()
    return int(last) if last.isdigit() else 0


def _reported(watch: ConsoleWatch, above: int) -> int:
    """How many records above number ``above`` the writer reported synced so far."""
    return sum(1 for n in watch.synced if n > above)


def _until_synced(watch: ConsoleWatch, count: int, above: int = 0, timeout: float = 60) -> None:
    """Until the writer reported ``count`` synced records above number ``above`` (a deadline, not an
    assertion: the caller asserts how many it needs)."""
    deadline = time.monotonic() + timeout
    while _reported(watch, above) < count and time.monotonic() < deadline:
        time.sleep(0.1)


def _run(ctx: Context, label: str, target: str, strategy: str, writer: Writer,
         grace: float = 10, source: str = "tiny:v1") -> tuple[swap.SwapResult, int]:
    """A new guest running ``writer`` (restarted by its quiesce.start) is swapped; see ``_swap_writing``."""
    custom = Customization(quiesce=Quiesce(start=writer.start_command(), grace=grace))
    g = guests.create(ctx, gname(label), source, custom=custom, data_size=64 << 20)
    try:
        guests.wait_ready(ctx, g, timeout=600)
        return _swap_writing(ctx, g, target, strategy, writer)
    finally:
        guests.remove(ctx, g.name)


def _swap_writing(ctx: Context, g: guests.Guest, target: str, strategy: str,
                  writer: Writer) -> tuple[swap.SwapResult, int]:
    """Guest ``g`` (whose quiesce.start is ``writer``) is swapped while the writer runs; returns the
    result and how many records the checker found, after checking them."""
    first = _last_record(ctx, g)
    with ConsoleWatch(g.console(ctx)) as watch:
        writer.start(ctx, g)
        _until_synced(watch, SEEN, first)
        before = _reported(watch, first)
        assert before >= SEEN, "the writer did not start"
        p = swap.plan(ctx, [g.name], target, strategy)
        # the bad image's application never answers: a short health wait is enough to see it
        [res] = swap.rollout(ctx, replace(p, health_timeout=BAD_WAIT[strategy]) if target == BAD else p)
        after = _reported(watch, first)
        # the writer goes on, on the new OS or on the old one after the rollback
        _until_synced(watch, after + SEEN, first)
        g = guests.load(ctx, g.name)
        Writer.stop(ctx, g)
        synced = watch.stop()
    v = check(read_records(ctx, g), synced)
    print(f"\n[measure] {strategy} swap to {target} with the writer running: ok={res.ok} "
          f"rolled_back={res.rolled_back} downtime={res.downtime} stopped={res.stopped} killed={res.killed}; "
          f"{v}; {before} before the swap")
    assert sum(1 for n in synced if n > first) > before + 5, "the writer did not go on after the swap"
    assert swap.journal.entries(ctx) == []
    return res, v.count


@contextlib.contextmanager
def _writing_guest(ctx: Context, label: str, image: str) -> Iterator[guests.Guest]:
    """A guest whose quiesce.start is the writer, started (not waited for), removed at the end."""
    custom = Customization(quiesce=Quiesce(start=Writer().start_command(), grace=10))
    g = guests.create(ctx, gname(label), image, custom=custom, data_size=64 << 20)
    try:
        yield g
    finally:
        guests.remove(ctx, g.name)


@pytest.fixture(scope="module")
def debian_started(ctx: Context, request: pytest.FixtureRequest) -> Iterator[guests.Guest | None]:
    """The Debian guest, started by the module's first test when a Debian test is selected and waited
    for only by the Debian tests: its ~40 s boot (one core under TCG) overlaps the tiny tests."""
    if not any(item.module is request.module and "debian" in item.name for item in request.session.items):
        yield None
        return
    with _writing_guest(ctx, "qdeb", "debian:v1") as g:
        yield g


@pytest.fixture(scope="module")
def tiny_guest(ctx: Context, golden: None, debian_started: guests.Guest | None) -> Iterator[guests.Guest]:
    """One tiny:v1 guest running the writer as its quiesce.start, for the tests whose swaps leave it
    on a healthy OS (one boot instead of five): the warm commit (to V2), the cold commit (back to V1),
    both rollbacks (V1 -> BAD -> V1), then the in-place quiesce. The writer goes on in one records
    file throughout, which the checker reads whole each time."""
    with _writing_guest(ctx, "qtiny", "tiny:v1") as g:
        guests.wait_ready(ctx, g, timeout=600)
        yield g


@pytest.fixture(scope="module")
def debian_guest(ctx: Context, debian_started: guests.Guest | None) -> guests.Guest:
    """One debian:v1 guest running the writer as its quiesce.start (a Debian boot takes ~40 s under
    TCG): the in-place quiesce test uses it first, then the warm swap test swaps it."""
    assert debian_started is not None, "debian_started found no Debian test in this module"
    guests.wait_ready(ctx, debian_started, timeout=600)
    return debian_started


@pytest.mark.parametrize("strategy", ["warm", "cold"])
def test_writer_loses_nothing_on_commit(ctx: Context, golden: None, tiny_guest: guests.Guest,
                                        strategy: str) -> None:
    g = guests.load(ctx, tiny_guest.name)
    target = V1 if g.image == V2 else V2  # the warm case swaps tiny:v1 to V2, the cold one back to V1
    res, _ = _swap_writing(ctx, g, target, strategy, Writer())
    assert res.ok, res.error
    assert guests.load(ctx, g.name).image == target


@pytest.mark.parametrize("strategy", ["warm", "cold"])
def test_writer_loses_nothing_on_rollback(ctx: Context, golden: None, tiny_guest: guests.Guest,
                                          strategy: str) -> None:
    g = guests.load(ctx, tiny_guest.name)
    res, _ = _swap_writing(ctx, g, BAD, strategy, Writer())
    assert not res.ok and res.rolled_back, res
    assert guests.load(ctx, g.name).image == g.image


def test_writer_holding_data_is_killed_after_the_grace(ctx: Context, golden: None) -> None:
    res, _ = _run(ctx, "qhold", V2, "warm", Writer(hold=True), grace=1)
    assert res.ok, res.error
    assert any(k.endswith(" sh") for k in res.killed), res.killed


@pytest.mark.parametrize("image", ["tiny:v1", "debian:v1"])
def test_quiesce_covers_data_and_a_rollback_in_place_uncovers_it(ctx: Context, image: str,
                                                                 request: pytest.FixtureRequest) -> None:
    """The quiesce script on each family's userland (busybox; Debian's dash, GNU ls, mawk, systemd),
    then what a rollback that never left the old OS does: the writer is kept out of /data meanwhile
    and carries on afterwards without a lost or doubled record. On the module's guest of the family
    (tiny: after its swaps; Debian: fresh, the warm swap test after this one swaps it)."""
    w = Writer()
    g = guests.load(ctx, request.getfixturevalue(f"{image.split(':')[0]}_guest").name)
    first = _last_record(ctx, g)
    with ConsoleWatch(g.console(ctx)) as watch:
        w.start(ctx, g)
        _until_synced(watch, SEEN, first)
        assert _reported(watch, first) >= SEEN, "the writer did not start"
        res = steps.SwapResult(g.name, "warm", g.image, g.image, g.os_version)
        t0 = time.monotonic()
        steps.quiesce(ctx, g, res)
        took = time.monotonic() - t0
        with guests.session(ctx, g) as s:
            r = s.run(["sh", "-c", "grep ' /data ' /proc/mounts; echo x >/data/probe"])
        assert f"{steps.QUIESCED} /data tmpfs ro" in r.out and r.rc != 0, (r.out, r.err)
        quiet = _reported(watch, first)
        time.sleep(2)
        assert _reported(watch, first) <= quiet + 1, "the writer synced records while /data was covered"
        steps.guest_sh(ctx, g, steps.unquiesce(g) + live_script(g.custom(), g.name, g.data_uuid), "re-mount")
        steps.start_workload(ctx, g)
        _until_synced(watch, quiet + SEEN, first)
        Writer.stop(ctx, g)
        synced = watch.stop()
    v = check(read_records(ctx, g), synced)
    print(f"\n[measure] quiesce on {image}: {took:.2f}s, held={res.stopped} killed={res.killed}; {v}")
    assert sum(1 for n in synced if n > first) > quiet + 5, "the writer did not carry on after /data came back"


def test_writer_loses_nothing_on_a_debian_warm_swap(ctx: Context, gold_debian_v2: str,
                                                    debian_guest: guests.Guest) -> None:
    """The issue's Debian case: systemd, dash, GNU tools; a warm swap v1 -> v2 with the writer running.
    The guest is the module's debian:v1 guest (after the in-place quiesce test, whose records the
    writer continues: the checker covers both); v2 is the session's Debian golden image."""
    g = guests.load(ctx, debian_guest.name)
    assert g.os_version == "v1"
    res, _ = _swap_writing(ctx, g, gold_debian_v2, "warm", Writer())
    assert res.ok, res.error
