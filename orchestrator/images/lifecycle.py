"""Image life cycle: build (boot a hidden builder guest, run build steps, capture) and removal.

Split from ``images.catalog`` because both need guests: a build boots a builder guest, and removal
must know which guests still use an image. The catalog itself (records, clone, snapshot, verify)
needs no guest, and guests need the catalog to resolve their image, so the catalog sits below
``guests`` and this module above it.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from .. import guests, hosts
from ..context import Context
from ..errors import ConflictError, GuestError, OsimgError, ValidationError
from ..host import qemu_img
from ..process import Progress, quiet
from ..validate import load_yaml_file, short
from ..validate import name as valid_name
from . import catalog

FILE_KEYS = ("path", "content", "mode")


@dataclass
class BuildSteps:
    """What a builder guest does before capture: files to install, then commands to run."""

    files: list[dict[str, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> BuildSteps:
        data = load_yaml_file(path, "build steps")
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValidationError(f"{path}: expected a mapping with keys 'files' and 'commands'")
        unknown = set(data) - {"files", "commands"}
        if unknown:
            raise ValidationError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected files, commands")
        files = data.get("files") or []
        cmds = data.get("commands") or []
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise ValidationError(f"{path}: 'files' must be a list of mappings with path, content, mode")
        for i, f in enumerate(files):
            unknown_keys = [str(k) for k in f if k not in FILE_KEYS]
            if unknown_keys:
                raise ValidationError(f"{path}: files[{i}]: unknown key {short(unknown_keys[0])}; expected "
                                      f"{', '.join(FILE_KEYS)}")
            p = f.get("path")
            if not isinstance(p, str) or not p.startswith("/") or ".." in p.split("/") or "\0" in p:
                raise ValidationError(f"{path}: files[{i}].path must be an absolute path without '..', "
                                      f"got {short(p)}")
            if not isinstance(f.get("content", ""), str):
                raise ValidationError(f"{path}: files[{i}].content must be a string")
            mode = f.get("mode", "0644")
            # YAML reads 0644 as the integer 420 and 644 as 644: only a quoted mode says what it means
            if not isinstance(mode, str) or not (len(mode) in (3, 4) and all(c in "01234567" for c in mode)):
                raise ValidationError(f"{path}: files[{i}].mode must be octal, as a quoted string like '0644' "
                                      f"(YAML reads 0644 as the number 420), got {short(mode)}")
        if not isinstance(cmds, list) or not all(isinstance(c, str) and c.strip() for c in cmds):
            raise ValidationError(f"{path}: 'commands' must be a list of strings, none empty")
        return cls([{k: str(v) for k, v in f.items()} for f in files], list(cmds))



# -- build and capture -------------------------------------------------------------------------------------
def build(ctx: Context, name: str, source: str, steps: BuildSteps | None = None,
          progress: Progress = quiet, boot_timeout: float = 180, memory_mib: int | None = None) -> catalog.Image:
    """Boot a hidden builder from ``source``, run ``steps``, capture disk and memory as ``name``.

    ``memory_mib``: the builder's memory (default: the source's), which is also the memory every guest
    paged in from this image runs with (a saved state keeps its size)."""
    catalog.check_new_name(ctx, name)
    src = catalog.resolve(ctx, source)
    if ":" not in source:
        catalog.verify(ctx, source, raise_on_error=True)
    steps = steps or BuildSteps()
    builder = f"build-{name}-{uuidlib.uuid4().hex[:6]}"[:63]
    tmp = catalog.staging(ctx, name)
    try:
        progress(f"booting hidden builder {builder} from {source}")
        g = guests.create(ctx, builder, source, hidden=True, config_drive=False, memory_mib=memory_mib)
        guests.wait_ready(ctx, g, timeout=boot_timeout)
        with guests.session(ctx, g) as s:
            for f in steps.files:
                progress(f"installing {f['path']}")
                s.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"', "-",
                       f["path"], f.get("mode", "0644")], stdin=f.get("content", ""), check=True)
            for cmd in steps.commands:
                progress(f"running {cmd}")
                res = s.run(["sh", "-c", cmd], timeout=600)
                if res.rc != 0:
                    raise GuestError(f"build step {cmd!r} failed with exit code {res.rc}: "
                                     f"{(res.err or res.out).strip()[-300:]}")
            # flush the page cache so the disk alone is consistent too (cold boots of this image)
            s.run(["sync"], check=True)
        progress("capturing memory state (page out)")
        ctx.hv.save(builder, str(tmp / catalog.STATE))
        progress("copying the disk into the repository")
        qemu_img.convert(g.overlay(ctx), tmp / catalog.DISK)
        shutil.copyfile(src.kernel, tmp / "vmlinuz")
        shutil.copyfile(src.initrd, tmp / "initrd.img")
        img = catalog.Image(
            name=name, kind="built", parent=None if ":" in source else source, source=source, family=src.family,
            os_version=src.os_version, files={}, virtual_size=0, allocated_size=0, has_memory_state=True,
            state_from=name, host_key=src.host_key, cmdline=src.cmdline, memory_mib=g.memory_mib,
            ready_marker=src.ready_marker, app_port=src.app_port,
            notes=[f"{len(steps.files)} file(s) installed, {len(steps.commands)} command(s) run"],
        )
        # a saved state is only valid for the hardware it was saved with: remember the XML it expects
        (tmp / "domain.xml").write_text(ctx.hv.saved_xml(str(tmp / catalog.STATE)))
        return catalog.finish(ctx, tmp, img)
    finally:
        with contextlib.suppress(OsimgError):
            guests.remove(ctx, builder)
        shutil.rmtree(tmp, ignore_errors=True)



def dependents(ctx: Context, name: str) -> list[str]:
    """What would break if ``name`` were removed: child images and guests on it."""
    deps = [f"image {i.name}" for i in catalog.list_images(ctx) if i.parent == name and i.kind == "snapshot"]
    deps += [f"image {i.name} (memory state)" for i in catalog.list_images(ctx)
             if i.state_from == name and i.name != name
             and i.kind != "snapshot"]
    deps += [f"guest {g.name}" for g in guests.all_guests(ctx, hidden=True) if g.image == name]
    return deps


def remove(ctx: Context, name: str) -> None:
    """Remove an image nothing depends on. A folder left without its catalog record (a crash between
    the two) is removed too: ``image build`` refuses the name while the folder is there, so ``rm``
    must be the way out."""
    valid_name(name, "image name")
    if ctx.store.get(catalog.KIND, name) is None and not catalog.image_dir(ctx, name).exists():
        catalog.get(ctx, name)  # the not-found error, with the list of images
    deps = dependents(ctx, name)
    if deps:
        raise ConflictError(f"image {name!r} is in use by {', '.join(deps)}; remove those first")
    for host in hosts.having(ctx, name):  # its copies on other hosts go first (an unreachable host stops here)
        hosts.unship(ctx, host, name)
    d = catalog.image_dir(ctx, name)
    if d.exists():
        for f in d.iterdir():
            f.chmod(0o600)  # writable again, so rmtree can remove it
        shutil.rmtree(d)
    ctx.store.delete(catalog.KIND, name)
