#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: osimg developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: guest
short_description: Create, start and remove one osimg guest
version_added: 1.0.0
description:
  - Manages one client guest on the libvirt host through the orchestrator's Python API; a guest is a libvirt
    domain on its own qcow2 overlay of a read-only image, with an optional data volume and a per-guest
    customization delivered on a NoCloud config drive.
  - V(present) creates the guest when it is missing (C(osimg guest create)), which boots it; an existing guest
    is left as it is, running or not. V(running) also starts a stopped guest, resumes a paused one and waits until
    it answers SSH. V(absent) destroys it with its overlay, config drive and data volume (C(osimg guest rm)).
  - An existing guest is never rebuilt. When its memory, vCPUs, data volume size or one of the customization
    options given to the task differ from what it was created with, the task fails and names the differences;
    remove the guest first to recreate it. O(image) is only used at creation, because a swap
    (M(osimg.virt.swap)) moves a guest to another image on purpose; the image it runs is returned.
options:
  name:
    description:
      - The guest's name (also its libvirt domain's name).
    type: str
    required: true
  state:
    description:
      - V(present), V(running) or V(absent); see the description.
    type: str
    choices: [present, running, absent]
    default: present
  image:
    description:
      - A catalog image or a recipe C(FAMILY:VERSION). Required to create the guest.
    type: str
  host:
    description:
      - A registered libvirt host (C(osimg host add NAME URI), or a fleet spec's C(hosts)) to create the guest on,
        as C(osimg guest create --host) does; the image must then be a catalog image, and it is uploaded to the
        host through libvirt and verified there when the host lacks it.
      - When omitted, a new guest is created on this machine's libvirt (O(uri)) with its files under O(home).
      - A guest stays where it was created; an existing guest on another host than the one given makes the task
        fail.
    type: str
  memory:
    description:
      - Memory in MiB. Default is the image's.
    type: int
  vcpus:
    description:
      - Virtual CPUs (1 when omitted at creation).
    type: int
  data_size:
    description:
      - Size of the guest's data volume (ext4, mounted at C(/data)), for example V(64M) or V(2G); a plain number
        means MiB. No data volume when omitted.
    type: str
  hostname:
    description:
      - The guest's host name (default its name).
    type: str
  address:
    description:
      - Static IPv4 address with prefix length, for example V(10.0.2.21/24).
    type: str
  gateway:
    description:
      - Default gateway; needs O(address).
    type: str
  users:
    description:
      - Accounts to create.
    type: list
    elements: dict
    suboptions:
      name:
        description: User name.
        type: str
        required: true
      uid:
        description: Numeric user ID.
        type: int
      groups:
        description: Supplementary groups (created when missing).
        type: list
        elements: str
        default: []
      shell:
        description: Login shell.
        type: str
        default: /bin/sh
      ssh_authorized_keys:
        description: OpenSSH public key lines.
        type: list
        elements: str
        default: []
  groups:
    description:
      - Groups to create.
    type: list
    elements: str
  mounts:
    description:
      - File systems to mount.
    type: list
    elements: dict
    suboptions:
      device:
        description: C(UUID=...), C(LABEL=...), a C(/dev) path or C(tmpfs).
        type: str
        required: true
      path:
        description: Absolute mount point.
        type: str
        required: true
      fstype:
        description: File system type.
        type: str
        default: ext4
      options:
        description: Mount options.
        type: str
        default: defaults
  init_scripts:
    description:
      - Shell commands run at first boot.
    type: list
    elements: str
  kernel_modules:
    description:
      - Kernel modules to load.
    type: list
    elements: str
  kernel_params:
    description:
      - Extra kernel command line parameters (one word each).
    type: list
    elements: str
  wait:
    description:
      - Wait until a guest this task created or started answers SSH.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for the guest.
    type: float
    default: 120
extends_documentation_fragment:
  - osimg.virt.common
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reports whether the guest would be created, started, resumed or removed, after the same checks.
  diff_mode:
    support: none
  platform:
    platforms: posix
seealso:
  - module: osimg.virt.fleet
author:
  - osimg developers (@osimg)
"""

EXAMPLES = r"""
- name: A running guest on the golden image, with a data volume and an account
  osimg.virt.guest:
    name: web1
    state: running
    image: app-v1
    memory: 256
    data_size: 64M
    hostname: web1.example.test
    address: 10.0.2.21/24
    gateway: 10.0.2.2
    users:
      - name: alice
        groups: [ops]
        ssh_authorized_keys:
          - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILk5UUsVHT67UTXAWokwGzHsfiDy7l0E55YLxahmfjHF alice@example
    init_scripts:
      - echo configured >/var/log/hello

- name: A guest on the registered host b (its files in b's storage pools, reached through libvirt)
  osimg.virt.guest:
    name: web2
    state: running
    image: app-v1
    host: b
    data_size: 64M

- name: Remove it with its overlay, config drive and data volume
  osimg.virt.guest:
    name: web1
    state: absent
"""

RETURN = r"""
guest:
  description:
    - The guest as it is after the task (in check mode, as it is now). Absent after O(state=absent).
  returned: when the guest exists
  type: dict
  contains:
    name:
      description: The guest's name.
      type: str
      sample: web1
    image:
      description: The image it runs (changes with a swap).
      type: str
      sample: app-v1
    os_version:
      description: The OS version of that image.
      type: str
      sample: v1
    host:
      description: The registered host it runs on (null for this machine's libvirt).
      type: str
      sample: b
    state:
      description: The libvirt domain state.
      type: str
      sample: running
    accel:
      description: V(kvm) or V(tcg).
      type: str
      sample: tcg
    ssh_port:
      description: SSH forward on 127.0.0.1.
      type: int
      sample: 40123
    app_port:
      description: Application forward on 127.0.0.1.
      type: int
      sample: 40124
    data_size:
      description: Size of the data volume in bytes (0 without one).
      type: int
      sample: 67108864
    ready_seconds:
      description: Seconds until it answered SSH, when this task waited for it.
      type: float
      sample: 5.2
action:
  description: What the task did (or would do in check mode).
  returned: always
  type: str
  sample: created
"""

from typing import Any

from ansible_collections.osimg.virt.plugins.module_utils.common import new_module, run, size_bytes

try:
    from orchestrator import guests, hosts
    from orchestrator.customize import Customization, Mount, User
    from orchestrator.errors import ConflictError, NotFoundError, ValidationError
    from orchestrator.validate import name as valid_name
except ImportError:
    pass  # new_module() fails the task with the import error

CUSTOM_KEYS = ("hostname", "address", "gateway", "users", "groups", "mounts", "init_scripts", "kernel_modules",
               "kernel_params")


def customization(params: dict[str, Any]) -> Customization:
    return Customization(
        hostname=params["hostname"], address=params["address"], gateway=params["gateway"],
        users=[User(**u) for u in params["users"] or []], groups=list(params["groups"] or []),
        mounts=[Mount(**m) for m in params["mounts"] or []], init_scripts=list(params["init_scripts"] or []),
        kernel_modules=list(params["kernel_modules"] or []), kernel_params=list(params["kernel_params"] or []),
    ).validate(f"guest {params['name']}")


def differences(g: Any, params: dict[str, Any], data_size: int | None) -> list[str]:
    """What the task asks for that the existing guest was not created with (options not given are not
    compared): the orchestrator's own drift rule, the one ``osimg fleet`` uses."""
    wanted = customization(params).to_dict()
    recorded = guests.config_of(g)
    recorded["memory"] = recorded.pop("memory_mib")  # named as the task's option in the messages
    asked = {"memory": params["memory"], "vcpus": params["vcpus"], "data_size": data_size,
             "customization": {k: wanted[k] if params[k] is not None else None for k in CUSTOM_KEYS}}
    return guests.config_drift(recorded, asked, only_given=True)


def describe(ctx: Any, g: Any, ready: float | None = None) -> dict[str, Any]:
    return {"name": g.name, "image": g.image, "os_version": g.os_version, "host": g.host,
            "state": guests.status(ctx, g),
            "accel": g.accel, "ssh_port": g.ssh_port, "app_port": g.app_port, "data_size": g.data_size,
            "ready_seconds": ready}


def ensure(module: Any, ctx: Any) -> dict[str, Any]:
    p = module.params
    name = p["name"]
    valid_name(name, "guest name")
    data_size = size_bytes(p["data_size"], "data_size") if p["data_size"] is not None else None
    try:
        g = guests.load(ctx, name)
    except NotFoundError:
        g = None

    if p["state"] == "absent":
        if g is None:
            return {"changed": False, "action": "absent"}
        if not module.check_mode:
            guests.remove(ctx, name)
        return {"changed": True, "action": "removed"}

    if g is None:
        if not p["image"]:
            raise ValidationError(f"guest {name} does not exist; give an image to create it")
        custom = customization(p)
        if module.check_mode:
            # an unregistered host fails here as in a real run
            if hosts.context(ctx, p["host"]).hv.exists(name):
                raise ConflictError(f"libvirt already has a domain named {name!r}; choose another guest name")
            return {"changed": True, "action": "created"}
        g = guests.create(ctx, name, p["image"], custom=custom, memory_mib=p["memory"], vcpus=p["vcpus"] or 1,
                              data_size=data_size or 0, host=p["host"])
        ready = guests.wait_ready(ctx, g, timeout=p["timeout"]) if p["wait"] else None
        return {"changed": True, "action": "created", "guest": describe(ctx, g, ready)}

    diffs = differences(g, p, data_size)
    if p["host"] is not None and p["host"] != g.host:
        diffs.append(f"host: {g.host or 'this machine'}, the task says {p['host']} (osimg does not move guests)")
    if diffs:
        raise ConflictError(f"guest {name} differs from the task ({'; '.join(diffs)}); nothing was changed: to "
                            f"recreate it, remove it first ('osimg guest rm {name}' or state=absent)")
    if p["image"] and p["image"] != g.image:
        module.warn(f"guest {name} runs image {g.image}, not {p['image']}: the image is only used at creation "
                    f"(osimg.virt.swap moves a guest to another image)")
    state = guests.status(ctx, g)
    action = "unchanged"
    if p["state"] == "running" and state != "running":
        action = "resumed" if state == "paused" else "started"
    if action == "unchanged" or module.check_mode:
        return {"changed": action != "unchanged", "action": action, "guest": describe(ctx, g)}
    if action == "resumed":
        g.at(ctx).hv.resume(name)
        ready = None
    else:
        guests.start(ctx, g)
        ready = guests.wait_ready(ctx, g, timeout=p["timeout"]) if p["wait"] else None
    return {"changed": True, "action": action, "guest": describe(ctx, g, ready)}


def main() -> None:
    module = new_module(
        {
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["present", "running", "absent"]},
            "image": {"type": "str"},
            "host": {"type": "str"},
            "memory": {"type": "int"},
            "vcpus": {"type": "int"},
            "data_size": {"type": "str"},
            "hostname": {"type": "str"},
            "address": {"type": "str"},
            "gateway": {"type": "str"},
            "users": {"type": "list", "elements": "dict", "options": {
                "name": {"type": "str", "required": True},
                "uid": {"type": "int"},
                "groups": {"type": "list", "elements": "str", "default": []},
                "shell": {"type": "str", "default": "/bin/sh"},
                "ssh_authorized_keys": {"type": "list", "elements": "str", "default": [], "no_log": False},
            }},
            "groups": {"type": "list", "elements": "str"},
            "mounts": {"type": "list", "elements": "dict", "options": {
                "device": {"type": "str", "required": True},
                "path": {"type": "str", "required": True},
                "fstype": {"type": "str", "default": "ext4"},
                "options": {"type": "str", "default": "defaults"},
            }},
            "init_scripts": {"type": "list", "elements": "str"},
            "kernel_modules": {"type": "list", "elements": "str"},
            "kernel_params": {"type": "list", "elements": "str"},
            "wait": {"type": "bool", "default": True},
            "timeout": {"type": "float", "default": 120},
        },
    )
    run(module, lambda ctx: ensure(module, ctx))


if __name__ == "__main__":
    main()
