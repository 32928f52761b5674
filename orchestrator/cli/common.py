"""What every CLI verb shares: the consoles, JSON output, verb registration and argument types.

Handlers are ``fn(ctx, args) -> exit code``. Output goes through rich, which wraps for a terminal
and writes plain text of a fixed width into a file, so a report redirected to a file stays readable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from rich import table as rich_table
from rich.console import Console

from ..context import Context
from ..errors import ValidationError
from ..validate import parse_size

# Not a terminal (a file, a pipe): rich would use 80 columns and cut table headers ("count…");
# 200 keeps every table whole and lines are still short enough to read.
out = Console(log_path=False, width=None if Console().is_terminal else 200)
err = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 200)

Handler = Callable[[Context, argparse.Namespace], int]


class Table(rich_table.Table):
    """A rich table whose headers are never cut ("count…"): a column is at least as wide as its
    header, and a long cell (an error message) folds onto more lines instead of squeezing the rest."""

    def __init__(self, *headers: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for h in headers:
            self.add_column(h, min_width=len(h), overflow="fold")


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def size_arg(text: str) -> int:
    """argparse type for sizes: ``256M``, ``2G``; a plain number means MiB (as in fleet specs)."""
    try:
        return parse_size(text)
    except ValidationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add(parent: Any, name: str, fn: Handler, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
    """Add a verb whose handler is ``fn(ctx, args) -> exit code``; ``--json`` on by default."""
    sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
    sp.set_defaults(fn=fn)
    if json_flag:
        sp.add_argument("--json", action="store_true", help="machine-readable output")
    return sp


@contextlib.contextmanager
def status(a: argparse.Namespace, label: str) -> Iterator[Callable[[str], None]]:
    """A spinner with ``label`` (none with --json); yields the progress callback that updates it."""
    if getattr(a, "json", False):
        yield lambda _msg: None
        return
    with out.status(label, spinner="dots") as st:
        yield lambda msg: st.update(msg)


def remove_each(a: argparse.Namespace, what: str, remove: Callable[[str], None]) -> int:
    for name in a.names:
        remove(name)
        if not a.json:
            out.print(f"removed {what} {name}")
    if a.json:
        emit_json({"removed": a.names})
    return 0


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"
