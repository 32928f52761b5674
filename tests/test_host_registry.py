"""Hosts without QEMU: the registry in the store, spec ``hosts:``, placement and per-host batches, on
libvirt's test:///default driver (it has pools and free memory, but no volume upload: the upload,
the hash check and guests on a second host are proven by tests/test_hosts.py with real daemons)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator import guests, hosts, swap
from orchestrator.context import Context
from orchestrator.errors import ConflictError, NotFoundError, StorageError, ValidationError
from orchestrator.fleet import reconcile
from orchestrator.fleet import spec as fleetspec
from orchestrator.swap.plan import batches

TEST_URI = "test:///default"


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    c = Context.from_env(home=str(tmp_path / "home"), uri=TEST_URI, store=f"sqlite://{tmp_path / 'store.sqlite'}")
    yield c
    c.close()


def test_hosts_are_kept_in_the_store_and_checked_as_data(ctx: Context) -> None:
    h = hosts.add(ctx, "b", TEST_URI, root="/srv/osimg")
    assert hosts.add(ctx, "b", TEST_URI, root="/srv/osimg") == h  # the same settings again: no change
    with pytest.raises(ConflictError, match="host b is registered"):
        hosts.add(ctx, "b", TEST_URI, root="/elsewhere")
    assert [x.name for x in hosts.list_hosts(ctx)] == ["b"]
    assert hosts.context(ctx, "b").hv.uri == TEST_URI
    assert hosts.context(ctx, None) is ctx
    # a record edited in the store is data: a root with '..' is refused before any use
    ctx.store.put(hosts.KIND, "evil", {"name": "evil", "uri": TEST_URI, "root": "/var/../etc"})
    with pytest.raises(StorageError, match="host record 'evil' is broken"):
        hosts.get(ctx, "evil")
    assert [x.name for x in hosts.list_hosts(ctx)] == ["b"]  # a broken one does not hide the others
    hosts.remove(ctx, "b", [])
    with pytest.raises(NotFoundError, match="no host named 'b'"):
        hosts.get(ctx, "b")


def test_removing_a_guest_of_another_host_leaves_a_domain_of_its_name_here(ctx: Context, tmp_path: Path) -> None:
    """A guest on host b is removed there, and the removal is whole; this host's domain of the same
    name (another home's, say) is not touched (osimg's destroy refused it, so the removal stopped
    half-way: domain and pool on b gone, the record left). Host b is a test driver of its own (a node
    file), this host test:///default."""
    node = tmp_path / "node.xml"
    node.write_text("<node><cpu><mhz>2000</mhz></cpu><memory>8388608</memory></node>\n")
    hosts.add(ctx, "b", f"test://{node}")
    assert ctx.hv.exists("test")  # the test driver's own domain, here
    none = ctx.settings.home / "images" / "none"
    rec = {"name": "test", "image": "tiny:v1", "base": f"{none}/disk.qcow2", "kernel": f"{none}/vmlinuz",
           "initrd": f"{none}/initrd.img",
           "cmdline": "", "host_key": "ssh-ed25519 AAAA", "os_version": "v1", "family": "tiny", "memory_mib": 256,
           "vcpus": 1, "accel": "qemu", "uuid": "0b3c3c1e-9d55-4d1d-8a8e-6b0f0e0f0e0f", "mac": "52:54:00:12:34:56",
           "ssh_port": 1, "app_port": 2, "guest_app_port": 8080, "ready_marker": "OSIMG-READY", "host": "b"}
    ctx.settings.ensure_dirs()
    (ctx.settings.guests_dir / "test").mkdir()
    (ctx.settings.guests_dir / "test" / "guest.json").write_text(json.dumps(rec))
    assert guests.load(ctx, "test").host == "b"
    guests.remove(ctx, "test")
    assert not (ctx.settings.guests_dir / "test").exists()
    assert ctx.hv.exists("test") and ctx.hv.is_active("test"), "a domain of this host was removed"


def test_a_host_with_guests_is_not_removed(ctx: Context) -> None:
    hosts.add(ctx, "b", TEST_URI)
    with pytest.raises(ConflictError, match="still runs guests 'g1'"):
        hosts.remove(ctx, "b", ["g1"])
    assert hosts.get(ctx, "b").name == "b"


def test_files_of_a_home_on_a_host_are_apart_from_other_homes(ctx: Context, tmp_path: Path) -> None:
    other = Context.from_env(home=str(tmp_path / "other"), uri=TEST_URI, store=f"sqlite://{tmp_path / 's2'}")
    try:
        assert hosts.home_id(ctx) != hosts.home_id(other)
        assert hosts.pool_name(ctx, "g", "web1") != hosts.pool_name(other, "g", "web1")
    finally:
        other.close()
    h = hosts.add(ctx, "b", TEST_URI, root="/srv/osimg")
    assert hosts.folder(ctx, h, "g", "web1") == f"/srv/osimg/osimg-{hosts.home_id(ctx)}-g-web1"
    local = str(ctx.settings.images_dir / "v1" / "disk.qcow2")
    assert hosts.image_path(ctx, None, local) == local
    assert hosts.image_path(ctx, "b", local) == f"/srv/osimg/osimg-{hosts.home_id(ctx)}-i-v1/disk.qcow2"
    with pytest.raises(StorageError, match="not a catalog image's file"):
        hosts.image_path(ctx, "b", "/etc/shadow")


