"""``osimg vios ...`` (VIOS nodes, LUs, exports, attachments) and ``osimg cluster status``."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from ..context import Context
from ..vios import attach as attach_mod
from ..vios import failover as failover_mod
from ..vios import lus, node
from .common import Table, add, emit_json, out, status


def cmd_vios_start(ctx: Context, a: argparse.Namespace) -> int:
    what = "VIOS guest" if a.as_guest else "VIOS node"
    with status(a, f"starting {what} {a.name}"):
        info = node.start(ctx, a.name, as_guest=a.as_guest, ttl=a.ttl, slots=a.slots)
    if a.json:
        emit_json(asdict(info))
    else:
        extra = f", domain {info.domain}" if info.domain else ""
        out.print(f"{what} {a.name} ready: node {info.node_id}, daemon pid {info.pid}, "
                  f"backend pid {info.backend_pid}{extra}")
    return 0


def cmd_vios_stop(ctx: Context, a: argparse.Namespace) -> int:
    was = node.stop(ctx, a.name)
    if a.json:
        emit_json({"name": a.name, "stopped": was})
    else:
        out.print(f"VIOS node {a.name} {'stopped' if was else 'was not running'}")
    return 0


def cmd_vios_list(ctx: Context, a: argparse.Namespace) -> int:
    rows = node.list_nodes(ctx)
    if a.json:
        emit_json(rows)
        return 0
    t = Table("name", "kind", "node", "state", "cluster", "primary", "pid", "backend", "exports", title="VIOS nodes")
    for r in rows:
        t.add_row(r["name"], r["kind"], str(r["node_id"]), r["state"], r["cluster_state"],
                  "yes" if r["primary"] else "", str(r["pid"]), str(r["backend_pid"]), ", ".join(r["exports"]) or "-")
    out.print(t)
    return 0


def cmd_lu_add(ctx: Context, a: argparse.Namespace) -> int:
    lu = lus.define_lu(ctx, a.name, a.path, a.role, readonly=a.readonly, fmt=a.format)
    mode = "ro" if lu.readonly else "rw"
    emit_json(asdict(lu)) if a.json else out.print(f"LU {lu.name}: {lu.path} ({lu.role}, {mode})")
    return 0


def cmd_lu_rm(ctx: Context, a: argparse.Namespace) -> int:
    lus.delete_lu(ctx, a.name)
    emit_json({"deleted": a.name}) if a.json else out.print(f"LU {a.name} deleted")
    return 0


def cmd_export(ctx: Context, a: argparse.Namespace) -> int:
    exp = lus.export_lu(ctx, a.lu, a.node, standby=True if a.standby else None)
    if a.json:
        emit_json(asdict(exp))
    else:
        where = exp.socket or (f"127.0.0.1:{exp.port}" if exp.port else "-")
        out.print(f"LU {exp.lu} on node {exp.node}: {exp.status} ({where})")
    return 0


def cmd_unexport(ctx: Context, a: argparse.Namespace) -> int:
    lus.unexport(ctx, a.lu, a.node)
    emit_json({"unexported": a.lu, "node": a.node}) if a.json else out.print(f"node {a.node} no longer exports {a.lu}")
    return 0


def _att_row(att: attach_mod.Attachment) -> dict[str, Any]:
    return {"guest": att.guest, "lu": att.lu, "client_id": att.client_id, "adapter_id": att.adapter_id,
            "scsi_lun": att.unit, "mode": att.mode, "via": att.via,
            "nodes": [p.node for p in att.connected()], "standby": [p.node for p in att.paths if not p.connected],
            "failovers": att.failovers, "tainted": attach_mod.TAINT if att.tainted else None}


def cmd_attach(ctx: Context, a: argparse.Namespace) -> int:
    att = attach_mod.attach(ctx, a.guest, a.lu, nodes=a.node or None, via=a.via)
    row = _att_row(att)
    if a.json:
        emit_json(row)
    else:
        out.print(f"LU {att.lu} attached to {att.guest} as SCSI LUN {att.unit} through {', '.join(row['nodes'])} "
                  f"(client {att.client_id}, adapter {att.adapter_id}, {att.mode})")
    return 0


def cmd_detach(ctx: Context, a: argparse.Namespace) -> int:
    attach_mod.detach(ctx, a.guest, a.lu)
    emit_json({"detached": a.lu, "guest": a.guest}) if a.json else out.print(f"LU {a.lu} detached from {a.guest}")
    return 0


def cmd_failover(ctx: Context, a: argparse.Namespace) -> int:
    att = failover_mod.failover(ctx, a.guest, a.lu)
    emit_json(_att_row(att)) if a.json else out.print(f"{att.guest}/{att.lu} now through "
                                                 f"{', '.join(p.node for p in att.connected())}")
    return 0


def cluster_status(ctx: Context) -> dict[str, Any]:
    st = ctx.store.status()
    st["lus"] = [asdict(lu) for lu in lus.list_lus(ctx)]
    st["exports"] = [asdict(e) for e in lus.exports_of(ctx)]
    st["attachments"] = [_att_row(x) for x in attach_mod.list_attachments(ctx)]
    st["vios"] = node.list_nodes(ctx)
    return st


def cmd_cluster_status(ctx: Context, a: argparse.Namespace) -> int:
    st = cluster_status(ctx)
    if a.json:
        emit_json(st)
        return 0
    out.print(f"[bold]store[/]: {st['store']}   [bold]primary[/]: node {st['primary']}")
    t = Table("id", "name", "state", "address", "ttl", title="nodes")
    for n in st["nodes"]:
        t.add_row(str(n["id"]), n["name"], n["state"], n["address"], f"{n['ttl']:g}s")
    out.print(t)
    t = Table("LU", "role", "mode", "exports", "reservations", title="LUs")
    for lu in st["lus"]:
        exps = ", ".join(f"{e['node']}:{e['status']}" for e in st["exports"] if e["lu"] == lu["name"])
        res = ", ".join(f"{r['client']}@{r['node']} {r['mode']}" for r in st["reservations"] if r["lu"] == lu["name"])
        t.add_row(lu["name"], lu["role"], "ro" if lu["readonly"] else "rw", exps or "-", res or "-")
    out.print(t)
    t = Table("guest", "client", "LU", "adapter/LUN", "via", "nodes", "tainted", title="attachments")
    for x in st["attachments"]:
        t.add_row(x["guest"], str(x["client_id"]), x["lu"], str(x["adapter_id"]), x["via"], ", ".join(x["nodes"]),
                  "yes (custom-monitor)" if x["tainted"] else "no")
    out.print(t)
    return 0


def register(nouns: dict[str, Any]) -> None:
    vios = nouns["vios"]
    s = add(vios, "start", cmd_vios_start, "start a VIOS node daemon (host service, or a VIOS guest)")
    s.add_argument("name")
    s.add_argument("--as-guest", action="store_true", help="serve from a VIOS guest domain instead of the host")
    s.add_argument("--ttl", type=float, default=node.DEFAULT_TTL, help="lease seconds (default %(default)s)")
    s.add_argument("--slots", type=int, default=4, help="VIOS guest: NBD port forwards (exports) (default 4)")
    add(vios, "stop", cmd_vios_stop, "stop a VIOS node (by its PID) and leave the cluster").add_argument("name")
    add(vios, "list", cmd_vios_list, "list VIOS nodes, their processes and exports")
    lu = vios.add_parser("lu", help="logical units").add_subparsers(dest="lu_sub", required=True)
    la = add(lu, "add", cmd_lu_add, "record a disk file as an LU")
    la.add_argument("name")
    la.add_argument("path")
    la.add_argument("--role", choices=lus.ROLES, default="data")
    la.add_argument("--readonly", action="store_true")
    la.add_argument("--format", choices=lus.FORMATS, default=None,
                    help="the file's format (default: qcow2 for *.qcow2, else raw; never probed)")
    add(lu, "rm", cmd_lu_rm, "delete an LU and its exports (refused while attached)").add_argument("name")
    for verb, fn, what in (("export", cmd_export, "serve an LU from a node"),
                           ("unexport", cmd_unexport, "stop serving an LU from a node")):
        e = add(vios, verb, fn, what)
        e.add_argument("lu")
        e.add_argument("node")
        if verb == "export":
            e.add_argument("--standby", action="store_true", help="writable LU: open only at failover")
    at = add(vios, "attach", cmd_attach, "attach an LU to a running guest as a virtio-scsi disk")
    at.add_argument("guest")
    at.add_argument("lu")
    at.add_argument("--node", action="append", help="use this node (repeat for a redundant pair, first serves)")
    at.add_argument("--via", choices=("qmp", "libvirt"), help="default: qmp with a second node, else libvirt")
    for verb, fn, what in (("detach", cmd_detach, "detach an LU from a guest and end its reservation"),
                           ("failover", cmd_failover, "re-point a guest's LU away from dead VIOS nodes now")):
        d = add(vios, verb, fn, what)
        d.add_argument("guest")
        d.add_argument("lu")
    cluster = nouns["cluster"]
    add(cluster, "status", cmd_cluster_status, "nodes, primary, clients, adapters, LUs, reservations, attachments")
