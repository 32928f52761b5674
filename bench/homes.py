"""A benchmark's own OSIMG_HOME, so a run never touches the user's guests and leaves nothing behind.

The folder lives under the checkout's .cache/ (git-ignored), readable by QEMU (it runs as
libvirt-qemu and must reach the guests' files); at the end every domain of that home is undefined
and the folder removed, also when the benchmark fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from orchestrator.context import Context
from orchestrator.settings import SOURCE_ROOT


@contextlib.contextmanager
def bench_home(name: str) -> Iterator[Context]:
    """A context on a fresh home ``.cache/NAME`` for the block; all of it is gone afterwards."""
    home = SOURCE_ROOT / ".cache" / name
    home.mkdir(parents=True)
    home.chmod(0o755)
    ctx = Context.from_env(home=str(home))
    try:
        yield ctx
    finally:
        try:
            for d in ctx.hv.list_domains():
                if d.metadata.get("home") == str(home):
                    ctx.hv.undefine(d.name)
        finally:
            ctx.close()
            shutil.rmtree(home, ignore_errors=True)
