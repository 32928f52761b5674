"""The ``osimg`` command: a thin layer over the Python API.

Verbs read like sentences (``osimg guest create``, ``osimg image list``). Errors raised on purpose
(OsimgError) become one line on stderr and a non-zero exit code; ``--json`` prints machine output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import cli_fleet, cli_vios, demo, doctor, images, partitions, recipes, swap
from .context import Context
from .errors import OsimgError, SwapError, ValidationError

out = Console(log_path=False)
err = Console(stderr=True)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t) * units["m"])  # a plain number means MiB, as in fleet specs
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 512M or 2G") from None


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- doctor -------------------------------------------------------------------------------------------
def cmd_doctor(ctx: Context, a: argparse.Namespace) -> int:
    rep = doctor.run(ctx.settings, ctx.hv, reprobe=a.reprobe)
    if a.json:
        emit_json({"ok": rep.ok, "versions": rep.versions, "accel": rep.accel,
                   "checks": [asdict(c) for c in rep.checks], "home": str(ctx.settings.home)})
        return 0 if rep.ok else 1
    for k, v in rep.versions.items():
        out.print(f"[bold]{k}[/]: {v}")
    out.print(f"[bold]accelerator[/]: {rep.accel['label']} — {rep.accel['reason']}")
    for c in rep.checks:
        mark = "[green]ok[/]" if c.ok else "[red]FAIL[/]"
        out.print(f"{mark} {c.name}: {c.detail}")
    return 0 if rep.ok else 1


# -- guest --------------------------------------------------------------------------------------------
def cmd_guest_create(ctx: Context, a: argparse.Namespace) -> int:
    with out.status(f"creating {a.name} from {a.image}", spinner="dots") if not a.json else _null():
        g = partitions.create(ctx, a.name, a.image, memory_mib=a.memory, vcpus=a.vcpus,
                              data_size=a.data_size or 0)
        ready = partitions.wait_ready(ctx, g) if not a.no_wait else None
    info = {"name": g.name, "image": g.image, "os_version": g.os_version, "accel": g.accel,
            "ssh_port": g.ssh_port, "app_port": g.app_port, "ready_seconds": ready}
    if a.json:
        emit_json(info)
    else:
        accel = "KVM" if g.accel == "kvm" else "TCG"
        when = f", SSH ready in {ready:.1f}s" if ready is not None else ""
        out.print(f"guest {g.name} running {g.image} ({g.os_version}) under {accel}{when}; "
                  f"ssh on 127.0.0.1:{g.ssh_port}")
    return 0


def cmd_guest_list(ctx: Context, a: argparse.Namespace) -> int:
    rows = [{"name": g.name, "image": g.image, "os_version": g.os_version, "state": partitions.status(ctx, g),
             "accel": g.accel, "ssh_port": g.ssh_port, "app_port": g.app_port, "hidden": g.hidden}
            for g in partitions.all_guests(ctx, hidden=a.all)]
    if a.json:
        emit_json(rows)
        return 0
    t = Table("name", "image", "os", "state", "accel", "ssh", "app", title="guests (add --all for hidden builders)")
    for r in rows:
        t.add_row(*(str(r[k]) for k in ("name", "image", "os_version", "state", "accel", "ssh_port", "app_port")))
    out.print(t)
    return 0


def cmd_guest_ssh(ctx: Context, a: argparse.Namespace) -> int:
    g = partitions.load(ctx, a.name)
    argv = [x for x in a.command if x != "--"] or ["cat", "/etc/os-release"]
    with partitions.session(ctx, g, timeout=a.timeout) as s:
        res = s.run(argv, timeout=a.timeout)
    sys.stdout.write(res.out)
    sys.stderr.write(res.err)
    return res.rc


def cmd_guest_rm(ctx: Context, a: argparse.Namespace) -> int:
    return _remove_each(a, "guest", lambda n: partitions.remove(ctx, n))


def _remove_each(a: argparse.Namespace, what: str, remove: Callable[[str], None]) -> int:
    for name in a.names:
        remove(name)
        if not a.json:
            out.print(f"removed {what} {name}")
    if a.json:
        emit_json({"removed": a.names})
    return 0


# -- image --------------------------------------------------------------------------------------------
def _image_row(i: images.Image) -> dict[str, Any]:
    return {**asdict(i), "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created))}


def cmd_image_build(ctx: Context, a: argparse.Namespace) -> int:
    steps = images.BuildSteps.load(Path(a.customize)) if a.customize else None
    with out.status(f"building image {a.name} from {a.source}", spinner="dots") if not a.json else _null() as st:
        def progress(msg: str) -> None:
            if st is not None:
                st.update(f"{a.name}: {msg}")
        img = images.build(ctx, a.name, a.source, steps, progress=progress)
    if a.json:
        emit_json(_image_row(img))
    else:
        out.print(f"image {img.name} captured from {a.source}: OS {img.os_version}, memory state saved, "
                  f"{img.allocated_size / (1 << 20):.1f} MiB")
    return 0


def cmd_image_clone(ctx: Context, a: argparse.Namespace) -> int:
    img = images.clone(ctx, a.src, a.dst)
    emit_json(_image_row(img)) if a.json else out.print(f"cloned {a.src} to {a.dst} (full copy)")
    return 0


def cmd_image_snapshot(ctx: Context, a: argparse.Namespace) -> int:
    img = images.snapshot(ctx, a.src, a.dst)
    emit_json(_image_row(img)) if a.json else out.print(f"snapshot {a.dst} of {a.src} (qcow2 overlay)")
    return 0


def cmd_image_list(ctx: Context, a: argparse.Namespace) -> int:
    imgs = images.list_images(ctx)
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
    r = _image_row(images.get(ctx, a.name))
    r["dependents"] = images.dependents(ctx, a.name)
    r["path"] = str(images.image_dir(ctx, a.name))
    emit_json(r) if a.json else out.print_json(json.dumps(r, default=str))
    return 0


def cmd_image_verify(ctx: Context, a: argparse.Namespace) -> int:
    problems = images.verify(ctx, a.name)
    if a.json:
        emit_json({"name": a.name, "ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            err.print(f"{a.name}: {p}", markup=False)
    else:
        out.print(f"{a.name}: ok (hashes match, backing chain inside the repository)")
    return 0 if not problems else 6


def cmd_image_rm(ctx: Context, a: argparse.Namespace) -> int:
    return _remove_each(a, "image", lambda n: images.remove(ctx, n))


# -- swap ---------------------------------------------------------------------------------------------
def cmd_swap(ctx: Context, a: argparse.Namespace) -> int:
    if a.resume:
        with out.status("resuming interrupted swaps", spinner="dots") if not a.json else _null():
            results = swap.resume(ctx, progress=(lambda m: None) if a.json else (lambda m: out.print(m)))
        return _report_swaps(results, a.json, empty="no interrupted swap in the journal")
    if not a.guests or not a.to:
        raise ValidationError("give GUEST... --to IMAGE (or --resume)")
    p = swap.plan(ctx, a.guests, a.to, a.strategy, a.batch, a.max_failures)
    if a.dry_run:
        if a.json:
            emit_json(asdict(p))
        else:
            for line in p.describe():
                out.print(line)
        return 0
    with out.status("swapping", spinner="dots") if not a.json else _null() as st:
        def progress(msg: str) -> None:
            if st is not None:
                st.update(msg)
        results = swap.rollout(ctx, p, progress=progress)
    return _report_swaps(results, a.json)


def _report_swaps(results: list[swap.SwapResult], as_json: bool, empty: str = "nothing to do") -> int:
    if as_json:
        emit_json([asdict(r) for r in results])
    elif not results:
        out.print(empty)
    else:
        t = Table("guest", "strategy", "from", "to", "result", "downtime", "counter", "error", title="swap")
        for r in results:
            state = "ok" if r.ok else "rolled back" if r.rolled_back else "skipped" if r.skipped else "FAILED"
            t.add_row(r.guest, r.strategy, f"{r.from_image} ({r.old_version})", r.to_image, state,
                      f"{r.downtime:.2f}s" if r.downtime is not None else "-",
                      f"{r.counter_before} -> {r.counter_after}", r.error or "")
        out.print(t)
    return 0 if all(r.ok for r in results) else SwapError.exit_code


# -- demo ---------------------------------------------------------------------------------------------
def cmd_demo(ctx: Context, a: argparse.Namespace) -> int:
    if a.json:
        rep = demo.run(ctx, keep=a.keep)
        emit_json(demo.as_dict(rep))
        return 0 if rep.ok else 1
    with out.status("osimg demo", spinner="dots") as st:
        def progress(msg: str) -> None:
            out.log(msg)
            st.update(msg)

        rep = demo.run(ctx, keep=a.keep, progress=progress)
    out.print(f"accelerator: {rep.accel}; cluster store: {rep.store}")
    t = Table("guest", "hostname", "OS before", "OS after", "downtime", "counter before", "counter after",
              "overlay", "result", title="rolling warm swap v1 -> v2")
    for g in rep.guests:
        t.add_row(g.guest, g.hostname or "-", g.old_version, g.new_version or "-",
                  f"{g.downtime:.2f}s" if g.downtime is not None else "-", str(g.counter_before),
                  str(g.counter_after), f"{g.overlay_bytes / (1 << 20):.1f} MiB",
                  "ok" if g.ok else (g.error or "FAILED"))
    out.print(t)
    lt = Table("image", "kind", "built from", "OS", "memory state", title="image lineage")
    for i in rep.lineage:
        lt.add_row(i["name"], i["kind"], i["source"], i["os_version"], "yes" if i["memory_state"] else "no")
    out.print(lt)
    out.print("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in rep.phases.items()))
    if rep.kept:
        out.print("--keep: the guests and images are still there ('osimg guest list', 'osimg image list')")
    elif rep.leftovers:
        out.print(f"[red]left behind:[/] {', '.join(rep.leftovers)}")
    else:
        out.print("everything the demo created was removed")
    return 0 if rep.ok else 1


# -- recipe -------------------------------------------------------------------------------------------
def cmd_recipe_build(ctx: Context, a: argparse.Namespace) -> int:
    rows = []
    for ref in a.refs:
        t0 = time.monotonic()
        with out.status(f"building {ref} (cached builds are reused)", spinner="dots") if not a.json else _null():
            b = recipes.ensure_built(ctx.settings, ref)
        rows.append({"ref": ref, "dir": str(b.dir), "seconds": round(time.monotonic() - t0, 2)})
        if not a.json:
            out.print(f"{ref}: {b.dir} ({rows[-1]['seconds']}s)")
    if a.json:
        emit_json(rows)
    return 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


Handler = Callable[[Context, argparse.Namespace], int]


def add(parent: Any, name: str, fn: Handler, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
    """Add a verb whose handler is ``fn(ctx, args) -> exit code``; ``--json`` on by default."""
    sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
    sp.set_defaults(fn=fn)
    if json_flag:
        sp.add_argument("--json", action="store_true", help="machine-readable output")
    return sp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osimg", description="OS image management for libvirt guests")
    p.add_argument("--home", help="state folder (default $OSIMG_HOME or /var/lib/osimg)")
    p.add_argument("--uri", help="libvirt URI (default $OSIMG_URI or qemu:///system)")
    p.add_argument("--store", help="cluster store URL (default sqlite under the home folder)")
    sub = p.add_subparsers(dest="cmd", required=True)


    d = add(sub, "doctor", cmd_doctor, "check the host: versions, accelerator, permissions, disk")
    d.add_argument("--reprobe", action="store_true", help="probe KVM again instead of using the cached result")

    guest = sub.add_parser("guest", help="client guests").add_subparsers(dest="sub", required=True)
    c = add(guest, "create", cmd_guest_create, "create and boot a guest on an overlay of an image")
    c.add_argument("name")
    c.add_argument("--image", required=True, help="catalog image name or recipe FAMILY:VERSION (e.g. tiny:v1)")
    c.add_argument("--memory", type=int, help="MiB (default: the image's)")
    c.add_argument("--vcpus", type=int, default=1)
    c.add_argument("--data-size", type=parse_size, help="data volume size (e.g. 256M; plain number: MiB)")
    c.add_argument("--no-wait", action="store_true", help="return once started, without waiting for SSH")
    ls = add(guest, "list", cmd_guest_list, "list guests")
    ls.add_argument("--all", action="store_true", help="include hidden builder guests")
    s = add(guest, "ssh", cmd_guest_ssh, "run a command in a guest over SSH (pinned host key)", json_flag=False)
    s.add_argument("name")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    s.add_argument("--timeout", type=float, default=60)
    r = add(guest, "rm", cmd_guest_rm, "destroy guests and delete their overlays and volumes")
    r.add_argument("names", nargs="+")
    image = sub.add_parser("image", help="the image repository").add_subparsers(dest="sub", required=True)
    b = add(image, "build", cmd_image_build, "capture a golden image (disk + memory) from a hidden builder guest")
    b.add_argument("name")
    b.add_argument("--from", dest="source", required=True, help="recipe FAMILY:VERSION or an image name")
    b.add_argument("--customize", metavar="FILE", help="YAML build steps: files (path, content, mode), commands")
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

    sw = add(sub, "swap", cmd_swap, "replace the OS of running guests (quiesce, swap, resume; rollback on failure)")
    sw.add_argument("guests", nargs="*", metavar="GUEST")
    sw.add_argument("--to", metavar="IMAGE", help="captured image to swap to")
    sw.add_argument("--strategy", choices=swap.STRATEGIES, default="warm")
    sw.add_argument("--batch", type=int, default=1, help="guests swapped at once")
    sw.add_argument("--max-failures", type=int, default=1, help="stop the rollout after this many failures")
    sw.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    sw.add_argument("--resume", action="store_true", help="finish or roll back swaps an interrupted run left")

    dm = add(sub, "demo", cmd_demo, "run the whole life cycle end to end and report it")
    dm.add_argument("--keep", action="store_true", help="leave the guests and images for inspection")

    recipe = sub.add_parser("recipe", help="guest OS recipes in images/").add_subparsers(dest="sub", required=True)
    rb = add(recipe, "build", cmd_recipe_build, "build recipe images (FAMILY:VERSION), reusing cached builds")
    rb.add_argument("refs", nargs="+", metavar="FAMILY:VERSION")
    for mod in (cli_fleet, cli_vios):
        mod.register(sub, add)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    ctx = Context.from_env(home=a.home, uri=a.uri, store=a.store)
    try:
        return int(a.fn(ctx, a))
    except OsimgError as e:
        err.print(f"osimg: error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("osimg: interrupted")
        return 130
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
