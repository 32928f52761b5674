"""``osimg guest create|list|ssh|rm|resize|rotate-key``: one guest at a time."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import guests
from ..context import Context
from ..customize import Carry, Customization, Quiesce
from ..errors import ValidationError
from ..validate import short
from .common import Table, add, emit_json, mib, out, remove_each, size_arg, status


def register(nouns: dict[str, Any]) -> None:
    guest = nouns["guest"]
    c = add(guest, "create", cmd_guest_create, "create and boot a guest on an overlay of an image")
    c.add_argument("name")
    c.add_argument("--image", required=True, help="catalog image name or recipe FAMILY:VERSION (e.g. tiny:v1)")
    c.add_argument("--memory", type=int, help="MiB (default: the image's)")
    c.add_argument("--vcpus", type=int, default=1)
    c.add_argument("--data-size", type=size_arg, help="data volume size (e.g. 256M; plain number: MiB)")
    c.add_argument("--no-wait", action="store_true", help="return once started, without waiting for SSH")
    c.add_argument("--quiesce-stop", metavar="CMD", help="shell command in the guest that stops its workload "
                   "before a swap (besides the image's application)")
    c.add_argument("--quiesce-start", metavar="CMD", help="shell command that starts the workload again after a "
                   "swap or rollback (must be harmless when it already runs)")
    c.add_argument("--quiesce-grace", metavar="DURATION", default="10s",
                   help="how long the workload may keep /data busy before it is killed (default 10s)")
    c.add_argument("--carry", metavar="NAME=PIDFILE", action="append",
                   help="a process tree a warm swap carries (CRIU) instead of restarting; repeatable "
                   "(default: the image's demo application)")
    c.add_argument("--no-carry", action="store_true", help="carry no process across a warm swap: restart them")
    c.add_argument("--host", help="a registered host to create it on ('osimg host list'; default: this one)")
    ls = add(guest, "list", cmd_guest_list, "list guests")
    ls.add_argument("--all", action="store_true", help="include hidden builder guests")
    s = add(guest, "ssh", cmd_guest_ssh, "run a command in a guest over SSH (pinned host key)", json_flag=False)
    s.add_argument("name")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    s.add_argument("--timeout", type=float, default=60)
    r = add(guest, "rm", cmd_guest_rm, "destroy guests and delete their overlays and volumes")
    r.add_argument("names", nargs="+")
    r = add(guest, "resize", cmd_guest_resize, "grow a guest's OS overlay or data volume (running or stopped)")
    r.add_argument("name")
    r.add_argument("--disk", choices=sorted(guests.DISK_TARGETS), required=True, help="which disk")
    r.add_argument("--size", type=size_arg, required=True, help="new size, e.g. 20G (shrinking is refused)")
    k = add(guest, "rotate-key", cmd_guest_rotate_key, "give a running guest a new SSH host key and pin it")
    k.add_argument("name")


# -- guest --------------------------------------------------------------------------------------------
def cmd_guest_create(ctx: Context, a: argparse.Namespace) -> int:
    quiesce = Quiesce(stop=a.quiesce_stop, start=a.quiesce_start, grace=a.quiesce_grace).validate(f"guest {a.name}")
    if a.no_carry and a.carry:
        raise ValidationError("give --carry or --no-carry, not both")
    carry: list[dict[str, str]] | None = [] if a.no_carry else None
    for item in a.carry or []:
        tree, eq, pidfile = item.partition("=")
        if not eq:
            raise ValidationError(f"--carry {short(item)}: expected NAME=PIDFILE, e.g. app=/run/app.pid")
        carry = [*(carry or []), {"name": tree, "pidfile": pidfile}]
    custom = Customization(quiesce=quiesce, carry=Carry.from_value(carry, f"guest {a.name}"))
    custom.validate(f"guest {a.name}")
    with status(a, f"creating {a.name} from {a.image}"):
        g = guests.create(ctx, a.name, a.image, custom=custom, memory_mib=a.memory,
                          vcpus=a.vcpus, data_size=a.data_size or 0, host=a.host)
        ready = guests.wait_ready(ctx, g) if not a.no_wait else None
    info = {"name": g.name, "host": g.host, "image": g.image, "os_version": g.os_version, "accel": g.accel,
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
    rows = [{"name": g.name, "host": g.host or "local", "image": g.image, "os_version": g.os_version,
             "state": guests.status(ctx, g), "accel": g.accel, "ssh_port": g.ssh_port,
             "app_port": g.app_port, "hidden": g.hidden}
            for g in guests.all_guests(ctx, hidden=a.all)]
    rows += [{"name": name, "host": "?", "image": "?", "os_version": "?", "state": "broken", "accel": "?",
              "ssh_port": None, "app_port": None, "hidden": False, "error": why}
             for name, why in guests.broken_guests(ctx).items()]
    if a.json:
        emit_json(rows)
        return 0
    t = Table("name", "host", "image", "os", "state", "accel", "ssh", "app",
              title="guests (add --all for hidden builders)")
    for r in rows:
        t.add_row(*(str(r[k]) for k in ("name", "host", "image", "os_version", "state", "accel", "ssh_port",
                                        "app_port")))
    out.print(t)
    for r in rows:
        if r.get("error"):
            out.print(f"{r['name']}: {r['error']}", markup=False)
    return 0


def cmd_guest_ssh(ctx: Context, a: argparse.Namespace) -> int:
    g = guests.load(ctx, a.name)
    argv = [x for x in a.command if x != "--"] or ["cat", "/etc/os-release"]
    with guests.session(ctx, g, timeout=a.timeout) as s:
        res = s.run(argv, timeout=a.timeout)
    sys.stdout.write(res.out)
    sys.stderr.write(res.err)
    return res.rc


def cmd_guest_rm(ctx: Context, a: argparse.Namespace) -> int:
    return remove_each(a, "guest", lambda n: guests.remove(ctx, n))


def cmd_guest_resize(ctx: Context, a: argparse.Namespace) -> int:
    live = guests.status(ctx, guests.load(ctx, a.name)) in ("running", "paused")
    old, new = guests.resize(ctx, a.name, a.disk, a.size)
    if a.json:
        emit_json({"name": a.name, "disk": a.disk, "old_bytes": old, "new_bytes": new, "changed": new != old,
                   "live": live})
    elif new == old:
        out.print(f"the {a.disk} disk of {a.name} is already {mib(new)}; nothing to do")
    else:
        how = "live, the guest sees it now" if live else "offline, the guest sees it at its next start"
        out.print(f"grew the {a.disk} disk of {a.name} from {mib(old)} to {mib(new)} ({how})")
    return 0




def cmd_guest_rotate_key(ctx: Context, a: argparse.Namespace) -> int:
    pub = guests.rotate_host_key(ctx, a.name)
    if a.json:
        emit_json({"name": a.name, "host_key": pub})
    else:
        out.print(f"guest {a.name} presents a new host key, now pinned: {pub}")
    return 0
