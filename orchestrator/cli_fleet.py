"""CLI verbs for fleet; registered by cli.build_parser."""

from __future__ import annotations

from typing import Any


def register(sub: Any, add: Any) -> None:
    """Add this module's verbs to the top-level subparsers with ``add`` (see cli.add)."""
