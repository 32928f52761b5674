"""The test writer's checker (no QEMU) and the writer itself on a real tiny guest."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from orchestrator import guests
from orchestrator.context import Context

from .conftest import gname
from .writer import ConsoleWatch, Writer, check, checksum, read_records


def _file(numbers: list[int]) -> str:
    return "".join(f"{n} {checksum(n)}\n" for n in numbers)


def test_check_accepts_a_complete_file() -> None:
    assert check(_file([1, 2, 3]), [1, 2]).count == 3


@pytest.mark.parametrize("text, synced, why", [
    (_file([1, 2, 4]), [], "gap"),
    (_file([2, 1]), [], "reorder"),
    (_file([1, 2]).replace(checksum(2), "deadbeef"), [], "corruption"),
    (_file([1, 2])[:-3], [], "cut short"),
    (_file([1, 2]), [1, 2, 3], "missing"),
    (_file([1, 2]), [1, 2, 2], "twice"),
])
def test_check_refuses(text: str, synced: list[int], why: str) -> None:
    with pytest.raises(AssertionError):
        check(text, synced)


@pytest.fixture
def tiny(ctx: Context) -> Iterator[guests.Guest]:
    g = guests.create(ctx, gname("writer"), "tiny:v1", data_size=64 << 20)
    guests.wait_ready(ctx, g)
    yield g
    guests.remove(ctx, g.name)


@pytest.mark.guest
@pytest.mark.parametrize("hold", [False, True])
def test_writer_reports_only_synced_records(ctx: Context, tiny: guests.Guest, hold: bool) -> None:
    w = Writer(hold=hold)
    with ConsoleWatch(tiny.console(ctx)) as watch:
        w.start(ctx, tiny)
        w.start(ctx, tiny)  # idempotent: a second start must not run a second writer
        time.sleep(4)
        Writer.stop(ctx, tiny)
        synced = watch.stop()
    v = check(read_records(ctx, tiny), synced, minimum=10)
    print(f"\n[measure] writer (hold={hold}) in 4 s: {v}")
    assert v.reported >= 10 and synced == sorted(synced)
