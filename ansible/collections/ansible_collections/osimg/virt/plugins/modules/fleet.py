#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: osimg developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet
short_description: Bring an osimg fleet up or down from its YAML spec
version_added: 1.0.0
description:
  - Converges the libvirt host to a fleet spec (the YAML file C(osimg fleet up) reads, see C(examples/fleet.yaml))
    through the orchestrator's Python API.
  - V(present) is C(osimg fleet up), it creates the missing guests, starts stopped ones and resumes paused ones, then
    waits until they answer SSH. A guest whose spec changed since it was created, or a guest of the same name the fleet did not
    create, makes the task fail before anything is changed, with the command's message.
  - V(absent) is C(osimg fleet down), it removes the fleet's guests with their overlays, config drives and data
    volumes; the shared images stay.
  - The task reports a change exactly when the fleet did something (a guest created, started, resumed or removed).
  - A spec may spread the fleet over several libvirt hosts (its C(hosts) mapping, each with a C(uri) and optionally
    a C(root) folder and C(accel)); V(present) registers them, and each guest goes to the host its C(host) names or,
    without one, to the host with the fewest guests, then the most free memory. Images reach each host through
    libvirt (uploaded to a storage pool there and checked by hash). Roll such a fleet with M(osimg.virt.swap) and
    its O(osimg.virt.swap#module:per_host) option.
options:
  spec:
    description:
      - Path of the fleet spec on the managed host. Relative paths are relative to the module's working
        directory, so give an absolute one.
    type: path
    required: true
  state:
    description:
      - V(present) (fleet up) or V(absent) (fleet down).
    type: str
    choices: [present, absent]
    default: present
  prune:
    description:
      - With V(present), also remove guests this fleet created that are no longer in the spec (C(--prune)).
        Without it they are kept and reported as C(kept).
    type: bool
    default: false
  wait:
    description:
      - With V(present), wait until the guests created or started answer SSH.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for the guests.
    type: float
    default: 300
notes:
  - The spec's C(uri) selects the libvirt host unless O(uri) is given, as with C(osimg --uri).
extends_documentation_fragment:
  - osimg.virt.common
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details:
      - Reports what each guest would go through (the same actions as a real run) after the same checks (the spec,
        its images, name clashes and drift).
      - A spec naming a catalog image that does not exist yet fails in check mode too, even when an earlier task of
        the play would build it.
  diff_mode:
    support: none
  platform:
    platforms: posix
seealso:
  - module: osimg.virt.swap
  - module: osimg.virt.guest
author:
  - osimg developers (@osimg)
"""

EXAMPLES = r"""
- name: Bring the fleet up (a second run changes nothing)
  osimg.virt.fleet:
    spec: /srv/osimg/fleet.yaml
  register: fleet

- name: Swap its guests to v2
  osimg.virt.swap:
    guests: "{{ fleet.names }}"
    to_image: app-v2

- name: A fleet over two libvirt hosts (the spec names them), rolled two at a time, at most one per host
  osimg.virt.fleet:
    spec: /srv/osimg/fleet-two-hosts.yaml   # hosts: {a: {uri: "qemu:///system"}, b: {uri: "qemu+ssh://root@b/system"}}
  register: fleet2

- name: Roll it to v2
  osimg.virt.swap:
    guests: "{{ fleet2.names }}"
    to_image: app-v2
    batch: 2
    per_host: 1

- name: Tear it down
  osimg.virt.fleet:
    spec: /srv/osimg/fleet.yaml
    state: absent
"""

RETURN = r"""
fleet:
  description: The fleet's name.
  returned: always
  type: str
  sample: demo
names:
  description: The guests of the spec, in its order.
  returned: always
  type: list
  elements: str
  sample: [web1, web2]
guests:
  description: One entry per guest of the spec or of the fleet's record, with what was done (or would be in check mode).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The guest.
      type: str
      sample: web1
    action:
      description: One of C(created), C(started), C(resumed), C(unchanged), C(removed), C(absent), C(kept).
      type: str
      sample: created
    detail:
      description: Why, in words.
      type: str
      sample: overlay on app-v1
    ready_seconds:
      description: Seconds until the guest answered SSH, when it was waited for.
      type: float
      sample: 5.4
placed:
  description:
    - The host each guest of the spec that exists runs on (null for this machine's libvirt, in a spec without
      C(hosts)); in check mode guests still to be created are not in it.
  returned: always
  type: dict
  sample: {"web1": "a", "web2": "b"}
summary:
  description: One line, as C(osimg fleet up) prints it.
  returned: always
  type: str
  sample: "fleet demo: 2 created"
"""

from typing import Any

from ansible_collections.osimg.virt.plugins.module_utils.common import new_module, plain, run

try:
    from orchestrator import guests
    from orchestrator.errors import NotFoundError
    from orchestrator.fleet import reconcile
    from orchestrator.fleet import spec as fleetspec
except ImportError:
    pass  # new_module() fails the task with the import error


def converge(module: Any, ctx: Any) -> dict[str, Any]:
    p = module.params
    spec = fleetspec.load(p["spec"], ctx)
    # like 'osimg --uri': the option beats the spec's uri, which beats OSIMG_URI
    fctx = ctx if p["uri"] else reconcile.context_for(ctx, spec)
    try:
        if p["state"] == "present":
            # plan_up is what up checks and decides before its first change
            res = (reconcile.plan_up(fctx, spec, p["prune"]) if module.check_mode else
                   reconcile.up(fctx, spec, wait=p["wait"], prune=p["prune"], timeout=p["timeout"]))
        else:
            res = reconcile.plan_down(fctx, spec) if module.check_mode else reconcile.down(fctx, spec)
    finally:
        if fctx is not ctx:
            fctx.close()
    return {"changed": res.changed, "fleet": res.fleet, "names": [g.name for g in spec.guests],
            "guests": plain(res.actions), "placed": placed(ctx, [g.name for g in spec.guests]),
            "summary": res.summary()}


def placed(ctx: Any, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        try:
            out[name] = guests.load(ctx, name).host
        except NotFoundError:
            continue
    return out


def main() -> None:
    module = new_module(
        {
            "spec": {"type": "path", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "prune": {"type": "bool", "default": False},
            "wait": {"type": "bool", "default": True},
            "timeout": {"type": "float", "default": 300},
        },
    )
    run(module, lambda ctx: converge(module, ctx))


if __name__ == "__main__":
    main()