def test_a_pool_is_made_once_and_removed_with_its_volumes(ctx: Context, tmp_path: Path) -> None:
    hv = ctx.hv
    name = f"osimgt-{hosts.home_id(ctx)}"
    hv.pool_ensure(name, str(tmp_path / "pool"), None)
    hv.pool_ensure(name, str(tmp_path / "pool"), None)  # there already: no error
    assert hv.pool_path(name) == str(tmp_path / "pool")
    hv.vol_create(name, "os.qcow2", 1 << 20, "qcow2")
    assert hv.vol_size(name, "os.qcow2") == 1 << 20 and hv.vol_size(name, "nope") is None
    hv.vol_delete(name, "os.qcow2")
    hv.vol_delete(name, "os.qcow2")  # gone already: no error
    hv.pool_remove(name)
    hv.pool_remove(name)
    with pytest.raises(Exception, match="pool"):
        hv.pool_path(name)


def test_batches_keep_at_most_k_guests_of_a_host() -> None:
    on = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b"}
    order = ["a1", "a2", "a3", "b1", "b2"]
    assert batches(order, 2, None, on) == [["a1", "a2"], ["a3", "b1"], ["b2"]]
    assert batches(order, 2, 1, on) == [["a1", "b1"], ["a2", "b2"], ["a3"]]
    assert batches(order, 4, 2, on) == [["a1", "a2", "b1", "b2"], ["a3"]]
    for per in (1, 2):
        for b in batches(order, 3, per, on):
            assert max(sum(1 for g in b if on[g] == h) for h in "ab") <= per


def _spec(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "fleet.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.mark.parametrize("hosts_value,guest_extra,message", [
    ({"a": {"uri": "not a uri"}}, {}, "hosts.a.uri: expected a libvirt URI"),
    ({"a": {"uri": TEST_URI, "root": "relative"}}, {}, "hosts.a.root: expected an absolute folder path"),
    ({"a": {"uri": TEST_URI, "accel": "turbo"}}, {}, "hosts.a.accel: expected tcg or kvm"),
    ({"a": {"uri": TEST_URI, "ur": 1}}, {}, "did you mean 'uri'"),
    ({"a": {"uri": TEST_URI}}, {"host": "b"}, "guests[0].host: unknown host 'b'"),
    ([TEST_URI], {}, "hosts: expected a mapping"),
])
def test_bad_hosts_in_a_spec_are_one_line(tmp_path: Path, hosts_value: object, guest_extra: dict[str, str],
                                          message: str) -> None:
    p = _spec(tmp_path, {"hosts": hosts_value, "guests": [{"name": "g1", "image": "tiny:v1", **guest_extra}]})
    with pytest.raises(ValidationError) as err:
        fleetspec.load(p)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_placement_fills_the_host_with_the_fewest_guests(ctx: Context, tmp_path: Path) -> None:
    p = _spec(tmp_path, {"hosts": {"a": {"uri": TEST_URI}, "b": {"uri": TEST_URI}},
                         "guests": [{"name": f"g{i}", "image": "tiny:v1", **({"host": "a"} if i == 1 else {})}
                                    for i in range(1, 6)]})
    spec = fleetspec.load(p)
    for name, h in spec.hosts.items():
        hosts.add(ctx, name, h["uri"])
    placed = reconcile.place(ctx, spec, spec.guests)
    # g1 is on a by the spec; then b (fewer), then a and b in turn (equal free memory: by name)
    assert placed == {"g1": "a", "g2": "b", "g3": "a", "g4": "b", "g5": "a"}
    no_hosts = fleetspec.load(_spec(tmp_path, {"guests": [{"name": "g1", "image": "tiny:v1"}]}))
    assert reconcile.place(ctx, no_hosts, no_hosts.guests) == {"g1": None}


def test_a_rollout_record_is_data(ctx: Context) -> None:
    """A pending rollout names guests that --resume swaps: names that are not guests of this home
    (or not names at all) are dropped, and a record left with none is removed."""
    ctx.store.put(swap.ROLLOUT_KIND, "r1", {"to_image": "v2", "strategy": "warm", "batch": "x",
                                            "pending": ["ghost", "../../etc", 7]})
    ctx.store.put(swap.ROLLOUT_KIND, "r2", {"pending": "not a list"})
    assert swap.pending_rollouts(ctx) == [("r1", {"to_image": "v2", "strategy": "warm", "batch": "x",
                                                 "pending": []})]
    assert swap.resume(ctx) == []
    assert ctx.store.get(swap.ROLLOUT_KIND, "r1") is None
