"""``host.libvirt.Hypervisor`` against libvirt's built-in ``test:///default`` driver: no QEMU, no daemon.

The model is virt-lightning's ``tests/conftest.py``. The test driver stands in for the plumbing (our
XML is accepted and read back, lookups, state changes, snapshots, save/restore, error translation),
not for QEMU: it drops ``<qemu:commandline>`` (so user-mode forwards are not visible in its XML),
writes its own save format (so ``retarget_saved_state`` is tested on libvirt's format in
test_domain.py instead), and has no device hot-plug, block resize, guest agent or QMP. Those are
checked here only for the error they raise; real-guest tests prove them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.errors import ConflictError, HypervisorError, NotFoundError
from orchestrator.host.domain import DiskSpec, DomainSpec, NetSpec
from orchestrator.host.libvirt import Hypervisor

URI = "test:///default"


@pytest.fixture(scope="module")
def hv() -> Iterator[Hypervisor]:
    h = Hypervisor(URI)
    try:
        h.versions()
    except HypervisorError as err:
        pytest.skip(f"libvirt's test driver is not available: {err}")
    yield h
    h.close()


@pytest.fixture
def make(hv: Hypervisor) -> Iterator[Callable[..., DomainSpec]]:
    """Specs with unique names; every domain made through it is undefined afterwards."""
    made: list[str] = []

    def spec(label: str = "g", net: NetSpec | None = None, metadata: dict[str, str] | None = None) -> DomainSpec:
        name = f"osimgt-{label}-{uuid.uuid4().hex[:6]}"
        made.append(name)
        return DomainSpec(
            name=name, kernel="/boot/vmlinuz", initrd="/boot/initrd.img", cmdline="console=ttyS0 root=/dev/vda",
            serial_log=f"/var/lib/osimg/guests/{name}/console.log",
            disks=[DiskSpec("vda", path=f"/var/lib/osimg/guests/{name}/os.qcow2"),
                   DiskSpec("vdb", path=f"/var/lib/osimg/guests/{name}/cidata.iso", fmt="raw", readonly=True),
                   DiskSpec("vdc", path=f"/var/lib/osimg/guests/{name}/data.qcow2", serial="osimg-data"),
                   DiskSpec("sda", bus="scsi", scsi_unit=2, readonly=True, nbd_export="base",
                            nbd_socket="/var/lib/osimg/vios/n1/nbd.sock")],
            net=net or NetSpec(mode="network", network="default", mac="52:54:00:00:00:07"),
            metadata={"home": "/var/lib/osimg", "image": "tiny:v1", "hidden": "0"} if metadata is None else metadata,
        )

    yield spec
    for name in made:
        hv.undefine(name)
        hv.destroy(name)  # a transient domain is gone after destroy; a persistent one after undefine


def test_a_defined_guest_is_listed_with_our_metadata(hv: Hypervisor, make: Callable[..., DomainSpec]) -> None:
    spec = make("list")
    hidden = make("builder", metadata={"home": "/var/lib/osimg", "hidden": "1"})
    hv.create(spec)
    hv.create(hidden)
    listed = {d.name: d for d in hv.list_domains()}
    assert listed[spec.name].metadata == spec.metadata
    assert (listed[spec.name].uuid, listed[spec.name].state, listed[spec.name].persistent) == (
        spec.uuid, "running", True)
    assert listed[hidden.name].metadata["hidden"] == "1"
    assert listed["test"].metadata == {}  # the driver's own domain: not ours
    assert hv.info(spec.name) == listed[spec.name]
    assert hv.exists(spec.name) and hv.is_active(spec.name)


@pytest.mark.parametrize("inactive", [False, True])
def test_libvirt_gives_back_the_spec_we_defined(hv: Hypervisor, make: Callable[..., DomainSpec],
                                                 inactive: bool) -> None:
    """Our parser reads libvirt's own rendering (memory in KiB, added controllers, target names)."""
    spec = make("xml")
    hv.create(spec)
    xml = hv.xml(spec.name, inactive=inactive)
    assert "<memory unit='KiB'>262144</memory>" in xml
    assert DomainSpec.from_xml(xml) == spec


