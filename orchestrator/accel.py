"""Which accelerator really works here: KVM when a real probe boots with it, else TCG.

The accelerator is probed once per host configuration (libvirt URI and version, QEMU, kernel, KVM
device) and remembered in the machine's build cache (``OSIMG_CACHE/accel.json``, one verdict per
configuration): a hanging KVM costs the probe's full timeout, which no command should pay twice, and
whether KVM works is a property of the machine, not of one OSIMG_HOME (a new home, the demo's or a
test session's, does not probe again). Its own module (not ``doctor``) because every guest creation
needs the choice, and ``context`` hands it out.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import recipes
from .host.libvirt import Hypervisor
from .settings import Settings


@dataclass
class AccelChoice:
    accel: str  # libvirt domain type: "kvm" or "qemu" (TCG)
    reason: str
    probed_at: float
    key: str

    @property
    def label(self) -> str:
        return "KVM" if self.accel == "kvm" else "TCG (software emulation)"


def _probe_key(settings: Settings, hv: Hypervisor) -> str:
    v = hv.versions()
    device = settings.kvm_device
    return (f"{settings.uri}|{v['libvirt']}|{v['hypervisor']}|{recipes.kernel_release()}|{device}|"
            f"{os.path.exists(device)}")


def _cached(path: Path) -> dict[str, dict[str, Any]]:
    """The remembered verdicts by key; an unreadable or foreign file counts as none (probe again).
    Data, not trust: only a verdict filed under its own key, naming one of the two domain types and
    when it was probed, is kept."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("verdicts") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items()
            if isinstance(v, dict) and v.get("key") == k and v.get("accel") in ("kvm", "qemu")
            and isinstance(v.get("probed_at"), (int, float)) and isinstance(v.get("reason"), str)}


def choose_accel(settings: Settings, hv: Hypervisor, reprobe: bool = False) -> AccelChoice:
    """KVM when a real probe boots with it, else TCG; ``OSIMG_ACCEL`` overrides."""
    if settings.accel:
        accel = "kvm" if settings.accel == "kvm" else "qemu"
        return AccelChoice(accel, f"forced by OSIMG_ACCEL={settings.accel}", time.time(), "forced")
    key = _probe_key(settings, hv)
    path = cache_file(settings)
    hit = None if reprobe else _cached(path).get(key)
    if hit is not None:
        return AccelChoice(hit["accel"], hit["reason"], float(hit["probed_at"]), key)
    settings.ensure_dirs()
    kernel, initrd = recipes.probe_boot_files(settings)
    ok, why = hv.probe_kvm(str(kernel), str(initrd), settings.home, device=settings.kvm_device)
    choice = AccelChoice("kvm" if ok else "qemu", why if ok else f"KVM unusable: {why}; falling back to TCG",
                         time.time(), key)
    entries = _cached(path)
    entries[key] = asdict(choice)
    # a verdict per configuration (the last 20): a reprobe with a test device keeps the real one
    keep = dict(sorted(entries.items(), key=lambda kv: float(kv[1]["probed_at"]))[-20:])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"verdicts": keep}, indent=1))
    os.replace(tmp, path)  # whole or not at all: two commands probing at once each leave a valid file
    return choice


def cache_file(settings: Settings) -> Path:
    """Where the verdicts are remembered (readable by all: they hold no secret)."""
    return settings.cache / "accel.json"
