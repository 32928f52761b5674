# -*- coding: utf-8 -*-
# Copyright: osimg developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""Options every osimg.virt module shares: where osimg keeps its state and which host it drives."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  home:
    description:
      - The osimg state folder (image repository, guests, cluster database) on the managed host.
      - Defaults to the C(OSIMG_HOME) environment variable of the module, then C(/var/lib/osimg).
      - QEMU's user (C(libvirt-qemu)) must be able to traverse it.
    type: path
  uri:
    description:
      - The libvirt URI, for example C(qemu:///system) or C(qemu+ssh://host/system).
      - Defaults to C(OSIMG_URI), then C(qemu:///system).
    type: str
  store:
    description:
      - The cluster store URL, for example C(sqlite:///var/lib/osimg/cluster.sqlite) or C(etcds://127.0.0.1:2379) (etcd over TLS with a client certificate).
      - Defaults to C(OSIMG_STORE), then an SQLite file in I(home).
    type: str
requirements:
  - Python 3.11 or later on the managed host, with the C(osimg) package (its C(orchestrator) module) installed
    in the interpreter Ansible uses there (set C(ansible_python_interpreter) to the osimg virtualenv's python).
  - libvirtd and QEMU on the managed host.
notes:
  - The modules call the orchestrator's Python API, not the C(osimg) command; errors carry the same messages
    as the command's.
"""
