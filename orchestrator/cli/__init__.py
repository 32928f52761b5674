"""The ``osimg`` command: a thin layer over the Python API.

Verbs read like sentences (``osimg guest create``, ``osimg image list``); each noun has its module
here (``guest``, ``image``, ``swap``, ``fleet``, ``vios``, ``host``). Errors raised on purpose
(OsimgError) become one line on stderr and their exit code; ``--json`` prints machine output.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..context import Context
from ..errors import OsimgError
from . import fleet, guest, host, image, swap, vios
from .common import err

NOUNS = {"guest": "client guests", "image": "the image repository", "recipe": "guest OS recipes in images/",
         "fleet": "guests declared in a YAML fleet spec", "vios": "VIOS storage-server nodes",
         "cluster": "the VIOS cluster"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osimg", description="OS image management for libvirt guests")
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
        err.print(f"osimg: error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("osimg: interrupted")
        return 130
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())
