"""Validation of user input shared by every layer: names, addresses, sizes, YAML files.

Names end up in file paths, libvirt domain names and NBD export names, so they are restricted to a
conservative alphabet: this rules out path traversal (``/``, ``..``) and shell or XML surprises.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from .errors import ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_NAME = 63
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


def name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a safe object name, else raise ValidationError saying why."""
    if not isinstance(value, str) or value == "":
        raise ValidationError(f"invalid {what} {value!r}: must be a non-empty string")
    if "/" in value or ".." in value:
        raise ValidationError(f"invalid {what} {value!r}: must not contain '/' or '..'")
    if len(value) > MAX_NAME:
        raise ValidationError(f"invalid {what} {value[:20]!r}...: longer than {MAX_NAME} characters")
    if not NAME_RE.match(value):
        raise ValidationError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return value


def inside(path: object, roots: list[Path], what: str) -> Path:
    """``path`` resolved (symlinks followed) if it lies under one of ``roots``, else ValidationError.

    Paths read from store records, journals and saved files are data, not trust: a record that
    names /etc/shadow must never make root serve, unlink or page in that file."""
    if not isinstance(path, (str, Path)) or str(path) == "" or "\0" in str(path):
        raise ValidationError(f"invalid {what} {short(path)}: expected a file path")
    p = Path(path).resolve()
    for root in roots:
        r = root.resolve()
        if p == r or r in p.parents:
            return p
    raise ValidationError(f"{what} {short(str(p))} is outside the allowed roots "
                          f"({', '.join(str(r) for r in roots)})")


def file_name(value: object, what: str) -> str:
    """A plain file name inside a folder osimg owns (no separator, no '..'), as records store them."""
    if not isinstance(value, str) or not FILE_RE.match(value) or ".." in value:
        raise ValidationError(f"invalid {what} {short(value)}: expected a plain file name")
    return value


def ip_interface(value: object, what: str = "address") -> ipaddress.IPv4Interface:
    """Parse ``A.B.C.D/NN`` (or ``A.B.C.D`` with a separate netmask) into an interface."""
    try:
        return ipaddress.IPv4Interface(str(value))
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError) as err:
        raise ValidationError(f"invalid {what} {value!r}: {err}") from None


def ip_address(value: object, what: str = "address") -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except (ipaddress.AddressValueError, ValueError) as err:
        raise ValidationError(f"invalid {what} {value!r}: {err}") from None


# -- sizes -----------------------------------------------------------------------------------------------
SIZE_RE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,6})?)\s*([kmgt])?(?:i?b)?\s*$", re.IGNORECASE | re.ASCII)
UNITS = {None: 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_SIZE = 64 << 40


def human_size(n: int) -> str:
    """``1G``, ``256M``: the shortest exact spelling, for messages about ranges."""
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n / (1 << 20):.1f}M"


def parse_size(value: object, what: str = "size", lo: int = 1, hi: int = MAX_SIZE) -> int:
    """Bytes from ``256M``, ``1.5G``, ``512k`` or a plain number of MiB (the one size rule of the CLI,
    fleet specs and Ansible). ``inf``, ``1e999``, negative and empty sizes are refused, and so is a
    size outside ``lo..hi``."""
    m = SIZE_RE.match(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        m = SIZE_RE.match(str(value))
    if m is None:
        raise ValidationError(f"invalid {what}: expected a size such as 256M or 2G (a plain number means MiB), "
                              f"got {short(value)}")
    n = int(float(m.group(1)) * UNITS[m.group(2).lower() if m.group(2) else None])
    if not lo <= n <= hi:
        raise ValidationError(f"invalid {what}: {short(value)} is outside {human_size(lo)}..{human_size(hi)}")
    return n


DURATION_RE = re.compile(r"^\s*(\d{1,6}(?:\.\d{1,3})?)\s*(ms|s|m)?\s*$", re.ASCII)
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def parse_duration(value: object, what: str = "duration", lo: float = 0.0, hi: float = 3600.0) -> float:
    """Seconds from ``10s``, ``1.5s``, ``500ms``, ``2m`` or a plain number of seconds, within ``lo..hi``."""
    text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    m = DURATION_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValidationError(f"invalid {what}: expected a duration such as 10s, 500ms or 2m, got {short(value)}")
    n = float(m.group(1)) * DURATION_UNITS[m.group(2)]
    if not lo <= n <= hi:
        raise ValidationError(f"invalid {what}: {short(value)} is outside {lo:g}s..{hi:g}s")
    return n


def short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message must never carry an 8 MB value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- YAML input ------------------------------------------------------------------------------------------
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; an input must not say a thing twice."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, "a key must be a scalar", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {short(key)}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _count_nodes(data: object, budget: int) -> int:
    """Nodes of ``data`` as a reader would walk them (aliases expanded), stopping past ``budget``.

    A 1 KB alias bomb expands to billions of nodes: checking the expanded size first keeps every
    later walk of the document cheap."""
    seen = 0
    stack = [data]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > budget:
            return seen
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return seen


def load_yaml_file(path: Path, what: str) -> Any:
    """Read a YAML input file: UTF-8, at most 1 MiB and 100,000 nodes, no duplicate keys; every
    failure is one ValidationError line naming the file (PyYAML's own messages span lines)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ValidationError(f"{short(str(path))}: cannot read {what}: {err.strerror}") from None
    except ValueError:  # a NUL in the path (only an API caller can pass one; argv cannot)
        raise ValidationError(f"{short(str(path))}: cannot read {what}: not a valid path") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ValidationError(f"{path}: {what} is larger than {MAX_YAML_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValidationError(f"{path}: {what} is not UTF-8 text (byte {err.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValidationError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise ValidationError(f"{path}: {what} is nested too deeply") from None
    if _count_nodes(data, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ValidationError(f"{path}: {what} expands to more than {MAX_YAML_NODES} values (YAML aliases?)")
    return data
