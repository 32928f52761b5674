"""Which accelerator really works here: KVM when a real probe boots with it, else TCG.

The accelerator is probed once per host configuration and remembered in ``OSIMG_HOME/accel.json``:
a hanging KVM costs the probe's full timeout, which no command should pay twice. Its own module
(not ``doctor``) because every guest creation needs the choice, and ``context`` hands it out.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

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


def _probe_key(hv: Hypervisor, device: str) -> str:
    v = hv.versions()
    return f"{v['libvirt']}|{v['hypervisor']}|{recipes.kernel_release()}|{device}|{os.path.exists(device)}"


def choose_accel(settings: Settings, hv: Hypervisor, reprobe: bool = False) -> AccelChoice:
    """KVM when a real probe boots with it, else TCG; ``OSIMG_ACCEL`` overrides."""
    if settings.accel:
        accel = "kvm" if settings.accel == "kvm" else "qemu"
        return AccelChoice(accel, f"forced by OSIMG_ACCEL={settings.accel}", time.time(), "forced")
    key = _probe_key(hv, settings.kvm_device)
    cache = settings.home / "accel.json"
    if not reprobe and cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return AccelChoice(**data)
        except (ValueError, TypeError):
            pass
    settings.ensure_dirs()
    kernel, initrd = recipes.probe_boot_files(settings)
    ok, why = hv.probe_kvm(str(kernel), str(initrd), settings.home, device=settings.kvm_device)
    choice = AccelChoice("kvm" if ok else "qemu", why if ok else f"KVM unusable: {why}; falling back to TCG",
                         time.time(), key)
    cache.write_text(json.dumps(asdict(choice)))
    return choice