def test_suspend_resume_and_freeze(hv: Hypervisor, make: Callable[..., DomainSpec]) -> None:
    spec = make("pause")
    hv.create(spec)
    hv.suspend(spec.name)
    assert hv.state(spec.name) == "paused"
    hv.resume(spec.name)
    assert hv.state(spec.name) == "running"
    assert hv.fs_freeze(spec.name) > 0
    assert hv.fs_thaw(spec.name) > 0


def test_stop_start_and_remove(hv: Hypervisor, make: Callable[..., DomainSpec]) -> None:
    spec = make("life")
    hv.create(spec)
    hv.destroy(spec.name)
    assert (hv.state(spec.name), hv.is_active(spec.name), hv.exists(spec.name)) == ("shutoff", False, True)
    hv.destroy(spec.name)  # already off: a no-op
    hv.start(spec.name)
    assert hv.state(spec.name) == "running"
    # the test driver refuses both the agent and the ACPI shutdown: this is the hard-stop fallback
    hv.shutdown(spec.name, timeout=0.2)
    assert hv.state(spec.name) == "shutoff"
    hv.start(spec.name)
    hv.undefine(spec.name)
    assert not hv.exists(spec.name)
    hv.undefine(spec.name)  # already gone: a no-op


def test_a_transient_domain_is_gone_once_destroyed(hv: Hypervisor, make: Callable[..., DomainSpec]) -> None:
    spec = make("transient")
    hv.create(spec, persistent=False)
    assert hv.info(spec.name).persistent is False
    hv.destroy(spec.name)
    assert not hv.exists(spec.name)


def test_a_second_domain_of_one_name_is_a_conflict(hv: Hypervisor, make: Callable[..., DomainSpec]) -> None:
    spec = make("dup")
    hv.create(spec)
    with pytest.raises(ConflictError, match=spec.name):
        hv.create(spec)


def test_a_failed_start_leaves_no_definition(hv: Hypervisor, make: Callable[..., DomainSpec]) -> None:
    """The test driver cannot start a domain paused: a real libvirt failure after defineXML succeeded."""
    spec = make("paused")
    with pytest.raises(HypervisorError, match=f"start {spec.name}: unsupported flags"):
        hv.create(spec, paused=True)
    assert not hv.exists(spec.name)


def test_snapshots(hv: Hypervisor, make: Callable[..., DomainSpec]) -> None:
    spec = make("snap")
    hv.create(spec)
    assert not hv.has_snapshot(spec.name, "osimg-rollback")
    hv.snapshot_create(spec.name, "osimg-rollback")
    assert hv.has_snapshot(spec.name, "osimg-rollback")
    hv.suspend(spec.name)
    hv.snapshot_revert(spec.name, "osimg-rollback")
    assert hv.state(spec.name) == "running"  # reverted to the running state it was taken in
    hv.snapshot_delete(spec.name, "osimg-rollback")
    assert not hv.has_snapshot(spec.name, "osimg-rollback")
    hv.snapshot_delete(spec.name, "osimg-rollback")  # gone: a no-op
    with pytest.raises(HypervisorError, match="revert to snapshot nope"):
        hv.snapshot_revert(spec.name, "nope")


def test_save_and_restore(hv: Hypervisor, make: Callable[..., DomainSpec], tmp_path: Path) -> None:
    spec = make("save")
    hv.create(spec)
    state = tmp_path / "state.sav"
    hv.save(spec.name, str(state))
    assert state.stat().st_size > 0 and hv.state(spec.name) == "shutoff"
    assert DomainSpec.from_xml(hv.saved_xml(str(state))) == spec
    hv.restore(str(state))
    assert hv.state(spec.name) == "running"
    with pytest.raises(HypervisorError, match="read saved state"):
        hv.saved_xml(str(tmp_path / "missing.sav"))


