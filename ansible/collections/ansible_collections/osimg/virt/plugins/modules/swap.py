#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: osimg developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: swap
short_description: Replace the OS of running osimg guests with a rolling warm or cold swap
version_added: 1.0.0
description:
  - Moves running guests to another captured image with minimal downtime through the orchestrator's Python API,
    as C(osimg swap GUEST... --to IMAGE) does. Each guest keeps its data volume and its customization;
    a guest whose new OS fails its health check is rolled back to its old OS.
  - Guests go batch by batch (a batch in parallel); the rollout stops once O(max_failures) guests failed,
    and the guests after that are not attempted.
  - Guests may live on several libvirt hosts (registered with C(osimg host add) or by a fleet spec's C(hosts));
    O(per_host) limits how many guests of one host are swapped at once. When a host's libvirtd stops answering,
    its guests fail or are skipped, the other hosts go on, and C(osimg swap --resume) finishes the rest once
    the host is back.
  - Idempotent. Guests already on O(to_image) are not swapped again; when all are, the task reports no change.
  - The task fails when any guest fails (rolled back, refused or not attempted); the per-guest results are
    returned with the failure.
options:
  guests:
    description:
      - The guests to move, in rollout order.
    type: list
    elements: str
    required: true
  to_image:
    description:
      - The captured catalog image to move them to. It must pass verification, and for O(strategy=warm)
        it must have a memory state (images built with M(osimg.virt.image) do).
    type: str
    required: true
    aliases: [image]
  strategy:
    description:
      - V(warm) pages the image's captured memory state into each guest (seconds of downtime);
        V(cold) shuts the guest down and boots the new OS.
    type: str
    choices: [warm, cold]
    default: warm
  batch:
    description:
      - How many guests are swapped at once.
    type: int
    default: 1
  max_failures:
    description:
      - Stop the rollout after this many failed guests.
    type: int
    default: 1
  per_host:
    description:
      - At most this many guests of one libvirt host in a batch (C(osimg swap --per-host)); guests keep their
        order as far as O(batch) and this limit allow. No limit but O(batch) when omitted.
      - Guests created with no host count as one host (this machine).
    type: int
extends_documentation_fragment:
  - osimg.virt.common
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Validates the rollout as a real run would (guests exist, the image passes verification) and returns
      the guests that would be swapped and the batches, without touching any guest.
  diff_mode:
    support: none
  platform:
    platforms: posix
seealso:
  - module: osimg.virt.image
  - module: osimg.virt.fleet
author:
  - osimg developers (@osimg)
"""

EXAMPLES = r"""
- name: Rolling warm swap of three guests to app-v2, two at a time, stop at the first failure
  osimg.virt.swap:
    guests: [web1, web2, db1]
    to_image: app-v2
    batch: 2
    max_failures: 1
  register: rollout

- name: A fleet over two hosts, four guests at once but at most two of one host
  osimg.virt.swap:
    guests: "{{ fleet.names }}"
    to_image: app-v2
    batch: 4
    per_host: 2
    max_failures: 2

- name: Show the downtime of each guest
  ansible.builtin.debug:
    msg: "{{ rollout.guest_results | items2dict(key_name='guest', value_name='downtime') }}"
"""

RETURN = r"""
guest_results:
  description:
    - One entry per guest of the rollout, in rollout order (guests already on O(to_image) are not in it).
    - Named C(guest_results) because Ansible reads a C(results) key as the items of a loop.
  returned: when a rollout ran (also on failure)
  type: list
  elements: dict
  contains:
    guest:
      description: The guest.
      type: str
      sample: web1
    ok:
      description: Whether the guest now runs the new image.
      type: bool
      sample: true
    rolled_back:
      description: Whether the swap failed and the guest was put back on its old OS.
      type: bool
      sample: false
    skipped:
      description: Not attempted because the rollout reached O(max_failures).
      type: bool
      sample: false
    from_image:
      description: The image the guest ran before.
      type: str
      sample: app-v1
    old_version:
      description: Its OS version.
      type: str
      sample: v1
    new_version:
      description: The OS version after the swap (null when it failed).
      type: str
      sample: v2
    downtime:
      description: Seconds the guest's application did not answer.
      type: float
      sample: 3.1
    counter_before:
      description: The demo application's counter before the swap (its state is on the data volume).
      type: int
      sample: 4
    counter_after:
      description: The counter after the swap; never lower than before.
      type: int
      sample: 6
    error:
      description: Why the guest failed.
      type: str
      sample: null
    steps:
      description: Seconds from the start of the guest's swap at the end of each step.
      type: dict
      sample: {"prepare": 0.6, "quiesce": 1.1, "page-in": 2.9}
    processes:
      description:
        - The process trees a warm swap carried (CRIU, Debian family), each V(resumed) on the new OS with its
          memory or V(restarted) with the reason, and the checkpoint size and the dump and restore seconds.
      type: list
      elements: dict
      sample: [{"name": "app", "outcome": "resumed", "reason": null, "checkpoint_kib": 9109,
                "dump_seconds": 0.62, "restore_seconds": 0.48}]
swapped:
  description: Guests moved to O(to_image) by this task.
  returned: always
  type: list
  elements: str
  sample: [web1, web2]
unchanged:
  description: Guests that were already on O(to_image).
  returned: always
  type: list
  elements: str
  sample: []
failed_guests:
  description: Guests that failed, were refused or were not attempted.
  returned: always
  type: list
  elements: str
  sample: []
would_swap:
  description: In check mode, the guests a real run would swap.
  returned: in check mode
  type: list
  elements: str
  sample: [web1, web2]
batches:
  description: The rollout's batches of guests (those not yet on O(to_image)), within O(batch) and O(per_host).
  returned: always
  type: list
  elements: list
  sample: [[web1], [web2]]
"""

from dataclasses import replace
from typing import Any

from ansible_collections.osimg.virt.plugins.module_utils.common import TaskFailed, new_module, plain, run

try:
    from orchestrator import guests, swap
    from orchestrator.swap.plan import batches as plan_batches
except ImportError:
    pass  # new_module() fails the task with the import error


def rollout(module: Any, ctx: Any) -> dict[str, Any]:
    p = module.params
    target = p["to_image"]
    # every guest and the image are checked first, also those that need nothing
    full = swap.plan(ctx, p["guests"], target, p["strategy"], p["batch"], p["max_failures"], p["per_host"])
    pending = [g for g in full.guests if guests.load(ctx, g).image != target]
    plan = replace(full, guests=pending, batches=plan_batches(pending, full.batch, full.per_host, full.hosts))
    out: dict[str, Any] = {"changed": bool(pending), "swapped": [], "failed_guests": [], "batches": plan.batches,
                           "unchanged": [g for g in full.guests if g not in pending]}
    if module.check_mode:
        return {**out, "would_swap": pending}
    if not pending:
        return {**out, "guest_results": []}
    results = swap.rollout(ctx, plan)
    out.update(changed=any(r.ok or r.rolled_back for r in results), guest_results=plain(results),
               swapped=[r.guest for r in results if r.ok], failed_guests=[r.guest for r in results if not r.ok])
    failed = [r for r in results if not r.ok]
    if failed:
        what = "; ".join(f"{r.guest}: {'rolled back: ' if r.rolled_back else ''}{r.error}" for r in failed)
        raise TaskFailed(f"swap to {target} failed for {len(failed)} of {len(results)} guest(s): {what}", **out)
    return out


def main() -> None:
    module = new_module(
        {
            "guests": {"type": "list", "elements": "str", "required": True},
            "to_image": {"type": "str", "required": True, "aliases": ["image"]},
            "strategy": {"type": "str", "default": "warm", "choices": ["warm", "cold"]},
            "batch": {"type": "int", "default": 1},
            "max_failures": {"type": "int", "default": 1},
            "per_host": {"type": "int"},
        },
    )
    run(module, lambda ctx: rollout(module, ctx))


if __name__ == "__main__":
    main()
