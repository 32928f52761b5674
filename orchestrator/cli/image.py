"""``osimg image ...`` (build, clone, snapshot, list, inspect, verify, rm) and ``osimg recipe build``."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import hosts, recipes
from ..context import Context
from ..images import catalog, lifecycle
from .common import Table, add, emit_json, err, out, remove_each, status


def register(nouns: dict[str, Any]) -> None:
    image = nouns["image"]
    b = add(image, "build", cmd_image_build, "capture a golden image (disk + memory) from a hidden builder guest")
    b.add_argument("name")
    b.add_argument("--from", dest="source", required=True, help="recipe FAMILY:VERSION or an image name")
    b.add_argument("--customize", metavar="FILE", help="YAML build steps: files (path, content, mode), commands")
    b.add_argument("--memory", type=int, help="the builder's MiB (default: the source's); guests paged in from "
                   "the image run with it")
    for verb, fn, what in (("clone", cmd_image_clone, "full copy of an image"),
                           ("snapshot", cmd_image_snapshot, "metadata-only image: an overlay on SRC")):
        sp = add(image, verb, fn, what)
        sp.add_argument("src")
        sp.add_argument("dst")
    add(image, "list", cmd_image_list, "list the catalog")
    for verb, fn, what in (("inspect", cmd_image_inspect, "show one image's record and dependents"),
                           ("verify", cmd_image_verify, "recompute hashes and check the backing chain")):
        add(image, verb, fn, what).add_argument("name")
    add(image, "rm", cmd_image_rm, "remove images nothing depends on").add_argument("names", nargs="+")
    sh = add(image, "ship", cmd_image_ship, "upload an image to a registered host's storage pool through libvirt "
             "and check its hashes there (done on demand by guest create and swap)")
    sh.add_argument("name")
    sh.add_argument("--host", required=True, help="the host ('osimg host list')")
    rb = add(nouns["recipe"], "build", cmd_recipe_build, "build recipe images (FAMILY:VERSION), reusing cached builds")
    rb.add_argument("refs", nargs="+", metavar="FAMILY:VERSION")


def _image_row(i: catalog.Image) -> dict[str, Any]:
    return {**asdict(i), "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created))}


def cmd_image_build(ctx: Context, a: argparse.Namespace) -> int:
    steps = lifecycle.BuildSteps.load(Path(a.customize)) if a.customize else None
    with status(a, f"building image {a.name} from {a.source}") as progress:
        img = lifecycle.build(ctx, a.name, a.source, steps, progress=lambda m: progress(f"{a.name}: {m}"),
                              memory_mib=a.memory)
    if a.json:
        emit_json(_image_row(img))
    else:
        out.print(f"image {img.name} captured from {a.source}: OS {img.os_version}, memory state saved, "
                  f"{img.allocated_size / (1 << 20):.1f} MiB")
    return 0


def cmd_image_clone(ctx: Context, a: argparse.Namespace) -> int:
    img = catalog.clone(ctx, a.src, a.dst)
    emit_json(_image_row(img)) if a.json else out.print(f"cloned {a.src} to {a.dst} (full copy)")
    return 0


def cmd_image_snapshot(ctx: Context, a: argparse.Namespace) -> int:
    img = catalog.snapshot(ctx, a.src, a.dst)
    emit_json(_image_row(img)) if a.json else out.print(f"snapshot {a.dst} of {a.src} (qcow2 overlay)")
    return 0


def cmd_image_list(ctx: Context, a: argparse.Namespace) -> int:
    imgs = catalog.list_images(ctx)
    if a.json:
        emit_json([_image_row(i) for i in imgs])
        return 0
    t = Table("name", "kind", "parent", "os", "memory state", "virtual", "allocated", "created", title="images")
    for i in imgs:
        r = _image_row(i)
        t.add_row(i.name, i.kind, i.parent or "-", i.os_version, "yes" if i.has_memory_state else "no",
                  f"{i.virtual_size / (1 << 20):.0f} MiB", f"{i.allocated_size / (1 << 20):.1f} MiB", r["created"])
    out.print(t)
    return 0


def cmd_image_inspect(ctx: Context, a: argparse.Namespace) -> int:
    r = _image_row(catalog.get(ctx, a.name))
    r["dependents"] = lifecycle.dependents(ctx, a.name)
    r["path"] = str(catalog.image_dir(ctx, a.name))
    emit_json(r) if a.json else out.print_json(json.dumps(r, default=str))
    return 0


def cmd_image_verify(ctx: Context, a: argparse.Namespace) -> int:
    problems = catalog.verify(ctx, a.name)
    if a.json:
        emit_json({"name": a.name, "ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            err.print(f"{a.name}: {p}", markup=False, highlight=False, soft_wrap=True)  # one line each
    else:
        out.print(f"{a.name}: ok (hashes match, backing chain inside the repository)")
    return 0 if not problems else 6


def cmd_image_rm(ctx: Context, a: argparse.Namespace) -> int:
    return remove_each(a, "image", lambda n: lifecycle.remove(ctx, n))


def cmd_recipe_build(ctx: Context, a: argparse.Namespace) -> int:
    rows = []
    for ref in a.refs:
        t0 = time.monotonic()
        with status(a, f"building {ref} (cached builds are reused)"):
            b = recipes.ensure_built(ctx.settings, ref)
        rows.append({"ref": ref, "dir": str(b.dir), "seconds": round(time.monotonic() - t0, 2)})
        if not a.json:
            out.print(f"{ref}: {b.dir} ({rows[-1]['seconds']}s)")
    if a.json:
        emit_json(rows)
    return 0


def cmd_image_ship(ctx: Context, a: argparse.Namespace) -> int:
    with status(a, f"shipping {a.name} to {a.host}"):
        done = hosts.ship(ctx, a.host, a.name)
    if a.json:
        emit_json(asdict(done))
    elif done.already:
        out.print(f"host {done.host} has {done.image} already (hashes match)", markup=False)
    else:
        mb = done.bytes_sent / (1 << 20)
        out.print(f"{done.image} shipped to {done.host}: {len(done.files)} files, {mb:.1f} MiB in {done.seconds:.2f}s, "
                  "sha256 checked on the host's copy", markup=False)
    return 0