UNKNOWN: list[tuple[str, Callable[[Hypervisor], object]]] = [
    ("info", lambda hv: hv.info("osimgt-nope")),
    ("state", lambda hv: hv.state("osimgt-nope")),
    ("xml", lambda hv: hv.xml("osimgt-nope")),
    ("start", lambda hv: hv.start("osimgt-nope")),
    ("suspend", lambda hv: hv.suspend("osimgt-nope")),
    ("resume", lambda hv: hv.resume("osimgt-nope")),
    ("save", lambda hv: hv.save("osimgt-nope", "/nonexistent/x.sav")),
    ("shutdown", lambda hv: hv.shutdown("osimgt-nope")),
    ("snapshot_create", lambda hv: hv.snapshot_create("osimgt-nope", "s")),
    ("snapshot_revert", lambda hv: hv.snapshot_revert("osimgt-nope", "s")),
    ("attach_disk", lambda hv: hv.attach_disk("osimgt-nope", DiskSpec("vdc", path="/d.qcow2"))),
    ("agent", lambda hv: hv.agent("osimgt-nope", "guest-ping")),
    ("qmp", lambda hv: hv.qmp("osimgt-nope", {"execute": "query-status"})),
    ("fs_freeze", lambda hv: hv.fs_freeze("osimgt-nope")),
]


@pytest.mark.parametrize("call", [c for _, c in UNKNOWN], ids=[n for n, _ in UNKNOWN])
def test_unknown_names_are_not_found(hv: Hypervisor, call: Callable[[Hypervisor], object]) -> None:
    with pytest.raises(NotFoundError, match=r"no libvirt domain named 'osimgt-nope' on test:///default"):
        call(hv)


def test_questions_about_unknown_names_answer_no(hv: Hypervisor) -> None:
    assert not hv.exists("osimgt-nope")
    assert not hv.is_active("osimgt-nope")
    assert not hv.has_snapshot("osimgt-nope", "s")
    assert not hv.agent_ping("osimgt-nope")
    hv.destroy("osimgt-nope")
    hv.undefine("osimgt-nope")
    hv.snapshot_delete("osimgt-nope", "s")


def test_what_the_driver_lacks_is_a_one_line_hypervisor_error(hv: Hypervisor, make: Callable[..., DomainSpec]) -> None:
    """Refusals come out as HypervisorError naming the guest and the operation, never a libvirtError."""
    spec = make("lacks")
    hv.create(spec)
    n = spec.name
    for call, what in [
        (lambda: hv.attach_disk(n, DiskSpec("vdd", path="/e.qcow2")), f"{n}: attach disk vdd"),
        (lambda: hv.detach_disk(n, DiskSpec("vdc", path="/d.qcow2")), f"{n}: detach disk vdc"),
        (lambda: hv.block_resize(n, "vda", 1 << 30), f"{n}: resize vda"),
        (lambda: hv.agent(n, "guest-ping"), f"{n}: guest agent guest-ping"),
        (lambda: hv.qmp(n, {"execute": "query-status"}), f"{n}: qmp query-status"),
    ]:
        with pytest.raises(HypervisorError) as err:
            call()
        assert str(err.value).startswith(what + ": ") and "\n" not in str(err.value)
    assert not hv.agent_ping(n)


def test_an_unreachable_host_is_one_line() -> None:
    with pytest.raises(HypervisorError, match=r"cannot reach libvirtd at test:///nonexistent/osimg\.xml"):
        Hypervisor("test:///nonexistent/osimg.xml").versions()


def test_versions_name_the_host(hv: Hypervisor) -> None:
    v = hv.versions()
    assert v["uri"] == URI and v["hypervisor"].startswith("TEST ")
    assert v["libvirt"].count(".") == 2
