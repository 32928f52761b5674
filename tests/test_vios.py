"""VIOS on real QEMU: node daemons with qemu-storage-daemon, guests on virtio-scsi over NBD, failover.

Two node daemons and two tiny client guests are started once for the module; every process and
domain is stopped by PID / name at the end, also after failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import guests, recipes
from orchestrator.cluster.events import ALERT, EventFilter
from orchestrator.context import Context
from orchestrator.errors import ConflictError, OsimgError, StorageError
from orchestrator.host import qemu_img
from orchestrator.settings import private_dir
from orchestrator.vios import attach as att_mod
from orchestrator.vios import clients as vguest
from orchestrator.vios import failover, lus, node

from .conftest import HOME, gname, osimg, osimg_json

pytestmark = pytest.mark.guest

TTL = 2.0


def _kill_pid(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_node(ctx: Context, name: str) -> None:
    """Stop a node daemon; if it does not go, kill its daemon and backend by their recorded PIDs."""
    info = node.get_info(ctx, name)
    if info is None:
        return
    with contextlib.suppress(OsimgError):
        node.stop(ctx, name, timeout=15)
    info = node.get_info(ctx, name)
    if info is not None and node.is_our_daemon(info.pid, name):
        _kill_pid(info.pid)
    if info is not None and info.backend_pid and Path(f"/proc/{info.backend_pid}").exists():
        _kill_pid(info.backend_pid)


@pytest.fixture(scope="module")
def nodes(ctx: Context) -> Iterator[tuple[str, str]]:
    names = (gname("va"), gname("vb"))
    try:
        for n in names:
            t0 = time.monotonic()
            node.start(ctx, n, ttl=TTL)
            print(f"\n[measure] VIOS node {n} ready in {time.monotonic() - t0:.2f}s")
        yield names
    finally:
        for n in names:
            stop_node(ctx, n)


@pytest.fixture(scope="module")
def clients(ctx: Context) -> Iterator[tuple[guests.Guest, guests.Guest]]:
    made: list[guests.Guest] = []
    try:
        t0 = time.monotonic()
        for label in ("c1", "c2"):
            made.append(guests.create(ctx, gname(label), "tiny:v1"))
        for g in made:
            guests.wait_ready(ctx, g)
        print(f"\n[measure] two client guests SSH-ready in {time.monotonic() - t0:.1f}s")
        yield made[0], made[1]
    finally:
        for g in made:
            with contextlib.suppress(OsimgError):
                att_mod.detach_all(ctx, g.name)
            guests.remove(ctx, g.name)


def data_lu(ctx: Context, label: str, size: int = 32 << 20) -> lus.LU:
    d = private_dir(HOME / "lus")
    path = d / f"{label}.qcow2"
    qemu_img.make_ext4_volume(path, size, label, str(uuid.uuid4()))
    return lus.define_lu(ctx, gname(label), path, "data")


def sh(ctx: Context, g: guests.Guest, script: str, timeout: float = 120) -> str:
    with guests.session(ctx, g) as s:
        res = s.script(script, timeout=timeout)
    assert res.rc == 0, f"{script!r}: {res.err or res.out}"
    return res.out


def wait_disk(unit: int) -> str:
    return (f"n=0; until ls /sys/bus/scsi/devices/*:0:0:{unit}/block >/dev/null 2>&1; do "
            f"n=$((n+1)); [ $n -gt 100 ] && exit 9; sleep 0.05; done; D={att_mod.guest_device_path(unit)}\n")


def test_nodes_register_with_ids_local_copy_and_status(ctx: Context, nodes: tuple[str, str]) -> None:
    a, b = nodes
    infos = [node.get_info(ctx, n) for n in nodes]
    assert all(i is not None and i.state == "ready" for i in infos)
    ids = {i.node_id for i in infos if i}
    assert len(ids) == 2 and None not in ids
    local = json.loads((node.folder(ctx, a) / "node.json").read_text())
    assert local["registration"]["node"]["name"] == a
    assert {n["name"] for n in local["registration"]["nodes"]} >= {a}
    st = osimg_json("cluster", "status")
    assert isinstance(st, dict)
    assert {n["name"] for n in st["nodes"]} >= {a, b}
    assert st["primary"] in ids
    rows = osimg_json("vios", "list")
    assert isinstance(rows, list)
    mine = {r["name"]: r for r in rows if r["name"] in nodes}
    assert mine[a]["state"] == "ready" and mine[a]["cluster_state"] == "alive" and mine[a]["kind"] == "service"
    sock = node.folder(ctx, a) / "nbd.sock"
    assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o660  # root and QEMU's group only


def test_guest_keeps_its_data_when_the_serving_vios_is_killed(
    ctx: Context, nodes: tuple[str, str], clients: tuple[guests.Guest, guests.Guest]
) -> None:
    a, b = nodes
    c1 = clients[0]
    lu = data_lu(ctx, "fo")
    ea = lus.export_lu(ctx, lu.name, a)
    eb = lus.export_lu(ctx, lu.name, b)
    assert (ea.status, eb.status) == ("serving", "standby")
    t0 = time.monotonic()
    att = att_mod.attach(ctx, c1.name, lu.name)
    assert att.via == "qmp" and att.tainted and [p.node for p in att.connected()] == [a]
    assert att.client_id == ctx.store.clients()[c1.name]
    assert [r.node for r in ctx.store.reservations(lu.name)] == [lus.alive_nodes(ctx)[a]]
    out = sh(ctx, c1, wait_disk(att.unit) + "mkdir -p /mnt/fo && mount $D /mnt/fo && "
             "echo before-failover >/mnt/fo/a.txt && dd if=/dev/urandom of=/mnt/fo/blob bs=64k count=64 2>/dev/null "
             "&& sync && md5sum /mnt/fo/blob | cut -d' ' -f1 && cat /mnt/fo/a.txt")
    blob_md5, first = out.split()
    print(f"\n[measure] attach + mount + 4 MiB write over NBD in {time.monotonic() - t0:.2f}s")
    assert first == "before-failover"

    sub = ctx.store.subscribe(EventFilter(obj_prefix=f"lu/{lu.name}"))
    info = node.get_info(ctx, a)
    assert info is not None and info.backend_pid
    killed = time.monotonic()
    _kill_pid(info.pid)  # the node's qemu-storage-daemon dies with it (PDEATHSIG)
    # the guest writes while its VIOS is gone; the write completes once the other node took over
    out = sh(ctx, c1, "echo during-outage >/mnt/fo/b.txt && sync && cat /mnt/fo/b.txt", timeout=120)
    took = time.monotonic() - killed
    assert out.strip() == "during-outage"
    ev = sub.get(timeout=30)
    while ev is not None and ev.type != "failed-over":
        ev = sub.get(timeout=30)
    sub.close()
    assert ev is not None and ev.data["dead"] == [a] and ev.data["nodes"] == [b]
    print(f"[measure] VIOS {a} killed -> guest write done on {b} after {took:.2f}s "
          f"(lease ttl {TTL}s, reconnect-delay {att_mod.RECONNECT_DELAY}s)")
    for _ in range(100):
        if not Path(f"/proc/{info.backend_pid}").exists():
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{info.backend_pid}").exists(), "the storage daemon outlived its node"
    assert ctx.hv.state(c1.name) == "running"
    out = sh(ctx, c1, "echo 3 >/proc/sys/vm/drop_caches; cat /mnt/fo/a.txt /mnt/fo/b.txt; "
             "md5sum /mnt/fo/blob | cut -d' ' -f1; echo after >/mnt/fo/c.txt && sync && umount /mnt/fo && echo ok")
    assert out.split() == ["before-failover", "during-outage", blob_md5, "ok"]
    now = att_mod.get(ctx, c1.name, lu.name)
    assert now is not None and [p.node for p in now.connected()] == [b] and now.failovers == 1
    assert [r.node for r in ctx.store.reservations(lu.name)] == [lus.alive_nodes(ctx)[b]]
    att_mod.detach(ctx, c1.name, lu.name)
    assert ctx.store.reservations(lu.name) == []
    # the old node comes back: it rejoins and serves its export as a standby again
    node.start(ctx, a, ttl=TTL)
    assert lus.wait_export(ctx, lus.export_name(a, lu.name)).status in ("standby", "serving")
    qemu_img.check(lu.path)


def test_two_writers_exactly_one_wins(
    ctx: Context, nodes: tuple[str, str], clients: tuple[guests.Guest, guests.Guest]
) -> None:
    a, b = nodes
    lu = data_lu(ctx, "w2")
    lus.export_lu(ctx, lu.name, b)
    lus.export_lu(ctx, lu.name, a)
    sub = ctx.store.subscribe(EventFilter(kinds=(ALERT,), obj_prefix=f"lu/{lu.name}"))
    results: dict[str, object] = {}

    def go(g: guests.Guest) -> None:
        try:
            results[g.name] = att_mod.attach(ctx, g.name, lu.name)
        except ConflictError as err:
            results[g.name] = err

    threads = [threading.Thread(target=go, args=(g,)) for g in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for n, r in results.items() if isinstance(r, att_mod.Attachment)]
    lost = [r for r in results.values() if isinstance(r, ConflictError)]
    assert len(won) == 1 and len(lost) == 1, results
    winner = won[0]
    loser = next(g for g in clients if g.name != winner)
    assert winner in str(lost[0]) and "exclusive" in str(lost[0])
    ev = sub.get(timeout=5)
    assert ev is not None and ev.type == "reservation-conflict"
    sub.close()
    # a second writer through the other node is refused too, naming the holder node and client
    with pytest.raises(ConflictError, match=f"node {lus.alive_nodes(ctx)[b]} \\({b}\\) for client {winner}"):
        att_mod.attach(ctx, loser.name, lu.name, nodes=[a])
    assert att_mod.get(ctx, loser.name, lu.name) is None
    att_mod.detach(ctx, winner, lu.name)
    att_mod.attach(ctx, loser.name, lu.name)
    att_mod.detach(ctx, loser.name, lu.name)
    assert ctx.store.reservations(lu.name) == []


def test_base_image_is_shared_read_only_by_two_guests_on_libvirt_disks(
    ctx: Context, nodes: tuple[str, str], clients: tuple[guests.Guest, guests.Guest]
) -> None:
    a, _ = nodes
    base = Path(clients[0].base)
    lu = lus.define_lu(ctx, gname("base"), base, "base")
    assert lu.readonly
    lus.export_lu(ctx, lu.name, a)
    for g in clients:
        att = att_mod.attach(ctx, g.name, lu.name)
        assert att.via == "libvirt" and not att.tainted
        out = sh(ctx, g, wait_disk(att.unit) + "mkdir -p /mnt/b && mount -o ro $D /mnt/b && "
                 "cat /mnt/b/etc/osimg-version && umount /mnt/b && "
                 "(dd if=/dev/zero of=$D bs=512 count=1 conv=fsync 2>/dev/null && echo writable"
                 " || echo refused)")
        assert out.split() == ["v1", "refused"]
    assert sorted(r.mode for r in ctx.store.reservations(lu.name)) == ["shared-read", "shared-read"]
    st = osimg_json("cluster", "status")
    assert isinstance(st, dict)
    assert {x["guest"] for x in st["attachments"] if x["lu"] == lu.name} == {g.name for g in clients}
    for g in clients:
        att_mod.detach(ctx, g.name, lu.name)
    assert ctx.store.reservations(lu.name) == []


def test_rejoin_drops_exports_deleted_while_the_node_was_down(ctx: Context, nodes: tuple[str, str]) -> None:
    a, _ = nodes
    keep, gone = data_lu(ctx, "rk", 8 << 20), data_lu(ctx, "rg", 8 << 20)
    for lu in (keep, gone):
        lus.export_lu(ctx, lu.name, a)
    local = json.loads((node.folder(ctx, a) / "node.json").read_text())
    assert lus.export_name(a, gone.name) in local["devices"]["export"]
    info = node.get_info(ctx, a)
    assert info is not None
    _kill_pid(info.pid)  # down without a goodbye
    lus.delete_lu(ctx, gone.name)
    time.sleep(TTL + 0.5)  # its lease must lapse before the same node may register again
    node.start(ctx, a, ttl=TTL)
    info = node.get_info(ctx, a)
    assert info is not None and info.removed_on_rejoin == [f"export/{lus.export_name(a, gone.name)}"]
    local = json.loads((node.folder(ctx, a) / "node.json").read_text())
    assert set(local["devices"]["export"]) >= {lus.export_name(a, keep.name)}
    assert lus.export_name(a, gone.name) not in local["devices"]["export"]
    assert lus.wait_export(ctx, lus.export_name(a, keep.name)).status == "serving"


def test_cli_vios_start_stop_and_errors(ctx: Context) -> None:
    name = gname("vc")
    try:
        res = osimg("vios", "start", name, "--ttl", "2", "--json")
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert info["state"] == "ready" and info["kind"] == "service"
        again = osimg("vios", "start", name)
        assert again.returncode == ConflictError.exit_code and "already running" in again.stderr
        assert osimg("vios", "stop", name).returncode == 0
        rows = osimg_json("vios", "list")
        assert isinstance(rows, list)
        assert next(r for r in rows if r["name"] == name)["state"] == "stopped"
    finally:
        stop_node(ctx, name)
    bad = osimg("vios", "start", "../x")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    missing = osimg("vios", "stop", gname("ghost"))
    assert missing.returncode == 3 and "no VIOS node" in missing.stderr


def test_failover_check_is_a_no_op_when_all_paths_live(
    ctx: Context, nodes: tuple[str, str], clients: tuple[guests.Guest, guests.Guest]
) -> None:
    a, b = nodes
    c2 = clients[1]
    lu = data_lu(ctx, "nop")
    lus.export_lu(ctx, lu.name, a)
    lus.export_lu(ctx, lu.name, b, standby=True)
    att = att_mod.attach(ctx, c2.name, lu.name)
    try:
        assert att.via == "qmp" and [p.node for p in att.connected()] == [a]
        assert set(lus.alive_nodes(ctx)) >= {a, b}
        assert failover.dead_paths(ctx, att, lus.alive_nodes(ctx)) == []
        live = [x for x in att_mod.list_attachments(ctx) if x.via == "qmp" and ctx.hv.is_active(x.guest)]
        assert att.name in [x.name for x in live], "the check must have a live attachment to look at"
        before = att_mod.get(ctx, c2.name, lu.name)
        assert failover.check(ctx) == []
        after = att_mod.get(ctx, c2.name, lu.name)
        assert after is not None and before is not None
        assert after.failovers == 0 and after.paths == before.paths and after.next_child == before.next_child
        out = sh(ctx, c2, wait_disk(att.unit) + "mkdir -p /mnt/nop && mount $D /mnt/nop && echo still >/mnt/nop/x "
                 "&& sync && cat /mnt/nop/x && umount /mnt/nop")
        assert out.strip() == "still"
    finally:
        att_mod.detach(ctx, c2.name, lu.name)


def test_a_failed_export_raises_the_export_failed_alert(ctx: Context, nodes: tuple[str, str]) -> None:
    a, _ = nodes
    lu = data_lu(ctx, "ef", 8 << 20)
    Path(lu.path).unlink()  # the node cannot open the LU's file: its export fails
    sub = ctx.store.subscribe(EventFilter(kinds=(ALERT,), obj_prefix=f"export/{lus.export_name(a, lu.name)}"))
    try:
        with pytest.raises(StorageError, match=f"node {a} could not serve LU {lu.name}"):
            lus.export_lu(ctx, lu.name, a)
        ev = sub.get(timeout=10)
    finally:
        sub.close()
    assert ev is not None and ev.type == "export-failed" and ev.kind == ALERT, ev
    assert ev.obj == f"export/{lus.export_name(a, lu.name)}" and ev.data["error"]
    exp = lus.get_export(ctx, lus.export_name(a, lu.name))
    assert exp is not None and exp.status == "failed"
    lus.unexport(ctx, lu.name, a)


# -- issue 9: VIOS guests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vios_guests(ctx: Context) -> Iterator[tuple[str, str]]:
    """A redundant pair of VIOS guests, each behind its own node daemon."""

    names = (gname("vg1"), gname("vg2"))
    errors: list[BaseException] = []

    def up(n: str) -> None:
        try:
            node.start(ctx, n, as_guest=True, ttl=3.0, slots=2, timeout=300)
        except BaseException as err:
            errors.append(err)

    try:
        t0 = time.monotonic()
        threads = [threading.Thread(target=up, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        print(f"\n[measure] two VIOS guests serving in {time.monotonic() - t0:.1f}s")
        base = lus.define_lu(ctx, gname("gbase"), recipes.ensure_built(ctx.settings, "tiny:v1").disk, "base")
        for n in names:
            exp = lus.export_lu(ctx, base.name, n, wait=120)
            assert exp.port and not exp.socket
        yield names
    finally:
        for n in names:
            stop_node(ctx, n)
            info = node.get_info(ctx, n)
            if info is not None and info.domain:
                ctx.hv.undefine(info.domain)


def test_vios_guest_export_is_reached_over_tls_on_a_loopback_port(
    ctx: Context, vios_guests: tuple[str, str], clients: tuple[guests.Guest, guests.Guest]
) -> None:
    """The export travels over TCP (127.0.0.1 forward), so it needs the node's TLS key: libvirt 9.0
    cannot give an NBD disk a PSK, hence a QMP attachment whose nbd node names the key's object."""
    c1 = clients[0]
    base = gname("gbase")
    with pytest.raises(OsimgError, match="TLS"):
        att_mod.attach(ctx, c1.name, base, nodes=[vios_guests[1]], via="libvirt")
    att = att_mod.attach(ctx, c1.name, base, nodes=[vios_guests[1]])
    exp = lus.get_export(ctx, lus.export_name(vios_guests[1], base))
    assert exp is not None and exp.port and exp.tls
    assert att.via == "qmp" and att.paths[0].tls == exp.tls
    out = sh(ctx, c1, wait_disk(att.unit) + "mkdir -p /mnt/g && mount -o ro $D /mnt/g && "
             "cat /mnt/g/etc/osimg-version && umount /mnt/g")
    assert out.strip() == "v1"
    att_mod.detach(ctx, c1.name, base)


