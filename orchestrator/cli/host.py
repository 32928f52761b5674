"""``osimg doctor`` (host checks), ``osimg host ksm`` (the opt-in page merging) and ``osimg demo``
(the whole life cycle end to end)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from .. import demo, doctor, guests, hosts
from ..context import Context
from ..errors import ValidationError
from ..host import ksm
from .common import Table, add, emit_json, out


def register(nouns: dict[str, Any]) -> None:
    d = add(nouns["_top"], "doctor", cmd_doctor, "check the host: versions, accelerator, permissions, disk")
    d.add_argument("--reprobe", action="store_true", help="probe KVM again instead of using the cached result")
    d.add_argument("--fix", action="store_true", help="narrow files and folders under OSIMG_HOME that are "
                   "readable beyond root and QEMU's group")
    k = add(nouns["host"], "ksm", cmd_ksm, "kernel samepage merging of guest memory: on, off (the default) or "
            "status; host-wide, see the README's 'Memory density (KSM)'")
    k.add_argument("action", choices=("on", "off", "status"))
    k.add_argument("--pages-to-scan", type=int, help="on: pages ksmd scans per wake-up (kernel default 100)")
    k.add_argument("--sleep-ms", type=int, help="on: milliseconds ksmd sleeps between scans (kernel default 20)")
    k.add_argument("--keep-merged", action="store_true", help="off: stop ksmd but leave merged pages merged "
                   "(default: give every page its own copy again)")
    ha = add(nouns["host"], "add", cmd_host_add, "register a libvirt host in the cluster store (checks that it "
             "answers); guests and images reach it through libvirt only")
    ha.add_argument("name")
    ha.add_argument("host_uri", metavar="URI", help="its libvirt URI, e.g. qemu+ssh://root@b.example/system")
    ha.add_argument("--root", default=hosts.DEFAULT_ROOT, help="folder on that host for osimg's storage pools "
                    f"(default {hosts.DEFAULT_ROOT})")
    ha.add_argument("--accel", choices=("tcg", "kvm"), default="tcg",
                    help="the accelerator its guests use (default tcg; say kvm for a host with working KVM)")
    add(nouns["host"], "list", cmd_host_list, "the registered hosts, their guests and images")
    hr = add(nouns["host"], "rm", cmd_host_rm, "forget a host (refused while guests live on it); removes its "
             "image pools there")
    hr.add_argument("name")
    dm = add(nouns["_top"], "demo", cmd_demo, "run the whole life cycle end to end and report it")
    dm.add_argument("--keep", action="store_true", help="leave the guests and images for inspection")
    dm.add_argument("--family", choices=demo.FAMILIES, default="tiny",
                    help="guest image family; debian also carries the application's processes (CRIU)")


def cmd_doctor(ctx: Context, a: argparse.Namespace) -> int:
    rep = doctor.run(ctx.settings, ctx.hv, reprobe=a.reprobe, fix=a.fix)
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


def cmd_host_add(ctx: Context, a: argparse.Namespace) -> int:
    h = hosts.add(ctx, a.name, a.host_uri, root=a.root, accel=a.accel)
    if a.json:
        emit_json(asdict(h))
    else:
        out.print(f"host {h.name}: {h.uri} (pools under {h.root}, {h.accel})", markup=False)
    return 0


def cmd_host_list(ctx: Context, a: argparse.Namespace) -> int:
    on: dict[str, list[str]] = {}
    for g in guests.all_guests(ctx, hidden=True):
        on.setdefault(g.host or "local", []).append(g.name)
    rows = [{**asdict(h), "guests": on.get(h.name, []), "images": hosts.shipped(ctx, h.name)}
            for h in hosts.list_hosts(ctx)]
    if a.json:
        emit_json(rows)
        return 0
    t = Table("host", "uri", "accel", "guests", "images", title="hosts (guests without a host run on this one)")
    for r in rows:
        t.add_row(r["name"], r["uri"], r["accel"], ", ".join(r["guests"]) or "-", ", ".join(r["images"]) or "-")
    out.print(t)
    return 0


def cmd_host_rm(ctx: Context, a: argparse.Namespace) -> int:
    hosts.remove(ctx, a.name, [g.name for g in guests.all_guests(ctx, hidden=True) if g.host == a.name])
    if a.json:
        emit_json({"removed": a.name})
    else:
        out.print(f"host {a.name} removed", markup=False)
    return 0


def cmd_ksm(ctx: Context, a: argparse.Namespace) -> int:
    if a.action != "on" and (a.pages_to_scan is not None or a.sleep_ms is not None):
        raise ValidationError(f"--pages-to-scan and --sleep-ms go with 'osimg host ksm on', not {a.action!r}")
    if a.action != "off" and a.keep_merged:
        raise ValidationError(f"--keep-merged goes with 'osimg host ksm off', not {a.action!r}")
    if a.action == "on":
        st = ksm.enable(a.pages_to_scan, a.sleep_ms)
    elif a.action == "off":
        st = ksm.disable(unmerge=not a.keep_merged)
    else:
        st = ksm.status()
    if a.json:
        emit_json({**asdict(st), "state": st.state, "saved_bytes": st.saved_bytes})
        return 0
    out.print(f"KSM {st.state} (host-wide): ksmd scans {st.pages_to_scan} pages every {st.sleep_ms} ms; "
              f"{st.full_scans} full scans; {st.pages_shared} pages shared by {st.pages_sharing} more, "
              f"{st.saved_bytes / (1 << 20):.1f} MiB saved", markup=False)
    return 0


def cmd_demo(ctx: Context, a: argparse.Namespace) -> int:
    if a.json:
        rep = demo.run(ctx, keep=a.keep, family=a.family)
        emit_json(demo.as_dict(rep))
        return 0 if rep.ok else 1
    with out.status("osimg demo", spinner="dots") as st:
        def progress(msg: str) -> None:
            out.log(msg)
            st.update(msg)

        rep = demo.run(ctx, keep=a.keep, progress=progress, family=a.family)
    out.print(f"accelerator: {rep.accel}; cluster store: {rep.store}")
    t = Table("guest", "hostname", "OS before", "OS after", "downtime", "counter before", "counter after",
              "overlay", "result", title="rolling warm swap v1 -> v2")
    for g in rep.guests:
        t.add_row(g.guest, g.hostname or "-", g.old_version, g.new_version or "-",
                  f"{g.downtime:.2f}s" if g.downtime is not None else "-", str(g.counter_before),
                  str(g.counter_after), f"{g.overlay_bytes / (1 << 20):.1f} MiB",
                  "ok" if g.ok else (g.error or "FAILED"))
    out.print(t)
    for g in rep.guests:
        if g.processes:
            out.print(f"{g.guest}: {'; '.join(g.processes)}; the application answered {g.app_before!r} on v1, "
                      f"{g.app_after!r} on v2", markup=False)
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


