"""The README lists every command, flag, environment variable, event type and module that exists.

``python -m tests.test_readme`` prints what is missing, one item a line.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

from orchestrator.cli import build_parser
from orchestrator.settings import SOURCE_ROOT

README = SOURCE_ROOT / "README.md"
# variables the code reads (orchestrator/, scripts/, tests/conftest.py): each needs a Configuration row
ENV_SOURCES = [*(SOURCE_ROOT / "orchestrator").rglob("*.py"), *(SOURCE_ROOT / "scripts").glob("*.sh"),
               SOURCE_ROOT / "tests" / "conftest.py"]
ENV_RE = re.compile(r"""environ\.get\(\s*["']([A-Z][A-Z0-9_]+)["']|environ\[["']([A-Z][A-Z0-9_]+)["']\]"""
                    r"""|\$\{([A-Z][A-Z0-9_]+):-""")
NOT_OURS = {"HOME", "PATH", "CI"}  # read, not defined by osimg (CI is the CI system's own flag)
# event types: the constants of cluster/events.py and the literal types modules publish
EVENTS_PY = SOURCE_ROOT / "orchestrator" / "cluster" / "events.py"
EVENT_CONST_RE = re.compile(r'^[A-Z_]+ = "([a-z-]+)"$', re.M)
EVENT_USE_RE = re.compile(r'publish\(ctx, (?:LIFECYCLE|ALERT), "([a-z-]+)"|Event\(kind="[a-z]+", type="([a-z-]+)"')


def leaves(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    """(command words, its --flags) for every runnable command."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    flags = [o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    if not subs:
        yield path, flags
    for a in subs:
        for name, sp in a.choices.items():
            yield from leaves(sp, (*path, name))
    if path == ():
        yield ("--top-level--",), flags


def command_cells(text: str) -> list[str]:
    """First cell of every table row that shows a command (escaped pipes stay in the cell)."""
    return [re.split(r"(?<!\\)\|", line)[1] for line in text.splitlines() if line.startswith("| `")]


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def missing() -> list[str]:
    text = README.read_text()
    cells = command_cells(text)
    out = []
    for path, flags in leaves(build_parser()):
        if path != ("--top-level--",) and not any(
                all(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", c) for w in path) for c in cells):
            out.append(f"command: osimg {' '.join(path)}")
        out += [f"flag: osimg {' '.join(path)} {f}" for f in flags if f not in text]
    config = section(text, "Configuration")
    for src in ENV_SOURCES:
        for m in ENV_RE.finditer(src.read_text()):
            var = next(g for g in m.groups() if g)
            if var not in NOT_OURS and f"`{var}`" not in config:
                out.append(f"variable: {var} (read in {src.relative_to(SOURCE_ROOT)})")
    events = {m.group(1) for m in EVENT_CONST_RE.finditer(EVENTS_PY.read_text())} - {"lifecycle", "alert"}
    for src in (SOURCE_ROOT / "orchestrator").rglob("*.py"):
        events |= {next(g for g in m.groups() if g) for m in EVENT_USE_RE.finditer(src.read_text())}
    out += [f"event: {e}" for e in events if not re.search(rf"(?<![\w-]){e}(?![\w-])", text)]
    layout = section(text, "Layout")
    for mod in sorted((SOURCE_ROOT / "orchestrator").rglob("*.py")):
        if mod.name != "__init__.py" and not re.search(rf"\b{re.escape(mod.stem)}\b", layout):
            out.append(f"module: {mod.relative_to(SOURCE_ROOT)}")
    return sorted(set(out))


def test_readme_lists_every_command_flag_variable_and_module() -> None:
    assert missing() == []


if __name__ == "__main__":
    print("\n".join(missing()) or "the README lists everything")