def test_client_boots_from_vios_guest_and_survives_losing_one_of_the_pair(
    ctx: Context, vios_guests: tuple[str, str]
) -> None:
    vg1, vg2 = vios_guests
    name = gname("nb")
    try:
        t0 = time.monotonic()
        g, _ = vguest.create_client(ctx, name, "tiny:v1", gname("gbase"), nodes=[vg1, vg2])
        ready = guests.wait_ready(ctx, g, timeout=300)
        print(f"\n[measure] client booted its OS over NBD from VIOS guests, SSH-ready in {ready:.1f}s "
              f"({time.monotonic() - t0:.1f}s with create)")
        out = sh(ctx, g, "cat /etc/osimg-version; awk '$2==\"/\"{print $1}' /proc/mounts; "
                 "echo mine >/root/mark && dd if=/dev/urandom of=/root/blob bs=64k count=32 2>/dev/null && sync && "
                 "md5sum /root/blob | cut -d' ' -f1")
        version, root, blob_md5 = out.split()
        assert version == "v1" and root == "/dev/sda"
        overlay = g.overlay(ctx)
        assert qemu_img.allocated_bytes(overlay) > 2 << 20  # the writes went to the client's own overlay
        sub = ctx.store.subscribe(EventFilter(obj_prefix=f"lu/{gname('gbase')}"))
        info = node.get_info(ctx, vg1)
        assert info is not None and info.domain
        killed = time.monotonic()
        _kill_pid(info.pid)
        ctx.hv.destroy(info.domain)  # the VIOS guest dies with its node
        # everything the client reads from the base now comes from the second VIOS guest
        out = sh(ctx, g, "echo 3 >/proc/sys/vm/drop_caches; md5sum /bin/busybox /usr/sbin/dropbear >/dev/null && "
                 "cat /root/mark && md5sum /root/blob | cut -d' ' -f1 && echo after >/root/mark2 && sync && echo ok")
        took = time.monotonic() - killed
        assert out.split() == ["mine", blob_md5, "ok"]
        ev = sub.get(timeout=60)
        while ev is not None and ev.type != "failed-over":
            ev = sub.get(timeout=60)
        sub.close()
        assert ev is not None and ev.data["dead"] == [vg1] and ev.data["nodes"] == [vg2]
        print(f"[measure] VIOS guest {vg1} killed -> client read its base from {vg2}, "
              f"data intact, after {took:.2f}s")
        assert ctx.hv.state(name) == "running"
        now = att_mod.get(ctx, name, gname("gbase"))
        assert now is not None and [p.node for p in now.connected()] == [vg2]
    finally:
        with contextlib.suppress(OsimgError):
            vguest.remove_client(ctx, name)
