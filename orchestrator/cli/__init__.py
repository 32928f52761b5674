"""The ``osimg`` command: a thin layer over the Python API.

Verbs read like sentences (``osimg guest create``, ``osimg image list``); each noun has its module
here (``guest``, ``image``, ``swap``, ``fleet``, ``vios``, ``host``). Errors raised on purpose
(OsimgError) become one line on stderr and their exit code; ``--json`` prints machine output.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from ..context import Context
from ..errors import OsimgError, StorageError
from . import fleet, guest, host, image, swap, vios
from .common import err

MAX_MESSAGE = 300


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first) and cut short."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def one_line(message: str) -> str:
    """A message as one printable line: a user's value may carry line breaks or terminal escapes,
    and may be megabytes long."""
    line = "".join(c if c.isprintable() else " " if c.isspace() else repr(c)[1:-1] for c in message[:4 * MAX_MESSAGE])
    line = " ".join(line.split())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."

NOUNS = {"guest": "client guests", "image": "the image repository", "recipe": "guest OS recipes in images/",
         "fleet": "guests declared in a YAML fleet spec", "vios": "VIOS storage-server nodes",
         "cluster": "the VIOS cluster", "host": "this libvirt host's own settings (KSM)"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="osimg", description="OS image management for libvirt guests")
    p.add_argument("--home", help="state folder (default $OSIMG_HOME or /var/lib/osimg)")
    p.add_argument("--uri", help="libvirt URI (default $OSIMG_URI or qemu:///system)")
    p.add_argument("--store", help="cluster store URL (default sqlite under the home folder)")
    sub = p.add_subparsers(dest="cmd", required=True)
    nouns: dict[str, Any] = {"_top": sub}
    for noun, what in NOUNS.items():
        nouns[noun] = sub.add_parser(noun, help=what).add_subparsers(dest="sub", required=True)
    for mod in (host, guest, image, swap, fleet, vios):
        mod.register(nouns)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    ctx: Context | None = None
    try:
        ctx = Context.from_env(home=a.home, uri=a.uri, store=a.store)
        return int(a.fn(ctx, a))
    except OsimgError as e:
        return _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        err.print("osimg: interrupted")
        return 130
    except OSError as e:  # a file osimg needs cannot be read or written (full disk, permissions)
        if os.environ.get("OSIMG_DEBUG"):
            raise
        return _fail(f"{e.filename or 'file'}: {e.strerror or e}", StorageError.exit_code)
    except Exception as e:  # a bug: still one line, with the way to see the whole story
        if os.environ.get("OSIMG_DEBUG"):
            raise
        return _fail(f"unexpected {type(e).__name__}: {e} (a bug in osimg; OSIMG_DEBUG=1 shows the traceback)", 1)
    finally:
        if ctx is not None:
            ctx.close()


def _fail(message: str, code: int) -> int:
    """The one form every error takes: one line on stderr (a value in it may be huge: cut), an exit code."""
    err.print(f"osimg: error: {one_line(message)}", markup=False, highlight=False, soft_wrap=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
