"""The handle every API call takes: settings, a lazily opened libvirt connection, cluster store and accelerator."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

from .accel import AccelChoice, choose_accel
from .cluster.open import open_store
from .cluster.store import ClusterStore
from .host.libvirt import Hypervisor
from .settings import UMASK, Settings


@dataclass
class Context:
    settings: Settings
    _hv: Hypervisor | None = field(default=None, repr=False)
    _accel: AccelChoice | None = field(default=None, repr=False)
    _store: ClusterStore | None = field(default=None, repr=False)
    _parent: Context | None = field(default=None, repr=False)
    _children: dict[str, Context] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # every file osimg (or a tool it runs) creates is root's and QEMU's group's alone: 0640, 0750
        os.umask(UMASK)

    @classmethod
    def from_env(cls, home: str | None = None, uri: str | None = None, store: str | None = None) -> Context:
        return cls(Settings.from_env(home=home, uri=uri, store=store))

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            self._hv = Hypervisor(self.settings.uri, home=str(self.settings.home))
        return self._hv

    @property
    def accel(self) -> AccelChoice:
        if self._accel is None:
            self._accel = choose_accel(self.settings, self.hv)
        return self._accel

    def child(self, uri: str, accel: str) -> Context:
        """The handle for another libvirt host: its own connection and accelerator (a remote host's
        is its record's, see ``hosts.Host``), this one's cluster store. Kept while this one lives."""
        if self._parent is not None:
            return self._parent.child(uri, accel)
        key = f"{accel} {uri}"
        if key not in self._children:
            c = Context(replace(self.settings, uri=uri, accel=accel), _parent=self)
            c._accel = AccelChoice("kvm" if accel == "kvm" else "qemu", f"the host record says {accel}",
                                   time.time(), f"host {uri}")
            self._children[key] = c
        return self._children[key]

    @property
    def store(self) -> ClusterStore:
        """The cluster store (image catalog, swap journal, locks); opened on first use."""
        if self._parent is not None:
            return self._parent.store
        if self._store is None:
            self.settings.ensure_dirs()
            self._store = open_store(self.settings.store_url)
        return self._store

    def close(self) -> None:
        for c in self._children.values():
            c.close()
        self._children.clear()
        if self._hv is not None:
            self._hv.close()
            self._hv = None
        if self._store is not None:
            self._store.close()
            self._store = None
